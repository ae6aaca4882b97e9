"""Build the bundled tiny Phi-3 base: train its tokenizer, pretrain it on the bundled corpus, save it to assets.

    python scripts/build_tiny_base.py            # about 3 minutes on 2 CPU cores

The base learns plain English facts from `assets/corpus.txt` (never the chat format), so that the demo's LoRA run
has something to build on: it teaches the Phi-3 chat turns and the answer style, as a real instruction fine-tune
would. Deterministic for a given seed, torch version and machine.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from phitune.tiny.phi3 import CORPUS, TINY_BASE, build_tiny_model


def corpus_batches(tokenizer, seq_len: int, batch_size: int, seed: int):
    """Endless random batches of `seq_len`-token windows over the whole tokenized corpus."""
    ids = tokenizer(CORPUS.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    data = torch.tensor(ids)
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        yield torch.stack([data[s : s + seq_len] for s in starts])


def pretrain(model, tokenizer, steps: int, lr: float, seq_len: int = 128, batch_size: int = 32, seed: int = 0):
    """Plain next-token pretraining with AdamW and a cosine schedule; prints the loss as it goes."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = steps // 20
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    batches = corpus_batches(tokenizer, seq_len, batch_size, seed)
    start = time.time()
    for step in range(steps):
        batch = next(batches)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.time() - start:.0f}s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    build_tiny_model(TINY_BASE, seed=args.seed)
    from transformers import AutoTokenizer, Phi3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TINY_BASE)
    model = Phi3ForCausalLM.from_pretrained(TINY_BASE, dtype=torch.float32)
    pretrain(model, tokenizer, args.steps, args.lr, seed=args.seed)
    model.save_pretrained(TINY_BASE)
    print(f"saved to {TINY_BASE}")


if __name__ == "__main__":
    main()
