"""Data: read rows, normalise them to conversations, render them with the chat template, mask the labels.

The result handed to the trainer is already tokenized (`input_ids`, `labels`), so that truncation can be counted,
fully-masked rows caught before training, and padding-free batching applied without re-tokenizing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from phitune.config import DataConfig
from phitune.data.formats import Messages, detect_format, to_messages
from phitune.data.readers import BadRow, read_rows
from phitune.errors import PhituneError

IGNORE_INDEX = -100  # label value that the loss ignores


@dataclass
class Conversations:
    """Normalised train and eval conversations, with what happened on the way."""

    train: list[Messages]
    eval: list[Messages]
    format: str
    skipped: list[str] = field(default_factory=list)  # "file:line: why" for each skipped row


def load_conversations(cfg: DataConfig) -> Conversations:
    """Read train (and eval) data, normalise every row to messages, and split off eval if no eval file is given."""
    train, fmt, skipped = _read_source(cfg.train, cfg.split, cfg)
    if cfg.eval:
        evals, _, eval_skipped = _read_source(cfg.eval, cfg.eval_hub_split or cfg.split, cfg)
        skipped += eval_skipped
    else:
        train, evals = split_eval(train, cfg.eval_split, cfg.seed)
    if cfg.max_train_examples:
        train = train[: cfg.max_train_examples]
    if cfg.max_eval_examples:
        evals = evals[: cfg.max_eval_examples]
    return Conversations(train=train, eval=evals, format=fmt, skipped=skipped)


def _read_source(source: str, split: str, cfg: DataConfig) -> tuple[list[Messages], str, list[str]]:
    rows, bad = read_rows(source, split=split, on_bad_row=cfg.on_bad_row)
    if not rows:
        raise PhituneError(f"{source}: no rows")
    fmt = cfg.format if cfg.format != "auto" else detect_format(rows[0][1], f"{source}:{rows[0][0]}")
    conversations = []
    for number, row in rows:
        try:
            conversations.append(to_messages(row, fmt, _where(source, number)))
        except BadRow as problem:
            if cfg.on_bad_row == "error":
                raise PhituneError(f"{problem} (set data.on_bad_row: skip to skip such rows)") from None
            bad.append(problem)
    if not conversations:
        raise PhituneError(f"{source}: the dataset is empty after skipping {len(bad)} bad rows")
    return conversations, fmt, [str(b) for b in bad]


def _where(source: str, number: int) -> str:
    return f"{source}:{number}" if source.endswith((".jsonl", ".csv")) else f"{source}: row {number}"


def split_eval(conversations: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out `fraction` of the conversations (at least one when fraction > 0), shuffled with `seed`."""
    if fraction <= 0:
        return conversations, []
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(conversations) * fraction))
    if n_eval >= len(conversations):
        raise PhituneError(f"data.eval_split {fraction} leaves no training rows out of {len(conversations)}")
    held = set(order[:n_eval])
    train = [c for i, c in enumerate(conversations) if i not in held]
    return train, [conversations[i] for i in sorted(held)]


@dataclass
class TokenizedSet:
    """Token ids and labels ready for the trainer, and the counts a user wants to see."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    truncated: int = 0
    skipped: list[str] = field(default_factory=list)
    format: str = ""  # set by train.tokenize_splits for metrics.json
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
    IGNORE_INDEX on system and user turns when train_on is "assistant".
    """
    template = training_chat_template(tokenizer, train_on)
    out = TokenizedSet(input_ids=[], labels=[])
    for index, messages in enumerate(conversations):
        ids, mask = render_with_mask(tokenizer, messages, template)
        labels = [t if (m or train_on == "all") else IGNORE_INDEX for t, m in zip(ids, mask)]
        if len(ids) > max_seq_length:
            out.truncated += 1
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            problem = f"{name} example {index + 1}: every label is masked (assistant turn cut off by max_seq_length?)"
            if on_bad_row == "error":
                raise PhituneError(problem + "; raise data.max_seq_length or set data.on_bad_row: skip")
            out.skipped.append(problem)
            continue
        out.input_ids.append(ids)
        out.labels.append(labels)
    if not out.input_ids:
        raise PhituneError(f"the {name} set is empty after skipping {len(out.skipped)} fully-masked examples")
    return out


def render_with_mask(tokenizer, messages: Messages, template: str) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation and a 0/1 mask of the tokens inside {% generation %} blocks.

    The same code as prepared data (prepare.encode_with_masks), so evaluation and training mask alike."""
    from phitune.data.prepare import encode_with_masks

    ids, mask = next(encode_with_masks(tokenizer, [messages], template))
    return ids.tolist(), mask.astype(int).tolist()


def training_chat_template(tokenizer, train_on: str = "assistant") -> str:
    """The tokenizer's chat template with {% generation %} markers: phitune's for the Phi family, else TRL's.

    With `train_on: all` the markers are not needed (every token is a label), so a template nobody has a training
    variant of is used as it is.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    from phitune.data.templates import training_template_for

    template = tokenizer.chat_template
    if not template:
        raise PhituneError("the tokenizer has no chat template; phitune needs one to render conversations")
    if has_generation_markers(template):
        return template
    try:
        family_template = training_template_for(tokenizer)  # Phi-4, Phi-4-mini (phitune.data.templates)
    except ValueError as exc:
        if train_on == "all":
            return template
        raise PhituneError(f"{exc}; add {{% generation %}} markers to the tokenizer's template") from None
    if family_template is not None:
        return family_template
    try:
        return get_training_chat_template(tokenizer) or template
    except Exception:  # TRL raises for templates it has no training variant of
        if all(tag in template for tag in ("<|user|>", "<|assistant|>", "<|end|>")):
            from trl.chat_template_utils import phi3_training_chat_template

            return phi3_training_chat_template  # a Phi-3 template revision TRL does not know verbatim
        if train_on == "all":
            return template
        raise PhituneError(
            "the tokenizer's chat template has no {% generation %} markers and TRL has no training variant of it, "
            "so assistant turns cannot be found; add the markers to the template or set data.train_on: all"
        ) from None
