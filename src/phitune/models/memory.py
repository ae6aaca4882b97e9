"""GPU memory a LoRA or QLoRA run needs, computed from the model's shapes (computed, not measured).

    python -m phitune.models.memory examples/phi4-lora.yaml [more.yaml ...]

A model is known by its hub id (SHAPES), or by a local folder named as one (models/Phi-4-multimodal-instruct).

The shipped family examples quote these numbers; tests/test_families.py holds them equal. The model:

    weights      LoRA: every parameter in bf16 (2 B). QLoRA: decoder linear layers in NF4 with double quantisation
                 (4 bits + 8-bit absmax per 64 weights + fp32 per 256 absmax = 4.127 bits), the rest in bf16: the
                 embeddings, lm_head, norms and, in transformers 5, an MoE's experts (3-D parameters, which
                 bitsandbytes does not quantise: checked on a tiny PhiMoE) and its router.
    adapter      LoRA parameters in fp32, their gradients and two Adam moments: 16 B each (PEFT keeps them fp32).
                 all-linear: r x (in + out) per linear layer (a fused one counts once); per expert for
                 MoE expert weights.
    activations  phitune's CUDA default `selective` checkpointing keeps each layer's input and its attention output
                 (2 x hidden values per token per layer, bf16; benchmarks/RESULTS.md measured 24,704 B fp32 for
                 Phi-3-mini, 2.01 x hidden x 4 B); the backward recomputes one layer at a time, whose working set is
                 6 h + (q + k + v) + 5 I x top_k values per token (for Phi-3-mini 68,608; measured 66,850); TRL's
                 fused loss holds one fp32 logits tile of 4,096 tokens x 32,768 vocabulary entries.
    expert delta MoE only: PEFT's LoRA on a 3-D expert weight materialises the delta and the adapted weight (bf16)
                 and the delta's fp32 gradient for the layer being computed: 8 B per expert weight of one layer.
    overhead     CUDA context and allocator slack: 1 GB, assumed.

Not counted: an eval batch running beside training, the optimizer's temporary buffers, fragmentation beyond the 1 GB.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

GB = 1e9
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4.127: NF4 values, 8-bit absmax per 64, fp32 constant per 256 absmax
ADAPTER_BYTES = 4 + 4 + 8  # fp32 value, fp32 gradient, Adam's two fp32 moments
LOGITS_TILE = 4096 * 32768 * 4  # TRL's chunked log-prob: TOKEN_CHUNK_SIZE x chunk_size, fp32
OVERHEAD_GB = 1.0  # CUDA context and allocator slack (assumed)


@dataclass(frozen=True)
class Shape:
    """A Phi model's sizes, as in its config.json (written from the model cards, not downloaded)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False
    experts: int = 0  # MoE: experts per layer
    top_k: int = 1  # MoE: experts per token
    frozen: int = 0  # parameters beside the language model, kept in bf16 under LoRA and QLoRA alike

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def attention_linears(self) -> list[tuple[int, int]]:
        """(in, out) of the attention's linear layers: Phi-3 fuses q, k, v into qkv_proj; PhiMoE keeps them apart."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.experts:
            return [(self.hidden, q), (self.hidden, kv), (self.hidden, kv), (q, self.hidden)]
        return [(self.hidden, q + 2 * kv), (q, self.hidden)]

    def mlp_linears(self) -> list[tuple[int, int]]:
        """(in, out) of one MLP (one expert's for MoE): gate_up (fused in both), then down."""
        return [(self.hidden, 2 * self.intermediate), (self.intermediate, self.hidden)]


PHI4_MINI = Shape(3072, 32, 24, 8, 8192, 200064, tied=True)
# Phi-4-multimodal: Phi-4-mini's language model + the SigLIP vision tower and Conformer audio encoder that
# transformers' Phi4MultimodalConfig defaults build (907,982,272 parameters) + its built-in vision-lora (r 256) and
# speech-lora (r 320) on every linear layer of the language model, kept in bf16 beside it to be chosen per row.
PHI4_MULTIMODAL_FROZEN = 907_982_272 + 256 * 45056 * 32 + 320 * 45056 * 32  # 45,056 = in + out of one layer's linears

SHAPES = {
    "microsoft/Phi-3-mini-4k-instruct": Shape(3072, 32, 32, 32, 8192, 32064),
    "microsoft/Phi-3-mini-128k-instruct": Shape(3072, 32, 32, 32, 8192, 32064),
    "microsoft/Phi-3.5-mini-instruct": Shape(3072, 32, 32, 32, 8192, 32064),
    "microsoft/Phi-3-medium-4k-instruct": Shape(5120, 40, 40, 10, 17920, 32064),
    "microsoft/Phi-3-medium-128k-instruct": Shape(5120, 40, 40, 10, 17920, 32064),
    "microsoft/Phi-4-mini-instruct": PHI4_MINI,
    "microsoft/phi-4": Shape(5120, 40, 40, 10, 17920, 100352),
    "microsoft/Phi-4-mini-reasoning": PHI4_MINI,
    "microsoft/Phi-4-reasoning": Shape(5120, 40, 40, 10, 17920, 100352),  # Phi-4's, fine-tuned
    "microsoft/Phi-3.5-MoE-instruct": Shape(4096, 32, 32, 8, 6400, 32064, experts=16, top_k=2),
    "microsoft/Phi-4-multimodal-instruct": replace(PHI4_MINI, frozen=PHI4_MULTIMODAL_FROZEN),
}


def parameters(shape: Shape) -> dict[str, int]:
    """Parameter counts: decoder linear layers (quantisable), experts, embeddings + lm_head (norms are negligible)."""
    mlp = sum(i * o for i, o in shape.mlp_linears())
    attention = sum(i * o for i, o in shape.attention_linears())
    router = shape.hidden * shape.experts
    return {"linear": shape.layers * (attention + (0 if shape.experts else mlp) + router),
            "experts": shape.layers * shape.experts * mlp,
            "embeddings": shape.vocab * shape.hidden * (1 if shape.tied else 2)}


def lora_parameters(shape: Shape, r: int) -> int:
    """LoRA parameters of `all-linear` at rank r: r x (in + out) per linear layer, per expert for MoE experts."""
    per_layer = sum(r * (i + o) for i, o in shape.attention_linears())
    per_layer += sum(r * (i + o) for i, o in shape.mlp_linears()) * max(shape.experts, 1)
    return shape.layers * per_layer


def activation_bytes(shape: Shape, tokens: int) -> int:
    """Bytes of activations for `tokens` tokens per micro-batch under selective checkpointing (bf16)."""
    kept = shape.layers * tokens * 2 * shape.hidden * 2
    qkv = (shape.heads + 2 * shape.kv_heads) * shape.head_dim
    one_layer = tokens * (6 * shape.hidden + qkv + 5 * shape.intermediate * shape.top_k) * 2
    tile = min(tokens, 4096) * min(shape.vocab, 32768) * 4
    return kept + one_layer + tile


@dataclass
class Estimate:
    """GPU memory of one training process, in GB (1e9 bytes)."""

    weights: float
    adapter: float
    activations: float
    expert_delta: float
    overhead: float = OVERHEAD_GB

    @property
    def total(self) -> float:
        return self.weights + self.adapter + self.activations + self.expert_delta + self.overhead


def estimate(shape: Shape, r: int, batch: int, seq_len: int, quantized: bool) -> Estimate:
    """GPU memory of a LoRA (or QLoRA, `quantized`) run of `shape` on all-linear at rank r, `batch` x `seq_len`."""
    counts = parameters(shape)
    bf16 = counts["experts"] + counts["embeddings"] + shape.frozen
    weights = counts["linear"] * NF4_BITS / 8 + bf16 * 2 if quantized else (counts["linear"] + bf16) * 2
    expert_delta = sum(i * o for i, o in shape.mlp_linears()) * shape.experts * 8
    return Estimate(weights=weights / GB, adapter=lora_parameters(shape, r) * ADAPTER_BYTES / GB,
                    activations=activation_bytes(shape, batch * seq_len) / GB, expert_delta=expert_delta / GB)


def shape_of(name: str) -> Shape:
    """The shape of a hub id in SHAPES, or of a local folder named as one (models/Phi-4-multimodal-instruct)."""
    from phitune.errors import PhituneError

    shape = SHAPES.get(name) or SHAPES.get(f"microsoft/{Path(name).name}")
    if shape is None:
        raise PhituneError(f"no shape known for {name}: phitune.models.memory knows {', '.join(SHAPES)} (or a local "
                           "folder named as one of them, e.g. models/Phi-4-multimodal-instruct)")
    return shape


def estimate_run(cfg, quantized: bool | None = None) -> Estimate:
    """The estimate for a RunConfig (model named in SHAPES, all-linear); `quantized` None: as the config says."""
    from phitune.errors import PhituneError

    shape = shape_of(cfg.model.name_or_path)
    if cfg.peft_config is None:
        raise PhituneError("phitune.models.memory estimates a LoRA run from its peft_config (r on all-linear); this "
                           "config has none (" + ("its adapter comes from model.adapter" if cfg.model.adapter else
                                                  "a full fine-tune") + ")")
    quantized = bool(cfg.model.quantization) if quantized is None else quantized
    return estimate(shape, cfg.peft_config.get("r", 8), cfg.training_config.get("per_device_train_batch_size", 8),
                    cfg.data.max_seq_length, quantized)


def summary(cfg) -> str:
    """One line per method: total and parts, rounded up to the next GB for the total."""
    lines = []
    for name, quantized in (("LoRA", False), ("QLoRA", True)):
        e = estimate_run(cfg, quantized)
        lines.append(f"{name}: {math.ceil(e.total)} GB (weights {e.weights:.1f}, adapter + Adam {e.adapter:.1f}, "
                     f"activations {e.activations:.1f}" + (f", expert delta {e.expert_delta:.1f}" if e.expert_delta
                                                           else "") + f", CUDA {e.overhead:.0f})")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # a usage mistake: one line and exit code 2, as phitune's own commands
        self.exit(2, f"error: {message} ({self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    """`python -m phitune.models.memory FILE.yaml ...`: each file's figures; a bad file is one line, exit code 2."""
    from phitune.config.schema import load_config
    from phitune.errors import PhituneError

    parser = _Parser(prog="python -m phitune.models.memory",
                     description="GPU memory of a LoRA and a QLoRA run of each config's model at its settings "
                                 "(computed from the model's shapes, not measured).")
    parser.add_argument("configs", nargs="+", metavar="FILE.yaml", help="a phitune config")
    args = parser.parse_args(argv)
    from phitune.terminal import setup_logging

    setup_logging()  # as phitune's commands: no libraries' chatter (bitsandbytes' note on its CPU kernels)
    try:
        for path in args.configs:
            cfg = load_config(path)
            print(f"{path}\n{summary(cfg)}")
            if cfg.method == "distill":  # its teacher is another model, loaded beside the student
                print(f"(the student only: the teacher {cfg.teacher.name_or_path} comes on top; the config's comments "
                      "give the whole)")
    except PhituneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
