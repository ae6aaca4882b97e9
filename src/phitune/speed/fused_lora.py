"""`speed.activation: fused-lora`: each Phi-3 decoder layer keeps only its input for backward and, in the backward
pass, recomputes everything but the down projection.

Why this shape (benchmarks/activation_budget.py, one Phi-3-mini layer): the backward of a LoRA layer whose base
weight W is frozen needs, per projection, only its input x and the low-rank A x; PEFT's own LoRA autograd already
keeps exactly that (with dropout 0), so fusing a projection changes neither FLOPs nor bytes by itself. What costs is
the nonlinear parts: attention's backward needs q, k, v (the qkv_proj output, 3x hidden) and the SwiGLU's backward
needs gate and up (the gate_up_proj output, 5.3x hidden); keeping those is 11x the reference's memory. So the layer is
recomputed from its input, as the reference does, with one difference: the output of the last projection is never
needed in backward, only its input, so down_proj (a fifth of the layer's forward) is not recomputed: its gradients
come from the fused LoRA formulas below, applied to the recomputed SwiGLU output.

A projection is y = W x + s B (A x) (W frozen, s = lora_alpha / r); its backward, with g = dL/dy:
    grad_x = W^T g + s A^T (B^T g),   grad_B = s g^T (A x),   grad_A = s (B^T g)^T x.
The MLP activation SiLU(gate) * up is one function that keeps gate_up's output only and recomputes the product.

Supported: PEFT LoRA (one active adapter, dropout 0, no DoRA, no LoRA bias) or no adapter on Phi-3's qkv_proj,
o_proj, gate_up_proj and down_proj, plain (16/32-bit) base weights, residual and attention dropout 0, SiLU. Anything
else is refused with one line. Outside training (no grad, eval mode) a layer runs its plain forward.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from phitune.errors import PhituneError

HINT = "use speed.activation selective or full"


@dataclass
class Projection:
    """A frozen linear layer with an optional LoRA: y = x W^T + b + s (x A^T) B^T."""

    weight: torch.Tensor  # (out, in), frozen
    bias: torch.Tensor | None
    lora_A: torch.Tensor | None = None  # (r, in)
    lora_B: torch.Tensor | None = None  # (out, r)
    scaling: float = 0.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """y and the low-rank A x (None without LoRA)."""
        y = F.linear(x, self.weight, self.bias)
        if self.lora_A is None:
            return y, None
        xa = F.linear(x.to(self.lora_A.dtype), self.lora_A)  # (..., r)
        return (y + F.linear(xa, self.lora_B) * self.scaling).to(y.dtype), xa  # PEFT's order and rounding

    def backward(self, g: torch.Tensor, x: torch.Tensor, xa: torch.Tensor | None):
        """(grad_x, grad_A, grad_B) for dL/dy = g; the base weight and bias get none (frozen)."""
        grad_x = F.linear(g, self.weight.t())  # W^T g
        if self.lora_A is None:
            return grad_x, None, None
        g2 = g.reshape(-1, g.shape[-1]).to(self.lora_B.dtype)  # (N, out)
        gb = g2 @ self.lora_B  # (N, r): B^T g per token
        grad_x = grad_x + (self.scaling * (gb @ self.lora_A)).reshape(grad_x.shape).to(grad_x.dtype)
        grad_B = self.scaling * g2.t() @ xa.reshape(-1, xa.shape[-1]).to(g2.dtype)  # (out, r)
        grad_A = self.scaling * gb.t() @ x.reshape(-1, x.shape[-1]).to(gb.dtype)  # (r, in)
        return grad_x, grad_A.to(self.lora_A.dtype), grad_B.to(self.lora_B.dtype)


def projection(module: nn.Module, name: str) -> Projection:
    """The weights of `module` (a plain nn.Linear or a PEFT LoRA layer around one); refuse what the formulas do not
    cover."""
    from peft.tuners.lora import LoraLayer

    if type(module) is nn.Linear:
        return Projection(module.weight, module.bias)
    if not isinstance(module, LoraLayer):
        raise PhituneError(f"speed.activation fused-lora needs PEFT LoRA on plain linear layers; {name} is a "
                           f"{type(module).__name__} (loralib backend?): {HINT}")
    base = module.get_base_layer()
    if type(base) is not nn.Linear:
        raise PhituneError(f"speed.activation fused-lora needs 16/32-bit base weights; {name} wraps a "
                           f"{type(base).__name__} (4-bit QLoRA?): {HINT}")
    active = [a for a in module.active_adapters if a in module.lora_A]
    if module.disable_adapters or module.merged or not active:
        return Projection(base.weight, base.bias)  # what PEFT computes then: the base layer alone
    if len(active) > 1 or active[0] in module.lora_variant or module.lora_B[active[0]].bias is not None:
        raise PhituneError(f"speed.activation fused-lora supports one plain LoRA adapter per layer (no DoRA, no "
                           f"LoRA bias); {name} has another kind: {HINT}")
    adapter = active[0]
    dropout = module.lora_dropout[adapter]
    if isinstance(dropout, nn.Dropout) and dropout.p > 0:
        raise PhituneError(f"speed.activation fused-lora needs lora_dropout 0 (it recomputes the layer in backward); "
                           f"{name} has {dropout.p}: set peft_config.lora_dropout: 0 or {HINT}")
    return Projection(base.weight, base.bias, module.lora_A[adapter].weight, module.lora_B[adapter].weight,
                      module.scaling[adapter])


def autocast_state(t: torch.Tensor) -> tuple:
    """The autocast setting in force for `t`'s device, to run a backward under the same one as its forward."""
    device = t.device.type
    return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)


def autocast(state: tuple):
    device, enabled, dtype = state
    return torch.autocast(device, dtype=dtype, enabled=enabled)


class LoRALinearFunction(torch.autograd.Function):
    """y = W x + s B (A x), keeping only x and A x for backward (W frozen)."""

    @staticmethod
    def forward(ctx, x, proj: Projection, lora_A, lora_B):  # lora_A, lora_B: proj's, passed so they get gradients
        y, xa = proj.forward(x)
        ctx.proj, ctx.autocast = proj, autocast_state(x)
        ctx.save_for_backward(x, xa)
        return y

    @staticmethod
    def backward(ctx, g):
        x, xa = ctx.saved_tensors
        with autocast(ctx.autocast):
            grad_x, grad_A, grad_B = ctx.proj.backward(g, x, xa)
        return grad_x.to(x.dtype), None, grad_A, grad_B


def lora_linear(x: torch.Tensor, proj: Projection) -> torch.Tensor:
    if proj.lora_A is None:
        return F.linear(x, proj.weight, proj.bias)
    return LoRALinearFunction.apply(x, proj, proj.lora_A, proj.lora_B)


class SwiGLUFunction(torch.autograd.Function):
    """SiLU(gate) * up from gate_up = [gate, up], keeping gate_up only (the product is recomputed in backward)."""

    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, g):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_gate = g * up * sig * (1 + gate * (1 - sig))  # d silu / d gate = sig (1 + gate (1 - sig))
        return torch.cat([grad_gate, g * silu], dim=-1)


def until_down(layer, attention_kwargs: dict, hidden: torch.Tensor):
    """A Phi-3 decoder layer up to the input of down_proj: (h2, a), h2 the residual after attention, a the SwiGLU
    output. The attention half is the model's own module (any attention kernel, mask or padding-free batch)."""
    attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden), **attention_kwargs)
    h2 = hidden + attn
    gate_up = lora_linear(layer.post_attention_layernorm(h2), projection(layer.mlp.gate_up_proj, "gate_up_proj"))
    return h2, SwiGLUFunction.apply(gate_up)


class FusedLoRALayer(torch.autograd.Function):
    """One decoder layer: out = h2 + down(a), with (h2, a) = until_down(h). Keeps h; backward recomputes until_down
    and applies down's LoRA backward to g without recomputing down's output."""

    @staticmethod
    def forward(ctx, run, down: Projection, hidden, *params):
        h2, a = run(hidden)
        ctx.run, ctx.down, ctx.params = run, down, params
        ctx.autocast = autocast_state(hidden)
        ctx.save_for_backward(hidden)
        return h2 + down.forward(a)[0]

    @staticmethod
    def backward(ctx, g):
        (hidden,) = ctx.saved_tensors
        down, params = ctx.down, ctx.params
        with torch.enable_grad(), autocast(ctx.autocast):
            leaf = hidden.detach().requires_grad_(ctx.needs_input_grad[2])
            # the layer sees a view, not the leaf: module hooks that wait for gradients (FlopCounterMode's module
            # tracker) cannot be put on a leaf under autograd.grad
            h2, a = ctx.run(leaf.view_as(leaf))
            a0 = a.detach()
            xa = None if down.lora_A is None else F.linear(a0.to(down.lora_A.dtype), down.lora_A)
            grad_a, grad_A, grad_B = down.backward(g, a0, xa)
        mine = {id(down.lora_A): grad_A, id(down.lora_B): grad_B}
        rest = [p for p in params if id(p) not in mine]
        inputs = ([leaf] if leaf.requires_grad else []) + rest
        outputs = [(t, dt.to(t.dtype)) for t, dt in ((h2, g), (a, grad_a)) if t.requires_grad]
        grads = [None] * len(inputs)
        if inputs and outputs:
            tensors, grad_outputs = zip(*outputs)
            grads = torch.autograd.grad(tensors, inputs, grad_outputs, allow_unused=True)
        grad_hidden = grads[0] if leaf.requires_grad else None
        found = dict(zip(map(id, rest), grads[len(inputs) - len(rest):]))
        return (None, None, grad_hidden, *(mine[id(p)] if id(p) in mine else found[id(p)] for p in params))


def _refuse_dropout(layer) -> None:
    rates = {"resid_pdrop": layer.resid_attn_dropout.p, "attention_dropout": layer.self_attn.attention_dropout}
    for name, rate in rates.items():
        if rate > 0:
            raise PhituneError(f"speed.activation fused-lora needs dropout 0 (it recomputes the layer in backward); "
                               f"the model's {name} is {rate}: {HINT}")


def fused_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                  position_embeddings=None, **kwargs):
    """Phi3DecoderLayer.forward with fused-lora's backward while training; the plain forward otherwise."""
    cache = kwargs.pop("past_key_values", cache)
    if not (self.training and torch.is_grad_enabled()) or cache is not None:
        return type(self).forward(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                  cache=cache, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
    _refuse_dropout(self)
    down = projection(self.mlp.down_proj, "down_proj")
    params = [p for p in self.parameters() if p.requires_grad]
    if down.weight.requires_grad:
        raise PhituneError(f"speed.activation fused-lora needs a frozen down_proj base weight: {HINT}")
    attention = dict(attention_mask=attention_mask, position_ids=position_ids, position_embeddings=position_embeddings,
                     **kwargs)
    run = functools.partial(until_down, self, attention)
    return FusedLoRALayer.apply(run, down, hidden_states, *params)


def is_phi3_layer(module: nn.Module) -> bool:
    attn, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
    return all(hasattr(attn, n) for n in ("qkv_proj", "o_proj")) and all(
        hasattr(mlp, n) for n in ("gate_up_proj", "down_proj")) and hasattr(module, "post_attention_layernorm")


def install_fused_lora(model: nn.Module) -> int:
    """Give every Phi-3 decoder layer of `model` the fused-lora forward (before or after PEFT wraps the projections:
    they are read at each call); the number of layers."""
    layers = [m for m in model.modules() if is_phi3_layer(m)]
    if not layers:
        raise PhituneError(f"speed.activation fused-lora needs Phi-3 decoder layers (fused qkv_proj and gate_up_proj); "
                           f"{type(model).__name__} has none: {HINT}")
    for layer in layers:
        if getattr(layer.config, "hidden_act", "silu") != "silu":
            raise PhituneError(f"speed.activation fused-lora needs the SiLU activation, not "
                               f"{layer.config.hidden_act}: {HINT}")
        for name in ("qkv_proj", "o_proj"):
            projection(getattr(layer.self_attn, name), name)
        for name in ("gate_up_proj", "down_proj"):
            projection(getattr(layer.mlp, name), name)
        _refuse_dropout(layer)
        layer.forward = types.MethodType(fused_forward, layer)
    return len(layers)
