"""Activation budget of one Phi-3-mini decoder layer: the work of a LoRA step and the bytes it keeps for backward.

    python benchmarks/activation_budget.py                    # real size, 2048 tokens, float32 (~2 min, ~3 GiB)
    python benchmarks/activation_budget.py --tokens 256 --json

One `Phi3DecoderLayer` at Phi-3-mini's size (hidden 3072, intermediate 8192, 32 heads, 32 kv heads), frozen, with
PEFT LoRA (r 16, alpha 32, dropout 0, as benchmarks/throughput.py) on qkv_proj, o_proj, gate_up_proj and down_proj,
sdpa attention (causal), one row of --tokens tokens. It runs inside a one-layer `Phi3Model`, so transformers' own
checkpointing wrapper (`GradientCheckpointingLayer`) and TRL's selective policy act on it exactly as in training.

Per activation strategy (phitune's `speed.activation`, docs/speed.md):
- FLOPs (torch.utils.flop_counter.FlopCounterMode): forward; recomputation (the backward phase's FLOPs minus those
  of `none`, whose backward recomputes nothing); backward. Attention counts the whole T x T score matrix (the
  counter's sdpa formula ignores causality; flash kernels skip the upper half).
- bytes kept for backward per token: every distinct non-parameter tensor saved for backward
  (torch.autograd.graph.saved_tensors_hooks around the forward; under non-reentrant checkpointing that is the
  layer's input, saved by the checkpoint itself), plus what TRL's selective policy caches (read from its caching
  mode, which saved_tensors_hooks cannot see). The layer's input is the previous layer's output: it is counted in
  every strategy (in `none` the first RMSNorm saves it).
`fused-lora` is phitune's decoder-layer forward (src/phitune/speed/fused_lora.py): keeps the layer input, recomputes
all but down_proj. Each row's LoRA gradients are compared with `none`'s (lora_B is randomised, std 0.02, so that
lora_A has a gradient; it changes no FLOP or byte).
`offload` is `full` with the kept tensors in host memory (transformers wraps the checkpoint in
`torch.autograd.graph.save_on_cpu`): the same FLOPs, its device bytes are those of `full` minus what moves (all).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch
from torch.utils import flop_counter
from torch.utils._pytree import tree_leaves

PHI3_MINI_LAYER = dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=32,
                       vocab_size=32064, max_position_embeddings=4096, original_max_position_embeddings=4096)
LORA_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
STRATEGIES = ["none", "full", "selective", "fused-lora"]  # measured; `offload` is derived from `full` (docstring)


@flop_counter.register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _sdpa_cpu_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """The CPU flash kernel has no formula in torch's registry; it does the work of the CUDA one."""
    return flop_counter.sdpa_flop_count(query, key, value)


@flop_counter.register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _sdpa_cpu_backward_flop(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def build_layer(dtype: torch.dtype):
    """A one-layer Phi3Model with LoRA on every linear layer of the decoder layer (embeddings unused, no final norm)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Phi3Config, Phi3Model

    config = Phi3Config(**PHI3_MINI_LAYER, num_hidden_layers=1, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    model = Phi3Model(config).to(dtype)
    model.norm = torch.nn.Identity()  # the final norm is no part of a decoder layer
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS)
    model = get_peft_model(model, lora)
    for name, param in model.named_parameters():  # B = 0 at init would leave lora_A without a gradient to compare
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


def enable_strategy(model, strategy: str) -> list:
    """Turn on `strategy` as phitune does; return a list that fills with the selective policy's caching modes."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    from trl.models import selective_activation_checkpointing as sac

    base = model.get_base_model()
    caches: list = []
    if strategy == "none":
        return caches
    if strategy == "fused-lora":  # phitune's own decoder-layer forward (src/phitune/speed/fused_lora.py)
        from phitune.speed.fused_lora import install_fused_lora

        install_fused_lora(base)
        return caches
    kwargs = {"use_reentrant": False}
    if strategy == "selective":  # TRL's policy, with its caching mode kept so that its cache can be measured
        policy = sac._build_policy_fn(sac._aten_attention_ops())

        def context_fn():
            contexts = create_selective_checkpoint_contexts(policy)
            caches.append(contexts[0])
            return contexts

        kwargs["context_fn"] = context_fn
    base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    return caches


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages (a view and its base count once)."""
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def measure(strategy: str, tokens: int, dtype: torch.dtype) -> dict:
    """FLOPs of forward and of the backward phase, and bytes kept between them, for one step of one layer."""
    model = build_layer(dtype).train()
    caches = enable_strategy(model, strategy)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, tokens, PHI3_MINI_LAYER["hidden_size"], generator=gen).to(dtype).requires_grad_()
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in parameters:
            saved.append(t)
        return t

    start = time.perf_counter()
    with flop_counter.FlopCounterMode(display=False) as forward_flops:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(inputs_embeds=hidden, position_ids=torch.arange(tokens)[None]).last_hidden_state
    wrapped = tree_leaves([list(mode.storage.values()) for mode in caches])  # torch's _VersionWrapper(val=tensor)
    cached = [w.val for w in wrapped if torch.is_tensor(getattr(w, "val", None))]
    kept = tensor_bytes(saved + cached + [hidden])  # the layer input, kept by its producer in every strategy
    with flop_counter.FlopCounterMode(display=False) as backward_flops:
        out.backward(torch.ones_like(out))
    grads = {n: p.grad.float() for n, p in model.named_parameters() if "lora_" in n}
    lora_grads = sum(g.norm().item() > 0 for g in grads.values())
    return {"strategy": strategy, "forward_flops": forward_flops.get_total_flops(),
            "backward_phase_flops": backward_flops.get_total_flops(), "kept_bytes": kept,
            "kept_bytes_per_token": kept / tokens, "selective_cache_bytes": tensor_bytes(cached),
            "lora_tensors_with_grad": lora_grads, "seconds": round(time.perf_counter() - start, 1)}, grads


def budget(tokens: int, dtype: torch.dtype) -> list[dict]:
    rows, grads = {}, {}
    for strategy in STRATEGIES:
        rows[strategy], grads[strategy] = measure(strategy, tokens, dtype)
        rows[strategy]["lora_grad_max_rel_diff"] = max(  # against `none` (autograd of the plain layer)
            ((g - grads["none"][n]).abs().max() / grads["none"][n].abs().max()).item()
            for n, g in grads[strategy].items())
    backward = rows["none"]["backward_phase_flops"]  # `none` recomputes nothing: its backward phase is all backward
    for row in rows.values():
        row["recompute_flops"] = row["backward_phase_flops"] - backward
        row["backward_flops"] = backward
        row["step_flops"] = row["forward_flops"] + row["backward_phase_flops"]
        row["forward_equivalents"] = row["step_flops"] / row["forward_flops"]
    offload = dict(rows["full"], strategy="offload", kept_bytes=0, kept_bytes_per_token=0.0,
                   host_bytes_per_token=rows["full"]["kept_bytes_per_token"], derived_from="full")
    return [rows["full"], *(rows[s] for s in ("selective", "fused-lora", "none")), offload]


def print_table(report: dict) -> None:
    print(f"one Phi-3-mini decoder layer, {report['tokens']} tokens, {report['dtype']}, LoRA r16 all-linear; "
          f"torch {report['torch']}, transformers {report['transformers']}, peft {report['peft']}, trl {report['trl']}")
    print(f"{'strategy':10s} {'forward':>9s} {'recompute':>9s} {'backward':>9s} {'step':>9s} {'x fwd':>6s} "
          f"{'kept B/token':>13s} {'grad vs none':>12s}  (GFLOP; max relative LoRA-gradient difference)")
    for row in report["rows"]:
        name = "full (ref)" if row["strategy"] == "full" else row["strategy"]
        kept = f"{row['kept_bytes_per_token']:,.0f}" + (" +host" if row["strategy"] == "offload" else "")
        print(f"{name:10s} {row['forward_flops'] / 1e9:9.1f} {row['recompute_flops'] / 1e9:9.1f} "
              f"{row['backward_flops'] / 1e9:9.1f} {row['step_flops'] / 1e9:9.1f} {row['forward_equivalents']:6.2f} "
              f"{kept:>13s} {row['lora_grad_max_rel_diff']:12.1e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens in the row (one row)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="weights and activations; FLOPs do not depend on it, bytes do")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5's checkpointing renames
    import peft
    import transformers
    import trl

    report = {"tokens": args.tokens, "dtype": args.dtype, "torch": torch.__version__,
              "transformers": transformers.__version__, "peft": peft.__version__, "trl": trl.__version__,
              "rows": budget(args.tokens, getattr(torch, args.dtype))}
    print(json.dumps(report) if args.json else "", end="\n" if args.json else "")
    if not args.json:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
