#!/usr/bin/env python3
"""Generate phitune's bundled KTO rows (prompt, completion, label) from the bundled preference pairs.

    python scripts/make_kto_data.py      # writes the files below, deterministically

Writes
    src/phitune/assets/demo_kto/train.jsonl   {"prompt": str, "completion": str, "label": bool} per line
    src/phitune/assets/demo_kto/eval.jsonl    the conversational shape: {"prompt": [messages],
                                              "completion": [assistant turn], "label": bool}

Each row takes one pair of demo_preference (made by scripts/make_preference_data.py) and keeps one of its two
answers: the chosen one labelled true (desirable) or the rejected one labelled false (undesirable), each with
probability one half. The rows are unpaired, as KTO's data is: no prompt has both answers, so the run learns from
single judgements, and the held-out rows ask questions no train row asks.

Standard library only; the same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "phitune" / "assets"


def unpair(row: dict, rng: random.Random) -> dict:
    """One answer of the pair, with its label; the shape (strings or message lists) of the pair."""
    desirable = rng.random() < 0.5
    return {"prompt": row["prompt"], "completion": row["chosen" if desirable else "rejected"], "label": desirable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ASSETS / "demo_kto")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("train", "eval"):
        pairs = (ASSETS / "demo_preference" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        rows = [unpair(json.loads(line), rng) for line in pairs]
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (args.out / f"{name}.jsonl").write_text(text, encoding="utf-8")
        desirable = sum(row["label"] for row in rows)
        print(f"wrote {len(rows)} rows ({desirable} desirable) to {args.out / f'{name}.jsonl'}")


if __name__ == "__main__":
    main()
