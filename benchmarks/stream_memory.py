"""Streaming's memory against the size of the file: `phitune train` and `phitune data` with data.streaming on
JSONL files of 1, 2 and 4 GB (and a 10 MB one for the fixed part), each in a fresh process.

    python benchmarks/stream_memory.py --sizes 0.01 1 2 4 --workdir /tmp/stream-bench
    python benchmarks/stream_memory.py --sizes 4 --read 20000        # also: iterate 20,000 streamed examples

The files are benchmarks/data_prep.py's synthetic ultrachat-like conversations (3 user/assistant pairs, about 3.3 kB
a row), written under --workdir and deleted after their size is measured (the disk holds one at a time). Each
measurement is the peak resident set size of the phitune process (`/usr/bin/time -v`, "Maximum resident set size";
streaming starts no worker processes) and its wall seconds:

- train: `phitune train` of the bundled tiny Phi-3 (LoRA, max_seq_length 1024, batch 4, --steps steps, the first 20
  examples held out for eval);
- data: `phitune data` on the same config (the first 1,000 rows, the default);
- read (with --read N): a child that takes the train stream phitune builds (phitune.data.stream.stream_splits) and
  iterates N examples, printing its RSS after each quarter: memory while rows are consumed, with no model.

Flat numbers down a column are the claim: nothing phitune holds grows with the file or with the rows read.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

TINY = ROOT / "src" / "phitune" / "assets" / "tiny-phi3"
BYTES_PER_ROW = 3_300  # data_prep's default shape, measured there: 3,275 MB for a million rows

READER = """
import resource, sys, time
from phitune.config.schema import load_config
from phitune.data.stream import stream_splits
from phitune.models.loading import load_tokenizer

cfg = load_config(sys.argv[1])
total = int(sys.argv[2])
train, _ = stream_splits(cfg.data, load_tokenizer(cfg.model, padding_side="right"))
start = time.perf_counter()
for index, _example in enumerate(train.to_dataset().take(total), start=1):
    if index % (total // 4) == 0:
        rss = int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
        print(f"read {index} examples: RSS {rss:.0f} MiB, {time.perf_counter() - start:.0f} s", flush=True)
"""


def write_config(folder: Path, data: Path, steps: int) -> Path:
    config = {
        "model": {"name_or_path": str(TINY), "torch_dtype": "float32"},
        "data": {"train": str(data), "streaming": True, "max_seq_length": 1024, "max_eval_examples": 20},
        "training_config": {"output_dir": str(folder / "run"), "max_steps": steps, "per_device_train_batch_size": 4,
                            "logging_steps": 5, "save_steps": 1000, "learning_rate": 1e-3, "disable_tqdm": True},
        "peft_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
    }
    path = folder / "stream.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def timed(command: list[str]) -> dict:
    """Peak RSS (MiB) and wall seconds of `command` through /usr/bin/time -v; fails loudly on a non-zero exit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return {"peak_rss_mib": round(peak_kib / 1024), "seconds": round(seconds, 1), "stdout": done.stdout}


def measure(size_gb: float, workdir: Path, steps: int, read: int) -> dict:
    from data_prep import write_conversations

    folder = workdir / f"{size_gb}g"
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "train.jsonl"
    rows = max(100, int(size_gb * 1e9 / BYTES_PER_ROW))
    began = time.perf_counter()
    write_conversations(data, rows)
    result = {"size_gb": round(data.stat().st_size / 1e9, 2), "rows": rows,
              "write_s": round(time.perf_counter() - began, 1)}
    config = write_config(folder, data, steps)
    phitune = [sys.executable, "-m", "phitune.cli"]
    train = timed([*phitune, "train", str(config), "--overwrite"])
    result["train"] = {k: v for k, v in train.items() if k != "stdout"}
    result["data"] = {k: v for k, v in timed([*phitune, "data", str(config)]).items() if k != "stdout"}
    if read:
        reader = folder / "read.py"
        reader.write_text(READER, encoding="utf-8")
        run = timed([sys.executable, str(reader), str(config), str(read)])
        result["read"] = {"peak_rss_mib": run["peak_rss_mib"], "seconds": run["seconds"],
                          "progress": run["stdout"].strip().splitlines()}
    data.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.01, 1, 2, 4], help="file sizes in GB")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/stream-bench"))
    parser.add_argument("--steps", type=int, default=20, help="training steps of each streamed run")
    parser.add_argument("--read", type=int, default=0, help="also iterate this many streamed examples, no model")
    args = parser.parse_args()
    for size in args.sizes:
        load = os.getloadavg()
        result = measure(size, args.workdir, args.steps, args.read)
        result["load"] = f"{load[0]:.1f}-{os.getloadavg()[0]:.1f}"
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
