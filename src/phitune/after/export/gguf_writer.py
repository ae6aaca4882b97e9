"""Write one GGUF file from a Hugging Face Phi-3 directory: metadata, tokenizer, then the tensors, streamed."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from phitune.errors import PhituneError
import phitune.after.export.quant as quants
from phitune.after.export.gguf_model import (ARCH, GGUFResult, add_hparams, hf_config, load_tensor, plan_weights,
                                       safetensors_shapes)
from phitune.after.export.gguf_vocab import add_vocab, gguf_name


def write_gguf(model_dir: Path, output: Path, quant: str = "f16", name: str | None = None) -> GGUFResult:
    """Write `model_dir` (a merged or full Phi-3) to `output` as GGUF with `quant` tensors; see quant.py for types."""
    quant = quants.check_quant(quant)
    if quant in quants.LLAMA_QUANTIZE:
        return _write_via_llama_quantize(model_dir, output, quant, name)
    return _write_direct(model_dir, output, quant, name)


def _write_direct(model_dir: Path, output: Path, quant: str, name: str | None) -> GGUFResult:
    import gguf

    from phitune.config.schema import ModelConfig
    from phitune.models.loading import load_tokenizer

    config = hf_config(model_dir)
    shapes = safetensors_shapes(model_dir)
    result = GGUFResult(path=output, quant=quant)
    writer = gguf.GGUFWriter(None, ARCH)
    writer.add_file_type(quants.file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    plans = add_hparams(writer, config)
    plans += plan_weights(shapes, config.num_hidden_layers, quants.type_chooser(quant, result.kept_f16))
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(model_dir)))
    result.special_ids = add_vocab(writer, model_dir, config.vocab_size, tokenizer)
    writer.add_name(gguf_name(name or model_dir.name, tokenizer))
    weights = [p for p in plans if len(p.shape) > 1]
    if quant not in ("f32", "f16") and weights and len(result.kept_f16) == len(weights):
        raise PhituneError(f"--quant {quant}: no weight of this model has rows that fit its blocks "
                           f"({result.kept_f16[0]}); export f16 or bf16 instead")
    for plan in plans:
        shape, dtype = quants.byte_shape(plan.shape, plan.qtype)
        nbytes = dtype.itemsize * math.prod(shape)
        writer.add_tensor_info(plan.name, shape, dtype, nbytes, raw_dtype=plan.qtype if dtype.kind == "u" else None)
        result.tensor_types[plan.name] = plan.qtype
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")  # a crash never leaves a half-written FILE.gguf
    try:
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for plan in plans:
            writer.write_tensor_data(quants.encode(load_tensor(plan, shapes), plan.qtype))
        writer.close()
        partial.replace(output)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    return result


def _write_via_llama_quantize(model_dir: Path, output: Path, quant: str, name: str | None) -> GGUFResult:
    """f16 GGUF to a temporary file, then llama.cpp's quantiser writes `output`."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".phitune-export-") as tmp:
        f16 = _write_direct(model_dir, Path(tmp) / "f16.gguf", "f16", name)
        quants.llama_quantize(f16.path, Path(tmp) / "quantized.gguf", quant)
        (Path(tmp) / "quantized.gguf").replace(output)  # a failed quantisation leaves no FILE.gguf
    return GGUFResult(path=output, quant=quant, special_ids=f16.special_ids)

