"""The model directory an export reads: a run's adapter merged into its base, or a full / merged model as it is."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

from phitune.config import ModelConfig
from phitune.errors import PhituneError

# Tokenizer files llama.cpp's Phi-3 conversion reads that a transformers 5 save_pretrained does not write: the
# SentencePiece model and the added-token ids (the real Phi-3's tokenizer is SentencePiece).
SENTENCEPIECE_FILES = ("tokenizer.model", "added_tokens.json")


@contextmanager
def model_directory(model_cfg: ModelConfig, adapter: Path | None, scratch: Path):
    """Yield a local directory holding the full model to export; an adapter is merged into `scratch` first."""
    from phitune.merge import merge_adapter

    if adapter is None:
        model_dir = Path(model_cfg.name_or_path)
        if not (model_dir / "config.json").is_file():
            raise PhituneError(f"{model_cfg.name_or_path} is not a local model directory; export reads a run "
                               "directory, or --model DIR of a merged or downloaded model")
        yield model_dir
        return
    merged = scratch / "merged"
    merge_adapter(model_cfg, adapter, merged)
    copy_sentencepiece_files(model_cfg, merged)
    yield merged


def copy_sentencepiece_files(model_cfg: ModelConfig, merged: Path) -> list[str]:
    """Copy tokenizer.model / added_tokens.json from the base next to the merged model, where missing."""
    copied = []
    for name in SENTENCEPIECE_FILES:
        if (merged / name).exists():
            continue
        found = _base_file(model_cfg, name)
        if found is not None:
            shutil.copyfile(found, merged / name)
            copied.append(name)
    return copied


def _base_file(model_cfg: ModelConfig, name: str) -> Path | None:
    """The base model's file `name`: from its directory, or from the hub (cache first); None where it has none."""
    base = Path(model_cfg.name_or_path)
    if base.is_dir():
        return base / name if (base / name).is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(model_cfg.name_or_path, name, revision=model_cfg.revision))
    except Exception:  # noqa: BLE001  the file does not exist there, or the hub is out of reach: export without it
        return None
