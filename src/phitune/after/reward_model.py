"""Reward models: a method reward run's adapter loaded once on the base it names, and conversations scored with it in
batches, without gradients, for `phitune eval` on a reward run and for GRPO's `{model: RUN_DIR}` reward.

A reward model reads a whole conversation, prompt + answer rendered with the chat template
(phitune.data.preference.conversation_ids, as TRL's RewardTrainer tokenizes it), and returns one number, the `score`
head's output at the last token that is not padding. Trained on pairs with the Bradley-Terry loss
-log sigmoid(r(chosen) - r(rejected)), only differences of scores mean something: a score is not a probability.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phitune.errors import PhituneError


@dataclass
class RewardModel:
    """A reward run loaded for scoring: the PEFT model (adapter and trained head), its tokenizer, where it came from."""

    model: object
    tokenizer: object
    run_dir: Path

    def score(self, prompts: list, answers: list[str], batch_size: int = 8) -> list[float]:
        """One score per (prompt messages, answer text)."""
        sequences = [_conversation(self.tokenizer, prompt, answer) for prompt, answer in zip(prompts, answers)]
        return score_sequences(self.model, sequences, self.tokenizer.pad_token_id, batch_size)


def _conversation(tokenizer, prompt, answer: str) -> list[int]:
    from phitune.data.preference import conversation_ids

    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return conversation_ids(tokenizer, messages, answer)


def load_reward_model(run_dir: str | Path) -> RewardModel:
    """The reward run at `run_dir` on the base its phitune_config.yaml names, on the GPU when there is one; one line
    when `run_dir` is not a finished reward run."""
    import torch
    from peft import PeftModel

    from phitune.config.schema import load_run_config
    from phitune.models.loading import load_score_model, load_tokenizer

    run_dir = Path(run_dir)
    if not (run_dir / "phitune_config.yaml").is_file() or not (run_dir / "adapter_config.json").is_file():
        raise PhituneError(f"{run_dir} is not a finished reward run (it needs phitune_config.yaml and "
                           "adapter_config.json)")
    run = load_run_config(run_dir)
    if run.method != "reward":
        raise PhituneError(f"{run_dir} is a method {run.method} run, not a reward model (method: reward)")
    tokenizer = load_tokenizer(run.model, padding_side="right")
    base = load_score_model(run.model, tokenizer, training=False)
    if torch.cuda.is_available() and not run.model.quantization:  # 4-bit weights are placed as they load
        base = base.to("cuda")
    model = PeftModel.from_pretrained(base, str(run_dir))
    model.eval()
    return RewardModel(model=model, tokenizer=tokenizer, run_dir=run_dir)


def score_sequences(model, sequences: list[list[int]], pad_token_id: int, batch_size: int = 8) -> list[float]:
    """The score of each token sequence, `batch_size` at a time, right-padded with `pad_token_id` (the id the model's
    config reads the last real token by), under no_grad; the model's train/eval mode is restored."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: list[float] = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, : len(ids)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                           use_cache=False).logits  # (batch, 1)
            scores += logits[:, 0].float().tolist()
    model.train(was_training)
    return scores


def score_pairs(model, tokenizer, pairs, batch_size: int = 8) -> dict:
    """A reward model on preference pairs (phitune.data.preference.PreferencePair): `pairwise_accuracy`, the share of
    pairs whose chosen answer scores above the rejected one (what the reward model is for), `score_margin`, the mean
    difference, and the mean `chosen_score` and `rejected_score`."""
    chosen = [_conversation(tokenizer, pair.prompt, pair.chosen) for pair in pairs]
    rejected = [_conversation(tokenizer, pair.prompt, pair.rejected) for pair in pairs]
    high = score_sequences(model, chosen, tokenizer.pad_token_id, batch_size)
    low = score_sequences(model, rejected, tokenizer.pad_token_id, batch_size)
    margins = [c - r for c, r in zip(high, low)]
    return {"pairwise_accuracy": sum(m > 0 for m in margins) / len(margins),
            "score_margin": sum(margins) / len(margins),
            "chosen_score": sum(high) / len(high), "rejected_score": sum(low) / len(low)}
