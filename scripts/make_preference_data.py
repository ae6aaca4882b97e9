#!/usr/bin/env python3
"""Generate phitune's bundled preference pairs from the bundled demo chat data.

    python scripts/make_preference_data.py      # writes the files below, deterministically

Writes
    src/phitune/assets/demo_preference/train.jsonl   {"prompt": str, "chosen": str, "rejected": str} per line
    src/phitune/assets/demo_preference/eval.jsonl    the conversational shape: {"prompt": [messages],
                                                     "chosen": [assistant turn], "rejected": [assistant turn]}

Each pair asks a question of demo_chat (train pairs from its train file, eval pairs from its eval file, so no eval
question appears in train). The chosen answer is the demo's own answer; the rejected one follows a simple rule a tiny
model can learn quickly: half the time a curt non-answer, half the time the answer to another question of the same
file (fluent, but wrong). The two files use the two shapes phitune reads, so the demo exercises both.

Standard library only; the same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "phitune" / "assets"
NON_ANSWERS = ["I do not know.", "Ask someone else.", "No.", "Not now.", "I will not answer that."]


def questions_and_answers(path: Path) -> list[tuple[list[dict], str]]:
    """(prompt messages up to the first answer, that answer) of each demo conversation."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        out.append((messages[:first], messages[first]["content"]))
    return out


def make_pairs(items: list[tuple[list[dict], str]], rng: random.Random) -> list[tuple[list[dict], str, str]]:
    pairs = []
    for index, (prompt, answer) in enumerate(items):
        if rng.random() < 0.5:
            rejected = rng.choice(NON_ANSWERS)
        else:
            others = [a for j, (_, a) in enumerate(items) if j != index and a != answer]
            rejected = rng.choice(others)
        pairs.append((prompt, answer, rejected))
    return pairs


def as_strings(prompt: list[dict], chosen: str, rejected: str) -> dict:
    """The last user turn as a string prompt (system prompts and earlier turns are dropped in this shape)."""
    return {"prompt": prompt[-1]["content"], "chosen": chosen, "rejected": rejected}


def as_conversation(prompt: list[dict], chosen: str, rejected: str) -> dict:
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ASSETS / "demo_preference")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, shape in (("train", as_strings), ("eval", as_conversation)):
        pairs = make_pairs(questions_and_answers(ASSETS / "demo_chat" / f"{name}.jsonl"), rng)
        text = "".join(json.dumps(shape(*pair), ensure_ascii=False) + "\n" for pair in pairs)
        (args.out / f"{name}.jsonl").write_text(text, encoding="utf-8")
        print(f"wrote {len(pairs)} pairs to {args.out / f'{name}.jsonl'}")


if __name__ == "__main__":
    main()
