"""Data preparation at scale: phitune's Arrow path against TRL's own, on the same synthetic ultrachat-like file.

    python benchmarks/data_prep.py --conversations 100000            # both, side by side, first and second run
    python benchmarks/data_prep.py --conversations 1000000 --only phitune --no-second
    python benchmarks/data_prep.py --conversations 1000000 --only phitune --no-second --pairs 1 --length-scale 0.2
    python benchmarks/data_prep.py --conversations 1000000 --only phitune --pairs 1 --length-scale 0.2 --sources 2

Each measured preparation runs in a fresh child process; its peak memory is the largest sum of PSS over that
process and its workers (sampled every 0.2 s; RSS sum and anonymous PSS are shown too, see `measure`), so
phitune's worker processes count against it; CPU seconds are those of the child and its workers. Both sides start
from an empty cache (their own temporary HF_DATASETS_CACHE and phitune cache); the "second run" repeats the same
command on the now-warm caches.

- phitune: `tokenize_splits(cfg, None, tokenizer, plan)`, i.e. read, validate, split, render, tokenize and mask into the
  fingerprinted Arrow cache with `data.num_proc` processes (default: the cores available), as `phitune train` does.
- `--sources K`: the same number of conversations as K files (seeds 0..K-1), given to phitune as a data.train list
  with equal weights: a mixture (phitune.data.mixture), each file prepared as its own cache entry, then mixed.
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


def write_conversations(path: Path, n: int, seed: int = 0, pairs: int = PAIRS, scale: float = 1.0) -> Path:
    """N ultrachat-like conversations as JSONL; messages are slices of the bundled corpus, so text is real words.

    `pairs` user/assistant pairs per conversation, message lengths `scale` times the medians above.
    """
    from phitune.tiny.phi3 import CORPUS

    rng = np.random.default_rng(seed)
    words = CORPUS.read_text(encoding="utf-8").split()
    pool = " ".join(rng.permutation(np.array(words * 8, dtype=object)))  # ~2.4 MB of shuffled words
    medians = np.array([USER_CHARS, ASSISTANT_CHARS] * pairs) * scale
    with path.open("w", encoding="utf-8") as out:
        for start in range(0, n, 10_000):
            count = min(10_000, n - start)
            lengths = np.clip(rng.lognormal(np.log(medians), SIGMA, size=(count, 2 * pairs)), 8, 20_000).astype(int)
            offsets = rng.integers(0, len(pool) - 20_001, size=(count, 2 * pairs))
            lines = []
            for row_lengths, row_offsets in zip(lengths, offsets):
                messages = [{"role": "user" if turn % 2 == 0 else "assistant",
                             "content": pool[o:o + length].strip() or "x"}
                            for turn, (o, length) in enumerate(zip(row_offsets, row_lengths))]
                lines.append(json.dumps({"messages": messages}, ensure_ascii=False))
            out.write("\n".join(lines) + "\n")
    return path


def prepare_phitune(data: list[Path], cache: Path, max_length: int, num_proc: int | None) -> dict:
    """phitune's preparation, as `phitune train` runs it, of one file or a mixture of several (equal weights); the
    counts of what it made."""
    from phitune.config.schema import config_from_dict
    from phitune.models.loading import load_tokenizer
    from phitune.recipes.sft import tokenize_splits
    from phitune.run.plan import plan_run
    from phitune.tiny.phi3 import tiny_base_path

    train = str(data[0]) if len(data) == 1 else [{"path": str(path), "weight": 1} for path in data]
    settings = {"train": train, "eval_split": 0, "max_seq_length": max_length, "cache_dir": str(cache)}
    if num_proc:
        settings["num_proc"] = num_proc
    cfg = config_from_dict({"model": {"name_or_path": str(tiny_base_path())}, "data": settings})
    tokenizer = load_tokenizer(cfg.model, padding_side="right")
    train_set, _ = tokenize_splits(cfg, None, tokenizer, plan_run(cfg))
    return {"examples": len(train_set), "tokens": train_set.num_tokens, "truncated": train_set.truncated}


def prepare_trl(data: Path, output: Path, max_length: int) -> dict:
    """TRL's own preparation: load_dataset("json") and the SFTTrainer's tokenization, one process."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import phi3_training_chat_template

    from phitune.tiny.phi3 import tiny_base_path

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


def measure(side: str, data: list[Path], workdir: Path, max_length: int, num_proc: int | None,
            limit_gib: float = 8.0) -> dict:
    """Run one preparation in a fresh child process: wall time, CPU time and peak memory of its process tree.

    Memory is sampled every 0.2 s from /proc/<pid>/smaps_rollup of the child and its workers, three ways: the sum
    of RSS (pages shared by several processes, such as the memory-mapped Arrow files, counted once per process:
    too high), the sum of PSS (each shared page divided among the processes that map it: the tree's real share),
    and the sum of anonymous PSS (heap: what the tree would keep if the page cache were dropped). The tree is
    killed if its anonymous PSS passes `limit_gib`, so a runaway preparation cannot take a shared machine down;
    file-backed pages of the memory-mapped Arrow files do not count there, the kernel reclaims them under pressure.
    """
    import resource

    import psutil

    env = {**os.environ, "HF_DATASETS_CACHE": str(workdir / "hf-cache"), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, __file__, "--child", side, "--data", *map(str, data), "--workdir", str(workdir),
               "--max-length", str(max_length), "--num-proc", str(num_proc or 0)]
    cpu_before = _children_cpu(resource)
    start, load = time.perf_counter(), [os.getloadavg()[0]]
    child = psutil.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    peak = {"rss": 0, "pss": 0, "anon": 0}
    while child.poll() is None:
        used = _tree_memory(child, psutil)
        peak = {k: max(peak[k], used[k]) for k in peak}
        load.append(os.getloadavg()[0])
        if peak["anon"] > limit_gib * 2**30:
            for process in [*child.children(recursive=True), child]:
                process.kill()
            raise SystemExit(f"{side}: anonymous PSS passed {limit_gib} GiB ({peak}); killed")
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    output = child.stdout.read()
    if child.returncode != 0:
        raise SystemExit(f"{side} failed ({child.returncode})")
    return {"side": side, "seconds": round(seconds, 1), "cpu_seconds": round(_children_cpu(resource) - cpu_before, 1),
            **{f"peak_{k}_gib": round(v / 2**30, 2) for k, v in peak.items()},
            "load": f"{min(load):.1f}-{max(load):.1f}", **json.loads(output.strip().splitlines()[-1])}


def _children_cpu(resource) -> float:
    """User + system seconds of every ended child and the workers they waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _tree_memory(child, psutil) -> dict:
    """Bytes of RSS, PSS and anonymous PSS summed over the child and its descendants (0 for one that just ended)."""
    fields = {"Rss:": "rss", "Pss:": "pss", "Pss_Anon:": "anon"}
    total = dict.fromkeys(fields.values(), 0)
    try:
        tree = [child, *child.children(recursive=True)]
    except psutil.Error:
        return total
    for process in tree:
        try:
            lines = Path(f"/proc/{process.pid}/smaps_rollup").read_text().splitlines()
        except OSError:  # ended between listing and reading
            continue
        for line in lines:
            name, *value = line.split()
            if name in fields:
                total[fields[name]] += int(value[0]) * 1024
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--pairs", type=int, default=PAIRS, help="user/assistant pairs per conversation")
    parser.add_argument("--length-scale", type=float, default=1.0, help="message lengths times this")
    parser.add_argument("--num-proc", type=int, default=0, help="phitune's data.num_proc; 0: the default")
    parser.add_argument("--only", choices=["phitune", "trl"], default=None)
    parser.add_argument("--no-second", action="store_true", help="skip the second (cached) runs")
    parser.add_argument("--limit-gib", type=float, default=8.0, help="kill a side whose anonymous PSS passes this")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--data", type=Path, nargs="+", default=None)
    parser.add_argument("--sources", type=int, default=1, help="phitune: the conversations as this many files, mixed")
    parser.add_argument("--child", choices=["phitune", "trl"], default=None)
    args = parser.parse_args()
    if args.child:
        if args.child == "phitune":
            result = prepare_phitune(args.data, args.workdir / "phitune-cache", args.max_length, args.num_proc)
        else:
            result = prepare_trl(args.data[0], args.workdir / "trl-out", args.max_length)
        print(json.dumps(result))
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="phitune-data-prep-"))
    workdir.mkdir(parents=True, exist_ok=True)
    shape = "" if (args.pairs, args.length_scale) == (PAIRS, 1.0) else f"-{args.pairs}x{args.length_scale:g}"
    if args.sources > 1 and args.only != "phitune":
        parser.error("--sources reads a mixture, which only phitune does: add --only phitune")
    k = args.sources
    data = args.data or [workdir / (f"chat-{args.conversations}{shape}.jsonl" if k == 1 else
                                    f"chat-{args.conversations}{shape}-{i + 1}of{k}.jsonl") for i in range(k)]
    for index, path in enumerate(data):
        if not path.exists():
            start = time.perf_counter()
            count = args.conversations // k + (index < args.conversations % k)
            write_conversations(path, count, seed=index, pairs=args.pairs, scale=args.length_scale)
            print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - start:.0f} s",
                  flush=True)
    sides = [args.only] if args.only else ["trl", "phitune"]
    rows = []
    for run in ("first", "second")[: 1 if args.no_second else 2]:
        for side in sides:
            rows.append({"run": run, **measure(side, data, workdir, args.max_length, args.num_proc or None,
                                                  args.limit_gib)})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.conversations:,} conversations in {k} source(s), {os.cpu_count()} cores, load average during each run\n")
    print("| run | side | seconds | CPU seconds | peak PSS (GiB) | peak anon PSS | peak RSS sum | load | examples "
          "| tokens |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for row in rows:
        print(f"| {row['run']} | {row['side']} | {row['seconds']} | {row['cpu_seconds']} | {row['peak_pss_gib']} "
              f"| {row['peak_anon_gib']} | {row['peak_rss_gib']} | {row['load']} | {row['examples']:,} "
              f"| {row['tokens']:,} |")

if __name__ == "__main__":
    main()
