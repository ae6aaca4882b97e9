"""Export for serving: one GGUF file (llama.cpp, LM Studio, Ollama), an Ollama Modelfile, or a GGUF LoRA adapter.

    phitune export RUN_DIR --format gguf --output model.gguf [--quant f16|bf16|q8_0|q4_k_m|...] [--ollama]

The adapter of RUN_DIR is merged into its base (phitune.after.merge), and the merged model is written with its tokenizer,
chat template and `<|end|>` as end of turn. tests/test_export.py checks the file with llama.cpp itself.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from phitune.errors import PhituneError, WriteFailed, is_write_failure, pip_install, write_error

FORMATS = ("gguf", "gguf-lora")


@dataclass
class ExportResult:
    """What `export_run` wrote."""

    path: Path
    format: str
    quant: str | None = None
    modelfile: Path | None = None
    kept_f16: list[str] = field(default_factory=list)
    special_ids: dict = field(default_factory=dict)


def export_run(run_dir: Path | None, output: Path, fmt: str = "gguf", quant: str = "f16", ollama: bool = False,
               model: str | None = None, adapter: Path | None = None) -> ExportResult:
    """Export a run (or --model / --adapter) to `output`; every check runs before the model is loaded."""
    from phitune.after.export.quant import check_quant
    from phitune.after.generate import refuse_reward_model, resolve_model_source

    output = Path(output)
    if fmt not in FORMATS:
        raise PhituneError(f"--format {fmt} is not one of: {', '.join(FORMATS)}")
    check_export_extras(fmt, check_quant(quant))
    if output.exists():
        raise PhituneError(f"{output} exists; choose a new --output file")
    if ollama and fmt != "gguf":
        raise PhituneError("--ollama needs --format gguf (Ollama runs a whole model file)")
    if ollama and (output.parent / "Modelfile").exists():
        raise PhituneError(f"{output.parent / 'Modelfile'} exists; export to another directory or remove it")
    model_cfg, adapter_dir = resolve_model_source(run_dir, model, adapter)
    refuse_vision_models(model_cfg)
    refuse_reward_model(adapter_dir)
    try:
        return _export(model_cfg, adapter_dir, output, fmt, check_quant(quant), ollama)
    except WriteFailed as exc:  # the merge into the scratch folder beside `output`: the user asked for `output`
        output.unlink(missing_ok=True)
        raise PhituneError(f"could not write {output}: {exc.reason}; no {output.name} was left") from None
    except Exception as exc:
        if not is_write_failure(exc):
            raise
        failed = write_error(exc, output)
        output.unlink(missing_ok=True)  # a GGUF cut short would load and be wrong
        raise PhituneError(f"{failed}; no {output.name} was left") from None


def _export(model_cfg, adapter_dir, output: Path, fmt: str, quant: str, ollama: bool) -> ExportResult:
    """The file of `fmt` (and an Ollama Modelfile) from the model and adapter."""
    if fmt == "gguf-lora":
        from phitune.after.export.gguf_lora import write_gguf_lora

        if adapter_dir is None:
            raise PhituneError("--format gguf-lora needs a run with a LoRA adapter, not a full model")
        write_gguf_lora(adapter_dir, output)
        return ExportResult(path=output, format=fmt)
    return _export_gguf(model_cfg, adapter_dir, output, quant, ollama)


VISION_MODEL_TYPES = ("phi4_multimodal", "phi3_v")  # Phi-4-multimodal, Phi-3.5-vision


def refuse_vision_models(model_cfg) -> None:
    """A vision model is refused before anything is merged: its GGUF would need the vision tower (and audio encoder)
    as a separate llama.cpp projector file, which phitune does not write, and the language model alone would answer
    without ever seeing a picture."""
    from phitune.models.loading import load_model_config

    model_type = getattr(load_model_config(model_cfg), "model_type", "")
    if model_type in VISION_MODEL_TYPES:
        raise PhituneError(f"{model_cfg.name_or_path} is a vision model ({model_type}): phitune's GGUF export writes a "
                           "text model only, without the image encoder llama.cpp would need beside it; serve the "
                           "merged model (phitune merge) with transformers or vLLM instead")


def check_export_extras(fmt: str, quant: str) -> None:
    """The optional packages an export needs, imported first: a missing one is a one-line error before the model
    is loaded and merged (minutes for a real model), not after."""
    from phitune.after.export.quant import LLAMA_QUANTIZE, require_llama_cpp

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise PhituneError("phitune export needs the gguf package, which the [export] extra installs: "
                           f"{pip_install('export')}") from None
    if fmt == "gguf" and quant in LLAMA_QUANTIZE:
        require_llama_cpp(quant)


def _export_gguf(model_cfg, adapter_dir, output: Path, quant: str, ollama: bool) -> ExportResult:
    from phitune.after.export.gguf_writer import write_gguf
    from phitune.after.export.ollama import write_modelfile
    from phitune.after.export.source import model_directory

    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".phitune-export-") as scratch, \
            model_directory(model_cfg, adapter_dir, Path(scratch)) as model_dir:
        written = write_gguf(model_dir, output, quant, name=output.stem)
    result = ExportResult(path=output, format="gguf", quant=quant, kept_f16=written.kept_f16,
                          special_ids=written.special_ids)
    if ollama:
        result.modelfile = write_modelfile(output)
    return result
