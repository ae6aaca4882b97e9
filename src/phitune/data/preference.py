"""Preference data for DPO, ORPO, SimPO and reward models: rows of a prompt, a chosen and a rejected answer, normalised
to conversations.

| shape          | a row looks like                                                                          |
| -------------- | ----------------------------------------------------------------------------------------- |
| strings        | {"prompt": "..", "chosen": "..", "rejected": ".."}                                          |
| conversational | {"prompt": [messages], "chosen": [{"role": "assistant", ..}], "rejected": [..]}             |
| implicit prompt| {"chosen": [user, assistant, ..], "rejected": [user, assistant, ..]} (HH-RLHF as TRL ships it) |

UltraFeedback-binarized (a string prompt, and chosen / rejected holding the whole conversation) is the implicit-prompt
shape with a redundant `prompt` field; it is accepted when the field agrees with the conversation.

Every row becomes a `PreferencePair`: the prompt as messages ending with a user turn, and the two answers as single
assistant turns. A string prompt is one user turn, so the answers are trained in Phi-3's chat format, as in SFT.
Tokens follow TRL's DPOTrainer: the prompt rendered with the generation prompt, then prompt + answer rendered whole;
the answer's tokens are those after the two agree, so the scores phitune reports are those DPO trains on. A reward
model (method reward, TRL's RewardTrainer) reads each side whole instead: prompt + answer rendered as one conversation
(`conversation_ids`), scored at its last token.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from phitune.config.schema import DataConfig
from phitune.data import load_splits_and_shares
from phitune.data.formats import Messages, check_conversation
from phitune.data.readers import BadRow, hub_options, read_rows, row_location
from phitune.errors import PhituneError

PREFERENCE_KEYS = ("chosen", "rejected")


@dataclass
class PreferencePair:
    """One comparison: `prompt` (messages ending with a user turn), and the preferred and the dispreferred answer."""

    prompt: Messages
    chosen: str
    rejected: str
    where: str = ""

    def as_row(self) -> dict:
        """TRL's conversational preference row."""
        return {"prompt": self.prompt, "chosen": [{"role": "assistant", "content": self.chosen}],
                "rejected": [{"role": "assistant", "content": self.rejected}]}


@dataclass
class PreferenceData:
    """Train and eval pairs, the shape they came in, and the rows skipped on the way ("file:line: why")."""

    train: list[PreferencePair]
    eval: list[PreferencePair]
    format: str
    skipped: list[str] = field(default_factory=list)
    shares: list = field(default_factory=list)  # a mixture: what each source gave (phitune.data.mixture)


def is_preference_row(row: dict) -> bool:
    return all(key in row for key in PREFERENCE_KEYS)


def row_shape(row: dict) -> str:
    """`preference (strings)` or `preference (conversational)`, for reports and metrics.json."""
    return "preference (conversational)" if isinstance(row.get("chosen"), list) else "preference (strings)"


def load_preference_data(cfg: DataConfig) -> PreferenceData:
    """Read train (and eval) pairs; hold out data.eval_split of train when no eval file is given."""
    train, evals, fmt, skipped, shares = load_splits_and_shares(cfg, _read_pairs)
    return PreferenceData(train=train, eval=evals, format=fmt, skipped=skipped, shares=shares)


def _read_pairs(source: str, split: str, cfg: DataConfig) -> tuple[list[PreferencePair], str, list[str]]:
    rows, bad = read_rows(source, split=split, on_bad_row=cfg.on_bad_row, hub=hub_options(cfg))
    if not rows:
        raise PhituneError(f"{source}: no rows")
    first = rows[0][1]
    if not is_preference_row(first):
        raise PhituneError(f"{row_location(source, rows[0][0])}: preference training needs chosen and rejected answers "
                           f"(and a prompt); this row has {', '.join(sorted(first)) or 'no columns'}")
    pairs = []
    for number, row in rows:
        try:
            pairs.append(to_pair(row, row_location(source, number)))
        except BadRow as problem:
            if cfg.on_bad_row == "error":
                raise PhituneError(f"{problem} (set data.on_bad_row: skip to skip such rows)") from None
            bad.append(problem)
    if not pairs:
        raise PhituneError(f"{source}: no usable preference pairs after skipping {len(bad)} bad rows")
    return pairs, row_shape(first), [str(b) for b in bad]


def to_pair(row: dict, where: str) -> PreferencePair:
    """Normalise one row (any shape in the table above) to a PreferencePair, or raise BadRow saying what is wrong."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if chosen is None or rejected is None:
        raise BadRow(where, "a preference row needs both chosen and rejected")
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise BadRow(where, "chosen and rejected must both be strings or both be message lists")
    try:
        if isinstance(chosen, list):
            prompt, chosen_text, rejected_text = _from_conversations(row.get("prompt"), chosen, rejected, where)
        else:
            prompt, chosen_text, rejected_text = _prompt_messages(row.get("prompt"), where), chosen, rejected
    except (KeyError, TypeError, AttributeError) as exc:
        raise BadRow(where, f"row does not match the preference format (missing or wrong field {exc})") from None
    for name, text in (("chosen", chosen_text), ("rejected", rejected_text)):
        if not isinstance(text, str) or not text.strip():
            raise BadRow(where, f"the {name} answer is empty")
    check_conversation(prompt + [{"role": "assistant", "content": chosen_text}], where)
    return PreferencePair(prompt=prompt, chosen=chosen_text, rejected=rejected_text, where=where)


def _prompt_messages(prompt, where: str) -> Messages:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt:
        return [{"role": str(m["role"]), "content": m["content"]} for m in prompt]
    raise BadRow(where, "the prompt is missing (a string, or a list of messages ending with a user turn)")


def _from_conversations(prompt, chosen: list, rejected: list, where: str) -> tuple[Messages, str, str]:
    """Explicit prompt + one-turn answers, or two whole conversations that share everything but the last turn."""
    chosen = [{"role": str(m["role"]), "content": m["content"]} for m in chosen]
    rejected = [{"role": str(m["role"]), "content": m["content"]} for m in rejected]
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns or turns[-1]["role"] != "assistant":
            raise BadRow(where, f"{name} must end with an assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise BadRow(where, "chosen and rejected differ before their last turn; they must answer the same prompt")
    shared = chosen[:-1]
    if not shared:
        return _prompt_messages(prompt, where), chosen[-1]["content"], rejected[-1]["content"]
    if prompt is not None and not _prompt_agrees(prompt, shared):
        raise BadRow(where, "the prompt field disagrees with the conversation in chosen / rejected")
    return shared, chosen[-1]["content"], rejected[-1]["content"]


def _prompt_agrees(prompt, shared: Messages) -> bool:
    """UltraFeedback repeats the last user turn as a string prompt; a message-list prompt must equal the prefix."""
    if isinstance(prompt, str):
        return shared[-1]["role"] == "user" and shared[-1]["content"].strip() == prompt.strip()
    return _prompt_messages(prompt, "") == shared


@dataclass
class TokenizedPair:
    """Token ids of one pair as DPOTrainer builds them: the shared prompt and each answer's continuation."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def tokenize_pair(tokenizer, pair: PreferencePair) -> TokenizedPair:
    """The prompt with the generation prompt, then each answer as the tokens after prompt + answer diverge from it."""
    prompt_ids = _render(tokenizer, pair.prompt, add_generation_prompt=True)
    full = [_render(tokenizer, pair.prompt + [{"role": "assistant", "content": text}], add_generation_prompt=False)
            for text in (pair.chosen, pair.rejected)]
    start = min(_common_prefix(prompt_ids, ids) for ids in full)
    return TokenizedPair(prompt_ids[:start], full[0][start:], full[1][start:])


def tokenize_answer(tokenizer, prompt: Messages, text: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of one answer, as TRL's DPO and KTO trainers build them: the prompt rendered with the
    generation prompt, the answer the tokens after prompt + answer (rendered whole) diverge from it."""
    prompt_ids = _render(tokenizer, prompt, add_generation_prompt=True)
    full = _render(tokenizer, prompt + [{"role": "assistant", "content": text}], add_generation_prompt=False)
    start = _common_prefix(prompt_ids, full)
    return prompt_ids[:start], full[start:]


def conversation_ids(tokenizer, prompt: Messages, answer: str) -> list[int]:
    """prompt + answer rendered whole with the chat template (no generation prompt), as TRL's RewardTrainer tokenizes
    one side of a conversational pair: what a reward model reads, in training, in evaluation and as a GRPO reward."""
    return _render(tokenizer, prompt + [{"role": "assistant", "content": answer}], add_generation_prompt=False)


def check_whole_lengths(pairs: list[PreferencePair], tokenizer, max_seq_length: int, on_bad_row: str,
                        name: str) -> tuple[list[PreferencePair], list[str]]:
    """(kept pairs, skipped) for method reward: a pair whose chosen or rejected conversation is longer than
    max_seq_length is a bad row. TRL's RewardTrainer would drop it without a word, and cutting it would cut the end,
    where the reward is read."""
    kept, skipped = [], []
    for pair in pairs:
        longest = max(len(conversation_ids(tokenizer, pair.prompt, text)) for text in (pair.chosen, pair.rejected))
        if longest <= max_seq_length:
            kept.append(pair)
            continue
        message = (f"{pair.where or name}: the pair is {longest} tokens, longer than data.max_seq_length "
                   f"{max_seq_length}")
        if on_bad_row == "error":
            raise PhituneError(message + "; raise data.max_seq_length or set data.on_bad_row: skip")
        skipped.append(message)
    if not kept:
        raise PhituneError(f"the {name} set is empty after skipping {len(skipped)} pairs longer than "
                           "data.max_seq_length")
    return kept, skipped


def _render(tokenizer, messages: Messages, add_generation_prompt: bool) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            add_generation_prompt=add_generation_prompt)
    return list(encoded["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def truncation_problem(tokens: TokenizedPair, max_seq_length: int) -> str | None:
    """None when both answers fit; 'cut' when an answer loses tokens; 'lost' when the prompt leaves no answer token."""
    if len(tokens.prompt_ids) >= max_seq_length:
        return "lost"
    if len(tokens.prompt_ids) + max(len(tokens.chosen_ids), len(tokens.rejected_ids)) > max_seq_length:
        return "cut"
    return None


def check_lengths(pairs: list[PreferencePair], tokenizer, max_seq_length: int, on_bad_row: str,
                  name: str) -> tuple[list[PreferencePair], int, list[str]]:
    """(kept pairs, number whose answers are truncated, skipped) for a set: a pair whose prompt alone fills
    max_seq_length has no answer token left to compare, which is a bad row (TRL would drop it silently)."""
    kept, cut, skipped = [], 0, []
    for pair in pairs:
        problem = truncation_problem(tokenize_pair(tokenizer, pair), max_seq_length)
        if problem == "lost":
            message = f"{pair.where or name}: the prompt fills data.max_seq_length ({max_seq_length} tokens)"
            if on_bad_row == "error":
                raise PhituneError(message + "; raise data.max_seq_length or set data.on_bad_row: skip")
            skipped.append(message)
            continue
        cut += problem == "cut"
        kept.append(pair)
    if not kept:
        raise PhituneError(f"the {name} set is empty after skipping {len(skipped)} pairs whose prompts fill "
                           "data.max_seq_length")
    return kept, cut, skipped


@dataclass
class PreferenceDataReport:
    """What `phitune data` found in preference data; report.print_data_report shows it."""

    source: str
    format: str
    counts: dict[str, int]
    lengths: dict[str, list[int]]  # "prompt", "chosen", "rejected": token lengths of the train pairs
    max_seq_length: int
    truncated: dict[str, int]
    example: list[tuple[str, bool]]  # (token text, trained?) of one pair: prompt, chosen, then rejected
    histogram: object = None
    warnings: list[str] = field(default_factory=list)
    sources: list = field(default_factory=list)  # a mixture: phitune.data.mixture.SourceShare per source
    truncated_label: str = "answers truncated"  # method reward: "pairs too long" (it drops them, never cuts)

    def summary(self) -> dict:
        rows = {"format": self.format, **self.counts}
        for name, values in self.lengths.items():
            ordered = sorted(values)
            rows[f"{name} tokens min / median / max"] = f"{ordered[0]} / {ordered[len(ordered) // 2]} / {ordered[-1]}"
        rows["max_seq_length"] = self.max_seq_length
        rows.update({f"{self.truncated_label} ({name})": n for name, n in self.truncated.items()})
        return rows


def inspect_preference_data(cfg, output_dir=None, example_index: int = 0) -> PreferenceDataReport:
    """Read the pairs as training does (bad rows skipped and reported), tokenize them as DPOTrainer does, and
    collect lengths, one rendered pair and the warnings: identical answers, empty answers, answers cut by
    data.max_seq_length (method reward: pairs longer than it, which it refuses or skips), other malformed rows."""
    from dataclasses import replace

    from phitune.data.inspect import HISTOGRAM_PNG, plot_lengths, report_dir
    from phitune.data.mixture import with_sources
    from phitune.models.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    data = load_preference_data(replace(cfg.data, on_bad_row="skip"))
    limit = cfg.data.max_seq_length
    tokens = {name: [tokenize_pair(tokenizer, p) for p in getattr(data, name)] for name in ("train", "eval")}
    train = tokens["train"]
    lengths = {"prompt": [len(t.prompt_ids) for t in train], "chosen": [len(t.chosen_ids) for t in train],
               "rejected": [len(t.rejected_ids) for t in train]}
    shown = train[min(example_index, len(train) - 1)]
    # each part decoded whole: one token at a time, SentencePiece's word marks and byte pieces come out wrong
    example = [(tokenizer.decode(shown.prompt_ids), False), ("\n[chosen] ", False),
               (tokenizer.decode(shown.chosen_ids), True), ("\n[rejected] ", False),
               (tokenizer.decode(shown.rejected_ids), True)]
    problems = {name: [truncation_problem(t, limit) for t in toks] for name, toks in tokens.items()}
    whole = cfg.method == "reward"  # prompt + answer is read whole: any pair past the limit is "long"
    if whole:
        problems = {name: [p and "long" for p in found] for name, found in problems.items()}
    report = PreferenceDataReport(
        source=str(cfg.data.train), format=data.format,
        counts={"train pairs": len(data.train), "eval pairs": len(data.eval), "skipped rows": len(data.skipped)},
        lengths=lengths, max_seq_length=limit,
        truncated={name: sum(p is not None for p in found) for name, found in problems.items()},
        example=example, truncated_label="pairs too long" if whole else "answers truncated",
    )
    report.warnings = preference_warnings(data, problems, limit, cfg.data.on_bad_row)
    totals = [p + max(c, r) for p, c, r in zip(*lengths.values())]
    report.histogram = plot_lengths(totals, limit, report_dir(cfg, output_dir, report_key(cfg)) / HISTOGRAM_PNG)
    return with_sources(report, cfg, data.shares)


def rows_have(count: int) -> str:
    """`1 row has` / `3 rows have`, for the warnings of `phitune data`."""
    return f"{count} row has" if count == 1 else f"{count:,} rows have"


def report_key(cfg, kind: str = "pairs") -> str:
    """A data cache folder of this data's own for `phitune data`'s histogram (DPO, ORPO, SimPO pairs and KTO's
    completions are not cached): the kind, the data settings and the model."""
    settings = json.dumps([asdict(cfg.data), cfg.model.name_or_path, cfg.model.revision], sort_keys=True, default=str)
    return f"{kind}-" + hashlib.sha256(settings.encode()).hexdigest()[:16]


def preference_warnings(data: PreferenceData, problems: dict, limit: int, on_bad_row: str) -> list[str]:
    """Pairs that teach nothing (identical answers), rows dropped for empty answers or other faults, answers that
    data.max_seq_length cuts (a cut answer is compared on its first tokens only), and, for method reward, pairs
    longer than it ("long")."""
    warnings = []
    same = [p.where for p in data.train + data.eval if p.chosen.strip() == p.rejected.strip()]
    if same:
        warnings.append(f"{len(same)} pairs have chosen == rejected (no preference to learn); first: {same[0]}")
    fate = "skipped" if on_bad_row == "skip" else "an error in training (set data.on_bad_row: skip)"
    empty = [s for s in data.skipped if "answer is empty" in s or "has empty content" in s]
    if empty:
        warnings.append(f"{rows_have(len(empty))} an empty answer or turn ({fate}); first: {empty[0]}")
    others = [s for s in data.skipped if s not in empty]
    if others:
        warnings.append(f"{len(others)} other malformed rows ({fate}); first: {others[0]}")
    for name, found in problems.items():
        cut, lost, long = found.count("cut"), found.count("lost"), found.count("long")
        if long:
            warnings.append(f"{name}: {long} pairs are longer than max_seq_length {limit}; a reward model reads them "
                            f"whole, so they are bad rows ({fate})")
        if cut:
            warnings.append(f"{name}: {cut} pairs have an answer cut by max_seq_length {limit}; raise "
                            "data.max_seq_length or shorten the prompts")
        if lost:
            warnings.append(f"{name}: {lost} pairs have a prompt that fills max_seq_length {limit}: no answer token "
                            f"is left to compare ({fate})")
    return warnings
