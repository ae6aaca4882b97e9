"""GPU checks of the speed switches (`python -m pytest -m gpu` on a CUDA machine; deselected by default).

The CPU suite proves padding-free equals padded with sdpa and eager attention; what only a GPU can show is that the
attention phitune picks there (flex_attention, or flash_attention_2 when installed) keeps the math in bf16.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from test_speed import _examples, _lora_model, _loss_and_grads

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BF16_TOL = dict(rtol=2e-2, atol=2e-2)  # bf16 keeps 8 bits of mantissa; summation order differs between layouts

GPU_ATTENTIONS = ["flex_attention"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


@pytest.mark.parametrize("attn", GPU_ATTENTIONS)
def test_padding_free_on_gpu_attention_equals_padded_sdpa(tiny_model_dir, attn):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = _examples([5, 23, 11, 40])
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(examples)
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    reference = _lora_model(tiny_model_dir, "sdpa").to("cuda", torch.bfloat16)
    fast = _lora_model(tiny_model_dir, attn).to("cuda", torch.bfloat16)
    loss_ref, grads_ref = _loss_and_grads(reference, {k: v.to("cuda") for k, v in padded.items()})
    loss_fast, grads_fast = _loss_and_grads(fast, {k: v.to("cuda") if torch.is_tensor(v) else v
                                                   for k, v in packed.items()})
    torch.testing.assert_close(loss_fast.float(), loss_ref.float(), **BF16_TOL)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads_fast[name].float(), grad.float(), **BF16_TOL, msg=name)


def test_gpu_defaults_train_and_match_the_plain_path(make_config, tmp_path):
    """phitune's CUDA defaults (padding-free, chosen attention, selective checkpointing) against all switches off."""
    from phitune.train import run_training

    common = {"max_steps": 6, "eval_strategy": "no", "lr_scheduler_type": "constant", "bf16": True}
    fast = run_training(make_config(training_config={**common, "output_dir": str(tmp_path / "fast")}))
    plain = run_training(make_config(
        model={"attn_implementation": "sdpa"},
        speed={"padding_free": "false", "liger": "false", "activation": "none"},
        training_config={**common, "output_dir": str(tmp_path / "plain")},
    ))
    assert fast.metrics["train_loss"] == pytest.approx(plain.metrics["train_loss"], rel=2e-2)
