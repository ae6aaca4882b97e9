"""GPU checks of the speed switches (`python -m pytest -m gpu` on a CUDA machine; deselected by default).

The CPU suite proves padding-free equals padded with sdpa and eager attention; what only a GPU can show is that the
plan phitune picks there (padding-free batches, flex_attention or flash_attention_2, selective checkpointing) is
really in effect and keeps the gradients in bf16. Gradients are compared tensor by tensor (tests/_equivalence.py),
raw (max_grad_norm 0): a silent fallback to another path, or a gradient scaled by a wrong normalisation, fails.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from _equivalence import gradient_mismatches, without_signal
from test_speed import _checkpoint_func, _examples, _lora_model, _loss_and_grads, _step_mismatches, _train

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
    assert fast.config._attn_implementation == attn
    loss_ref, grads_ref = _loss_and_grads(reference, {k: v.to("cuda") for k, v in padded.items()})
    loss_fast, grads_fast = _loss_and_grads(fast, {k: v.to("cuda") if torch.is_tensor(v) else v
                                                   for k, v in packed.items()})
    torch.testing.assert_close(loss_fast.float(), loss_ref.float(), **BF16_TOL)
    assert without_signal(grads_ref) == []
    assert gradient_mismatches(grads_fast, grads_ref, torch.bfloat16) == []


def test_gpu_defaults_are_in_effect_and_give_the_plain_paths_gradients(make_config):
    """phitune's CUDA defaults against all switches off, both in bf16: the plan actually in effect (padding-free
    batches, flex or flash attention, selective checkpointing: a silent fallback fails here), and the raw gradients
    of both steps equal to the dtype's tolerance."""
    from phitune.speed import auto_attention

    bf16 = {"model": {"torch_dtype": "bfloat16"}, "training": {"bf16": True}}
    fast = _train(make_config, {}, bf16["training"], bf16["model"])
    plain = _train(make_config, {"padding_free": "false", "liger": "false", "activation": "none"}, bf16["training"],
                   {**bf16["model"], "attn_implementation": "sdpa"})
    assert getattr(fast.data_collator, "padding_free", False) is True
    assert getattr(plain.data_collator, "padding_free", False) is False
    attention = fast.model.get_base_model().config._attn_implementation
    assert attention == auto_attention(padding_free=True) and attention in ("flex_attention", "flash_attention_2")
    selective = _checkpoint_func(fast)
    assert selective is not None and "context_fn" in selective.keywords  # selective recomputation, installed
    assert _checkpoint_func(plain) is None
    assert next(fast.model.parameters()).device.type == "cuda"
    assert _step_mismatches(fast, plain, torch.bfloat16) == []
