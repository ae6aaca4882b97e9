"""speed.activation fused-lora: the plain path's loss and LoRA gradients, each layer keeping only its input, a
`phitune train` run whose adapter is a plain PEFT adapter, and one-line refusals of what it does not support.

CPU, the tiny Phi-3 in float32; "the same" means within TOL for losses, and for gradients within
_equivalence.RELATIVE_TOLERANCE per tensor (only the summation order differs), compared themselves (B non-zero) or
through plain SGD without clipping, never through AdamW steps, which hide a gradient's scale.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from phitune.errors import PhituneError
from phitune.speed import fused_lora
from phitune.speed.fused_lora import Projection, install_fused_lora

from _equivalence import gradient_mismatches, without_signal

TOL = dict(rtol=1e-5, atol=1e-6)  # float32; observed relative differences are ~4e-7


def _peft_model(model_dir, fused: bool, dropout: float = 0.0, dtype=torch.float32, targets="all-linear"):
    """The tiny Phi-3 with LoRA on all linear layers; B randomised so that every LoRA weight gets a gradient."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    if fused:
        install_fused_lora(model)  # before PEFT wraps the projections, as phitune train does
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, init_lora_weights=False)
    return get_peft_model(model, config).train()


def _batch(padding_free: bool = False):
    """Two rows of unequal length, prompts masked out of the loss: padded with an attention mask, or concatenated
    into one row with restarting position ids (padding-free)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (2, 40), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 27:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :9] = -100
    if padding_free:
        keep = mask.bool().flatten()
        positions = torch.cat([torch.arange(40), torch.arange(27)])[None]
        return {"input_ids": ids.flatten()[keep][None], "labels": labels.flatten()[keep][None],
                "position_ids": positions}
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, padding_free: bool = False, autocast: bool = False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**_batch(padding_free), use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("padding_free,targets", [(False, "all-linear"), (True, "all-linear"), (False, ["o_proj"])])
def test_loss_and_lora_gradients_equal_the_plain_path(tiny_model_dir, padding_free, targets):
    """All four projections with LoRA, or o_proj alone (the others plain linear layers). The gradients themselves
    are compared, B non-zero: test_gradient_check_sees_a_scaled_lora_B_gradient shows the comparison failing."""
    loss, grads = _loss_and_grads(_peft_model(tiny_model_dir, fused=False, targets=targets), padding_free)
    fused_loss, fused_grads = _loss_and_grads(_peft_model(tiny_model_dir, fused=True, targets=targets), padding_free)
    torch.testing.assert_close(fused_loss, loss, **TOL)
    projections = 4 if targets == "all-linear" else 1
    assert len(grads) == 2 * projections * 2 and fused_grads.keys() == grads.keys()  # layers x projections x (A, B)
    assert without_signal(grads) == []
    assert gradient_mismatches(fused_grads, grads) == []


def test_gradient_check_sees_a_scaled_lora_B_gradient(tiny_model_dir, monkeypatch):
    """Deliberate break: the fused formulas return twice B's gradient (the loss is untouched, and AdamW would
    follow the same direction). The comparison reports the lora_B of every projection whose backward goes through
    Projection.backward (gate_up_proj and down_proj; attention's projections are recomputed under autograd), and
    nothing else."""
    _, grads = _loss_and_grads(_peft_model(tiny_model_dir, fused=False))
    backward = Projection.backward

    def doubled_B(self, g, x, xa):
        grad_x, grad_A, grad_B = backward(self, g, x, xa)
        return grad_x, grad_A, None if grad_B is None else 2 * grad_B

    monkeypatch.setattr(Projection, "backward", doubled_B)
    _, fused_grads = _loss_and_grads(_peft_model(tiny_model_dir, fused=True))
    mismatched = gradient_mismatches(fused_grads, grads)
    expected = {f"base_model.model.model.layers.{i}.mlp.{p}_proj.lora_B.default.weight" for i in (0, 1)
                for p in ("gate_up", "down")}
    assert {line.split(":")[0] for line in mismatched} == expected, mismatched


def test_bf16_autocast_is_as_close_to_float32_as_the_plain_path(tiny_model_dir):
    """bf16 weights under autocast (phitune's CUDA setting; here on the CPU): the same loss as the plain path, and
    LoRA gradients no further from float32's than the plain path's are."""
    _, exact = _loss_and_grads(_peft_model(tiny_model_dir, fused=False))
    runs = {fused: _loss_and_grads(_peft_model(tiny_model_dir, fused, dtype=torch.bfloat16), autocast=True)
            for fused in (False, True)}
    torch.testing.assert_close(runs[True][0], runs[False][0])

    def error(grads):
        return sum(((grads[n] - g).norm() / g.norm()).item() for n, g in exact.items()) / len(exact)

    assert error(runs[True][1]) <= 1.1 * error(runs[False][1])


def test_each_layer_keeps_only_its_input(tiny_model_dir):
    """What a decoder layer saves for backward is its input alone: nothing else of the layer stays alive."""
    model = _peft_model(tiny_model_dir, fused=True)
    inside, inputs, saved = [], [], []

    def enter(layer, args, kwargs):
        inside.append(layer)
        inputs.append(args[0])

    for layer in model.get_base_model().model.layers:
        layer.register_forward_pre_hook(enter, with_kwargs=True)
        layer.register_forward_hook(lambda *_: inside.pop() and None)

    def pack(t):
        if inside and not isinstance(t, nn.Parameter):
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**_batch(), use_cache=False).loss.backward()
    storages = {t.untyped_storage().data_ptr() for t in saved}
    assert storages == {t.untyped_storage().data_ptr() for t in inputs}


def test_down_projection_gradients_match_autograd():
    """The fused formulas alone, on a projection with a bias and LoRA rank 3, against autograd of y = Wx + b + sBAx."""
    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(7, 5, generator=gen), torch.randn(7, generator=gen)
    lora_A = torch.randn(3, 5, generator=gen, requires_grad=True)
    lora_B = torch.randn(7, 3, generator=gen, requires_grad=True)
    x = torch.randn(2, 4, 5, generator=gen, requires_grad=True)
    g = torch.randn(2, 4, 7, generator=gen)
    ((x @ weight.T + bias + 0.5 * (x @ lora_A.T) @ lora_B.T) * g).sum().backward()
    proj = Projection(weight, bias, lora_A, lora_B, 0.5)
    y, xa = proj.forward(x.detach())
    torch.testing.assert_close(y, x @ weight.T + bias + 0.5 * (x @ lora_A.T) @ lora_B.T)
    grad_x, grad_A, grad_B = proj.backward(g, x.detach(), xa)
    for mine, reference in ((grad_x, x.grad), (grad_A, lora_A.grad), (grad_B, lora_B.grad)):
        torch.testing.assert_close(mine, reference, **TOL)


def _write_config(path, model_dir, demo_data, output_dir):
    raw = {
        "model": {"name_or_path": str(model_dir), "torch_dtype": "float32"},
        "data": {"train": str(demo_data / "train.jsonl"), "max_seq_length": 64, "max_train_examples": 8},
        # plain SGD without clipping: each update is -lr x the gradient, so equal adapters mean equal gradients
        # (AdamW's update would be about lr x sign(gradient), blind to its scale)
        "training_config": {"output_dir": str(output_dir), "max_steps": 2, "optim": "sgd", "learning_rate": 1.0,
                            "max_grad_norm": 0.0, "seed": 0, "per_device_train_batch_size": 4, "logging_steps": 1,
                            "save_strategy": "no", "lr_scheduler_type": "constant", "disable_tqdm": True},
        "peft_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
    }
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _logits(output_dir, model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        return PeftModel.from_pretrained(base, str(output_dir)).eval()(input_ids=_batch()["input_ids"]).logits


def test_phitune_train_with_fused_lora_saves_the_plain_paths_adapter(tiny_model_dir, demo_data, tmp_path, monkeypatch):
    """`phitune train` with speed.activation fused-lora and none, 2 SGD steps: same losses, the same B (its summed
    gradients), and the saved adapters reload in plain PEFT with the same logits; the fused layers really ran."""
    import json

    from safetensors.torch import load_file

    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from phitune.cli import app

    calls = []
    until_down = fused_lora.until_down
    monkeypatch.setattr(fused_lora, "until_down", lambda *a: calls.append(1) or until_down(*a))
    outputs = {}
    for activation in ("none", "fused-lora"):
        out = tmp_path / activation
        config = _write_config(tmp_path / f"{activation}.yaml", tiny_model_dir, demo_data, out)
        result = CliRunner().invoke(app, ["train", str(config), "--set", f"speed.activation={activation}"])
        assert result.exit_code == 0, result.output
        assert bool(calls) == (activation == "fused-lora")
        outputs[activation] = out
    plain, fused = (json.loads((outputs[a] / "metrics.json").read_text()) for a in ("none", "fused-lora"))
    assert fused["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-5)
    configs = [json.loads((outputs[a] / "adapter_config.json").read_text()) for a in ("none", "fused-lora")]
    assert configs[0] == configs[1]  # the same plain PEFT LoRA adapter, nothing fused-lora-specific in it
    adapters = [load_file(str(outputs[a] / "adapter_model.safetensors")) for a in ("none", "fused-lora")]
    sums = [{k: v for k, v in adapter.items() if "lora_B" in k} for adapter in adapters]  # -lr x B's gradients
    assert without_signal(sums[0]) == [] and gradient_mismatches(sums[1], sums[0]) == []
    logits = _logits(outputs["none"], tiny_model_dir)
    torch.testing.assert_close(_logits(outputs["fused-lora"], tiny_model_dir), logits, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the adapters moved: equal logits are not two untouched (B = 0) adapters
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
        assert (base(input_ids=_batch()["input_ids"]).logits - logits).abs().max() > 1e-2


def test_refuses_lora_dropout(tiny_model_dir):
    model = _peft_model(tiny_model_dir, fused=False, dropout=0.1)
    with pytest.raises(PhituneError, match="lora_dropout 0"):
        install_fused_lora(model)


def test_refuses_what_it_does_not_support(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from phitune.config.schema import SpeedConfig
    from phitune.lora.layers import Linear as LoraLibLinear
    from phitune.speed import resolve_activation, resolve_speed

    with pytest.raises(PhituneError, match="not 4-bit"):
        resolve_speed(SpeedConfig(activation="fused-lora"), quantized=True)
    with pytest.raises(PhituneError, match="contradicts"):  # it replaces transformers' checkpointing
        resolve_activation("fused-lora", {"activation_checkpointing": True}, cuda=True)
    with pytest.raises(PhituneError, match="needs Phi-3 decoder layers"):
        install_fused_lora(nn.Sequential(nn.Linear(4, 4)))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    proj = model.model.layers[0].self_attn.o_proj
    model.model.layers[0].self_attn.o_proj = LoraLibLinear(proj.in_features, proj.out_features, r=2, bias=False)
    with pytest.raises(PhituneError, match="loralib backend"):
        install_fused_lora(model)
