"""QLoRA on CPU: the base loads as bitsandbytes 4-bit layers, a short run lowers the loss, and its adapter merges
into the unquantised base.

The model is 192 wide because bitsandbytes' CPU 4-bit kernels need each weight's input size to be a multiple of the
64-value quantisation block and its output size a multiple of 32 (Phi-3-mini's 3072 / 8192 are).
"""

from __future__ import annotations

import pytest
import torch

from phitune.config.schema import config_from_dict
from phitune.tiny.phi3 import DEMO_DATA, build_tiny_model

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
    from phitune.run.lifecycle import load_model_for_training
    from phitune.run.plan import plan_run

    model, peft_config = load_model_for_training(qlora_config, plan_run(qlora_config))
    linear4bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4bit) == 2 * 4  # qkv_proj, o_proj, gate_up_proj, down_proj in each of 2 layers
    assert model.model.layers[0].self_attn.qkv_proj.weight.quant_state.quant_type == "nf4"
    assert peft_config.target_modules == "all-linear" or "qkv_proj" in peft_config.target_modules


def test_qlora_training_lowers_loss_and_merges(qlora_config, tmp_path):
    from phitune.after.generate import load_for_inference, resolve_model_source
    from phitune.after.merge import merge_adapter
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


# --- bitsandbytes' packed CPU path at sizes it applies to --------------------------------------------------------
# On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight into an inference-only layout the first time its
# layer runs without gradients (phitune evaluates before training), after which the backward through that layer is
# dropped. Hidden 256 / intermediate 512 qualify for the packing (in % 64 == 0, out % 32 == 0), as Phi-3-mini does.

def _cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            return "avx512_bf16" in cpuinfo.read().split()
    except OSError:
        return False


@pytest.fixture(scope="module")
def packable_base(tmp_path_factory):
    """A 2-layer Phi-3 of 256 x 512 (sizes bitsandbytes packs) with the bundled tokenizer, stored in float32."""
    from transformers import AutoTokenizer, Phi3ForCausalLM

    from phitune.tiny.phi3 import tiny_base_path, tiny_config

    out = tmp_path_factory.mktemp("packable")
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_path())
    config = tiny_config(len(tokenizer), hidden=256, layers=2)
    config.intermediate_size = 512
    torch.manual_seed(0)
    Phi3ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _packable_config(base, output_dir, with_eval: bool):
    return config_from_dict({
        "model": {"name_or_path": str(base), "torch_dtype": "float32", "quantization": QUANTIZATION},
        "data": {"train": str(DEMO_DATA / "train.jsonl"), "eval": str(DEMO_DATA / "eval.jsonl") if with_eval else None,
                 "eval_split": 0.0, "max_seq_length": 64, "max_train_examples": 16, "max_eval_examples": 8},
        "training_config": {"output_dir": str(output_dir), "max_steps": 4, "learning_rate": 1e-3, "eval_steps": 2,
                            "per_device_train_batch_size": 4, "logging_steps": 1, "save_strategy": "no",
                            "report_to": "none", "seed": 0, "disable_tqdm": True},
        "peft_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
    })


def _train_adapter(base, output_dir, with_eval: bool) -> dict:
    """LoRA weights after 4 QLoRA steps; with an eval set the run also evaluates before step 1 and after step 2."""
    from phitune.train import run_training

    result = run_training(_packable_config(base, output_dir, with_eval))
    return {n: p.detach().clone() for n, p in result.model.named_parameters() if "lora_" in n}


@pytest.fixture(scope="module")
def adapter_without_eval(packable_base, tmp_path_factory):
    return _train_adapter(packable_base, tmp_path_factory.mktemp("no-eval"), with_eval=False)


def _assert_same_adapter(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, weight in expected.items():
        if "lora_B" in name:  # lora_A starts equal and moves by the same gradients; lora_B is where they show first
            error = ((actual[name] - weight).norm() / weight.norm()).item()
            assert error < 0.01, f"{name}: {error:.1%} away from the run without evaluation"


@pytest.mark.skipif(not _cpu_has_avx512_bf16(), reason="this CPU has no avx512_bf16, so bitsandbytes never packs "
                    "4-bit weights here (test_qlora_eval_emulating_avx512_bf16 covers the path)")
def test_qlora_with_evaluation_trains_like_without_at_packable_sizes(packable_base, adapter_without_eval, tmp_path):
    _assert_same_adapter(_train_adapter(packable_base, tmp_path, with_eval=True), adapter_without_eval)


@pytest.fixture
def emulate_avx512_bf16(monkeypatch):
    """Make bitsandbytes' 4-bit layers, created from now on, behave as on an AVX512-BF16 CPU: a layer run without
    gradients repacks its weight for the (here generic) gemv_4bit, which has no backward, exactly as there."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)


def test_qlora_eval_emulating_avx512_bf16(packable_base, adapter_without_eval, emulate_avx512_bf16, tmp_path):
    _assert_same_adapter(_train_adapter(packable_base, tmp_path, with_eval=True), adapter_without_eval)


def _packed(model) -> list[bool]:
    return [getattr(m.weight.quant_state, "packing_format_for_cpu", False)
            for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_emulation_takes_the_packed_path_for_inference(packable_base, emulate_avx512_bf16):
    """The emulation above is real: a model loaded for inference does pack its layers on the first forward."""
    from phitune.config.schema import ModelConfig
    from phitune.models.loading import load_base_model

    model = load_base_model(ModelConfig(name_or_path=str(packable_base), quantization=QUANTIZATION), training=False)
    with torch.no_grad():
        model.eval()(input_ids=torch.tensor([[5, 17, 42]]))
    assert _packed(model) and all(_packed(model))


def test_backprop_through_packed_4bit_is_an_error(packable_base, emulate_avx512_bf16):
    """If a layer ever were packed while training, torch's "autograd kernel was not registered" warning (the only
    sign that gradients are being dropped) stops the run instead of scrolling past."""
    from phitune.config.schema import ModelConfig
    from phitune.models.loading import load_base_model

    model = load_base_model(ModelConfig(name_or_path=str(packable_base), quantization=QUANTIZATION))
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True  # what phitune left on before: layers pack at the next eval
    ids = torch.tensor([[5, 17, 42]])
    with torch.no_grad():
        model.eval()(input_ids=ids)
    model.train()
    embeddings = model.get_input_embeddings()(ids).detach().requires_grad_()
    with pytest.raises(UserWarning, match="autograd kernel was not registered"):
        model(inputs_embeds=embeddings).logits.sum().backward()


def test_dropped_gradients_stop_training_with_one_line(packable_base, emulate_avx512_bf16, monkeypatch, tmp_path):
    """Were a 4-bit layer ever packed while the model trains (here: phitune's guard switched off), the run stops at
    the first backward with a one-line PhituneError, not a traceback and not a silently wrong adapter."""
    from phitune.errors import PhituneError
    from phitune.train import run_training

    monkeypatch.setattr("phitune.models.loading.keep_4bit_trainable", lambda model: None)
    with pytest.raises(PhituneError, match="without a gradient, so the LoRA gradients would be silently wrong"):
        run_training(_packable_config(packable_base, tmp_path, with_eval=True))
