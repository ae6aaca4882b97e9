"""Equivalence checks that see gradient scale: two paths are compared by their gradients, tensor by tensor.

After AdamW's first step its update is about lr * sign(g), and Adam ignores a uniform scaling of the gradient, so
equal adapters after a few AdamW steps do not show equal gradients: a loss-normalisation bug that scales them (by the
process count, the accumulation steps, the token count) passes such a check. The gradients themselves do not.
Each family of equivalence test keeps a deliberate break that makes `gradient_mismatches` report a difference.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

# ||got - expected|| / ||expected|| per tensor. float32: only the summation order differs between two paths
# (observed ~1e-6); bf16 keeps 8 bits of mantissa (relative rounding 4e-3 per operation, accumulated over layers).
RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def gradient_mismatches(got: dict, expected: dict, dtype=torch.float32) -> list[str]:
    """One line per tensor of `expected` that `got` lacks or that differs by more than the tolerance of `dtype`
    (relative to the norm of the expected tensor; a zero expected gradient must be zero); [] when they agree."""
    tolerance = RELATIVE_TOLERANCE[dtype]
    problems = [f"{name}: missing" for name in expected if name not in got]
    for name, want in expected.items():
        if name in got:
            difference = (got[name].float() - want.float()).norm().item()
            scale = want.float().norm().item()
            if difference > tolerance * scale:
                problems.append(f"{name}: |difference| {difference:.3g} vs |expected| {scale:.3g}")
    return problems


def without_signal(gradients: dict) -> list[str]:
    """Names of the gradients that are all zero (a LoRA A whose B is still zero, a path that carries nothing)."""
    return [name for name, grad in gradients.items() if not grad.abs().sum() > 0]


class GradientRecorder(TrainerCallback):
    """Every trainable parameter's gradient at each optimizer step: `steps[i][name]`. Recorded after the Trainer's
    clipping, so a comparison trains with max_grad_norm 0 to see the raw gradients."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({name.removeprefix("module."): p.grad.detach().float().clone()
                           for name, p in model.named_parameters() if p.requires_grad and p.grad is not None})
