"""Data: read rows, normalise them to conversations, render them with the chat template, mask the labels.

The result handed to the trainer is already tokenized (`input_ids`, `labels`), so that truncation can be counted,
fully-masked rows caught before training, and padding-free batching applied without re-tokenizing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from phitune.config.schema import DataConfig
from phitune.data.encode import (  # IGNORE_INDEX, render_with_mask, training_chat_template: public here too
    IGNORE_INDEX,
    encode_with_masks,
    label_tokens,
    render_with_mask,
    training_chat_template,
)
from phitune.data.formats import Messages, detect_format, to_messages
from phitune.data.mixture import load_mixture, split_eval
from phitune.data.readers import BadRow, hub_options, read_rows, row_location
from phitune.errors import PhituneError

__all__ = ["IGNORE_INDEX", "Conversations", "TokenizedSet", "load_conversations", "render_with_mask", "split_eval",
           "tokenize_conversations", "training_chat_template"]


@dataclass
class Conversations:
    """Normalised train and eval conversations, with what happened on the way."""

    train: list[Messages]
    eval: list[Messages]
    format: str
    skipped: list[str] = field(default_factory=list)  # "file:line: why" for each skipped row


def load_conversations(cfg: DataConfig) -> Conversations:
    """Read train (and eval) data, normalise every row to messages, and split off eval if no eval file is given."""
    if cfg.format == "text":  # raw documents are packed into blocks by phitune.data.prepare, never conversations
        raise PhituneError("data.format: text has no conversations to score or prompt with; a text run's held-out "
                           "loss is eval_loss_after in its metrics.json")
    train, evals, fmt, skipped = load_splits(cfg, _read_source)
    return Conversations(train=train, eval=evals, format=fmt, skipped=skipped)


def load_splits_and_shares(cfg: DataConfig, read) -> tuple[list, list, str, list[str], list]:
    """load_splits, and what each source of a mixture gave (phitune.data.mixture.SourceShare; [] for one source)."""
    if cfg.is_mixture:
        return load_mixture(cfg, read)
    return (*load_splits(cfg, read), [])


def load_splits(cfg: DataConfig, read) -> tuple[list, list, str, list[str]]:
    """(train, eval, format, skipped rows) of cfg's data, for any kind of row: `read(source, split, cfg)` gives a
    file's items, their format and its skipped rows. data.eval_split is held out of train when no eval file is
    given, then the max_train_examples / max_eval_examples caps apply. A list of sources is read source by source
    and mixed (phitune.data.mixture)."""
    if cfg.is_mixture:
        return load_mixture(cfg, read)[:4]
    train, fmt, skipped = read(cfg.train, cfg.split, cfg)
    if cfg.eval:
        evals, _, eval_skipped = read(cfg.eval, cfg.eval_hub_split or cfg.split, cfg)
        skipped += eval_skipped
    else:
        train, evals = split_eval(train, cfg.eval_split, cfg.seed)
    if cfg.max_train_examples:
        train = train[: cfg.max_train_examples]
    if cfg.max_eval_examples:
        evals = evals[: cfg.max_eval_examples]
    return train, evals, fmt, skipped


def _read_source(source: str, split: str, cfg: DataConfig) -> tuple[list[Messages], str, list[str]]:
    rows, bad = read_rows(source, split=split, on_bad_row=cfg.on_bad_row, hub=hub_options(cfg))
    if not rows:
        raise PhituneError(f"{source}: no rows")
    fmt = cfg.format if cfg.format != "auto" else detect_format(rows[0][1], f"{source}:{rows[0][0]}")
    conversations = []
    for number, row in rows:
        try:
            conversations.append(to_messages(row, fmt, row_location(source, number)))
        except BadRow as problem:
            if cfg.on_bad_row == "error":
                raise PhituneError(f"{problem} (set data.on_bad_row: skip to skip such rows)") from None
            bad.append(problem)
    if not conversations:
        raise PhituneError(f"{source}: every row is bad ({len(bad)} skipped); the first: {bad[0]}")
    return conversations, fmt, [str(b) for b in bad]


def rows_dataset(rows: list):
    """A datasets.Dataset of the rows' `as_row()` dicts: TRL's conversational preference rows (PreferencePair),
    unpaired preference rows (LabelledCompletion) or prompt rows with their other columns (PromptRow)."""
    import datasets

    return datasets.Dataset.from_list([row.as_row() for row in rows])


@dataclass
class TokenizedSet:
    """Token ids and labels ready for the trainer, and the counts a user wants to see."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    truncated: int = 0
    skipped: list[str] = field(default_factory=list)
    format: str = ""  # set by run.chat_data.tokenize_splits for metrics.json
    skipped_rows: int = 0

    def to_dataset(self):
        import datasets

        return datasets.Dataset.from_dict({"input_ids": self.input_ids, "labels": self.labels})

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)


def tokenize_conversations(
    conversations: list[Messages],
    tokenizer,
    max_seq_length: int,
    train_on: str = "assistant",
    on_bad_row: str = "error",
    name: str = "train",
) -> TokenizedSet:
    """Render each conversation with the training chat template; label assistant tokens (or all), truncate.

    Labels equal input_ids on assistant content and its closing `<|end|>` (the model must learn to stop), and
    IGNORE_INDEX on system and user turns when train_on is "assistant": phitune.data.encode's encoding and labels,
    the ones training's Arrow cache holds, in memory.
    """
    template = training_chat_template(tokenizer, train_on)
    out = TokenizedSet(input_ids=[], labels=[])
    encoded = encode_with_masks(tokenizer, conversations, template, train_on) if conversations else []
    for index, (ids, mask) in enumerate(encoded):
        ids, labels, length, masked = label_tokens(ids, mask, train_on, max_seq_length)
        out.truncated += length > max_seq_length
        if masked:
            problem = f"{name} example {index + 1}: every label is masked (assistant turn cut off by max_seq_length?)"
            if on_bad_row == "error":
                raise PhituneError(problem + "; raise data.max_seq_length or set data.on_bad_row: skip")
            out.skipped.append(problem)
            continue
        out.input_ids.append(ids.tolist())
        out.labels.append(labels.tolist())
    if not out.input_ids:
        raise PhituneError(f"the {name} set is empty after skipping {len(out.skipped)} fully-masked examples")
    return out
