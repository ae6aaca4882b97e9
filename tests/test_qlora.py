"""QLoRA on CPU: the base loads as bitsandbytes 4-bit layers, a short run lowers the loss, and its adapter merges
into the unquantised base.

The model is 192 wide because bitsandbytes' CPU 4-bit kernels need each weight's input size to be a multiple of the
64-value quantisation block and its output size a multiple of 32 (Phi-3-mini's 3072 / 8192 are).
"""

from __future__ import annotations

import pytest
import torch

from phitune.config import config_from_dict
from phitune.tiny import DEMO_DATA, build_tiny_model

bnb = pytest.importorskip("bitsandbytes")

QUANTIZATION = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                "bnb_4bit_compute_dtype": "float32"}  # bfloat16 on a GPU; float32 is the fast CPU choice


@pytest.fixture(scope="module")
def qlora_config(tmp_path_factory):
    base = build_tiny_model(tmp_path_factory.mktemp("tiny192"), vocab_size=512, hidden=192, layers=2)
    return config_from_dict({
        "model": {"name_or_path": str(base), "torch_dtype": "float32", "quantization": QUANTIZATION},
        "data": {"train": str(DEMO_DATA / "train.jsonl"), "eval": str(DEMO_DATA / "eval.jsonl"),
                 "max_seq_length": 128, "max_train_examples": 96, "max_eval_examples": 16},
        "training_config": {"output_dir": str(tmp_path_factory.mktemp("qlora-run")), "max_steps": 8,
                            "learning_rate": 5e-3, "per_device_train_batch_size": 12, "logging_steps": 1,
                            "save_strategy": "no", "eval_strategy": "no", "report_to": "none", "seed": 0},
        "peft_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
    })


def test_qlora_base_is_4bit(qlora_config):
    from phitune.train import load_model_for_training

    model, peft_config = load_model_for_training(qlora_config)
    linear4bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4bit) == 2 * 4  # qkv_proj, o_proj, gate_up_proj, down_proj in each of 2 layers
    assert model.model.layers[0].self_attn.qkv_proj.weight.quant_state.quant_type == "nf4"
    assert peft_config.target_modules == "all-linear" or "qkv_proj" in peft_config.target_modules


def test_qlora_training_lowers_loss_and_merges(qlora_config, tmp_path):
    from phitune.generate import load_for_inference, resolve_model_source
    from phitune.merge import merge_adapter
    from phitune.train import run_training

    result = run_training(qlora_config)
    assert result.metrics["eval_loss_after"] < result.metrics["eval_loss_before"]
    assert result.metrics["train_loss"] < result.metrics["eval_loss_before"]
    merged = merge_adapter(*resolve_model_source(result.output_dir), tmp_path / "merged")
    assert merged.dequantized
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(merged.output_dir, dtype=torch.float32)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())
    # Merged into the unquantised base: equal to (unquantised base + adapter), not to the 4-bit model.
    from dataclasses import replace

    model_cfg, adapter = resolve_model_source(result.output_dir)
    reference, _ = load_for_inference(replace(model_cfg, quantization=None), adapter)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=0)
