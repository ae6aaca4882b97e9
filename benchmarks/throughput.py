"""Training throughput: the reference Phi-3 LoRA recipe against phitune's own training path, on the same batches.

    python benchmarks/throughput.py --shape phi3-mini --data both     # one GPU; both modes in well under 8 minutes
    python benchmarks/throughput.py --shape tiny --data both --seq-len 512   # CPU smoke run
    python benchmarks/throughput.py --also-activation fused-lora   # (b) once more with speed.activation fused-lora

(a) reference: transformers + PEFT LoRA (r 16, alpha 32, all-linear), sdpa, full gradient checkpointing
    (use_reentrant False), padded batches with an attention mask, AdamW (fused on CUDA), a plain loop.
(b) phitune: the same random weights through phitune.recipes.sft.build_sft_config + PhituneTrainer with the default
    `speed` section (padding-free, Liger where installed, attention and activation strategy as resolved).

Both sides hold their weights in the same dtype (bf16 on CUDA, float32 on a CPU, whatever torch_dtype auto would
pick there) and run constant LR 1e-4, no weight decay, gradient clipping at 1.0, from the same weights.

Before anything is timed, both recipes compute the same first batch with the same LoRA weights, B drawn non-zero so
the LoRA path carries signal: per-token logits and every LoRA gradient (raw, before clipping) must agree to the
dtype's tolerance (EQUIVALENCE_TOLERANCE). Where they do not, a speed switch changed the math: no ratio is printed
and the exit status is 1. (First losses from a zero LoRA B are the frozen base's, near ln(vocab) whatever the path
does: they showed nothing.) Tokens/s counts only real tokens (no padding); the first --warmup steps are not timed.
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
from transformers import TrainerCallback

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
# Largest relative difference allowed between the recipes, ||phitune - reference|| / ||reference||, for each real
# token's logits and for each LoRA gradient tensor. float32: the attention kernels and the layouts only reorder
# sums (measured on the tiny shape: 2e-6 logits, 3e-6 gradients). bf16 keeps 8 bits of mantissa and rounds after
# every operation of 32 layers; not yet measured on a GPU.
EQUIVALENCE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
BREAKS = ("leak", "unmask", "scale")  # --inject-break: a deliberate change of phitune's math, for the tests


@dataclass
class Result:
    tokens_per_s: float
    peak_memory_gib: float | None  # torch.cuda.max_memory_allocated; None on CPU
    first_loss: float
    last_loss: float
    weights: str  # the parameters' dtype: the base's, then LoRA's
    attention: str
    batch_layout: str
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


def compute_dtype(device: str):
    """Both recipes' weight dtype: bf16 on CUDA; float32 on a CPU, where bf16 speed depends on the CPU (emulated
    without avx512_bf16), so the two sides would not be compared on equal terms."""
    return torch.bfloat16 if device == "cuda" else torch.float32


def reference_model(shape: str, device: str):
    """(a)'s model: PEFT LoRA on the random base, full gradient checkpointing, in training mode."""
    from peft import get_peft_model

    model = get_peft_model(build_model(shape, "sdpa", device, compute_dtype(device)), lora_config())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model.train()


def run_reference(shape: str, batches, warmup: int, device: str) -> Result:
    """(a) transformers + PEFT, full gradient checkpointing, padded batches, a plain training loop."""
    model = reference_model(shape, device)
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
    optim = "fused AdamW" if device == "cuda" else "AdamW"
    return _result(batches[warmup:], elapsed, losses, device, model, "sdpa", "padded (rows x longest)",
                   f"full checkpointing, {optim}")


class GradientRecorder(TrainerCallback):
    """The trainable parameters' gradients of the first optimizer step, after clipping (so a check trains with
    max_grad_norm 0), before the optimizer runs."""

    def __init__(self):
        self.gradients: dict = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.gradients:
            self.gradients = {name.removeprefix("module."): p.grad.detach().clone()
                              for name, p in model.named_parameters() if p.requires_grad}


def phitune_trainer(shape: str, batches, device: str, activation: str = "auto", max_grad_norm: float = 1.0,
                    callbacks=()):
    """(b)'s trainer on `batches` (one optimizer step each): phitune's SFTConfig, speed plan, attention and
    PhituneTrainer; returns (trainer, plan, attention)."""
    import datasets
    from transformers.trainer_callback import PrinterCallback

    from phitune.config.schema import config_from_dict
    from phitune.models.loading import resolve_attn_implementation
    from phitune.recipes.sft import build_sft_config
    from phitune.run.trainer import PhituneTrainer
    from phitune.run.plan import RunPlan
    from phitune.speed import apply_activation_strategy, resolve_speed

    dtype = str(compute_dtype(device)).removeprefix("torch.")
    cfg = config_from_dict({
        "model": {"name_or_path": "unused", "torch_dtype": dtype},
        "data": {"train": "unused.jsonl"},
        "training_config": {"output_dir": tempfile.mkdtemp(prefix="phitune-bench-"), "max_steps": len(batches),
                            "learning_rate": LR, "lr_scheduler_type": "constant", "weight_decay": 0.0,
                            "max_grad_norm": max_grad_norm, "per_device_train_batch_size": len(batches[0]),
                            "train_sampling_strategy": "sequential", "save_strategy": "no",
                            "logging_steps": 10_000, "disable_tqdm": True, "seed": 0},
        "peft_config": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "speed": {"activation": activation},
    })
    plan = resolve_speed(cfg.speed, training_config=cfg.training_config)
    attn = resolve_attn_implementation(cfg.model.attn_implementation, plan.padding_free)
    model = build_model(shape, attn, device, compute_dtype(device))
    # No model directory to read (the weights are built here), so the run's plan is made from the same answers.
    run_plan = RunPlan(model_config=model.config, context=None, target_modules="all-linear", speed=plan,
                       dtype=compute_dtype(device), attn_implementation=attn, sharded=False)
    args = build_sft_config(cfg, has_eval=False, plan=run_plan)
    apply_activation_strategy(model, args)
    flat = [r for rows in batches for r in rows]
    dataset = datasets.Dataset.from_dict({k: [r[k] for r in flat] for k in ("input_ids", "labels")})
    trainer = PhituneTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer_for(model),
                             peft_config=lora_config(), callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # keep stdout to the report
    return trainer, plan, attn


def run_phitune(shape: str, batches, warmup: int, device: str, activation: str = "auto") -> Result:
    """(b) phitune's training path: build_sft_config + PhituneTrainer with the default speed section (or another
    speed.activation)."""
    from transformers import TrainerCallback

    losses = []

    class Clock(TrainerCallback):
        start = end = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                synchronize(device)
                Clock.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            synchronize(device)
            Clock.end = time.perf_counter()

    trainer, plan, attn = phitune_trainer(shape, batches, device, activation, callbacks=[Clock()])
    training_step = trainer.training_step

    def recording_step(*args, **kwargs):  # each step's loss, kept on the device (no extra synchronisation)
        loss = training_step(*args, **kwargs)
        losses.append(loss.detach())
        return loss

    trainer.training_step = recording_step
    trainer.train()
    args = trainer.args
    detail = (f"activation {plan.activation}, liger {plan.liger}, optim {getattr(args.optim, 'value', args.optim)}, "
              f"bf16 autocast {args.bf16}")
    return _result(batches[warmup:], Clock.end - Clock.start, losses, device, trainer.model, attn,
                   layout(plan.padding_free), detail)


def layout(padding_free: bool) -> str:
    return "padding-free (1 x all tokens, position ids restart)" if padding_free else "padded (rows x longest)"


def tokenizer_for(model):
    """A word-level tokenizer the size of the model's vocabulary: SFTTrainer wants one for its pad token."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, model.config.vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def _result(timed_batches, elapsed: float, losses, device: str, model, attention: str, batch_layout: str,
            detail: str) -> Result:
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    base = next(d for name, d in dtypes.items() if "lora_" not in name)
    lora = {d for name, d in dtypes.items() if "lora_" in name}
    weights = f"{base}, LoRA {', '.join(sorted(str(d) for d in lora))}".replace("torch.", "")
    return Result(tokens_per_s=real_tokens(timed_batches) / elapsed, peak_memory_gib=peak,
                  first_loss=losses[0].float().item(), last_loss=losses[-1].float().item(), weights=weights,
                  attention=attention, batch_layout=batch_layout, detail=detail)


def break_math(name: str | None, trainer) -> None:
    """--inject-break: change phitune's math on purpose, to show that the equivalence check refuses the ratio.
    unmask: the prompt tokens count in the loss; scale: twice the gradient, the same loss value (a wrong token count
    in the normalisation); leak: packed rows attend to each other (acts only on a padding-free layout)."""
    if name == "unmask":
        trainer.train_dataset = trainer.train_dataset.map(lambda row: {"labels": row["input_ids"]})
    elif name == "scale":
        compute_loss = trainer.compute_loss

        def doubled(*args, **kwargs):
            loss = compute_loss(*args, **kwargs)
            return (2 * loss[0] - loss[0].detach(), *loss[1:]) if isinstance(loss, tuple) else 2 * loss - loss.detach()

        trainer.compute_loss = doubled
    elif name == "leak":
        import transformers.masking_utils as masking_utils

        masking_utils.find_packed_sequence_indices = lambda position_ids: None


def relative_differences(got: torch.Tensor, want: torch.Tensor, dim=None) -> torch.Tensor:
    """||got - want|| / ||want||, over `dim` (every element when None)."""
    got, want = got.float(), want.float()
    return (got - want).norm(dim=dim) / want.norm(dim=dim).clamp_min(torch.finfo(torch.float32).tiny)


def check_equivalence(shape: str, rows: list[dict], device: str, activation: str = "auto",
                      inject: str | None = None) -> dict:
    """Both recipes on the batch `rows` from the same weights, LoRA B drawn non-zero: the largest relative
    difference of a real token's logits and of a LoRA gradient tensor (raw, before clipping), against the dtype's
    tolerance; `passed` False means a speed switch changed the math."""
    reference = reference_model(shape, device)
    torch.manual_seed(1)
    for name, p in reference.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # so the LoRA path carries signal (and A gets a gradient)
    batch = padded_batch(rows, device)
    output = reference(**batch)
    output.loss.backward()
    want_logits = output.logits.detach()[batch["attention_mask"].bool()]  # (real tokens, vocab), in row order
    lora = {name: p.detach().clone() for name, p in reference.named_parameters() if p.requires_grad}
    want_grads = {name: p.grad.detach() for name, p in reference.named_parameters() if p.requires_grad}
    del reference, output
    fresh_memory(device)
    recorder = GradientRecorder()
    trainer, plan, attn = phitune_trainer(shape, [rows], device, activation, max_grad_norm=0.0, callbacks=[recorder])
    break_math(inject, trainer)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if p.requires_grad:
                p.copy_(lora[name])
        inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
        inputs = {k: v.to(device) for k, v in inputs.items() if k != "labels" and torch.is_tensor(v)}
        logits = trainer.model(**inputs).logits
    got_logits = logits[inputs["attention_mask"].bool()] if "attention_mask" in inputs else logits.flatten(0, 1)
    trainer.train()  # one step: the gradients the recipe itself computes
    tolerance = EQUIVALENCE_TOLERANCE[compute_dtype(device)]
    token_errors = relative_differences(got_logits, want_logits, dim=-1)
    grad_errors = {name: relative_differences(recorder.gradients[name], grad).item() for name, grad in want_grads.items()}
    mismatched = sorted((e, n) for n, e in grad_errors.items() if not e <= tolerance)[::-1]
    return {"tolerance": tolerance, "logits_max_relative_difference": token_errors.max().item(),
            "gradients_max_relative_difference": max(grad_errors.values()), "gradients_compared": len(grad_errors),
            "gradients_differing": len(mismatched), "worst": [f"{n} {e:.2g}" for e, n in mismatched[:3]],
            "passed": bool(token_errors.max() <= tolerance) and not mismatched and len(recorder.gradients) > 0,
            "phitune_attention": attn, "phitune_layout": layout(plan.padding_free), "injected_break": inject}


def fresh_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_mode(shape: str, mode: str, warmup: int, steps: int, seed: int, device: str, seq_len: int,
             also: tuple[str, ...] = (), inject: str | None = None) -> dict:
    """Reference and phitune on the same batches; `also`: phitune again per extra speed.activation value, reported
    as `phitune_<value>` with its own `ratio_<value>`. Each phitune recipe is first checked against the reference
    on the first batch; when one differs, nothing is timed and the run has no ratio."""
    batches = make_batches(mode, warmup + steps, SHAPES[shape]["vocab_size"], seed, seq_len)
    run = {"data": mode, "rows_per_step": len(batches[0]), "real_tokens_timed": real_tokens(batches[warmup:])}
    activations = {"phitune": "auto", **{f"phitune_{value}": value for value in also}}
    run["equivalence"] = {name: check_equivalence(shape, batches[0], device, value, inject)
                          for name, value in activations.items()}
    if not all(check["passed"] for check in run["equivalence"].values()):
        return run
    results = {}
    for name, runner, kwargs in [("reference", run_reference, {})] + [
            (name, run_phitune, {"activation": value}) for name, value in activations.items()]:
        fresh_memory(device)
        results[name] = runner(shape, batches, warmup, device, **kwargs)
    reference = results["reference"].tokens_per_s
    ratios = {"ratio" + name[len("phitune"):]: r.tokens_per_s / reference for name, r in results.items()
              if name != "reference"}
    return {**run, **ratios, **{k: dataclasses.asdict(v) for k, v in results.items()}}


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
        for name, check in run["equivalence"].items():
            print(f"  {name} vs reference on batch 1: {'same math' if check['passed'] else 'DIFFERENT MATH'}: "
                  f"logits {check['logits_max_relative_difference']:.2g}, gradients "
                  f"{check['gradients_max_relative_difference']:.2g} ({check['gradients_differing']} of "
                  f"{check['gradients_compared']} beyond {check['tolerance']:g}) {' '.join(check['worst'])}")
        for name in [k for k in run if k == "reference" or (k.startswith("phitune") and k in run["equivalence"])]:
            r = run[name]
            memory = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f} GiB"
            print(f"  {name:18s} {r['tokens_per_s']:10,.0f} tok/s  peak {memory:>9s}  loss first {r['first_loss']:.4f}"
                  f" last {r['last_loss']:.4f}  (weights {r['weights']}; {r['attention']}; {r['batch_layout']}; "
                  f"{r['detail']})")
        for key in [k for k in run if k.startswith("ratio")]:
            print(f"  {key} (phitune{key[5:]} / reference): {run[key]:.2f}x")
        if not any(k.startswith("ratio") for k in run):
            print("  no speed ratio: the recipes do not compute the same thing, so their speeds are not comparable")


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
    parser.add_argument("--inject-break", choices=BREAKS, help=argparse.SUPPRESS)  # for the tests: see break_math
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
                                tuple(args.also_activation), args.inject_break) for m in modes]}
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0 if all(any(k.startswith("ratio") for k in run) for run in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
