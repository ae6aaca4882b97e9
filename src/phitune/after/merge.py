"""Merge: fold a LoRA adapter into its base model and save a standalone model, loadable without PEFT or phitune.

Phi-4-multimodal keeps its built-in `vision-lora/` and `speech-lora/` folders beside the merged weights, as the
original checkpoint does (its model card loads them with `model.load_adapter(..., subfolder=...)`).

Merging computes W = W0 + (alpha/r) B A for every adapted layer (PEFT's merge_and_unload with safe_merge=True,
which refuses to write non-finite weights). A QLoRA adapter was trained against 4-bit weights, but 4-bit weights
cannot absorb a full-precision update, so its base is reloaded unquantised and merged there.

The merged model keeps the base checkpoint's dtype (bf16 in, bf16 out; `dtype` chooses another), whatever dtype the
run trained in: the base is loaded once, directly in that dtype, and merged in place, so the model is in memory once
(Phi-3-mini in bf16: 7.6 GB, not 15.3 GB twice). The tokenizer files of the base that a save does not rewrite
(`tokenizer.model`, `added_tokens.json`, ...) are copied as they are: llama.cpp's converter reads them.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from phitune.config.schema import ModelConfig
from phitune.errors import PhituneError, WriteFailed, is_write_failure, write_error

MAX_SHARD_SIZE = "2GB"  # safetensors shard size: small enough for any filesystem and for parallel downloads
DTYPES = ("auto", "bfloat16", "float16", "float32")  # auto: the base checkpoint's own dtype
TOKENIZER_FILES = (  # every file a Hugging Face tokenizer may be made of; the base's are all carried over
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "vocab.json", "merges.txt",
    "preprocessor_config.json", "processor_config.json",  # a multimodal model's image / audio processor settings
)


@dataclass
class MergeResult:
    """What merge wrote, and whether the adapter came from a quantised (QLoRA) run."""

    output_dir: Path
    dequantized: bool
    dtype: str
    size_bytes: int = 0  # the safetensors files written
    hub_url: str | None = None


def check_empty_output(output_dir: Path) -> None:
    """A merged model is never written over existing files (a half-overwritten model would load and be wrong)."""
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise PhituneError(f"{output_dir} exists and is not empty; choose a new --output directory")


def merge_adapter(model_cfg: ModelConfig, adapter: Path | None, output_dir: Path,
                  push_to_hub: str | None = None, dtype: str = "auto") -> MergeResult:
    """Load the base unquantised in the merge dtype, apply and merge the adapter, save model + tokenizer + generation
    config; `dtype` auto keeps the base checkpoint's dtype."""
    from phitune.after.generate import attach_adapter, refuse_reward_model
    from phitune.models.loading import load_base_model, load_tokenizer, untie_embeddings_for

    if adapter is None:
        raise PhituneError("nothing to merge: the run holds a full model, not an adapter")
    refuse_reward_model(adapter)
    output_dir = Path(output_dir).resolve()  # `.` or `..` name no folder: the work folder is named after this one
    check_empty_output(output_dir)
    plain_cfg = replace(model_cfg, quantization=None, torch_dtype=merge_dtype(model_cfg, dtype))
    tokenizer = load_tokenizer(plain_cfg)
    base = load_base_model(plain_cfg, training=False)
    untie_embeddings_for(base, adapter_target_modules(adapter))  # as training did, or the merge changes both
    model = attach_adapter(base, adapter)
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # safe_merge found NaN or inf in a merged weight
        raise PhituneError(f"merging {adapter} gives non-finite weights ({exc}); the adapter is broken") from None
    set_generation_stops(merged, tokenizer)
    save_merged(merged, tokenizer, model_cfg, output_dir)
    result = MergeResult(output_dir=output_dir, dequantized=bool(model_cfg.quantization), dtype=plain_cfg.torch_dtype,
                         size_bytes=sum(p.stat().st_size for p in output_dir.glob("*.safetensors")))
    if push_to_hub:
        from phitune.after.hub import push_folder

        result.hub_url = push_folder(output_dir, push_to_hub)
    return result


def save_merged(merged, tokenizer, model_cfg: ModelConfig, output_dir: Path) -> None:
    """Save model, tokenizer and the base's tokenizer files into a hidden sibling folder, then move them to
    `output_dir` (absent or empty): an interrupt or a full disk leaves no half-written model, and the folders this
    call made are removed again. A folder the user made is never deleted."""
    created = [folder for folder in output_dir.parents if not folder.exists()]  # deepest first
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    try:
        merged.save_pretrained(work, max_shard_size=MAX_SHARD_SIZE)
        tokenizer.save_pretrained(work)
        copy_tokenizer_files(model_cfg, work)
        if getattr(merged.config, "model_type", "") == "phi4_multimodal":
            copy_built_in_loras(model_cfg, work)
        move_into_place(work, output_dir)
    except BaseException as exc:
        failed = write_error(exc, output_dir) if is_write_failure(exc) else None
        shutil.rmtree(work, ignore_errors=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:  # not empty: something else was put there meanwhile
                break
        if failed:
            raise WriteFailed(f"{failed}; nothing was written to {output_dir}", failed.reason) from None
        raise


def move_into_place(work: Path, output_dir: Path) -> None:
    """Rename `work` to a new `output_dir`. An existing empty one is kept and filled instead (renaming over it would
    leave a shell or process working in it inside a deleted folder, e.g. after `--output .`): config.json goes last,
    so the folder holds no loadable model until every file is there, and an interrupt takes the moved files back."""
    if not output_dir.exists():
        try:
            work.rename(output_dir)
        except OSError:
            raise PhituneError(f"{output_dir} was filled while merging; choose a new --output directory") from None
        return
    check_empty_output(output_dir)
    files = sorted(work.iterdir(), key=lambda path: path.name == "config.json")
    moved = []
    try:
        for path in files:
            os.replace(path, output_dir / path.name)
            moved.append(output_dir / path.name)
    except BaseException:
        for path in moved:
            path.unlink(missing_ok=True)
        raise
    work.rmdir()


def adapter_target_modules(adapter: Path):
    """target_modules of a saved PEFT adapter (a list of names or a regex string), None if it has no config."""
    import json

    config = Path(adapter) / "adapter_config.json"
    return json.loads(config.read_text()).get("target_modules") if config.is_file() else None


def merge_dtype(model_cfg: ModelConfig, dtype: str = "auto") -> str:
    """The dtype to merge and save in: `dtype` when given, else the one the base checkpoint is stored in."""
    from phitune.models.loading import load_model_config

    if dtype not in DTYPES:
        raise PhituneError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    stored = getattr(load_model_config(model_cfg), "dtype", None)  # config.json's dtype (torch_dtype before v5)
    stored = str(stored).replace("torch.", "") if stored is not None else "float32"
    return stored if stored in DTYPES[1:] else "float32"


def copy_tokenizer_files(model_cfg: ModelConfig, output_dir: Path) -> list[str]:
    """Copy the base's tokenizer files that the tokenizer's own save did not write; return their names."""
    from transformers.utils import cached_file

    copied = []
    for name in TOKENIZER_FILES:
        if (output_dir / name).exists():
            continue
        source = cached_file(model_cfg.name_or_path, name, revision=model_cfg.revision,
                             _raise_exceptions_for_missing_entries=False,
                             _raise_exceptions_for_connection_errors=False)
        if source is not None:
            shutil.copyfile(source, output_dir / name)
            copied.append(name)
    return copied


def copy_built_in_loras(model_cfg: ModelConfig, output_dir: Path) -> list[str]:
    """Copy Phi-4-multimodal's built-in `vision-lora/` and `speech-lora/` beside the merged model: the user's LoRA
    is folded into the base weights, the built-in ones stay adapters chosen per row (phitune.models.built_in_lora),
    as in the original checkpoint. LoRA terms add up, so W0 + the user's update, then a built-in adapter on top, is
    exactly what the run trained and evaluated."""
    from phitune.models.built_in_lora import find_built_in_loras

    folders = find_built_in_loras(model_cfg, warn=False)
    for folder in folders.values():
        shutil.copytree(folder, output_dir / folder.name)
    return [folder.name for folder in folders.values()]


def set_generation_stops(model, tokenizer) -> None:
    """generation_config stops at eos and at `<|end|>`, so plain `model.generate` ends a Phi-3 turn by itself."""
    from phitune.after.generate import stop_token_ids

    config = model.generation_config
    existing = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    config.eos_token_id = list(dict.fromkeys([i for i in existing + stop_token_ids(tokenizer) if i is not None]))
    config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = True
