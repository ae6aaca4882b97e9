#!/usr/bin/env python3
"""Generate phitune's bundled GRPO prompt set: questions of the demo chat data with a one-word answer column.

    python scripts/make_grpo_data.py            # writes the files below, deterministically

Writes
    src/phitune/assets/demo_grpo/train.jsonl    {"prompt": "What colour is grass?", "answer": "green"} per line
    src/phitune/assets/demo_grpo/eval.jsonl     the same things asked in a phrasing train never uses for them

The questions (colours, animal sounds, capitals) and their phrasings are the demo chat data's
(scripts/make_demo_data.py).
The SFT demo adapter answers them in the demo's template ("Grass is green.") but names the right word only sometimes
(about 60% of the time): a verifiable reward (`answer`, the last word) it earns sometimes but not always, which is what
GRPO learns from. Each thing is asked in all but one of its phrasings in train; the held-out phrasing is the eval
prompt, so the eval pass rate measures answers that hold whatever the wording, not a memorised line.
Standard library only; the same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_data import Capitals, Colours, Sounds  # noqa: E402 - the demo's own families and phrasings

OUT = Path(__file__).resolve().parents[1] / "src" / "phitune" / "assets" / "demo_grpo"


def answer_word(family, item) -> str:
    """The word a correct answer ends with: the colour, the sound, the capital."""
    return family.answer(item).rstrip(".").split()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=27)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    train, held_out = [], []
    for family in (Colours(), Sounds(), Capitals()):
        for item in family.items():
            phrasings = family.phrasings(item)
            rng.shuffle(phrasings)
            answer = answer_word(family, item)
            held_out.append({"prompt": phrasings[0], "answer": answer})
            train += [{"prompt": phrasing, "answer": answer} for phrasing in phrasings[1:]]
    rng.shuffle(train)
    rng.shuffle(held_out)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("eval", held_out)):
        (args.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{name}: {len(rows)} prompts")


if __name__ == "__main__":
    main()
