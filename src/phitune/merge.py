"""Merge: fold a LoRA adapter into its base model and save a standalone model, loadable without PEFT or phitune.

Merging computes W = W0 + (alpha/r) B A for every adapted layer (PEFT's merge_and_unload with safe_merge=True,
which refuses to write non-finite weights). A QLoRA adapter was trained against 4-bit weights, but 4-bit weights
cannot absorb a full-precision update, so its base is reloaded unquantised in the run's dtype and merged there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from phitune.config import ModelConfig
from phitune.errors import PhituneError

MAX_SHARD_SIZE = "2GB"  # safetensors shard size: small enough for any filesystem and for parallel downloads


@dataclass
class MergeResult:
    """What merge wrote, and whether the adapter came from a quantised (QLoRA) run."""

    output_dir: Path
    dequantized: bool
    dtype: str
    hub_url: str | None = None


def check_empty_output(output_dir: Path) -> None:
    """A merged model is never written over existing files (a half-overwritten model would load and be wrong)."""
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise PhituneError(f"{output_dir} exists and is not empty; choose a new --output directory")


def merge_adapter(model_cfg: ModelConfig, adapter: Path | None, output_dir: Path,
                  push_to_hub: str | None = None) -> MergeResult:
    """Load the base unquantised, apply and merge the adapter, save model + tokenizer + generation config."""
    from phitune.generate import attach_adapter
    from phitune.modeling import load_base_model, load_tokenizer, resolve_dtype

    if adapter is None:
        raise PhituneError("nothing to merge: the run holds a full model, not an adapter")
    output_dir = Path(output_dir)
    check_empty_output(output_dir)
    dequantized = bool(model_cfg.quantization)
    plain_cfg = replace(model_cfg, quantization=None)
    tokenizer = load_tokenizer(plain_cfg)
    model = attach_adapter(load_base_model(plain_cfg, training=False), adapter)
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # safe_merge found NaN or inf in a merged weight
        raise PhituneError(f"merging {adapter} gives non-finite weights ({exc}); the adapter is broken") from None
    set_generation_stops(merged, tokenizer)
    output_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(output_dir, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.save_pretrained(output_dir)
    dtype = str(resolve_dtype(model_cfg.torch_dtype)).replace("torch.", "")
    result = MergeResult(output_dir=output_dir, dequantized=dequantized, dtype=dtype)
    if push_to_hub:
        from phitune.hub import push_folder

        result.hub_url = push_folder(output_dir, push_to_hub)
    return result


def set_generation_stops(model, tokenizer) -> None:
    """generation_config stops at eos and at `<|end|>`, so plain `model.generate` ends a Phi-3 turn by itself."""
    from phitune.generate import stop_token_ids

    config = model.generation_config
    existing = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    config.eos_token_id = list(dict.fromkeys([i for i in existing + stop_token_ids(tokenizer) if i is not None]))
    config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = True
