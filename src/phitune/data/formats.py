"""Formats: every supported row shape is normalised to a list of chat messages.

| format            | a row looks like                                                   |
| ----------------- | ------------------------------------------------------------------ |
| messages          | {"messages": [{"role": "system"|"user"|"assistant", "content": ..}]} |
|                   | (tool calls: "tools", "tool_calls" and "tool" turns, see phitune.data.tools) |
|                   | (reasoning: an assistant's "reasoning_content", see phitune.data.reasoning) |
| sharegpt          | {"conversations": [{"from": "human"|"gpt"|"system", "value": ..}]}   |
| alpaca            | {"instruction": .., "input": .. (optional), "output": ..}           |
| prompt_completion | {"prompt": .., "completion": ..}                                     |
"""

from __future__ import annotations

from phitune.data.readers import BadRow
from phitune.data.reasoning import BadTrace, join_trace
from phitune.data.tools import BadToolField, definitions_text, normalise_calls
from phitune.errors import PhituneError

Messages = list[dict[str, str]]

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def detect_format(row: dict, source: str) -> str:
    """Name the format of a row from its keys."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    keys = ", ".join(sorted(row)) or "none"
    raise PhituneError(
        f"{source}: unknown data format (columns: {keys}); expected messages, conversations (sharegpt), "
        "instruction/output (alpaca) or prompt/completion"
    )


def to_messages(row: dict, fmt: str, where: str) -> Messages:
    """Normalise one row to messages and check the conversation makes sense; raise BadRow if not."""
    try:
        messages = CONVERTERS[fmt](row)
    except (KeyError, TypeError, AttributeError) as exc:
        raise BadRow(where, f"row does not match the {fmt} format (missing or wrong field {exc})") from None
    except (BadToolField, BadTrace) as exc:
        raise BadRow(where, str(exc)) from None
    check_conversation(messages, where)
    return messages


def _from_messages(row: dict) -> Messages:
    messages = [_message(m) for m in row["messages"]]
    if row.get("tools") is not None:  # OpenAI style: the definitions beside the messages go on the system turn
        if messages and messages[0]["role"] == "system":
            if "tools" in messages[0]:
                raise BadToolField("tools are given twice, on the row and on its system turn")
            messages[0]["tools"] = definitions_text(row["tools"])
        else:
            messages.insert(0, {"role": "system", "content": "", "tools": definitions_text(row["tools"])})
    return messages


def _message(m: dict) -> dict:
    """role and content; a system turn's tool definitions kept as JSON text, an assistant's `tool_calls` as
    [{"name", "arguments"}] (phitune.data.tools renders both in the template family's format), an assistant's
    `reasoning_content` written before its answer as a <think> trace (phitune.data.reasoning)."""
    message = {"role": str(m["role"]), "content": m["content"]}
    if m.get("reasoning_content") is not None and message["role"] == "assistant":
        message["content"] = join_trace(m["reasoning_content"], m["content"])
    if m.get("tools") is not None:
        message["tools"] = definitions_text(m["tools"])
    if m.get("tool_calls"):
        message["tool_calls"] = normalise_calls(m["tool_calls"])
        message["content"] = m.get("content") or ""  # a call alone has no text (OpenAI sends null)
    return message


def _from_sharegpt(row: dict) -> Messages:
    out = []
    for turn in row["conversations"]:
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise KeyError(f"from={turn['from']!r}")
        out.append({"role": role, "content": turn["value"]})
    return out


def _from_alpaca(row: dict) -> Messages:
    extra = row.get("input") or ""
    user = row["instruction"] + (f"\n\n{extra}" if str(extra).strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def _from_prompt_completion(row: dict) -> Messages:
    prompt, completion = row["prompt"], row["completion"]
    # TRL's conversational prompt/completion: lists of messages.
    if isinstance(prompt, list) and isinstance(completion, list):
        return _from_messages({"messages": prompt + completion, "tools": row.get("tools")})
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


CONVERTERS = {
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion,
}


def _fold_tool_turns(roles: list[str]) -> list[str]:
    """An assistant turn that calls a tool, the tool's result and the assistant's reply count as one assistant turn
    (assistant, tool, assistant -> assistant), so tool-using conversations pass the order check."""
    folded: list[str] = []
    for role in roles:
        if role == "tool" and folded[-1:] in (["assistant"], ["tool"]):  # one call may return several results
            folded[-1] = "tool"
        elif role == "assistant" and folded[-1:] == ["tool"]:
            folded[-1] = "assistant"
        else:
            folded.append(role)
    return folded


def check_conversation(messages: Messages, where: str) -> None:
    """An optional system turn, then user and assistant alternating, ending with an assistant turn; no empty text."""
    if not messages:
        raise BadRow(where, "empty conversation")
    for index, message in enumerate(messages):
        content = message["content"]
        may_be_empty = "tool_calls" in message or "tools" in message  # a call alone; definitions alone
        if isinstance(content, list):  # content parts: text, image, audio (phitune.data.multimodal)
            raise BadRow(where, f"turn {index + 1} ({message['role']}) is a list of content parts (images, audio): "
                                "train Phi-4-multimodal on it with method: vision (docs/multimodal.md)")
        if not isinstance(content, str) or not (content.strip() or may_be_empty):
            raise BadRow(where, f"turn {index + 1} ({message['role']}) has empty content")
    roles = [m["role"] for m in messages]
    body = _fold_tool_turns(roles[1:] if roles[0] == "system" else roles)
    if "assistant" not in body:
        raise BadRow(where, "conversation has no assistant turn")
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if body != expected[: len(body)] or body[-1] != "assistant":
        raise BadRow(
            where, f"roles out of order ({' -> '.join(roles)}); expected [system], user, assistant, user, ..., assistant"
        )
