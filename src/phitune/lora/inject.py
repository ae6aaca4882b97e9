"""Put LoRA layers into any torch model in place, keeping its pretrained weights.

Phi-3 fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``; targets may name the logical
projections (``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj``, ``up_proj``) and the fused layer then
becomes a ``MergedLinear`` adapting only those slices, sized from the model config.
"""

from __future__ import annotations

from typing import Iterable, Union

import torch.nn as nn

from phitune.errors import PhituneError

from .layers import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoRALayer, MergedLinear
from .utils import mark_only_lora_as_trainable

__all__ = ["inject"]

# Exact base types only: a subclass (e.g. a quantised Linear) may compute something else.
_LORA_CLASS = {nn.Linear: Linear, nn.Embedding: Embedding, nn.Conv1d: Conv1d, nn.Conv2d: Conv2d,
               nn.Conv3d: Conv3d}
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _matches(name: str, target: str) -> bool:
    """A target names a module by its last component(s): ``v_proj`` or ``layers.0.self_attn.v_proj``."""
    return name == target or name.endswith("." + target)


def _split(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


def _logical_names(name: str, module: nn.Module) -> tuple[str, ...]:
    """The names of the projections fused into ``module`` (empty when it is not a fused layer)."""
    parent, child = _split(name)
    if type(module) is not nn.Linear or child not in _FUSED:
        return ()
    return tuple(f"{parent}.{p}" if parent else p for p in _FUSED[child])


def _slice_sizes(model: nn.Module, name: str, module: nn.Linear) -> list[int]:
    """Output sizes of the fused projections, read from a Phi-3 style config."""
    config = getattr(model, "config", None)
    if config is None:
        raise PhituneError(f"cannot split '{name}' into its projections without model.config; "
                           f"target '{_split(name)[1]}' to adapt the whole fused layer")
    if _split(name)[1] == "gate_up_proj":
        sizes = [config.intermediate_size] * 2
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv = config.num_key_value_heads * head_dim
        sizes = [config.num_attention_heads * head_dim, kv, kv]
    if sum(sizes) != module.out_features:
        raise PhituneError(f"'{name}' has {module.out_features} outputs but the config implies slices "
                           f"{sizes}; target '{_split(name)[1]}' to adapt the whole fused layer")
    return sizes


def _no_match_message(target: str, layers: dict[str, nn.Module]) -> str:
    names = list(dict.fromkeys(_split(n)[1] for n in layers))
    logical = list(dict.fromkeys(_split(ln)[1] for n, m in layers.items() for ln in _logical_names(n, m)))
    message = f"target module '{target}' matches nothing; this model's adaptable layers are {', '.join(names)}"
    if logical:
        message += f" (and logical {', '.join(logical)} inside the fused ones)"
    return message


def _plan(model: nn.Module, targets: list[str]) -> dict[str, list[bool] | None]:
    """Map each layer to adapt to None (the whole layer) or its per-slice enable flags."""
    layers = {n: m for n, m in model.named_modules() if type(m) in _LORA_CLASS}
    plan: dict[str, list[bool] | None] = {}
    for target in targets:
        already = [n for n, m in model.named_modules() if isinstance(m, LoRALayer) and _matches(n, target)]
        if already:
            raise PhituneError(f"'{already[0]}' already has LoRA; inject each layer only once")
        found = False
        for name, module in layers.items():
            if _matches(name, target):
                found = True
                _add(plan, name, None)
            for i, logical in enumerate(_logical_names(name, module)):
                if _matches(logical, target):
                    found = True
                    _add(plan, name, i)
        if not found:
            raise PhituneError(_no_match_message(target, layers))
    return plan


def _add(plan: dict[str, list[bool] | None], name: str, slice_index: int | None) -> None:
    """Record a whole-layer (slice_index None) or one-slice target, refusing a mix of both."""
    if name in plan and (plan[name] is None) != (slice_index is None):
        raise PhituneError(f"'{name}' is targeted both as a whole and by its projections; pick one")
    if slice_index is None:
        plan[name] = None
        return
    n_slices = len(_FUSED[_split(name)[1]])
    flags = plan.setdefault(name, [False] * n_slices)
    flags[slice_index] = True


def _describe(name: str, old: nn.Module, new: nn.Module) -> str:
    description = f"{old!r} -> lora.{type(new).__name__}(r={new.r}, lora_alpha={new.lora_alpha}"
    if isinstance(new, MergedLinear):
        on = [p for p, e in zip(_FUSED[_split(name)[1]], new.enable_lora) if e]
        description += f", adapting {'+'.join(on)} of slices {new.slice_sizes}"
    return description + ")"


def inject(model: nn.Module, target_modules: Union[str, Iterable[str]], r: int = 8, lora_alpha: int = 16,
           lora_dropout: float = 0.0, bias: str = "none", merge_weights: bool = False) -> dict[str, str]:
    """Replace the matching layers of ``model`` by LoRA layers in place; return ``{name: description}``.

    A target matches a module whose dotted name equals it or ends with ``"." + target``. Supported:
    ``nn.Linear``, ``nn.Embedding``, ``nn.Conv1d/2d/3d``; a fused Phi-3 ``qkv_proj`` / ``gate_up_proj``
    targeted by its projections becomes a ``MergedLinear``. The new layers share the pretrained
    weights; afterwards only LoRA parameters (and biases per ``bias``, as in
    ``mark_only_lora_as_trainable``) are trainable. ``merge_weights=False`` by default so ``eval()``
    leaves the weights untouched (what exporting and PEFT expect).
    Raises PhituneError for a target that matches nothing, listing the layers that exist.
    """
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    replaced = {}
    for name, flags in _plan(model, targets).items():
        old = model.get_submodule(name)
        kwargs = dict(r=r, lora_alpha=lora_alpha, merge_weights=merge_weights)
        if not isinstance(old, nn.Embedding):
            kwargs["lora_dropout"] = lora_dropout
        if flags is None:
            new = _LORA_CLASS[type(old)].from_module(old, **kwargs)
        else:
            sizes = _slice_sizes(model, name, old)
            new = MergedLinear.from_module(old, enable_lora=flags, slice_sizes=sizes, **kwargs)
        parent, child = _split(name)
        setattr(model.get_submodule(parent), child, new)
        replaced[name] = _describe(name, old, new)
    mark_only_lora_as_trainable(model, bias=bias)
    return replaced
