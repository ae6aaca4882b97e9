"""Export LoRA layers as a standard PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

A MergedLinear with per-slice ``A_i`` (r x in) and ``B_i`` (out_i x r) equals one PEFT LoRA on the fused
layer of rank ``r * n_enabled``: ``A = cat(A_i)`` and ``B`` block-diagonal, zero rows for the disabled
slices. Its PEFT alpha is ``lora_alpha * n_enabled`` so that alpha / rank stays ``lora_alpha / r``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn

from phitune.errors import PhituneError

from .layers import ConvLoRA, Embedding, LoRALayer, MergedLinear

__all__ = ["export_peft_adapter"]

_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the wrapped model


def _merged_linear_B(layer: MergedLinear) -> torch.Tensor:
    """PEFT's ``lora_B`` (out x r * n_enabled): each enabled slice's B_i in its own rows and columns."""
    blocks = layer.lora_B.detach().split(layer._enabled_sizes())
    B = layer.lora_B.new_zeros((layer.out_features, layer.r * len(blocks)))
    row, j = 0, 0
    for size, on in zip(layer.slice_sizes, layer.enable_lora):
        if on:
            B[row:row + size, j * layer.r:(j + 1) * layer.r] = blocks[j]
            j += 1
        row += size
    return B


def _peft_entry(name: str, layer: LoRALayer) -> tuple[dict[str, torch.Tensor], int, float]:
    """The adapter tensors of one layer, with its PEFT rank and alpha."""
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    if isinstance(layer, ConvLoRA):
        raise PhituneError(f"'{name}' is a LoRA convolution, which PEFT cannot represent; export "
                           f"supports Linear, MergedLinear and Embedding layers")
    if isinstance(layer, Embedding):
        tensors = {"lora_embedding_A": A, "lora_embedding_B": B}
    else:
        if isinstance(layer, MergedLinear):
            B = _merged_linear_B(layer)
        tensors = {"lora_A.weight": A, "lora_B.weight": B}
    rank = A.shape[0]
    alpha = layer.lora_alpha * (rank // layer.r)  # rank is r, or r * n_enabled for a MergedLinear
    return {f"{_PREFIX}{name}.{k}": v.contiguous() for k, v in tensors.items()}, rank, alpha


def export_peft_adapter(model: nn.Module, output_dir: Union[str, Path], base_model_name_or_path: str,
                        task_type: str = "CAUSAL_LM") -> Path:
    """Write the model's LoRA layers as a PEFT adapter that ``PeftModel.from_pretrained`` loads.

    ``model`` is the model after ``inject`` (or with hand-placed LoRA layers); the adapter applies to
    the same model without them, i.e. ``base_model_name_or_path``. Layers of different rank are
    recorded in ``rank_pattern``/``alpha_pattern``. Trained biases are not part of the adapter.
    Returns the output directory.
    """
    from peft import LoraConfig  # imported here: peft is slow to import and only exporting needs it
    from safetensors.torch import save_file

    tensors, ranks, alphas = {}, {}, {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer) and module.has_lora:
            layer_tensors, ranks[name], alphas[name] = _peft_entry(name, module)
            tensors.update(layer_tensors)
    if not tensors:
        raise PhituneError("the model has no LoRA layers to export; call lora.inject(model, ...) first")
    # The most common (rank, alpha) becomes the default; other layers get per-module patterns.
    r, alpha = Counter(zip(ranks.values(), alphas.values())).most_common(1)[0][0]
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=sorted(ranks), bias="none", task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
        rank_pattern={n: k for n, k in ranks.items() if k != r},
        alpha_pattern={n: a for n, a in alphas.items() if a != alpha},
    )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(output_dir))
    save_file(tensors, str(output_dir / "adapter_model.safetensors"))
    return output_dir
