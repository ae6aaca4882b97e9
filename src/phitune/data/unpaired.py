"""Unpaired preference data for KTO: rows of a prompt, one completion and a label (desirable or not), normalised to
conversations.

| shape           | a row looks like                                                                      |
| --------------- | ------------------------------------------------------------------------------------- |
| strings         | {"prompt": "..", "completion": "..", "label": true}                                    |
| conversational  | {"prompt": [messages], "completion": [{"role": "assistant", ..}], "label": false}      |
| implicit prompt | {"completion": [user, assistant, ..], "label": true}: every turn but the last is the prompt |

`label` is true (a desirable completion) or false (an undesirable one): JSON booleans, or true / false / 1 / 0 as CSV
and parquet files write them. As for DPO (phitune.data.preference), a string prompt is one user turn, so every
completion is scored and trained in the model's chat format, and its tokens are the ones TRL's KTOTrainer builds: the
tokens after the prompt rendered with the generation prompt (phitune.data.preference.tokenize_answer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from phitune.config.schema import DataConfig
from phitune.data import load_splits_and_shares
from phitune.data.formats import Messages, check_conversation
from phitune.data.preference import PreferenceDataReport, report_key, rows_have, tokenize_answer
from phitune.data.mixture import with_sources
from phitune.data.readers import BadRow, hub_options, read_rows, row_location
from phitune.errors import PhituneError

TRUE, FALSE = ("true", "1", "yes", "desirable"), ("false", "0", "no", "undesirable")


@dataclass
class LabelledCompletion:
    """One judged completion: `prompt` (messages ending with a user turn), the completion, and whether it is
    desirable."""

    prompt: Messages
    completion: str
    desirable: bool
    where: str = ""

    def as_row(self) -> dict:
        """TRL's conversational unpaired preference row."""
        return {"prompt": self.prompt, "completion": [{"role": "assistant", "content": self.completion}],
                "label": self.desirable}


@dataclass
class UnpairedData:
    """Train and eval completions, the shape they came in, and the rows skipped on the way ("file:line: why")."""

    train: list[LabelledCompletion]
    eval: list[LabelledCompletion]
    format: str
    skipped: list[str] = field(default_factory=list)
    shares: list = field(default_factory=list)  # a mixture: what each source gave (phitune.data.mixture)


def load_unpaired_data(cfg: DataConfig) -> UnpairedData:
    """Read train (and eval) completions; hold out data.eval_split of train when no eval file is given."""
    train, evals, fmt, skipped, shares = load_splits_and_shares(cfg, _read_completions)
    return UnpairedData(train=train, eval=evals, format=fmt, skipped=skipped, shares=shares)


def _read_completions(source: str, split: str, cfg: DataConfig) -> tuple[list[LabelledCompletion], str, list[str]]:
    rows, bad = read_rows(source, split=split, on_bad_row=cfg.on_bad_row, hub=hub_options(cfg))
    if not rows:
        raise PhituneError(f"{source}: no rows")
    first = rows[0][1]
    if "completion" not in first or "label" not in first:
        hint = (" (these are preference pairs: train them with method dpo, simpo or orpo)"
                if "chosen" in first and "rejected" in first else "")
        raise PhituneError(f"{row_location(source, rows[0][0])}: method kto needs a prompt, a completion and a label "
                           f"(true or false); this row has {', '.join(sorted(first)) or 'no columns'}{hint}")
    examples = []
    for number, row in rows:
        try:
            examples.append(to_labelled(row, row_location(source, number)))
        except BadRow as problem:
            if cfg.on_bad_row == "error":
                raise PhituneError(f"{problem} (set data.on_bad_row: skip to skip such rows)") from None
            bad.append(problem)
    if not examples:
        raise PhituneError(f"{source}: no usable labelled completions after skipping {len(bad)} bad rows")
    shape = "conversational" if isinstance(first.get("completion"), list) else "strings"
    return examples, f"unpaired preference ({shape})", [str(b) for b in bad]


def to_labelled(row: dict, where: str) -> LabelledCompletion:
    """Normalise one row (any shape in the table above) to a LabelledCompletion, or raise BadRow saying what is
    wrong."""
    desirable = parse_label(row.get("label"), where)
    completion, prompt = row.get("completion"), row.get("prompt")
    try:
        if isinstance(completion, list):
            turns = [{"role": str(m["role"]), "content": m["content"]} for m in completion]
            if not turns or turns[-1]["role"] != "assistant":
                raise BadRow(where, "the completion must end with an assistant turn")
            prompt = turns[:-1] if len(turns) > 1 and prompt is None else _prompt_messages(prompt, where)
            completion = turns[-1]["content"]
        else:
            prompt = _prompt_messages(prompt, where)
    except (KeyError, TypeError, AttributeError) as exc:
        raise BadRow(where, f"row does not match the prompt / completion / label format (missing or wrong field "
                            f"{exc})") from None
    if not isinstance(completion, str) or not completion.strip():
        raise BadRow(where, "the completion is empty")
    check_conversation(prompt + [{"role": "assistant", "content": completion}], where)
    return LabelledCompletion(prompt=prompt, completion=completion, desirable=desirable, where=where)


def parse_label(value, where: str) -> bool:
    """True for a desirable completion, False for an undesirable one; anything else is a bad row."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
        return value.strip().lower() in TRUE
    raise BadRow(where, f"label must be true (desirable) or false (undesirable), got {value!r}")


def _prompt_messages(prompt, where: str) -> Messages:
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt:
        return [{"role": str(m["role"]), "content": m["content"]} for m in prompt]
    raise BadRow(where, "the prompt is missing (a string, or a list of messages ending with a user turn)")


def length_problem(prompt_ids: list[int], completion_ids: list[int], max_seq_length: int) -> str | None:
    """None when the completion fits; 'cut' when it loses tokens; 'lost' when the prompt leaves no completion token."""
    if len(prompt_ids) >= max_seq_length:
        return "lost"
    return "cut" if len(prompt_ids) + len(completion_ids) > max_seq_length else None


def check_lengths(examples: list[LabelledCompletion], tokenizer, max_seq_length: int, on_bad_row: str,
                  name: str) -> tuple[list[LabelledCompletion], int, list[str]]:
    """(kept, number whose completion is truncated, skipped): a completion whose prompt alone fills max_seq_length
    has no token left to judge, which is a bad row (TRL would drop it silently)."""
    kept, cut, skipped = [], 0, []
    for example in examples:
        problem = length_problem(*tokenize_answer(tokenizer, example.prompt, example.completion), max_seq_length)
        if problem == "lost":
            message = f"{example.where or name}: the prompt fills data.max_seq_length ({max_seq_length} tokens)"
            if on_bad_row == "error":
                raise PhituneError(message + "; raise data.max_seq_length or set data.on_bad_row: skip")
            skipped.append(message)
            continue
        cut += problem == "cut"
        kept.append(example)
    if not kept:
        raise PhituneError(f"the {name} set is empty after skipping {len(skipped)} rows whose prompts fill "
                           "data.max_seq_length")
    return kept, cut, skipped


def label_counts(examples: list[LabelledCompletion]) -> tuple[int, int]:
    """(desirable, undesirable) completions in `examples`."""
    desirable = sum(e.desirable for e in examples)
    return desirable, len(examples) - desirable


def inspect_unpaired_data(cfg, output_dir=None, example_index: int = 0) -> PreferenceDataReport:
    """`phitune data` for method kto: read the completions as training does (bad rows skipped and reported),
    tokenize them as KTOTrainer does, and collect counts per label, lengths, one rendered completion and the
    warnings: a label missing from a set, a completion judged both ways, empty completions, completions cut by
    data.max_seq_length, other malformed rows."""
    from dataclasses import replace

    from phitune.data.inspect import HISTOGRAM_PNG, plot_lengths, report_dir
    from phitune.models.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    data = load_unpaired_data(replace(cfg.data, on_bad_row="skip"))
    limit = cfg.data.max_seq_length
    tokens = {name: [tokenize_answer(tokenizer, e.prompt, e.completion) for e in getattr(data, name)]
              for name in ("train", "eval")}
    train = tokens["train"]
    shown = min(example_index, len(train) - 1)
    prompt_ids, completion_ids = train[shown]
    label = "desirable" if data.train[shown].desirable else "undesirable"
    problems = {name: [length_problem(p, c, limit) for p, c in toks] for name, toks in tokens.items()}
    counts = {}
    for name in ("train", "eval"):
        good, bad = label_counts(getattr(data, name))
        counts |= {f"{name} desirable": good, f"{name} undesirable": bad}
    report = PreferenceDataReport(
        source=str(cfg.data.train), format=data.format, counts=counts | {"skipped rows": len(data.skipped)},
        lengths={"prompt": [len(p) for p, _ in train], "completion": [len(c) for _, c in train]},
        max_seq_length=limit,
        truncated={name: sum(p is not None for p in found) for name, found in problems.items()},
        example=[(tokenizer.decode(prompt_ids), False), (f"\n[{label}] ", False),
                 (tokenizer.decode(completion_ids), True)],
    )
    report.warnings = unpaired_warnings(data, problems, limit, cfg.data.on_bad_row)
    totals = [p + c for p, c in zip(*report.lengths.values())]
    report.histogram = plot_lengths(totals, limit, report_dir(cfg, output_dir, report_key(cfg, "unpaired")) / HISTOGRAM_PNG)
    return with_sources(report, cfg, data.shares)


def unpaired_warnings(data: UnpairedData, problems: dict, limit: int, on_bad_row: str) -> list[str]:
    """Sets without one of the labels (KTO learns from both; the held-out margin needs both), a completion judged
    both ways, rows dropped for empty completions or other faults, completions that data.max_seq_length cuts."""
    warnings = []
    for name in ("train", "eval"):
        examples = getattr(data, name)
        good, bad = label_counts(examples)
        if examples and not (good and bad):
            missing = "undesirable" if good else "desirable"
            warnings.append(f"{name}: no {missing} completions (label {str(not good).lower()}); KTO learns from both, "
                            "and the held-out margin compares both")
    seen: dict[tuple, bool] = {}
    for e in data.train + data.eval:
        key = (repr(e.prompt), e.completion.strip())
        if seen.setdefault(key, e.desirable) != e.desirable:
            warnings.append(f"a completion is labelled both desirable and undesirable for the same prompt; "
                            f"first: {e.where}")
            break
    fate = "skipped" if on_bad_row == "skip" else "an error in training (set data.on_bad_row: skip)"
    empty = [s for s in data.skipped if "completion is empty" in s or "has empty content" in s]
    if empty:
        warnings.append(f"{rows_have(len(empty))} an empty completion or turn ({fate}); first: {empty[0]}")
    others = [s for s in data.skipped if s not in empty]
    if others:
        warnings.append(f"{len(others)} other malformed rows ({fate}); first: {others[0]}")
    for name, found in problems.items():
        cut, lost = found.count("cut"), found.count("lost")
        if cut:
            warnings.append(f"{name}: {cut} completions are cut by max_seq_length {limit}; raise "
                            "data.max_seq_length or shorten the prompts")
        if lost:
            warnings.append(f"{name}: {rows_have(lost)} a prompt that fills max_seq_length {limit}: no completion "
                            f"token is left to judge ({fate})")
    return warnings
