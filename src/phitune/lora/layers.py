"""LoRA layers: a drop-in, bug-fixed replacement for loralib 0.1.2's ``loralib.layers``.

Every layer computes ``h = W0 x + (lora_alpha / r) * B A dropout(x)``: ``W0`` is the frozen pretrained
weight, ``A`` (``lora_A``) and ``B`` (``lora_B``) are the trainable low-rank factors. Constructor
arguments, defaults, parameter names, initialisation and random-number order match loralib, so the same
seed gives the same parameters and outputs, and loralib checkpoints load unchanged.

With ``merge_weights=True`` (the default) ``eval()`` folds ``B A`` into ``W0`` for zero-overhead inference
and ``train()`` takes it out again.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from phitune.errors import PhituneError

__all__ = ["LoRALayer", "Embedding", "Linear", "MergedLinear", "ConvLoRA", "Conv1d", "Conv2d", "Conv3d"]


class LoRALayer:
    """Mixin with the LoRA hyper-parameters and the merge/unmerge logic shared by all layers.

    It comes before the wrapped ``nn`` class in each layer's bases, so its ``train`` and
    ``reset_parameters`` wrap the ``nn`` ones. Subclasses create ``lora_A``/``lora_B`` and implement
    ``_delta_weight`` (the scaled update in the layout of ``weight``).
    """

    def __init__(self, r: int, lora_alpha: int, lora_dropout: float, merge_weights: bool):
        self.r = r
        self.lora_alpha = lora_alpha
        if r > 0:
            self.scaling = lora_alpha / r
        # A module rather than loralib's lambda: it follows train()/eval() and shows in print(model).
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.merged = False
        self.merge_weights = merge_weights
        self._remerge = False  # set while a partial state dict is loaded into a merged layer
        # loralib issue 190: loading new LoRA weights into a merged layer left the old B A inside W0.
        self.register_load_state_dict_pre_hook(LoRALayer._unmerge_before_partial_load)
        self.register_load_state_dict_post_hook(LoRALayer._remerge_after_load)

    @property
    def has_lora(self) -> bool:
        """True when the layer owns LoRA parameters (r > 0 and, for MergedLinear, a slice enabled)."""
        return "lora_A" in self._parameters

    def reset_parameters(self) -> None:
        """Re-initialise the base layer like ``nn`` does, then the LoRA factors."""
        super().reset_parameters()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A like nn.Linear's weight, B zero: the layer starts out equal to the base layer."""
        if self.has_lora:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def merge(self) -> None:
        """Fold the LoRA update into ``weight`` (what ``eval()`` does when ``merge_weights``)."""
        if not self.merged:
            if self.has_lora:
                self.weight.data += self._delta_weight().detach()
            self.merged = True

    def unmerge(self) -> None:
        """Take the LoRA update back out of ``weight`` (what ``train()`` does when ``merge_weights``)."""
        if self.merged:
            if self.has_lora:
                self.weight.data -= self._delta_weight().detach()
            self.merged = False

    def train(self, mode: bool = True):
        """Switch mode, merging on eval and unmerging on train; returns the module (loralib returned None)."""
        super().train(mode)
        if self.merge_weights and mode:
            self.unmerge()
        elif self.merge_weights:
            self.merge()
        return self

    def _delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _unmerge_before_partial_load(self, state_dict, prefix, *args) -> None:
        # A full snapshot (weight and both factors) holds the weight as the saving layer held it; load
        # it as it is, as loralib does, so a merged eval-mode state_dict() goes back into a merged layer
        # unchanged (re-merging it would give W0 + 2 B A). A partial one -- LoRA factors only (issue 190)
        # or pretrained weights only -- replaces one side of W0 + B A: take the old update out first.
        full = all(prefix + name in state_dict for name in ("weight", "lora_A", "lora_B"))
        self._remerge = self.merged and not full
        if not full:
            self.unmerge()

    def _remerge_after_load(self, incompatible_keys) -> None:
        if self._remerge:
            self.merge()
        self._remerge = False

    def _adopt(self, base: nn.Module):
        """Take over ``base``'s parameters (shared, not copied) and create the LoRA ones beside them.

        The layer was built on the meta device, so nothing was allocated for the weight it replaces.
        LoRA parameters get the base weight's device and dtype (fp16/bf16 bases stay fp16/bf16).
        """
        for name, param in base.named_parameters(recurse=False):
            setattr(self, name, param)
        for name in ("lora_A", "lora_B"):
            if name in self._parameters:
                meta = self._parameters[name]
                setattr(self, name, nn.Parameter(torch.empty_like(meta, device=base.weight.device)))
        self.reset_lora_parameters()
        if self.has_lora:
            self.weight.requires_grad = False
        return self.train(base.training)


class Embedding(LoRALayer, nn.Embedding):
    """``nn.Embedding`` with LoRA: ``h = W0[x] + (lora_alpha / r) * (A^T[x]) B^T``.

    ``lora_A`` is ``(r, num_embeddings)`` initialised to zero, ``lora_B`` ``(embedding_dim, r)`` normal,
    as in loralib. There is no dropout: a dropped one-hot input would drop the whole row.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 0, lora_alpha: int = 1,
                 merge_weights: bool = True, **kwargs):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=0.0, merge_weights=merge_weights)
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, num_embeddings)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((embedding_dim, r)))
            self.weight.requires_grad = False
        self.reset_parameters()

    @classmethod
    def from_module(cls, base: nn.Embedding, r: int = 0, lora_alpha: int = 1,
                    merge_weights: bool = True) -> "Embedding":
        """Wrap an existing ``nn.Embedding``, keeping (sharing) its pretrained weight (loralib issue 55)."""
        layer = cls(base.num_embeddings, base.embedding_dim, r=r, lora_alpha=lora_alpha,
                    merge_weights=merge_weights, padding_idx=base.padding_idx, max_norm=base.max_norm,
                    norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                    sparse=base.sparse, device="meta", dtype=base.weight.dtype)
        return layer._adopt(base)

    def reset_lora_parameters(self) -> None:
        """A zero and B normal, as loralib does for embeddings."""
        if self.has_lora:
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def _delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).transpose(0, 1) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = nn.Embedding.forward(self, x)
        if self.has_lora and not self.merged:
            after_A = F.embedding(x, self.lora_A.transpose(0, 1), self.padding_idx, self.max_norm,
                                  self.norm_type, self.scale_grad_by_freq, self.sparse)
            result = result + (after_A @ self.lora_B.transpose(0, 1)) * self.scaling
        return result


class Linear(LoRALayer, nn.Linear):
    """``nn.Linear`` with LoRA: ``h = W0 x + b + (lora_alpha / r) * B A dropout(x)``.

    ``lora_A`` is ``(r, in_features)`` (Kaiming-uniform, a=sqrt(5)), ``lora_B`` ``(out_features, r)``
    (zero). Set ``fan_in_fan_out`` when the replaced layer stores its weight as ``(in, out)``, like
    GPT-2's ``Conv1D``.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: int = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, merge_weights: bool = True,
                 **kwargs):
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           merge_weights=merge_weights)
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((out_features, r)))
            self.weight.requires_grad = False
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)

    @classmethod
    def from_module(cls, base: nn.Linear, r: int = 0, lora_alpha: int = 1, lora_dropout: float = 0.0,
                    merge_weights: bool = True) -> "Linear":
        """Wrap an existing ``nn.Linear``, keeping (sharing) its weight and bias (loralib issue 55)."""
        layer = cls(base.in_features, base.out_features, r=r, lora_alpha=lora_alpha,
                    lora_dropout=lora_dropout, merge_weights=merge_weights, bias=base.bias is not None,
                    device="meta", dtype=base.weight.dtype)
        return layer._adopt(base)

    def _t(self, w: torch.Tensor) -> torch.Tensor:
        return w.transpose(0, 1) if self.fan_in_fan_out else w

    def _delta_weight(self) -> torch.Tensor:
        return self._t(self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self._t(self.weight), bias=self.bias)
        if self.has_lora and not self.merged:
            lora = self.lora_dropout(x) @ self.lora_A.transpose(0, 1) @ self.lora_B.transpose(0, 1)
            result = result + lora * self.scaling
        return result


def _resolve_slice_sizes(out_features: int, enable_lora: Sequence[bool],
                         slice_sizes: Optional[Sequence[int]]) -> list[int]:
    """Output sizes of the fused projections; equal by default, as loralib assumes."""
    if slice_sizes is None:
        if out_features % len(enable_lora) != 0:
            raise PhituneError(f"MergedLinear: len(enable_lora)={len(enable_lora)} must divide "
                               f"out_features={out_features}; pass slice_sizes for unequal slices")
        return [out_features // len(enable_lora)] * len(enable_lora)
    if len(slice_sizes) != len(enable_lora) or sum(slice_sizes) != out_features:
        raise PhituneError(f"MergedLinear: slice_sizes {list(slice_sizes)} must have one entry per "
                           f"enable_lora flag ({len(enable_lora)}) and sum to out_features={out_features}")
    return list(slice_sizes)


class MergedLinear(LoRALayer, nn.Linear):
    """One ``nn.Linear`` computing several projections (e.g. fused q/k/v) with LoRA on chosen slices.

    Slice ``i`` (output rows of size ``slice_sizes[i]``) gets ``(lora_alpha / r) * B_i A_i dropout(x)``
    when ``enable_lora[i]``; disabled slices keep ``W0``. ``lora_A`` stacks the enabled ``A_i``
    (``(r * n_enabled, in)``), ``lora_B`` the enabled ``B_i`` (``(sum enabled sizes, r)``), the loralib
    layout. ``slice_sizes`` (new) allows unequal slices, e.g. grouped-query attention's q, k, v.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: int = 1,
                 lora_dropout: float = 0.0, enable_lora: Sequence[bool] = (False,),
                 fan_in_fan_out: bool = False, merge_weights: bool = True,
                 slice_sizes: Optional[Sequence[int]] = None, **kwargs):
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           merge_weights=merge_weights)
        self.enable_lora = [bool(e) for e in enable_lora]
        self.slice_sizes = _resolve_slice_sizes(out_features, self.enable_lora, slice_sizes)
        self.fan_in_fan_out = fan_in_fan_out
        # loralib created no LoRA parameters when every slice was disabled, then crashed in forward.
        if r > 0 and any(self.enable_lora):
            self.lora_A = nn.Parameter(self.weight.new_zeros((r * sum(self.enable_lora), in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((sum(self._enabled_sizes()), r)))
            self.weight.requires_grad = False
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)

    @classmethod
    def from_module(cls, base: nn.Linear, r: int = 0, lora_alpha: int = 1, lora_dropout: float = 0.0,
                    enable_lora: Sequence[bool] = (False,), merge_weights: bool = True,
                    slice_sizes: Optional[Sequence[int]] = None) -> "MergedLinear":
        """Wrap an existing fused ``nn.Linear``, keeping (sharing) its weight and bias (loralib issue 55)."""
        layer = cls(base.in_features, base.out_features, r=r, lora_alpha=lora_alpha,
                    lora_dropout=lora_dropout, enable_lora=enable_lora, merge_weights=merge_weights,
                    slice_sizes=slice_sizes, bias=base.bias is not None, device="meta",
                    dtype=base.weight.dtype)
        return layer._adopt(base)

    def _enabled_sizes(self) -> list[int]:
        return [size for size, on in zip(self.slice_sizes, self.enable_lora) if on]

    def _t(self, w: torch.Tensor) -> torch.Tensor:
        return w.transpose(0, 1) if self.fan_in_fan_out else w

    @property
    def lora_ind(self) -> torch.Tensor:
        """``(out_features,)`` bool mask of the output rows whose slice has LoRA (as in loralib)."""
        flags = torch.tensor(self.enable_lora, device=self.weight.device)
        return flags.repeat_interleave(torch.tensor(self.slice_sizes, device=self.weight.device))

    def zero_pad(self, x: torch.Tensor) -> torch.Tensor:
        """Spread ``x`` (one row per enabled output row) over all ``out_features`` rows, zeros for the
        disabled slices (as in loralib)."""
        return self._pad_disabled(x, 0)

    def merge_AB(self) -> torch.Tensor:
        """The unscaled update ``B A`` in ``weight``'s layout, zero for disabled slices (as in loralib).

        Code written for loralib exports merged weights as ``weight + merge_AB() * scaling``.
        """
        pairs = zip(self.lora_B.split(self._enabled_sizes()), self.lora_A.split(self.r))
        return self._t(self.zero_pad(torch.cat([b @ a for b, a in pairs])))

    def _pad_disabled(self, enabled: torch.Tensor, dim: int) -> torch.Tensor:
        """Insert zeros for the disabled slices along ``dim`` of a tensor holding the enabled ones."""
        chunks = iter(enabled.split(self._enabled_sizes(), dim))
        parts = []
        for size, on in zip(self.slice_sizes, self.enable_lora):
            if on:
                parts.append(next(chunks))
            else:
                shape = list(enabled.shape)
                shape[dim] = size
                parts.append(enabled.new_zeros(shape))
        return torch.cat(parts, dim)

    def _delta_weight(self) -> torch.Tensor:
        return self.merge_AB() * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self._t(self.weight), bias=self.bias)
        if self.has_lora and not self.merged:
            # loralib issue 109: go through the rank-r bottleneck slice by slice instead of building
            # the full out x in update on every training step.
            after_A = self.lora_dropout(x) @ self.lora_A.transpose(0, 1)
            pairs = zip(after_A.split(self.r, -1), self.lora_B.split(self._enabled_sizes()))
            lora = torch.cat([h @ b.transpose(0, 1) for h, b in pairs], -1)
            result = result + self._pad_disabled(lora, -1) * self.scaling
        return result


def _rename_loralib_conv_keys(module, state_dict, prefix, *args) -> None:
    """loralib kept conv parameters under ``conv.``; accept those keys so its checkpoints still load."""
    for name in ("weight", "bias"):
        old_key = f"{prefix}conv.{name}"
        if old_key in state_dict:
            state_dict[prefix + name] = state_dict.pop(old_key)


class ConvLoRA(LoRALayer):
    """Shared base of Conv1d/2d/3d: an ``nn.ConvNd`` (with ``.weight``/``.bias``) plus LoRA.

    ``h = conv(x, W0) + b + (lora_alpha / r) * conv(dropout(x), reshape(B A))``. With kernel
    ``(k0, ..., kl)``: ``lora_A`` is ``(r*k0, in_channels*kl)`` and ``lora_B``
    ``(out_channels/groups * prod(kernel)/kl, r*k0)`` -- loralib's Conv2d layout for square kernels,
    extended so ``B A`` has the weight's size for 1d, 3d and non-square kernels (loralib issue 115).
    Unlike loralib's ``ConvLoRA(conv_module, ...)`` it is not built directly; use a subclass.
    """

    _conv_cls: type  # the wrapped nn.ConvNd, set by each subclass

    def __init__(self, in_channels: int, out_channels: int, kernel_size, r: int = 0, lora_alpha: int = 1,
                 lora_dropout: float = 0.0, merge_weights: bool = True, **kwargs):
        self._conv_cls.__init__(self, in_channels, out_channels, kernel_size, **kwargs)
        # Before LoRALayer's load hook, so that hook sees loralib's "conv.weight" as "weight".
        self.register_load_state_dict_pre_hook(_rename_loralib_conv_keys)
        LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           merge_weights=merge_weights)
        if r > 0:
            k0, k_last = self.kernel_size[0], self.kernel_size[-1]
            b_rows = out_channels // self.groups * math.prod(self.kernel_size) // k_last
            self.lora_A = nn.Parameter(self.weight.new_zeros((r * k0, in_channels * k_last)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((b_rows, r * k0)))
            self.weight.requires_grad = False
        self.reset_parameters()

    @classmethod
    def from_module(cls, base: nn.Module, r: int = 0, lora_alpha: int = 1, lora_dropout: float = 0.0,
                    merge_weights: bool = True) -> "ConvLoRA":
        """Wrap an existing ``nn.ConvNd``, keeping (sharing) its weight and bias (loralib issue 55)."""
        layer = cls(base.in_channels, base.out_channels, base.kernel_size, r=r, lora_alpha=lora_alpha,
                    lora_dropout=lora_dropout, merge_weights=merge_weights, stride=base.stride,
                    padding=base.padding, dilation=base.dilation, groups=base.groups,
                    bias=base.bias is not None, padding_mode=base.padding_mode, device="meta",
                    dtype=base.weight.dtype)
        return layer._adopt(base)

    def _delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).view(self.weight.shape) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_lora or self.merged:
            return self._conv_forward(x, self.weight, self.bias)
        delta = self._delta_weight()
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            # Dropout applies to the LoRA branch only, so it needs its own convolution (loralib skipped it).
            lora = self._conv_forward(self.lora_dropout(x), delta, None)
            return self._conv_forward(x, self.weight, self.bias) + lora
        # Both branches see the same input: one convolution with W0 + delta, as loralib does.
        return self._conv_forward(x, self.weight + delta, self.bias)


class Conv1d(ConvLoRA, nn.Conv1d):
    """``nn.Conv1d`` with LoRA; see ConvLoRA."""

    _conv_cls = nn.Conv1d


class Conv2d(ConvLoRA, nn.Conv2d):
    """``nn.Conv2d`` with LoRA; see ConvLoRA."""

    _conv_cls = nn.Conv2d


class Conv3d(ConvLoRA, nn.Conv3d):
    """``nn.Conv3d`` with LoRA; see ConvLoRA."""

    _conv_cls = nn.Conv3d
