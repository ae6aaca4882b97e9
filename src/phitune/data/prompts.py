"""Prompt data for GRPO: rows holding a prompt to complete, and any other columns the rewards compare with.

| shape             | a row looks like                                                          |
| ----------------- | ------------------------------------------------------------------------- |
| prompt (string)   | {"prompt": "What is 7 plus 5?", "answer": "12"}                            |
| prompt (messages) | {"prompt": [{"role": "system", ...}, {"role": "user", ...}], "answer": ..} |
| messages          | {"messages": [..., {"role": "user", "content": "..."}], "answer": ...}     |

Other data (GSM8K's {"question": ..., "answer": ...}) becomes a string prompt through data.prompt_template, e.g.
`"{question}\nEnd with the line: The answer is N."`; the row's columns, all of them, still reach the rewards.

Every row becomes a `PromptRow`: the prompt as messages ending with a user turn (a string is one user turn, so
completions are generated in the chat format, as SFT trained it), and its other columns, which TRL hands to every
reward function (`answer=[...]`). The budget of a prompt is data.max_seq_length minus the completion's
max_completion_length: TRL 1.x does not cut prompts, so a longer one is an error (or skipped, data.on_bad_row).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from phitune.config.schema import DataConfig
from phitune.data import load_splits_and_shares
from phitune.data.formats import Messages
from phitune.data.readers import BadRow, hub_options, read_rows, row_location
from phitune.errors import PhituneError

PROMPT_KEYS = ("prompt", "messages")


@dataclass
class PromptRow:
    """One prompt: messages ending with a user turn, the row's other columns, and where it came from."""

    prompt: Messages
    columns: dict
    where: str = ""

    def as_row(self) -> dict:
        """TRL's conversational prompt row: `prompt` and the other columns beside it."""
        return {"prompt": self.prompt, **self.columns}


@dataclass
class PromptData:
    """Train and eval prompts, the shape they came in, and the rows skipped on the way ("file:line: why")."""

    train: list[PromptRow]
    eval: list[PromptRow]
    format: str
    skipped: list[str] = field(default_factory=list)
    shares: list = field(default_factory=list)  # a mixture: what each source gave (phitune.data.mixture)


def load_prompt_data(cfg: DataConfig) -> PromptData:
    """Read train (and eval) prompts; hold out data.eval_split of train when no eval file is given."""
    train, evals, fmt, skipped, shares = load_splits_and_shares(cfg, _read_prompts)
    return PromptData(train=train, eval=evals, format=fmt, skipped=skipped, shares=shares)


def _read_prompts(source: str, split: str, cfg: DataConfig) -> tuple[list[PromptRow], str, list[str]]:
    rows, bad = read_rows(source, split=split, on_bad_row=cfg.on_bad_row, hub=hub_options(cfg),
                          needs="prompt rows (a prompt column, or messages ending with a user turn)")
    if not rows:
        raise PhituneError(f"{source}: no rows")
    first = rows[0][1]
    if not any(key in first for key in PROMPT_KEYS) and cfg.prompt_template is None:
        raise PhituneError(f"{row_location(source, rows[0][0])}: GRPO needs a prompt column (a string or messages) "
                           f"or messages ending with a user turn; this row has {', '.join(sorted(first)) or 'nothing'}")
    prompts = []
    for number, row in rows:
        try:
            prompts.append(to_prompt(row, row_location(source, number), cfg.prompt_template))
        except BadRow as problem:
            if cfg.on_bad_row == "error":
                raise PhituneError(f"{problem} (set data.on_bad_row: skip to skip such rows)") from None
            bad.append(problem)
    if not prompts:
        raise PhituneError(f"{source}: no usable prompts after skipping {len(bad)} bad rows")
    return prompts, row_shape(first, cfg.prompt_template), [str(b) for b in bad]


def row_shape(row: dict, template: str | None = None) -> str:
    if template is not None:
        return "prompt_template"
    if "prompt" in row:
        return "prompt (messages)" if isinstance(row["prompt"], list) else "prompt (string)"
    return "messages"


def to_prompt(row: dict, where: str, template: str | None = None) -> PromptRow:
    """One row (any shape in the table above, or any columns with data.prompt_template) as a PromptRow, or BadRow
    saying what is wrong."""
    if template is not None:
        row = dict(row, prompt=fill_template(template, row, where))
    key = "prompt" if "prompt" in row else "messages"
    value = row.get(key)
    columns = {k: v for k, v in row.items() if k not in PROMPT_KEYS}
    if isinstance(value, str):
        if not value.strip():
            raise BadRow(where, "the prompt is empty")
        return PromptRow([{"role": "user", "content": value}], columns, where)
    if not isinstance(value, list) or not value:
        raise BadRow(where, f"{key} must be a string or a non-empty list of messages")
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            raise BadRow(where, f"{key}: each message needs a role and a string content")
        if not message["content"].strip():
            raise BadRow(where, f"{key}: a {message['role']} message has empty content")
    if value[-1]["role"] != "user":
        raise BadRow(where, f"{key}: the last message must be a user turn (the one to complete), "
                            f"not {value[-1]['role']}")
    return PromptRow([{"role": m["role"], "content": m["content"]} for m in value], columns, where)


def fill_template(template: str, row: dict, where: str) -> str:
    """data.prompt_template with the row's columns filled in ('{question}' -> the row's question)."""
    try:
        return template.format(**row)
    except KeyError as exc:
        raise BadRow(where, f"data.prompt_template names the column {exc.args[0]!r}, which this row lacks "
                            f"(it has {', '.join(sorted(row))})") from None
    except (IndexError, ValueError) as exc:
        raise BadRow(where, f"data.prompt_template is not a valid template ({exc}); name columns as {{column}} "
                            "and write a literal brace as {{ or }}") from None


def prompt_length(tokenizer, row: PromptRow) -> int:
    """Tokens of the prompt as TRL renders it: the chat template with the generation prompt."""
    return len(tokenizer.apply_chat_template(row.prompt, tokenize=True, add_generation_prompt=True,
                                             return_dict=True)["input_ids"])


def check_prompt_lengths(rows: list[PromptRow], tokenizer, budget: int, on_bad_row: str,
                         name: str) -> tuple[list[PromptRow], list[str]]:
    """(kept rows, skipped rows): prompts longer than `budget` tokens are an error, or skipped."""
    kept, skipped = [], []
    for row in rows:
        tokens = prompt_length(tokenizer, row)
        if tokens <= budget:
            kept.append(row)
            continue
        problem = (f"{row.where}: the prompt has {tokens} tokens, over the budget of {budget} (data.max_seq_length "
                   "minus training_config.max_completion_length)")
        if on_bad_row == "error":
            raise PhituneError(f"{name}: {problem}; raise data.max_seq_length or set data.on_bad_row: skip")
        skipped.append(problem)
    return kept, skipped


@dataclass
class PromptDataReport:
    """What `phitune data` found in prompt data; report.print_data_report shows it."""

    source: str
    format: str
    counts: dict
    lengths: dict[str, list[int]]  # "prompt": token lengths of the train prompts
    max_seq_length: int
    budget: int  # tokens a prompt may take: max_seq_length minus max_completion_length
    columns: list[str]
    example: list[tuple[str, bool]]  # (text, trained?): the rendered prompt, then its columns
    histogram: object = None
    warnings: list[str] = field(default_factory=list)
    sources: list = field(default_factory=list)  # a mixture: phitune.data.mixture.SourceShare per source

    def summary(self) -> dict:
        rows = {"format": self.format, **self.counts, "columns for the rewards": ", ".join(self.columns) or "none"}
        ordered = sorted(self.lengths["prompt"])
        rows["prompt tokens min / median / max"] = f"{ordered[0]} / {ordered[len(ordered) // 2]} / {ordered[-1]}"
        rows["max_seq_length"] = self.max_seq_length
        rows["prompt budget (max_seq_length - max_completion_length)"] = self.budget
        return rows


def inspect_prompt_data(cfg, output_dir=None, example_index: int = 0, budget: int | None = None,
                        needed_columns: tuple[str, ...] = ()) -> PromptDataReport:
    """Read the prompts as training does (bad rows skipped and reported), render them as TRL does, and collect the
    prompt lengths, one rendered prompt with its columns, and the warnings: prompts over `budget` tokens, columns
    that a chosen reward needs and the data lacks, malformed rows."""
    from dataclasses import replace

    from phitune.data.inspect import HISTOGRAM_PNG, plot_lengths, report_dir
    from phitune.data.mixture import with_sources
    from phitune.models.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    data = load_prompt_data(replace(cfg.data, on_bad_row="skip"))
    budget = cfg.data.max_seq_length if budget is None else budget
    lengths = [prompt_length(tokenizer, row) for row in data.train]
    shown = data.train[min(example_index, len(data.train) - 1)]
    rendered = tokenizer.apply_chat_template(shown.prompt, tokenize=False, add_generation_prompt=True)
    example = [(rendered, False), ("\n[columns] " + json.dumps(shown.columns, ensure_ascii=False), False)]
    columns = sorted({key for row in data.train for key in row.columns})
    report = PromptDataReport(
        source=str(cfg.data.train), format=data.format,
        counts={"train prompts": len(data.train), "eval prompts": len(data.eval), "skipped rows": len(data.skipped)},
        lengths={"prompt": lengths}, max_seq_length=cfg.data.max_seq_length, budget=budget, columns=columns,
        example=example)
    report.warnings = prompt_warnings(data, lengths, budget, needed_columns, cfg.data.on_bad_row)
    report.histogram = plot_lengths(lengths, budget, report_dir(cfg, output_dir, _report_key(cfg)) / HISTOGRAM_PNG)
    return with_sources(report, cfg, data.shares)


def prompt_warnings(data: PromptData, lengths: list[int], budget: int, needed_columns, on_bad_row: str) -> list[str]:
    """Train prompts over the budget, reward columns missing from some rows, and malformed rows."""
    warnings = []
    fate = "skipped" if on_bad_row == "skip" else "an error in training (set data.on_bad_row: skip)"
    over = [row.where for row, n in zip(data.train, lengths) if n > budget]
    if over:
        warnings.append(f"train: {len(over)} prompts are longer than the prompt budget of {budget} tokens "
                        f"(data.max_seq_length minus max_completion_length; {fate}); first: {over[0]}")
    for column in needed_columns:
        missing = [row.where for row in data.train + data.eval if column not in row.columns]
        if missing:
            warnings.append(f"{len(missing)} rows lack the column {column!r} that a reward compares with; first: "
                            f"{missing[0]}")
    if data.skipped:
        warnings.append(f"{len(data.skipped)} malformed rows ({fate}); first: {data.skipped[0]}")
    return warnings


def _report_key(cfg) -> str:
    """A data cache folder of these prompts' own (prompts are not cached): the data settings and the model."""
    settings = json.dumps([asdict(cfg.data), cfg.model.name_or_path, cfg.model.revision], sort_keys=True, default=str)
    return "prompts-" + hashlib.sha256(settings.encode()).hexdigest()[:16]
