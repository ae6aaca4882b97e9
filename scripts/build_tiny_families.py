#!/usr/bin/env python3
"""Build the shipped tiny Phi-4-mini and Phi-4: random weights at toy size, each family's special tokens and real chat
template, a BPE trained on the bundled corpus, demo chats and tool-call conversations (so a call is a few tokens).

    python scripts/build_tiny_families.py       # writes the folders below, deterministically (seed 0)

Writes
    src/phitune/assets/tiny-phi4-mini           Phi-4-mini's shape (tied, partial rotary, LongRoPE) and tool format
    src/phitune/assets/tiny-phi4                Phi-4's shape and ChatML-style template

Run scripts/make_tool_data.py first when the tool data changes: the tokenizers are trained on it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from phitune.tiny.families import TINY_PHI4, TINY_PHI4_MINI, build_family_model  # noqa: E402
from phitune.tiny.phi3 import ASSETS, demo_texts  # noqa: E402

VOCAB = 1024  # pieces: the shipped models stay under 1 MB each in bf16
# Weight std. At transformers' 0.02 the tied embeddings are so short that the logits stay within about +-2 and LoRA
# alone cannot make a prediction confident: the tool example's held-out loss went 6.94 -> 5.87 in 120 steps, against
# 8.32 -> 0.17 at 0.2 (examples/tiny-phi4-mini-tools.yaml, 1 thread).
INIT = 0.2


def tool_texts() -> list[str]:
    """Every string of the bundled tool conversations, and each call as the template writes it."""
    texts = []
    for name in ("train.jsonl", "eval.jsonl"):
        for line in (ASSETS / "demo_tools" / name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts.append(json.dumps([t["function"] for t in row["tools"]]))
            for message in row["messages"]:
                calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                         for c in message.get("tool_calls", [])]
                texts.append(json.dumps(calls) if calls else message["content"])
    return texts


def main() -> None:
    texts = demo_texts() + tool_texts()
    for name, path in (("phi-4-mini", TINY_PHI4_MINI), ("phi-4", TINY_PHI4)):
        build_family_model(name, path, texts=texts, vocab_size=VOCAB, dtype=torch.bfloat16, initializer_range=INIT)
        size = sum(f.stat().st_size for f in path.iterdir())
        print(f"{path}: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
