"""The model directory an export reads: a run's adapter merged into its base, or a full / merged model as it is."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from phitune.config.schema import ModelConfig
from phitune.errors import PhituneError


@contextmanager
def model_directory(model_cfg: ModelConfig, adapter: Path | None, scratch: Path):
    """Yield a local directory holding the full model to export; an adapter is merged into `scratch` first."""
    from phitune.after.merge import merge_adapter

    if adapter is None:
        model_dir = Path(model_cfg.name_or_path)
        if not (model_dir / "config.json").is_file():
            raise PhituneError(f"{model_cfg.name_or_path} is not a local model directory; export reads a run "
                               "directory, or --model DIR of a merged or downloaded model")
        yield model_dir
        return
    merged = scratch / "merged"
    merge_adapter(model_cfg, adapter, merged)  # also copies tokenizer.model / added_tokens.json from the base
    yield merged
