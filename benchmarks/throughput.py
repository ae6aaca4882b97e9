"""Training throughput: the reference Phi-3 LoRA recipe against phitune's own training path, on the same batches.

    python benchmarks/throughput.py --shape phi3-mini --data both     # one GPU; both modes in well under 8 minutes
    python benchmarks/throughput.py --shape tiny --data both --seq-len 512   # CPU smoke run
    python benchmarks/throughput.py --also-activation fused-lora   # (b) once more with speed.activation fused-lora

(a) reference: transformers + PEFT LoRA (r 16, alpha 32, all-linear), bf16 weights on GPU, sdpa, full gradient
    checkpointing (use_reentrant False), padded batches with an attention mask, AdamW (fused on CUDA), a plain loop.
(b) phitune: the same random weights through phitune.recipes.sft.build_sft_config + PhituneTrainer with the default
    `speed` section (padding-free, Liger where installed, attention and activation strategy as resolved).

Both run constant LR 1e-4, no weight decay, gradient clipping at 1.0, and start from the same weights, so their
first-step losses must agree (LoRA B starts at zero): a speed switch that changes the math shows here. Tokens/s
counts only real tokens (no padding); the first --warmup steps are not timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch

SHAPES = {  # the transformers Phi3Config fields that differ between shapes
    "phi3-mini": dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=168, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096),
}
DATA = {  # rows per optimizer step, and how long each row is
    "fixed": dict(rows=4),  # rows of --seq-len tokens
    "chat": dict(rows=16, median=290, sigma=0.9, low=51),  # log-normal lengths, clipped to 51..--seq-len
}
LR = 1e-4


@dataclass
class Result:
    tokens_per_s: float
    peak_memory_gib: float | None  # torch.cuda.max_memory_allocated; None on CPU
    first_loss: float
    last_loss: float
    detail: str


def make_batches(mode: str, steps: int, vocab: int, seed: int, seq_len: int = 2048) -> list[list[dict]]:
    """`steps` batches of rows {input_ids, labels}; chat rows mask their first third (the prompt) out of the loss.

    `seq_len` is the fixed rows' length and the chat lengths' ceiling (2048 as specified; smaller for CPU runs)."""
    gen = torch.Generator().manual_seed(seed)
    spec = DATA[mode]
    batches = []
    for _ in range(steps):
        if mode == "fixed":
            lengths = [seq_len] * spec["rows"]
        else:
            normal = torch.randn(spec["rows"], generator=gen) * spec["sigma"] + math.log(spec["median"])
            lengths = normal.exp().round().clamp(spec["low"], seq_len).int().tolist()
        rows = []
        for n in lengths:
            ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
            prompt = n // 3 if mode == "chat" else 0
            rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
        batches.append(rows)
    return batches


def build_model(shape: str, attn: str, device: str, dtype):
    """A randomly initialised Phi-3 of `shape`, built on `device`; seed fixed, so both paths get equal weights."""
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(**SHAPES[shape], pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False,
                        tie_word_embeddings=False, attn_implementation=attn)
    torch.manual_seed(0)
    with torch.device(device):
        model = Phi3ForCausalLM(config).to(dtype)
    return model


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def padded_batch(rows: list[dict], device: str) -> dict:
    """Right-padded ids, attention mask and labels (-100 on padding), as the reference recipe's collator makes."""
    longest = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    labels = torch.full((len(rows), longest), -100)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}


def real_tokens(batches: list[list[dict]]) -> int:
    return sum(len(r["input_ids"]) for rows in batches for r in rows)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_reference(shape: str, batches, warmup: int, device: str) -> Result:
    """(a) transformers + PEFT, full gradient checkpointing, padded batches, a plain training loop."""
    from peft import get_peft_model

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = get_peft_model(build_model(shape, "sdpa", device, dtype), lora_config())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=device == "cuda")
    losses = []
    for step, rows in enumerate(batches):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        loss = model(**padded_batch(rows, device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    synchronize(device)
    elapsed = time.perf_counter() - start
    detail = "sdpa, full checkpointing, padded, " + ("bf16, fused AdamW" if device == "cuda" else "fp32, AdamW")
    return _result(batches[warmup:], elapsed, losses, device, detail)


def run_phitune(shape: str, batches, warmup: int, device: str, activation: str = "auto") -> Result:
    """(b) phitune's training path: build_sft_config + PhituneTrainer with the default speed section (or another
    speed.activation)."""
    import datasets
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from phitune.config import config_from_dict
    from phitune.modeling import resolve_attn_implementation, resolve_dtype
    from phitune.speed import apply_activation_strategy, resolve_speed
    from phitune.plan import RunPlan
    from phitune.recipes.sft import build_sft_config
    from phitune.train_support import PhituneTrainer

    class Recording(PhituneTrainer):
        """PhituneTrainer that keeps each step's loss (on device: no extra synchronisation)."""

        losses: list = []

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.losses.append(loss.detach())
            return loss

    class Clock(TrainerCallback):
        start = end = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                synchronize(device)
                Clock.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            synchronize(device)
            Clock.end = time.perf_counter()

    rows_per_step = len(batches[0])
    output_dir = tempfile.mkdtemp(prefix="phitune-bench-")
    cfg = config_from_dict({
        "data": {"train": "unused.jsonl"},
        "training_config": {"output_dir": output_dir, "max_steps": len(batches), "learning_rate": LR,
                            "lr_scheduler_type": "constant", "weight_decay": 0.0, "max_grad_norm": 1.0,
                            "per_device_train_batch_size": rows_per_step, "train_sampling_strategy": "sequential",
                            "save_strategy": "no", "logging_steps": 10_000, "disable_tqdm": True, "seed": 0},
        "peft_config": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "speed": {"activation": activation},
    })
    speed = resolve_speed(cfg.speed, training_config=cfg.training_config)
    attn = resolve_attn_implementation(cfg.model.attn_implementation, speed.padding_free)
    dtype = resolve_dtype("auto")
    model = build_model(shape, attn, device, dtype)
    # No model directory to read (the weights are built here), so the plan is made by hand from the same answers.
    plan = RunPlan(model_config=model.config, context=None, target_modules="all-linear", speed=speed, dtype=dtype,
                   attn_implementation=attn, sharded=False)
    args = build_sft_config(cfg, has_eval=False, plan=plan)
    apply_activation_strategy(model, args)
    flat = [r for rows in batches for r in rows]
    dataset = datasets.Dataset.from_dict({k: [r[k] for r in flat] for k in ("input_ids", "labels")})
    trainer = Recording(model=model, args=args, train_dataset=dataset, processing_class=tokenizer_for(model),
                        peft_config=lora_config(), callbacks=[Clock()])
    trainer.losses = []
    trainer.remove_callback(PrinterCallback)  # keep stdout to the report
    trainer.train()
    detail = (f"{attn}, activation {speed.activation}, padding-free {speed.padding_free}, liger {speed.liger}, "
              f"optim {getattr(args.optim, 'value', args.optim)}, bf16 {args.bf16}")
    return _result(batches[warmup:], Clock.end - Clock.start, trainer.losses, device, detail)


def tokenizer_for(model):
    """A word-level tokenizer the size of the model's vocabulary: SFTTrainer wants one for its pad token."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, model.config.vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def _result(timed_batches, elapsed: float, losses, device: str, detail: str) -> Result:
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return Result(tokens_per_s=real_tokens(timed_batches) / elapsed, peak_memory_gib=peak,
                  first_loss=losses[0].float().item(), last_loss=losses[-1].float().item(), detail=detail)


def fresh_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_mode(shape: str, mode: str, warmup: int, steps: int, seed: int, device: str, seq_len: int,
             also: tuple[str, ...] = ()) -> dict:
    """Reference and phitune on the same batches; `also`: phitune again per extra speed.activation value, reported
    as `phitune_<value>` with its own `ratio_<value>`."""
    batches = make_batches(mode, warmup + steps, SHAPES[shape]["vocab_size"], seed, seq_len)
    runners = [("reference", run_reference, {}), ("phitune", run_phitune, {})]
    runners += [(f"phitune_{value}", run_phitune, {"activation": value}) for value in also]
    results = {}
    for name, runner, kwargs in runners:
        fresh_memory(device)
        results[name] = runner(shape, batches, warmup, device, **kwargs)
    reference = results["reference"].tokens_per_s
    ratios = {"ratio" + name[len("phitune"):]: r.tokens_per_s / reference for name, r in results.items()
              if name != "reference"}
    return {"data": mode, "rows_per_step": len(batches[0]), "real_tokens_timed": real_tokens(batches[warmup:]),
            **ratios, **{k: dataclasses.asdict(v) for k, v in results.items()}}


def machine() -> dict:
    import peft
    import transformers
    import trl

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores visible)"
    return {"card": card, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "trl": trl.__version__}


def print_table(report: dict) -> None:
    print(f"{report['machine']}  shape {report['shape']}, seq-len {report['seq_len']}, "
          f"warm-up {report['warmup']}, timed {report['steps']}")
    for run in report["runs"]:
        tokens = run["real_tokens_timed"]
        print(f"\n--data {run['data']} ({run['rows_per_step']} rows/step, {tokens} real tokens timed)")
        for name in [k for k in run if k == "reference" or k.startswith("phitune")]:
            r = run[name]
            memory = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f} GiB"
            print(f"  {name:18s} {r['tokens_per_s']:10,.0f} tok/s  peak {memory:>9s}  loss first {r['first_loss']:.4f}"
                  f" last {r['last_loss']:.4f}  ({r['detail']})")
        for key in [k for k in run if k.startswith("ratio")]:
            print(f"  {key} (phitune{key[5:]} / reference): {run[key]:.2f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="phi3-mini")
    parser.add_argument("--data", choices=["fixed", "chat", "both"], default="both")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    parser.add_argument("--seq-len", type=int, default=2048, help="fixed row length / chat length ceiling")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random token ids and lengths")
    parser.add_argument("--also-activation", action="append", default=[], metavar="VALUE",
                        help="run phitune's path once more with this speed.activation (repeatable), e.g. fused-lora")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(min(4, os.cpu_count() or 1))
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    modes = ["fixed", "chat"] if args.data == "both" else [args.data]
    report = {"machine": machine(), "shape": args.shape, "warmup": args.warmup, "steps": args.steps,
              "seq_len": args.seq_len,
              "runs": [run_mode(args.shape, m, args.warmup, args.steps, args.seed, device, args.seq_len,
                                tuple(args.also_activation)) for m in modes]}
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
