#!/usr/bin/env python3
"""Generate phitune's bundled tool-call conversations, in the OpenAI chat-completions shape.

    python scripts/make_tool_data.py            # writes the files below, deterministically

Writes
    src/phitune/assets/demo_tools/train.jsonl   {"tools": [weather, local_time], "messages": [system, user,
                                                assistant with tool_calls]} per line
    src/phitune/assets/demo_tools/eval.jsonl    the same calls asked in a phrasing train never uses for them

Two tools (`weather`, `local_time`), each taking a `city`, and 12 cities. Each (tool, city) pair is asked in five
phrasings: four train, the fifth is held out, so the eval's exact match measures calls that hold whatever the
wording. Each conversation ends with the call, so `phitune eval` compares generated calls with the reference calls.
Standard library only; the same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "phitune" / "assets" / "demo_tools"
CITIES = ["Paris", "Rome", "Madrid", "Berlin", "Vienna", "Lisbon", "Athens", "Dublin", "Oslo", "Warsaw", "Prague",
          "Cairo"]
TOOLS = {
    "weather": ("The current weather in a city", ["What is the weather in {}?", "Is it raining in {}?",
                                                  "How warm is it in {} today?", "Weather in {}, please.",
                                                  "Tell me the forecast for {}."]),
    "local_time": ("The current local time in a city", ["What time is it in {}?", "Tell me the time in {}.",
                                                        "What is the local time in {}?", "Is it morning in {} now?",
                                                        "Current time in {}?"]),
}


def definition(name: str, description: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def conversation(tools: list[dict], question: str, name: str, city: str) -> dict:
    call = {"type": "function", "function": {"name": name, "arguments": json.dumps({"city": city})}}
    return {"tools": tools, "messages": [{"role": "system", "content": "You can call tools."},
                                         {"role": "user", "content": question},
                                         {"role": "assistant", "content": None, "tool_calls": [call]}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=35)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tools = [definition(name, description) for name, (description, _) in TOOLS.items()]
    train, held_out = [], []
    for name, (_, phrasings) in TOOLS.items():
        for city in CITIES:
            asked = [p.format(city) for p in phrasings]
            rng.shuffle(asked)
            held_out.append(conversation(tools, asked[0], name, city))
            train += [conversation(tools, question, name, city) for question in asked[1:]]
    rng.shuffle(train)
    rng.shuffle(held_out)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("eval", held_out)):
        (args.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{name}: {len(rows)} conversations")


if __name__ == "__main__":
    main()
