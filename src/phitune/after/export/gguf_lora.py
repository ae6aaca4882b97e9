"""A PEFT LoRA adapter -> a GGUF LoRA adapter, for llama.cpp's `--lora` (and llama-cpp-python's `lora_path`).

Port of llama.cpp's `convert_lora_to_gguf.py`, which the `gguf` package does not ship: metadata
`general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and for each adapted weight `W` of the base
GGUF two tensors `W.lora_a` (r x in) and `W.lora_b` (out x r), kept in f32. Phi-3's fused `qkv_proj` and
`gate_up_proj` are llama.cpp's own fused `attn_qkv` and `ffn_up`, so phitune's adapter maps one to one.

llama.cpp computes h = W0 x + (alpha / r) B A x with one alpha for the file and r read from each tensor. PEFT allows
a scaling per module (rank_pattern / alpha_pattern, rsLoRA's alpha / sqrt(r), and the loralib backend's export
with its per-module ranks); wherever PEFT's scaling differs from alpha / r, the difference is folded into B.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from phitune.errors import PhituneError

PEFT_PREFIX = "base_model.model."


def write_gguf_lora(adapter_dir: Path, output: Path) -> int:
    """Write the adapter in `adapter_dir` to `output`; returns the number of adapted weights."""
    import gguf
    import numpy as np

    config = _read_config(adapter_dir)
    pairs = _lora_pairs(adapter_dir)
    n_blocks = 1 + max((int(m.group(1)) for k in pairs if (m := re.search(r"layers\.(\d+)\.", k))), default=0)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, n_blocks)
    alpha = float(config["lora_alpha"])
    writer = gguf.GGUFWriter(None, "phi3")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for module, (a, b) in pairs.items():
        name = name_map.get_name(module)  # e.g. blk.0.attn_qkv
        if name is None:
            raise PhituneError(f"adapted module {module} has no llama.cpp Phi-3 tensor; llama.cpp cannot load it")
        rank = a.shape[0]
        fold = _peft_scaling(config, module, rank) * rank / alpha  # so that alpha / r * fold = PEFT's scaling
        writer.add_tensor(f"{name}.weight.lora_a", a.astype(np.float32))
        writer.add_tensor(f"{name}.weight.lora_b", (b * fold).astype(np.float32))
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    try:
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial.replace(output)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    return len(pairs)


def _read_config(adapter_dir: Path) -> dict:
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise PhituneError(f"{adapter_dir} holds a {config.get('peft_type')} adapter; gguf-lora takes LoRA only")
    if config.get("use_dora"):
        raise PhituneError("llama.cpp has no DoRA: export --format gguf (merged) instead of gguf-lora")
    if config.get("modules_to_save") or config.get("trainable_token_indices"):
        raise PhituneError("the adapter also trains whole modules or tokens, which a GGUF LoRA cannot carry: "
                           "export --format gguf (merged) instead")
    return config


def _lora_pairs(adapter_dir: Path) -> dict:
    """{module name without the PEFT prefix: (A, B)} as float32 numpy, from adapter_model.safetensors."""
    import torch
    from safetensors import safe_open

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise PhituneError(f"{path} is missing; gguf-lora reads a safetensors PEFT adapter")
    pairs: dict[str, list] = {}
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            match = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
            if match is None:
                raise PhituneError(f"adapter tensor {key} is not a LoRA A/B matrix; export --format gguf instead")
            module = match.group(1).removeprefix(PEFT_PREFIX)
            pairs.setdefault(module, [None, None])["AB".index(match.group(2))] = \
                f.get_tensor(key).to(torch.float32).numpy()
    if any(a is None or b is None for a, b in pairs.values()):
        raise PhituneError(f"{path} has a LoRA A without its B (or the reverse); the adapter is incomplete")
    return {module: (a, b) for module, (a, b) in pairs.items()}


def _peft_scaling(config: dict, module: str, rank: int) -> float:
    """PEFT's scaling of one module: alpha / r, or alpha / sqrt(r) with rsLoRA; per-module patterns first."""
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a pattern key applies when the module name ends with it (as a regex, after a dot)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?{pattern}$", module):
            return value
    return default
