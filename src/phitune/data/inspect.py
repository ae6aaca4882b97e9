"""`phitune data`: look at the data as the trainer will see it, before spending GPU hours on it.

Only the tokenizer is loaded. Rows are read, normalised and rendered with the same functions as training
(load_conversations, training_chat_template, render_with_mask), so what is shown is what will be trained on.

The pad-token check looks at two tokenizers on purpose: the one training uses (phitune pads with `<unk>` when the
tokenizer has one; if it has none, padding stays on the tokenizer's own pad token) and the raw tokenizer_config.
Padding with eos in training masks every eos out of the loss, so the model never learns to stop: an error-grade
warning. A raw pad == eos that phitune replaces is still reported, because any other tool (TRL alone, vLLM
scripts, a colleague's notebook) that loads this tokenizer would pad with eos.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from phitune.config import RunConfig
from phitune.data import load_conversations, render_with_mask, training_chat_template

HISTOGRAM_PNG = "data_lengths.png"
END_OF_TURN = "<|end|>"


@dataclass
class DataReport:
    """What `phitune data` found; report.print_data_report shows it."""

    source: str
    format: str
    counts: dict[str, int]
    lengths: list[int]
    max_seq_length: int
    truncated: dict[str, int]
    example: list[tuple[str, bool]]  # (token text, trained?) of one rendered example
    histogram: Path | None = None
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        lengths = sorted(self.lengths)
        return {
            "format": self.format,
            **self.counts,
            "tokens (train)": sum(lengths),
            "length min / median / max": f"{lengths[0]} / {lengths[len(lengths) // 2]} / {lengths[-1]}",
            "max_seq_length": self.max_seq_length,
            **{f"truncated ({name})": n for name, n in self.truncated.items()},
        }


def inspect_data(cfg: RunConfig, output_dir: Path | None = None, example_index: int = 0) -> DataReport:
    """Read, render and check the data of `cfg`; write the token-length histogram; collect every warning."""
    from phitune.modeling import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    conversations = load_conversations(replace(cfg.data, on_bad_row="skip"))
    template = training_chat_template(tokenizer)
    rendered = {name: [render_with_mask(tokenizer, m, template) for m in rows]
                for name, rows in (("train", conversations.train), ("eval", conversations.eval))}
    limit = cfg.data.max_seq_length
    report = DataReport(
        source=str(cfg.data.train),
        format=conversations.format,
        counts={"train examples": len(conversations.train), "eval examples": len(conversations.eval),
                "skipped rows": len(conversations.skipped)},
        lengths=[len(ids) for ids, _ in rendered["train"]],
        max_seq_length=limit,
        truncated={name: sum(len(ids) > limit for ids, _ in rows) for name, rows in rendered.items()},
        example=example_tokens(tokenizer, *rendered["train"][min(example_index, len(rendered["train"]) - 1)]),
    )
    report.warnings = (pad_token_warnings(cfg, tokenizer)
                       + label_warnings(tokenizer, rendered, limit, cfg.data.train_on)
                       + row_warnings(conversations, cfg.data.on_bad_row))
    report.histogram = plot_lengths(report.lengths, limit, _output_dir(cfg, output_dir) / HISTOGRAM_PNG)
    return report


def _output_dir(cfg: RunConfig, output_dir: Path | None) -> Path:
    """--output, else the run's output_dir when it exists already, else the current directory."""
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        return Path(output_dir)
    return cfg.output_dir if cfg.output_dir.is_dir() else Path.cwd()


def example_tokens(tokenizer, ids: list[int], mask: list[int]) -> list[tuple[str, bool]]:
    """Each token's text and whether it is trained on (its label is kept)."""
    return [(tokenizer.decode([token]), bool(m)) for token, m in zip(ids, mask)]


def pad_token_warnings(cfg: RunConfig, tokenizer) -> list[str]:
    """pad == eos in the tokenizer as training uses it, or in the raw tokenizer config."""
    warnings = []
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
        warnings.append(
            f"the pad token is the eos token ({tokenizer.eos_token!r}) and the tokenizer has no unk token to pad "
            "with instead: eos is masked wherever it pads, so the model may never learn to stop; add a pad token "
            "to the tokenizer"
        )
    raw_pad, raw_eos = _raw_special_tokens(cfg)
    if raw_pad is not None and raw_pad == raw_eos and tokenizer.pad_token != raw_pad:
        warnings.append(
            f"the tokenizer's own config pads with its eos token ({raw_eos!r}); phitune pads with "
            f"{tokenizer.pad_token!r} instead, but other tools loading this tokenizer would not"
        )
    return warnings


def _raw_special_tokens(cfg: RunConfig) -> tuple[str | None, str | None]:
    """(pad, eos) exactly as the tokenizer files say, before phitune's Phi-3 conventions are applied."""
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code,
                                        revision=cfg.model.revision)
    return raw.pad_token, raw.eos_token


def label_warnings(tokenizer, rendered: dict, limit: int, train_on: str) -> list[str]:
    """Examples whose trained tokens never include an end-of-turn token: the model would not learn to stop."""
    stops = {tokenizer.convert_tokens_to_ids(END_OF_TURN), tokenizer.eos_token_id} - {None, tokenizer.unk_token_id}
    warnings = []
    for name, rows in rendered.items():
        missing = sum(not any((m or train_on == "all") and t in stops for t, m in zip(ids[:limit], mask[:limit]))
                      for ids, mask in rows)
        if missing:
            warnings.append(f"{name}: {missing} examples have no end-of-turn token ({END_OF_TURN} or eos) among "
                            "their trained tokens (cut off by max_seq_length, or a chat template without it)")
    return warnings


def row_warnings(conversations, on_bad_row: str) -> list[str]:
    """Empty assistant turns, duplicated train examples, and eval examples that also appear in train."""
    warnings = []
    empty = [s for s in conversations.skipped if "(assistant) has empty content" in s]
    if empty:
        fate = "skipped" if on_bad_row == "skip" else "an error in training (set data.on_bad_row: skip)"
        warnings.append(f"{len(empty)} rows have an empty assistant turn ({fate}); first: {empty[0]}")
    others = len(conversations.skipped) - len(empty)
    if others:
        first = next(s for s in conversations.skipped if s not in empty)
        warnings.append(f"{others} other malformed rows; first: {first}")
    train_keys = Counter(_key(m) for m in conversations.train)
    duplicates = sum(n - 1 for n in train_keys.values() if n > 1)
    if duplicates:
        warnings.append(f"{duplicates} train examples are exact duplicates of another train example")
    leaked = sum(_key(m) in train_keys for m in conversations.eval)
    if leaked:
        warnings.append(f"{leaked} eval examples also appear in train: eval loss will look better than it is")
    return warnings


def _key(messages) -> str:
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def plot_lengths(lengths: list[int], limit: int, path: Path) -> Path:
    """Histogram of train token lengths with max_seq_length marked; examples right of the line are truncated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lengths, bins=min(50, max(5, len(set(lengths)))))
    ax.axvline(limit, color="red", linestyle="--", label=f"max_seq_length {limit}")
    ax.set_xlabel("tokens per example (train)")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
