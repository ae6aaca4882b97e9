"""GRPO's reward functions: the built-in ones people verify most, a user's own, and the scoring of greedy
completions that shows what a run learned.

Every reward follows TRL's GRPOTrainer convention, `f(prompts, completions, completion_ids, **columns) -> list[float]`,
one value per completion, where `columns` are the data's other columns (e.g. `answer`), repeated per completion.
A completion is a string, or (conversational prompts) a one-message list `[{"role": "assistant", "content": ...}]`.

| name     | reward                                                                                          |
| -------- | ----------------------------------------------------------------------------------------------- |
| `answer` | 1.0 when the completion's final answer equals the reference column, else 0.0. The answer is the  |
|          | last number (`last_number`, the default), the last `\\boxed{...}` (`boxed`), the first group of the  |
|          | last match of `pattern` (`regex`), or the whole stripped text (`text`); both sides compare as     |
|          | numbers when both parse as numbers ("3.0" == "3", "1,000" == "1000"), else as trimmed,           |
|          | case-folded text. `reference_pattern` extracts the reference first (GSM8K: `####\\s*(.+)`).        |
| `format` | 1.0 when `re.search(pattern, completion, re.DOTALL)` matches (anchor with ^...$ for the whole).    |
| `json`   | 1.0 when the completion (or its ```json fenced block) parses and, with `schema`, validates.        |
| `length` | 0.0 up to `max_tokens` completion tokens, then -(tokens - max_tokens) / max_tokens, at least -1.  |

`{model: RUN_DIR}` (optional `batch_size`, default 8) is a reward model, a method reward run: its adapter is loaded
once on the base its config names (phitune.after.reward_model), and each completion's score is the model's output on
prompt + completion, scored `batch_size` at a time without gradients. It logs as `rewards/model/mean`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from phitune.errors import PhituneError, first_line

NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
FENCED_JSON = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


@dataclass
class Reward:
    """One reward of a run: its name in the logs (`rewards/NAME/mean`), the function, and its weight."""

    name: str
    func: Callable
    weight: float = 1.0
    builtin: str | None = None  # "answer", "format", ... for a built-in reward


def completion_text(completion) -> str:
    """The text of a completion: a string, or the content of the last message of a conversational one."""
    if isinstance(completion, list):
        return str(completion[-1].get("content", "")) if completion else ""
    return str(completion)


def last_number(text: str) -> str | None:
    """The last number in `text` ("... so 7 plus 5 is 12." -> "12"; "1,000" stays one number)."""
    found = NUMBER.findall(text)
    return found[-1] if found else None


def last_boxed(text: str) -> str | None:
    r"""The content of the last `\boxed{...}`, braces nested inside it kept (`\boxed{\frac{1}{2}}` -> `\frac{1}{2}`)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for index in range(begin - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[begin:index]
    return None  # unclosed: no answer


def regex_answer(text: str, pattern: str) -> str | None:
    """The first group (else the whole match) of the last match of `pattern` in `text`."""
    matches = list(re.finditer(pattern, text, re.DOTALL))
    if not matches:
        return None
    last = matches[-1]
    return last.group(1) if last.re.groups else last.group(0)


def extract_answer(text: str, extract: str = "last_number", pattern: str | None = None) -> str | None:
    """The final answer of a completion, as the `answer` reward's `extract` says; None when there is none."""
    if extract == "boxed":
        return last_boxed(text)
    if extract == "regex":
        return regex_answer(text, pattern or "")
    if extract == "text":
        return text.strip()
    return last_number(text)


def as_number(text: str) -> float | None:
    """`text` as a number when it is one ("$1,000." -> 1000.0, "3.0" -> 3.0), else None."""
    cleaned = text.strip().strip("$").rstrip(".").replace(",", "").strip()
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def same_answer(got: str | None, reference) -> bool:
    """Equal as numbers when both are numbers, else as trimmed, case-folded text without a final period."""
    if got is None or reference is None:
        return False
    got, reference = str(got), str(reference)
    a, b = as_number(got), as_number(reference)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    def norm(text: str) -> str:
        return " ".join(text.strip().rstrip(".").casefold().split())
    return norm(got) == norm(reference)


def answer_reward(column: str = "answer", extract: str = "last_number", pattern: str | None = None,
                  reference_pattern: str | None = None) -> Callable:
    """The `answer` reward: 1.0 when the extracted answer equals the `column` reference, else 0.0."""
    def answer(prompts, completions, **columns):
        if column not in columns:
            raise PhituneError(f"the answer reward compares with column {column!r}, which the data does not have "
                               f"(its columns besides the prompt: {', '.join(sorted(k for k in columns if k != 'completion_ids')) or 'none'})")
        references = columns[column]
        if reference_pattern:
            references = [regex_answer(str(ref), reference_pattern) for ref in references]
        return [float(same_answer(extract_answer(completion_text(c), extract, pattern), ref))
                for c, ref in zip(completions, references)]
    return answer


def format_reward(pattern: str) -> Callable:
    """The `format` reward: 1.0 when the completion matches `pattern` (re.search, DOTALL), else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)

    def format(prompts, completions, **columns):  # noqa: A001 - the reward's name in TRL's logs
        return [float(compiled.search(completion_text(c)) is not None) for c in completions]
    return format


def json_reward(schema=None) -> Callable:
    """The `json` reward: 1.0 when the completion parses as JSON (and validates against `schema`), else 0.0."""
    validator = json_validator(schema) if schema is not None else None

    def json_(prompts, completions, **columns):
        return [float(valid_json(completion_text(c), validator)) for c in completions]
    json_.__name__ = "json"
    return json_


def json_validator(schema):
    """A jsonschema validator for `schema` (a mapping, or the path of a .json file holding one)."""
    import jsonschema

    if isinstance(schema, str):
        path = Path(schema)
        if not path.is_file():
            raise PhituneError(f"the json reward's schema file {schema} does not exist")
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise PhituneError(f"the json reward's schema file {schema} is not JSON ({first_line(exc)})") from None
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise PhituneError(f"the json reward's schema is not a valid JSON schema ({first_line(exc.message)})") from None
    return jsonschema.validators.validator_for(schema)(schema)


def valid_json(text: str, validator=None) -> bool:
    """True when `text`, or the first ```json fenced block in it, parses (and passes `validator`)."""
    fenced = FENCED_JSON.search(text)
    for candidate in (text.strip(), fenced.group(1).strip() if fenced else None):
        if candidate is None:
            continue
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        return validator is None or validator.is_valid(value)
    return False


def length_reward(max_tokens: int) -> Callable:
    """The `length` reward: 0.0 up to `max_tokens`, then -(tokens - max_tokens) / max_tokens, floored at -1."""
    def length(prompts, completions, completion_ids=None, **columns):
        counts = ([len(ids) for ids in completion_ids] if completion_ids is not None
                  else [len(completion_text(c).split()) for c in completions])
        return [max(-1.0, -max(0, n - max_tokens) / max_tokens) for n in counts]
    return length


BUILDERS = {"answer": answer_reward, "format": format_reward, "json": json_reward, "length": length_reward}


def model_reward(path: str, batch_size: int = 8) -> Callable:
    """The `{model: RUN_DIR}` reward: the reward run's score of each completion after its prompt, loaded once now."""
    from phitune.after.reward_model import load_reward_model

    scorer = load_reward_model(path)

    def model(prompts, completions, **columns):
        return scorer.score(prompts, [completion_text(c) for c in completions], batch_size)
    return model


def build_rewards(entries: list[dict]) -> list[Reward]:
    """The run's rewards from its `rewards:` entries (checked by config_methods.check_rewards), each wrapped so that
    a function that raises or returns the wrong number of values stops the run with one line naming it. A reward
    model is loaded here, once per entry."""
    rewards, seen = [], {}
    for index, entry in enumerate(entries):
        options = {k: v for k, v in entry.items() if k not in ("name", "function", "model", "weight")}
        if "function" in entry:
            func, builtin = load_function(entry["function"], f"rewards[{index}].function"), None
        elif "model" in entry:
            func, builtin = model_reward(entry["model"], **options), None
        else:
            func, builtin = BUILDERS[entry["name"]](**options), entry["name"]
        name = getattr(func, "__name__", f"reward{index}")
        seen[name] = seen.get(name, 0) + 1
        name = name if seen[name] == 1 else f"{name}_{seen[name]}"  # two format rewards log apart
        rewards.append(Reward(name=name, func=checked(func, name), weight=float(entry.get("weight", 1.0)),
                              builtin=builtin))
    return rewards


def try_rewards(rewards: list[Reward], row) -> None:
    """Call every reward once on `row` (a PromptRow) with two empty completions, before any weight loads: a reward
    that raises, returns the wrong count or needs a column the data lacks fails now, with its one line. Two, not
    one: a reward that always returns one value would pass a check with a single completion."""
    copies = 2
    for reward in rewards:
        reward.func(prompts=[row.prompt] * copies, completions=[[{"role": "assistant", "content": ""}]] * copies,
                    completion_ids=[[]] * copies, **{key: [value] * copies for key, value in row.columns.items()})


def load_function(spec: str, where: str) -> Callable:
    """`module:function` (importable) or `path/to/file.py:function` -> the function, or one line saying what is
    missing."""
    target, _, name = spec.strip().rpartition(":")
    if target.endswith(".py"):
        module = _module_from_file(Path(target), where)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise PhituneError(f"{where}: cannot import module {target} ({first_line(exc)})") from None
        except Exception as exc:  # noqa: BLE001 - a user's module failing at import: one line, not a traceback
            raise PhituneError(f"{where}: importing {target} raised {type(exc).__name__}: {first_line(exc)}") from None
    func = getattr(module, name, None)
    if not callable(func):
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise PhituneError(f"{where}: {target} has no function {name} (it has: {', '.join(public) or 'none'})")
    return func


def _module_from_file(path: Path, where: str):
    if not path.is_file():
        raise PhituneError(f"{where}: file not found: {path}")
    module_name = f"phitune_reward_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # TRL may pickle the function for worker processes
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - a user's file failing at import: one line, not a traceback
        del sys.modules[module_name]
        raise PhituneError(f"{where}: loading {path} raised {type(exc).__name__}: {first_line(exc)}") from None
    return module


def checked(func: Callable, name: str) -> Callable:
    """`func` called as TRL calls a reward, its failures turned into one-line PhituneErrors naming the reward."""
    def reward(prompts, completions, **columns):
        try:
            values = func(prompts=prompts, completions=completions, **columns)
        except PhituneError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever a user's reward raises, say which reward and why
            raise PhituneError(f"reward {name} raised {type(exc).__name__}: {first_line(exc)}") from None
        values = list(values) if isinstance(values, (list, tuple)) else values
        if not isinstance(values, list) or len(values) != len(completions):
            got = _count(len(values), "value") if isinstance(values, list) else type(values).__name__
            raise PhituneError(f"reward {name} returned {got} for {_count(len(completions), 'completion')}; it must "
                               "return one number (or None) per completion")
        bad = [v for v in values if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool))]
        if bad:
            raise PhituneError(f"reward {name} returned a value that is not a number: {bad[0]!r}")
        return [None if v is None else float(v) for v in values]
    reward.__name__ = name
    return reward


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def score_completions(model, tokenizer, rows, rewards: list[Reward], max_new_tokens: int,
                      batch_size: int = 8) -> tuple[dict, list[str]]:
    """Greedy completions of `rows` (phitune.data.prompts.PromptRow) and their scores: the mean of each reward
    (`reward_NAME`), the weighted total (`reward`), and `pass_rate`, the share of prompts whose completion earns the
    full `answer` reward (when the run has one). Returns (metrics, completions)."""
    from phitune.after.generate import SamplingSettings, generate_replies

    was_training = model.training
    model.eval()
    settings = SamplingSettings(max_new_tokens=max_new_tokens)
    texts = generate_replies(model, tokenizer, [row.prompt for row in rows], settings, batch_size=batch_size)
    model.train(was_training)
    completions = [[{"role": "assistant", "content": text}] for text in texts]
    columns = {key: [row.columns.get(key) for row in rows] for key in rows[0].columns} if rows else {}
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    metrics, total = {}, [0.0] * len(rows)
    for reward in rewards:
        values = reward.func(prompts=[row.prompt for row in rows], completions=completions, completion_ids=ids,
                             **columns)
        values = [0.0 if v is None else v for v in values]
        metrics[f"reward_{reward.name}"] = sum(values) / len(values)
        total = [t + reward.weight * v for t, v in zip(total, values)]
        if reward.builtin == "answer" and "pass_rate" not in metrics:
            metrics["pass_rate"] = sum(v >= 1.0 for v in values) / len(values)
    metrics["reward"] = sum(total) / len(total)
    return metrics, texts
