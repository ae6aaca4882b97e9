"""Which tensor types a `--quant` choice means, and who quantises: the `gguf` package or llama.cpp itself.

f32, f16, bf16 and q8_0 are what llama.cpp's HF converter writes directly, and the `gguf` package's quantisers do
them here. Every other type (q4_0 ... q6_k, the K-quants with their per-tensor mixes) is llama.cpp's
`llama-quantize` job; phitune writes f16 first and calls the same C function through llama-cpp-python.

Rules from the converter's `prepare_tensors`: 1-D tensors (norms) and LongRoPE factors stay f32. A tensor whose row
length is not a multiple of the quant block (32 for q8_0) cannot be quantised and is written f16, as the converter
does; the export summary lists these. If no tensor at all can take the asked type, the export stops with an error
instead of writing a file that is not what was asked for.
"""

from __future__ import annotations

from pathlib import Path

from phitune.errors import PhituneError

# --quant name -> (GGML type of 2-D weights, llama.cpp file type)
DIRECT = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
          "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
# --quant name -> llama.cpp file type, done by llama.cpp's own quantiser
LLAMA_QUANTIZE = {"q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1",
                  "q2_k": "MOSTLY_Q2_K", "q3_k_s": "MOSTLY_Q3_K_S", "q3_k_m": "MOSTLY_Q3_K_M",
                  "q3_k_l": "MOSTLY_Q3_K_L", "q4_k_s": "MOSTLY_Q4_K_S", "q4_k_m": "MOSTLY_Q4_K_M",
                  "q5_k_s": "MOSTLY_Q5_K_S", "q5_k_m": "MOSTLY_Q5_K_M", "q6_k": "MOSTLY_Q6_K"}
QUANTS = [*DIRECT, *LLAMA_QUANTIZE]


def check_quant(quant: str) -> str:
    """The normalised quant name, or a one-line error listing the choices."""
    name = quant.lower().replace("-", "_")
    if name not in QUANTS:
        raise PhituneError(f"--quant {quant} is not one of: {', '.join(QUANTS)}")
    return name


def type_chooser(quant: str, kept_f16: list[str]):
    """A function (gguf name, numpy shape) -> GGML type for `quant` in DIRECT; appends fallbacks to `kept_f16`."""
    import gguf

    weight_type = gguf.GGMLQuantizationType[DIRECT[quant][0]]
    block = gguf.GGML_QUANT_SIZES[weight_type][0]

    def choose(name: str, shape: tuple[int, ...]) -> int:
        if len(shape) <= 1 or name.endswith("_norm.weight"):
            return int(gguf.GGMLQuantizationType.F32)
        if shape[-1] % block:
            kept_f16.append(f"{name} (rows of {shape[-1]}, not a multiple of {block})")
            return int(gguf.GGMLQuantizationType.F16)
        return int(weight_type)

    return choose


def file_type(quant: str) -> int:
    import gguf

    return int(gguf.LlamaFileType[DIRECT[quant][1]])


def encode(values, qtype: int):
    """float32 numpy -> the bytes (numpy array) GGUF stores for this GGML type."""
    import gguf
    import numpy as np

    kind = gguf.GGMLQuantizationType(qtype)
    if kind == gguf.GGMLQuantizationType.F32:
        return values.astype(np.float32)
    if kind == gguf.GGMLQuantizationType.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values, kind)


def byte_shape(shape: tuple[int, ...], qtype: int) -> tuple[tuple[int, ...], object]:
    """(shape, numpy dtype) as GGUFWriter.add_tensor_info wants them: quantised types are uint8 rows of blocks."""
    import gguf
    import numpy as np

    kind = gguf.GGMLQuantizationType(qtype)
    if kind == gguf.GGMLQuantizationType.F32:
        return shape, np.dtype(np.float32)
    if kind == gguf.GGMLQuantizationType.F16:
        return shape, np.dtype(np.float16)
    return gguf.quant_shape_to_byte_shape(shape, kind), np.dtype(np.uint8)


def require_llama_cpp(quant: str):
    """llama-cpp-python, which the quants beyond DIRECT need; a one-line error naming the way round when missing."""
    try:
        import llama_cpp
    except ImportError:
        raise PhituneError(f"--quant {quant} is done by llama.cpp's quantiser: pip install llama-cpp-python, or "
                           f"export f16 and run llama-quantize FILE.gguf OUT.gguf {quant.upper()}") from None
    return llama_cpp


def llama_quantize(source: Path, output: Path, quant: str, threads: int = 0) -> None:
    """Quantise an f16 GGUF with llama.cpp's own quantiser (llama_model_quantize, as `llama-quantize` runs it)."""
    llama_cpp = require_llama_cpp(quant)
    import gguf

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[LLAMA_QUANTIZE[quant]])
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(output).encode(), params)
    if status != 0:
        raise PhituneError(f"llama.cpp could not quantise {source} to {quant} (status {status}); run with --debug")
