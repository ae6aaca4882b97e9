"""`phitune data`: look at the data as the trainer will see it, before spending GPU hours on it.

Only the tokenizer is loaded. The data is prepared by the same code as training (phitune.data.prepare, and its
cache, so `phitune data` then `phitune train` tokenizes once); the statistics are read column by column from the
Arrow files, so a million rows fit in memory; one sampled example is rendered to show its trained tokens. The
example is the rendered text itself, cut by the character offsets of the trained tokens: SentencePiece's "▁" and
byte-fallback pieces (one Kannada letter is three tokens) decode to garbage one token at a time, so the text is never
rebuilt from per-token decoding.

The pad-token check looks at two tokenizers on purpose: the one training uses (phitune pads with `<unk>` when the
tokenizer has one; if it has none, padding stays on the tokenizer's own pad token) and the raw tokenizer_config.
Padding with eos in training masks every eos out of the loss, so the model never learns to stop: an error-grade
warning. A raw pad == eos that phitune replaces is still reported, because any other tool (TRL alone, vLLM
scripts, a colleague's notebook) that loads this tokenizer would pad with eos.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from phitune.config.schema import RunConfig
from phitune.data import training_chat_template
from phitune.data.encode import END_OF_TURN, rendered_with_offsets
from phitune.data.mixture import with_sources
from phitune.data.reasoning import OWN_SYSTEM, TRACE_PROBLEMS
from phitune.errors import replacing
from phitune.models.loading import turn_end_token
from phitune.data.templates import SYSTEM_PROMPTS

HISTOGRAM_PNG = "data_lengths.png"
EXAMPLE_TOKENS = 512  # of a text block shown by `phitune data`: a 4k-token block would fill the terminal


@dataclass
class DataReport:
    """What `phitune data` found; report.print_data_report shows it."""

    source: str
    format: str
    counts: dict[str, int]
    lengths: np.ndarray  # untruncated token length of each train example
    max_seq_length: int
    truncated: dict[str, int]
    example: list[tuple[str, bool]]  # one rendered example, exactly, in (text, trained?) runs
    histogram: Path | None = None
    warnings: list[str] = field(default_factory=list)
    sources: list = field(default_factory=list)  # a mixture: phitune.data.mixture.SourceShare per source

    def summary(self) -> dict:
        lengths = np.sort(self.lengths)  # numpy throughout: a million lengths are 4 MB, not 36 MB of Python ints
        return {
            "format": self.format,
            **self.counts,
            "tokens (train)": int(lengths.sum(dtype=np.int64)),
            "length min / median / max": f"{lengths[0]} / {lengths[len(lengths) // 2]} / {lengths[-1]}",
            "max_seq_length": self.max_seq_length,
            **{f"truncated ({name})": n for name, n in self.truncated.items()},
        }


def inspect_data(cfg: RunConfig, output_dir: Path | None = None, example_index: int = 0) -> DataReport:
    """Prepare (or reuse) the data of `cfg` as training does; statistics come from its Arrow columns, streamed."""
    from phitune.data.prepare_mixture import prepare_sources
    from phitune.models.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    if cfg.data.streaming:
        from phitune.data.stream import preview_data

        prepared = preview_data(cfg.data, tokenizer)
    else:
        prepared = prepare_sources(replace(cfg.data, on_bad_row="skip"), tokenizer)
    if prepared.format == "text":
        report = text_report(cfg, tokenizer, prepared, output_dir, example_index)
        return streamed(with_sources(report, cfg, getattr(prepared, "shares", [])), prepared)
    sets = {"train": prepared.train, **({"eval": prepared.eval} if prepared.eval is not None else {})}
    limit = cfg.data.max_seq_length
    sample = prepared.samples[min(example_index, len(prepared.samples) - 1)]
    lengths = prepared.train.column("length")
    report = DataReport(
        source=str(cfg.data.train),
        format=prepared.format,
        counts={"train examples": len(prepared.train), "eval examples": len(sets.get("eval", ())),
                "skipped rows": len(prepared.skipped)},
        lengths=lengths,
        max_seq_length=limit,
        truncated={"train": int((lengths > limit).sum()), "eval": sets["eval"].truncated if "eval" in sets else 0},
        example=example_runs(tokenizer, sample, training_chat_template(tokenizer, cfg.data.train_on),
                             cfg.data.train_on),
    )
    report.warnings = (pad_token_warnings(cfg, tokenizer) + label_warnings(sets) + trace_warnings(sets)
                       + system_turn_warnings(tokenizer, sets)
                       + row_warnings(prepared.skipped, sets, cfg.data.on_bad_row))
    report.histogram = plot_lengths(lengths, limit, report_dir(cfg, output_dir, prepared.fingerprint) / HISTOGRAM_PNG)
    return streamed(with_sources(report, cfg, getattr(prepared, "shares", [])), prepared)


def streamed(report: DataReport, prepared) -> DataReport:
    """A report on a stream's first rows says so, first among its counts and in a warning: its numbers are those of
    the rows read, not of the whole set (reading it all is what streaming avoids)."""
    rows = prepared.stats.get("streamed_rows")
    if rows is None:
        return report
    report.counts = {"streamed: rows read": rows, **report.counts}
    report.warnings.insert(0, f"data.streaming: this report covers the first {rows:,} rows of {report.source} only "
                              "(data.max_train_examples sets how many); bad rows further on stop training when it "
                              "reaches them (or are skipped with data.on_bad_row: skip)")
    return report


def text_report(cfg: RunConfig, tokenizer, prepared, output_dir: Path | None, example_index: int) -> DataReport:
    """`phitune data` on raw text (data.format: text): documents, tokens and blocks per split, one block shown as
    trained (every token is), and the warnings that apply to blocks (pad token, skipped documents, duplicates)."""
    sets = {"train": prepared.train, **({"eval": prepared.eval} if prepared.eval is not None else {})}
    documents = prepared.stats["documents"]
    counts = {"documents (data.train)": documents["train"],
              **({"documents (data.eval)": documents["eval"]} if "eval" in documents else {}),
              **{f"blocks ({name})": len(blocks) for name, blocks in sets.items()},
              "tokens (eval)": sets["eval"].num_tokens if "eval" in sets else 0,
              "skipped documents": len(prepared.skipped)}
    lengths = prepared.train.column("length")
    block = prepared.train.rows[min(example_index, len(prepared.train) - 1)]["input_ids"]
    shown = tokenizer.decode(block[:EXAMPLE_TOKENS])  # decoded whole, never token by token (see the module doc)
    more = f" ... ({len(block) - EXAMPLE_TOKENS} more tokens)" if len(block) > EXAMPLE_TOKENS else ""
    report = DataReport(source=str(cfg.data.train), format="text", counts=counts, lengths=lengths,
                        max_seq_length=cfg.data.max_seq_length, truncated={},
                        example=[(shown, True)] + ([(more, False)] if more else []))
    report.warnings = pad_token_warnings(cfg, tokenizer) + row_warnings(prepared.skipped, sets, cfg.data.on_bad_row)
    report.histogram = plot_lengths(lengths, cfg.data.max_seq_length,
                                    report_dir(cfg, output_dir, prepared.fingerprint) / HISTOGRAM_PNG)
    return report


def report_dir(cfg: RunConfig, output_dir: Path | None, entry: str) -> Path:
    """--output, else the folder `entry` of the data cache (data.cache_dir): `phitune data` only looks, so it writes
    nothing where a person works, nor into a run's directory (a finished run is never changed, an empty one must
    stay empty for training). `entry` is the data's own (its cache entry), so one config's histogram never
    overwrites another's."""
    from phitune.data.prepare import cache_root

    folder = Path(output_dir) if output_dir is not None else cache_root(cfg.data) / entry
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def example_runs(tokenizer, messages: list[dict], template: str, train_on: str = "assistant") -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained?) runs, cut at the character offsets of the trained tokens.

    A character is trained when a trained token's own text covers it (the whitespace a Phi-3 chat token swallows is
    not its own text); joined, the runs are the rendered text exactly."""
    [(text, _, offsets, mask)] = rendered_with_offsets(tokenizer, [messages], template, train_on)
    if train_on == "all":
        return [(text, True)]
    depth = np.zeros(len(text) + 1, dtype=np.int64)  # +1 where a trained token starts, -1 where it ends
    np.add.at(depth, offsets[mask, 0], 1)
    np.add.at(depth, offsets[mask, 1], -1)
    trained = np.cumsum(depth)[:-1] > 0
    cuts = [0, *(np.flatnonzero(trained[1:] != trained[:-1]) + 1).tolist(), len(text)]
    return [(text[a:b], bool(trained[a])) for a, b in zip(cuts, cuts[1:]) if b > a]


def pad_token_warnings(cfg: RunConfig, tokenizer) -> list[str]:
    """pad == eos in the tokenizer as training uses it, or in the raw tokenizer config."""
    warnings = []
    turn_end = turn_end_token(tokenizer)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id and turn_end:
        # Phi-4-mini's case (docs/families.md): padding is masked by position, and a turn ends with its own token,
        # whose training label_warnings checks; "add a pad token" would be advice about a model the user cannot fix
        warnings.append(
            f"the tokenizer pads with its eos token ({tokenizer.eos_token!r}; it has no unk token): safe for "
            f"phitune's training, which masks padding by position and trains {turn_end} to end each turn; a tool "
            "that masks padding by token id would never train the eos"
        )
    elif tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
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


def label_warnings(sets: dict) -> list[str]:
    """Examples whose trained tokens never include an end-of-turn token: the model would not learn to stop."""
    warnings = []
    for name, prepared in sets.items():
        missing = int((~prepared.column("stop")).sum())
        if missing:
            warnings.append(f"{name}: {missing} examples have no end-of-turn token ({END_OF_TURN} or eos) among "
                            "their trained tokens (cut off by max_seq_length, or a chat template without it)")
    return warnings


def trace_warnings(sets: dict) -> list[str]:
    """Reasoning traces that never close, close unopened, are empty, or come after the answer, counted per set."""
    warnings = []
    for name, prepared in sets.items():
        found = prepared.column("notes")  # phitune.data.reasoning.row_notes, per example
        for bit, problem in TRACE_PROBLEMS.items():
            count = int((found & bit).astype(bool).sum())
            if count:
                warnings.append(f"{name}: {count} example{'s' if count != 1 else ''} {problem}")
    return warnings


def system_turn_warnings(tokenizer, sets: dict) -> list[str]:
    """Rows with their own system turn, where the chat template drops it or puts it in place of the reasoning
    model's own system prompt (without which, users report, its traces may never close)."""
    own = sum(int((prepared.column("notes") & OWN_SYSTEM).astype(bool).sum()) for prepared in sets.values())
    effect = system_turn_effect(tokenizer.chat_template or "") if own else None
    if effect is None:
        return []
    rows = f"{own} example{'s' if own != 1 else ''} (train and eval)"
    if effect == "dropped":
        return [(f"{rows} have a system turn of their own, which this model's chat template drops without a word: "
                 "that text is neither seen nor trained; move it into the first user turn")]
    return [(f"{rows} have a system turn of their own, which this model's chat template renders in place of the "
             "reasoning system prompt it was trained with: without that prompt its traces may not close; drop the "
             "system turn to keep the model's own (docs/reasoning.md)")]


def system_turn_effect(template: str) -> str | None:
    """'dropped' when the template renders no system turn of the conversation, 'replaces' when a conversation's own
    system turn takes the place of a reasoning system prompt the template writes by default, else None."""
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(messages: list[dict]) -> str:
        return render_jinja_template(conversations=[messages], chat_template=template)[0][0]

    marker = "phitune-probe-7d1e"
    answer = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    try:
        alone, with_own = render(answer), render([{"role": "system", "content": marker}, *answer])
    except (TemplateError, TypeError, KeyError):  # a template that refuses this probe: nothing to say about it
        return None
    if marker not in with_own:
        return "dropped"
    lost = [p for p in SYSTEM_PROMPTS if p in alone and p not in with_own]
    return "replaces" if lost else None


def row_warnings(skipped: list[str], sets: dict, on_bad_row: str) -> list[str]:
    """Empty assistant turns, duplicated train examples, and eval examples that also appear in train.

    Duplicates are found from a 64-bit hash per conversation (the `key` column), so a million rows cost 8 MB.
    """
    warnings = []
    empty = [s for s in skipped if "(assistant) has empty content" in s]
    fate = "skipped" if on_bad_row == "skip" else "an error in training (set data.on_bad_row: skip)"
    if empty:
        has = "row has" if len(empty) == 1 else "rows have"
        warnings.append(f"{len(empty)} {has} an empty assistant turn ({fate}); first: {empty[0]}")
    others = len(skipped) - len(empty)
    if others:  # phitune data reads past them; say that phitune train stops at the first unless told to skip
        first = next(s for s in skipped if s not in empty)
        other = "other " if empty else ""
        warnings.append(f"{others} {other}malformed row{'s' if others != 1 else ''} ({fate}); first: {first}")
    train_keys = sets["train"].column("key")
    duplicates = len(train_keys) - len(np.unique(train_keys))
    if duplicates:
        are = "train example is an exact duplicate" if duplicates == 1 else "train examples are exact duplicates"
        warnings.append(f"{duplicates} {are} of another train example")
    leaked = int(np.isin(sets["eval"].column("key"), train_keys).sum()) if "eval" in sets else 0
    if leaked:
        appear = "eval example also appears" if leaked == 1 else "eval examples also appear"
        warnings.append(f"{leaked} {appear} in train: eval loss will look better than it is")
    return warnings


def plot_lengths(lengths: np.ndarray, limit: int, path: Path) -> Path:
    """Histogram of train token lengths with max_seq_length marked; examples right of the line are truncated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lengths, bins=min(50, max(5, len(np.unique(lengths)))))
    ax.axvline(limit, color="red", linestyle="--", label=f"max_seq_length {limit}")
    ax.set_xlabel("tokens per example (train)")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    with replacing(path) as partial:
        fig.savefig(partial, dpi=100)
    plt.close(fig)
    return path
