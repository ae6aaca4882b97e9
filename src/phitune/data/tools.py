"""Tool-call conversations: OpenAI-style rows normalised on reading, rendered in the family's own format on encoding.

A row may carry the tool definitions in a `tools` field (next to `messages`) or on its system turn, assistant turns
may carry `tool_calls` (OpenAI's `[{"type": "function", "function": {"name": .., "arguments": ..}}]`, `arguments` a
JSON string or an object), and `tool` turns hold what a tool returned. Reading (phitune.data.formats) keeps them as

    system:    {"role": "system", "content": .., "tools": "<JSON list of the definitions>"}
    assistant: {"role": "assistant", "content": .. (may be ""), "tool_calls": [{"name": .., "arguments": {..}}]}
    tool:      {"role": "tool", "content": ..}

and encoding (phitune.data.encode) renders them with the tokenizer's template family (`render_for_template`):

- Phi-4-mini: its hub template puts the definitions in the system turn between `<|tool|>` and `<|/tool|>` and
  renders a `tool` turn as `<|tool|>RESULT<|end|>`; a call is assistant text, `<|tool_call|>` + the JSON list
  `[{"name": .., "arguments": {..}}]` + `<|/tool_call|>` (Microsoft's Phi Cookbook: the answer decoded without
  special tokens is that JSON list; its ONNX notebook constrains the output to `<|tool_call|>` then JSON). The call
  is assistant content, so it is trained; definitions and results are not.
- Phi-3, Phi-3.5, Phi-4 and any other template: no tool format (their templates drop `tool` turns and `tools`
  silently), so a conversation with tools is an error, not a rendering the model was never prompted with.
"""

from __future__ import annotations

import json

from phitune.errors import PhituneError

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<|tool_call|>", "<|/tool_call|>"  # Phi-4-mini's special tokens for a call
TOOL_FAMILIES = ("phi-4-mini",)  # template families with a tool format


class BadToolField(ValueError):
    """A `tools` or `tool_calls` value phitune cannot read; formats.py turns it into a BadRow with the row's place."""


def definitions_text(tools) -> str:
    """Tool definitions as the JSON text Phi-4-mini's template puts between `<|tool|>` and `<|/tool|>`.

    A string is kept as written; a list is dumped, each OpenAI `{"type": "function", "function": {..}}` unwrapped to
    the `{"name", "description", "parameters"}` object the model card shows."""
    if isinstance(tools, str):
        return tools
    if not isinstance(tools, list) or not tools:
        raise BadToolField("`tools` must be a non-empty list of tool definitions (or their JSON text)")
    unwrapped = [t["function"] if isinstance(t, dict) and isinstance(t.get("function"), dict) else t for t in tools]
    if not all(isinstance(t, dict) and t.get("name") for t in unwrapped):
        raise BadToolField("each tool definition needs a `name`")
    return json.dumps(unwrapped, ensure_ascii=False)


def normalise_calls(calls) -> list[dict]:
    """OpenAI `tool_calls` (or bare `{"name", "arguments"}` objects) as `[{"name": str, "arguments": dict}]`."""
    if not isinstance(calls, list) or not calls:
        raise BadToolField("`tool_calls` must be a non-empty list")
    out = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise BadToolField("each tool call needs a function `name`")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise BadToolField(f"tool call {function['name']!r}: `arguments` is not valid JSON") from None
        if not isinstance(arguments, dict):
            raise BadToolField(f"tool call {function['name']!r}: `arguments` must be a JSON object")
        out.append({"name": function["name"], "arguments": arguments})
    return out


def uses_tools(messages: list[dict]) -> bool:
    return any(m["role"] == "tool" or "tools" in m or "tool_calls" in m for m in messages)


def render_for_template(conversations: list, family: str | None) -> list:
    """The conversations as the family's template renders them: Phi-4-mini's calls written into the assistant's
    content; a conversation with tools for a family without a tool format is a one-line error."""
    if not any(uses_tools(c) for c in conversations):
        return conversations
    if family not in TOOL_FAMILIES:
        raise PhituneError(
            f"tool-call data (`tools`, `tool_calls` or `tool` turns) needs a chat template with a tool format "
            f"(Phi-4-mini's); this model's template ({family or 'not a Phi family template'}) has none and would drop "
            "them: train Phi-4-mini, or write the calls and results into ordinary user/assistant turns")
    return [[_phi4_mini_message(m) for m in c] for c in conversations]


def _phi4_mini_message(message: dict) -> dict:
    if "tool_calls" not in message:
        return message
    calls = json.dumps(message["tool_calls"], ensure_ascii=False)
    content = message["content"] or ""
    rendered = {k: v for k, v in message.items() if k != "tool_calls"}
    rendered["content"] = f"{content}{TOOL_CALL_OPEN}{calls}{TOOL_CALL_CLOSE}"
    return rendered
