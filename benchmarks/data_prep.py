"""Data preparation at scale: phitune's Arrow path against TRL's own, on the same synthetic ultrachat-like file.

    python benchmarks/data_prep.py --conversations 100000            # both, side by side, first and second run
    python benchmarks/data_prep.py --conversations 1000000 --only phitune --no-second

Each measured preparation runs in a fresh child process; its peak memory is the largest sum of RSS over that
process and its children (sampled every 0.1 s), so phitune's worker processes count against it. Both sides start
from an empty cache (their own temporary HF_DATASETS_CACHE and phitune cache); the "second run" repeats the same
command on the now-warm caches.

- phitune: `tokenize_splits(cfg, None, tokenizer)`, i.e. read, validate, split, render, tokenize and mask into the
  fingerprinted Arrow cache with `data.num_proc` processes (default: the cores available), as `phitune train` does.
- TRL: `datasets.load_dataset("json")` and `SFTTrainer(...)` with TRL's Phi-3 training template,
  `assistant_only_loss=True`, `max_length`, one process: the trainer's own dataset preparation (the bundled tiny
  Phi-3 model, so the model load is negligible).

A conversation is 3 user/assistant pairs with log-normal message lengths (user median 150 characters, assistant
median 700), cut from the bundled corpus: about 3.4 kB of JSONL per conversation, as ultrachat_200k.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

USER_CHARS, ASSISTANT_CHARS, SIGMA = 150, 700, 0.6  # log-normal medians (characters) and spread
PAIRS = 3  # user/assistant pairs per conversation


def write_conversations(path: Path, n: int, seed: int = 0) -> Path:
    """N ultrachat-like conversations as JSONL; messages are slices of the bundled corpus, so text is real words."""
    from phitune.tiny import CORPUS

    rng = np.random.default_rng(seed)
    words = CORPUS.read_text(encoding="utf-8").split()
    pool = " ".join(rng.permutation(np.array(words * 8, dtype=object)))  # ~2.4 MB of shuffled words
    medians = np.array([USER_CHARS, ASSISTANT_CHARS] * PAIRS)
    with path.open("w", encoding="utf-8") as out:
        for start in range(0, n, 10_000):
            count = min(10_000, n - start)
            lengths = np.clip(rng.lognormal(np.log(medians), SIGMA, size=(count, 2 * PAIRS)), 8, 20_000).astype(int)
            offsets = rng.integers(0, len(pool) - 20_001, size=(count, 2 * PAIRS))
            lines = []
            for row_lengths, row_offsets in zip(lengths, offsets):
                messages = [{"role": "user" if turn % 2 == 0 else "assistant",
                             "content": pool[o:o + length].strip() or "x"}
                            for turn, (o, length) in enumerate(zip(row_offsets, row_lengths))]
                lines.append(json.dumps({"messages": messages}, ensure_ascii=False))
            out.write("\n".join(lines) + "\n")
    return path


def prepare_phitune(data: Path, cache: Path, max_length: int, num_proc: int | None) -> dict:
    """phitune's preparation, as `phitune train` runs it; the counts of what it made."""
    from phitune.config import config_from_dict
    from phitune.modeling import load_tokenizer
    from phitune.tiny import tiny_base_path
    from phitune.train import tokenize_splits

    settings = {"train": str(data), "eval_split": 0, "max_seq_length": max_length, "cache_dir": str(cache)}
    if num_proc:
        settings["num_proc"] = num_proc
    cfg = config_from_dict({"model": {"name_or_path": str(tiny_base_path())}, "data": settings})
    tokenizer = load_tokenizer(cfg.model, padding_side="right")
    train_set, _ = tokenize_splits(cfg, None, tokenizer)
    return {"examples": len(train_set), "tokens": train_set.num_tokens, "truncated": train_set.truncated}


def prepare_trl(data: Path, output: Path, max_length: int) -> dict:
    """TRL's own preparation: load_dataset("json") and the SFTTrainer's tokenization, one process."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import phi3_training_chat_template

    from phitune.tiny import tiny_base_path

    tokenizer = AutoTokenizer.from_pretrained(tiny_base_path())
    tokenizer.chat_template = phi3_training_chat_template
    dataset = datasets.load_dataset("json", data_files=str(data), split="train")
    args = SFTConfig(output_dir=str(output), assistant_only_loss=True, max_length=max_length, report_to="none",
                     use_cpu=True, max_steps=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_base_path())
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    prepared = trainer.train_dataset
    import pyarrow.compute as pc

    tokens = pc.sum(pc.list_value_length(prepared.with_format("arrow")[:]["input_ids"])).as_py()  # no Python ints
    return {"examples": len(prepared), "tokens": tokens}


def measure(side: str, data: Path, workdir: Path, max_length: int, num_proc: int | None) -> dict:
    """Run one preparation in a fresh child process; wall time and peak RSS of its whole process tree."""
    import psutil

    env = {**os.environ, "HF_DATASETS_CACHE": str(workdir / "hf-cache"), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, __file__, "--child", side, "--data", str(data), "--workdir", str(workdir),
               "--max-length", str(max_length), "--num-proc", str(num_proc or 0)]
    start = time.perf_counter()
    child = psutil.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    peak = 0
    while child.poll() is None:
        try:
            tree = [child, *child.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:  # a worker ended between listing and reading
            pass
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    output = child.stdout.read()
    if child.returncode != 0:
        raise SystemExit(f"{side} failed ({child.returncode})")
    return {"side": side, "seconds": round(seconds, 1), "peak_rss_gib": round(peak / 2**30, 2),
            **json.loads(output.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--num-proc", type=int, default=0, help="phitune's data.num_proc; 0: the default")
    parser.add_argument("--only", choices=["phitune", "trl"], default=None)
    parser.add_argument("--no-second", action="store_true", help="skip the second (cached) runs")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--child", choices=["phitune", "trl"], default=None)
    args = parser.parse_args()
    if args.child:
        if args.child == "phitune":
            result = prepare_phitune(args.data, args.workdir / "phitune-cache", args.max_length, args.num_proc)
        else:
            result = prepare_trl(args.data, args.workdir / "trl-out", args.max_length)
        print(json.dumps(result))
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="phitune-data-prep-"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = args.data or workdir / f"chat-{args.conversations}.jsonl"
    if not data.exists():
        start = time.perf_counter()
        write_conversations(data, args.conversations)
        print(f"wrote {data} ({data.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - start:.0f} s", flush=True)
    sides = [args.only] if args.only else ["trl", "phitune"]
    rows = []
    for run in ("first", "second")[: 1 if args.no_second else 2]:
        for side in sides:
            rows.append({"run": run, **measure(side, data, workdir, args.max_length, args.num_proc or None)})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.conversations:,} conversations, {os.cpu_count()} cores\n")
    print("| run | side | seconds | peak RSS (GiB) | examples | tokens |\n| --- | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['run']} | {row['side']} | {row['seconds']} | {row['peak_rss_gib']} | {row['examples']:,} "
              f"| {row['tokens']:,} |")


if __name__ == "__main__":
    main()
