"""The run resolved once: what a RunConfig means on this machine, for this model.

A run needs the same few answers in several steps: the model's config.json (context length, layer names for the
target-module check), the speed switches with `auto` turned into on or off, the dtype and the attention kernel the
base model loads with, and whether FSDP shards it. `plan_run` works them out once, before any weight is read, into a
frozen RunPlan that run_training (phitune.train) hands down to the recipe's steps, so no step reads config.json or
resolves the switches again, and each answer has one place where it is decided. Every step takes the plan; none
has a fallback that works it out without one.

torch and transformers are imported inside plan_run, not here: `phitune.config.schema` and the CLI's fast paths stay free
of them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from phitune.config.methods import PACKING_METHODS
from phitune.config.schema import RunConfig

log = logging.getLogger("phitune")

if TYPE_CHECKING:  # for the field types only: importing torch here would slow every config error down
    import torch
    from transformers import PretrainedConfig

    from phitune.speed import SpeedPlan


@dataclass(frozen=True)
class RunPlan:
    """What every step of one run reads instead of re-deriving it from the RunConfig."""

    model_config: PretrainedConfig  # the model's config.json, read once
    context: int | None  # max_position_embeddings: the longest sequence the model takes, when it says
    target_modules: str | list[str] | None  # peft_config.target_modules, checked against the model's layers
    speed: SpeedPlan  # padding-free, Liger, activation strategy
    dtype: torch.dtype  # the dtype the base weights load in (`torch_dtype: auto` resolved)
    attn_implementation: str  # the attention kernel the base model loads with (`auto` resolved)
    sharded: bool  # FSDP on GPUs: 4-bit weights stored in the compute dtype, no device_map

    @property
    def padding_free(self) -> bool:
        """Whether the SFT batches are concatenated rows (one switch of `speed`, read by data and attention)."""
        return self.speed.padding_free


def plan_run(cfg: RunConfig) -> RunPlan:
    """Resolve `cfg` once; fails (PhituneError) on a contradictory speed switch or a target that matches nothing,
    before the data is tokenized or a weight is read."""
    import torch

    from phitune.models.loading import check_target_modules, load_model_config, resolve_attn_implementation, resolve_dtype
    from phitune.run.processes import restarts_reuse_the_store
    from phitune.speed import resolve_speed

    if restarts_reuse_the_store():
        log.warning("torchrun will restart these workers (--max-restarts) with the store of their first attempt, "
                    "where a restarted worker can read a dead worker's address and fail or wait (pytorch issue "
                    "135712); start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and --rdzv-backend c10d")
    speed = resolve_speed(cfg.speed, quantized=bool(cfg.model.quantization), training_config=cfg.training_config)
    model_config = load_model_config(cfg.model)
    targets = cfg.peft_config.get("target_modules") if cfg.peft_config else None
    if cfg.backend == "peft":  # a target that matches nothing fails before the weights are read
        check_target_modules(cfg.model, targets, model_config=model_config)
    return RunPlan(
        model_config=model_config,
        context=getattr(model_config, "max_position_embeddings", None),
        target_modules=targets,
        speed=speed,
        dtype=resolve_dtype(cfg.model.torch_dtype, log_choice=True),
        attn_implementation=resolve_attn_implementation(cfg.model.attn_implementation, attention_padding_free(cfg,
                                                                                                              speed)),
        sharded=fsdp_requested(cfg) and torch.cuda.is_available(),  # CPU: DDP (run.warn_if_fsdp_fell_back)
    )


def machine_description() -> str:
    """What a run's numbers depend on beyond its config and seed, for metrics.json: torch's version, its threads and
    the CPU kernels it picked. The tiny GRPO example ended bit-identical at 1 and 2 threads and on a rerun
    (docs/grpo.md); other kernels (AVX2 vs AVX512) or versions round sums differently, and sampling makes the
    difference grow."""
    import torch

    kernels = torch.backends.cpu.get_cpu_capability()
    threads = torch.get_num_threads()
    return f"torch {torch.__version__}, {threads} thread{'' if threads == 1 else 's'}, {kernels} CPU kernels"


def attention_padding_free(cfg: RunConfig, speed) -> bool:
    """The padding-free flag `attn_implementation: auto` is chosen for: only SFT concatenates rows. DPO and ORPO
    batches are TRL's padded chosen/rejected pairs, so their base loads with the kernel for padded batches (sdpa, or
    flash-attn when installed), never flex_attention, whatever `speed.padding_free` says."""
    return speed.padding_free and cfg.method in PACKING_METHODS


def fsdp_requested(cfg: RunConfig) -> bool:
    """FSDP from an accelerate config (accelerate launch sets ACCELERATE_USE_FSDP) or from training_config.fsdp."""
    return bool(cfg.training_config.get("fsdp")) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
