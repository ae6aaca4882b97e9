"""Training and checkpoint helpers, compatible with loralib 0.1.2's ``loralib.utils``."""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

from phitune.errors import PhituneError

from .layers import LoRALayer

__all__ = ["mark_only_lora_as_trainable", "lora_state_dict", "load_lora_state_dict"]

_BIAS_MODES = ("none", "all", "lora_only")


def _check_bias(bias: str) -> None:
    if bias not in _BIAS_MODES:
        raise PhituneError(f"bias={bias!r} is not supported; use one of {', '.join(_BIAS_MODES)}")


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Make the LoRA parameters trainable and freeze everything else.

    ``bias``: ``'none'`` freezes all biases, ``'all'`` trains every bias, ``'lora_only'`` trains the
    biases of LoRA layers. Unlike loralib, LoRA parameters are switched back on even when something
    froze them earlier (loralib PR 125), so the function can be called at any point.
    """
    _check_bias(bias)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name
    if bias == "all":
        for name, param in model.named_parameters():
            if "bias" in name:
                param.requires_grad = True
    elif bias == "lora_only":
        for module in model.modules():
            if isinstance(module, LoRALayer) and getattr(module, "bias", None) is not None:
                module.bias.requires_grad = True


def lora_state_dict(model: nn.Module, bias: str = "none") -> Dict[str, torch.Tensor]:
    """The part of ``model.state_dict()`` that LoRA fine-tuning changes (same keys as loralib).

    ``bias`` selects the biases to include, as in ``mark_only_lora_as_trainable``.
    """
    _check_bias(bias)
    full = model.state_dict()
    if bias == "none":
        return {k: v for k, v in full.items() if "lora_" in k}
    if bias == "all":
        return {k: v for k, v in full.items() if "lora_" in k or "bias" in k}
    selected = {}
    for key, value in full.items():
        if "lora_" in key:
            selected[key] = value
            bias_key = key.split("lora_")[0] + "bias"
            if bias_key in full:
                selected[bias_key] = full[bias_key]
    return selected


def load_lora_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor]):
    """Load a ``lora_state_dict`` checkpoint on top of the pretrained weights (``strict=False``).

    Plain ``load_state_dict(strict=False)`` silently ignores keys the model lacks, so a checkpoint
    loaded into a model without the matching LoRA layers would do nothing; this raises instead, and
    also when a LoRA parameter of the model is missing from the checkpoint. Returns the
    ``(missing_keys, unexpected_keys)`` result of ``load_state_dict``.
    """
    result = model.load_state_dict(state_dict, strict=False)
    if result.unexpected_keys:
        raise PhituneError(f"checkpoint has {len(result.unexpected_keys)} keys this model lacks "
                           f"(e.g. {result.unexpected_keys[0]}); add the same LoRA layers before loading")
    missing_lora = [k for k in result.missing_keys if "lora_" in k]
    if missing_lora:
        raise PhituneError(f"checkpoint lacks {len(missing_lora)} LoRA parameters of this model "
                           f"(e.g. {missing_lora[0]}); was it saved from a model with other LoRA layers?")
    return result
