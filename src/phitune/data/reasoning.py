"""Reasoning traces: assistant turns that think before they answer, `<think>trace</think>answer`.

Phi-4-reasoning and Phi-4-mini-reasoning write their trace between `<think>` and `</think>`, then the answer, in the
assistant turn itself; their chat templates render the turn's content as it is. So a row may give the trace in its
content, or (OpenAI / vLLM style) in a `reasoning_content` field beside the answer, which `join_trace` writes into
the content the way DeepSeek-R1's and Qwen3's templates do (`<think>\\nTRACE\\n</think>\\n\\nANSWER`; Phi-4-mini-
reasoning was distilled from DeepSeek-R1's traces, and vLLM serves both Phi reasoning models with its deepseek_r1
parser, which splits exactly there).

`data.train_on: answer` keeps each leading trace in the context and out of the loss (`answer_spans`); `assistant`
trains trace, answer and end-of-turn token alike. `row_notes` flags what `phitune data` warns about: a trace that
never closes (the model learns to ramble on), one closed but never opened, an empty one, and one written after
the answer has begun; and a row's own system turn, which the reasoning templates drop or put in place of the
system prompt the model was trained with.
"""

from __future__ import annotations

import re

THINK, END_THINK = "<think>", "</think>"
LEADING_TRACE = re.compile(r"\s*<think>.*?</think>", re.DOTALL)  # a trace at the start of an assistant's content

# row_notes bits, stored per example (the prepared data's `notes` column) and counted by `phitune data`
UNCLOSED, UNOPENED, EMPTY, AFTER_ANSWER, OWN_SYSTEM = 1, 2, 4, 8, 16
TRACE_PROBLEMS = {  # bit -> what `phitune data` says of the examples that have it ("train: 3 examples with ...")
    UNCLOSED: f"with a {THINK} trace that never closes with {END_THINK} (trained so, the model learns to think "
              "without end)",
    UNOPENED: f"with a {END_THINK} that no {THINK} opened (the reasoning models write {THINK} first themselves)",
    EMPTY: f"with an empty trace (nothing but whitespace between {THINK} and {END_THINK})",
    AFTER_ANSWER: f"with answer text before the {THINK} trace (the reasoning models think first)",
}


class BadTrace(ValueError):
    """A reasoning field that cannot be rendered; phitune.data.formats turns it into a bad row with its place."""


def join_trace(reasoning, answer) -> str:
    """An assistant's content from a `reasoning_content` field and its answer: `<think>\\nTRACE\\n</think>\\n\\nANSWER`
    (surrounding newlines of each part dropped, as DeepSeek-R1's and Qwen3's templates do)."""
    if not isinstance(reasoning, str):
        raise BadTrace(f"reasoning_content must be text, not {type(reasoning).__name__}")
    answer = answer or ""
    if THINK in answer or END_THINK in answer:
        raise BadTrace(f"the trace is given twice: in reasoning_content and as {THINK}...{END_THINK} in the content")
    return f"{THINK}\n{reasoning.strip(chr(10))}\n{END_THINK}\n\n{answer.lstrip(chr(10))}"


def content_notes(content: str) -> int:
    """The TRACE_PROBLEMS bits of one assistant content (0 for an answer without any trace)."""
    opened, closed = content.find(THINK), content.find(END_THINK)
    if opened < 0:
        return UNOPENED if closed >= 0 else 0
    notes = AFTER_ANSWER if content[:opened].strip() else 0
    if closed < opened:
        return notes | (UNCLOSED if content.find(END_THINK, opened) < 0 else UNOPENED)
    return notes | (EMPTY if not content[opened + len(THINK):closed].strip() else 0)


def row_notes(messages: list[dict]) -> int:
    """Every bit that applies to one conversation: its assistant turns' trace problems and OWN_SYSTEM."""
    notes = OWN_SYSTEM if messages and messages[0]["role"] == "system" else 0
    for message in messages:
        if message["role"] == "assistant" and isinstance(message["content"], str):
            notes |= content_notes(message["content"])
    return notes


def answer_spans(text: str, spans: list) -> list[tuple[int, int]]:
    """The {% generation %} character spans of a rendered conversation without each leading trace: what
    `train_on: answer` trains (the answer and the token that closes the turn)."""
    cut = []
    for start, end in spans:
        trace = LEADING_TRACE.match(text, start, end)
        cut.append((trace.end(), end) if trace else (start, end))
    return cut
