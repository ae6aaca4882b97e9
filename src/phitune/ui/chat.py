"""Chat on the page: base and fine-tuned model side by side, streamed, through phitune.after.generate.ChatSession (the
code `phitune chat` runs). A run's model is loaded once (base + adapter); the base answers with the adapter
switched off (PEFT's disable_adapter), so a side-by-side chat costs one copy of the weights, not two."""

from __future__ import annotations

import threading
from contextlib import nullcontext
from pathlib import Path

from phitune.after.generate import ChatSession, SamplingSettings


class BaseOnly:
    """The PEFT model with its adapter off, for ChatSession (which needs `device` and `generate`)."""

    def __init__(self, model):
        self.model = model

    @property
    def device(self):
        return self.model.device

    def generate(self, **kwargs):
        switch = getattr(self.model, "disable_adapter", None)
        with switch() if switch else nullcontext():
            return self.model.generate(**kwargs)


class ChatModels:
    """The models of the run last chatted with (one at a time: a page is one person's), loaded on first use."""

    def __init__(self):
        self.lock = threading.Lock()  # one generation at a time: base and tuned share the weights
        self.loaded: tuple[Path, object, object] | None = None

    def get(self, run_dir: Path):
        from phitune.after.generate import load_for_inference, resolve_model_source

        if self.loaded is None or self.loaded[0] != run_dir:
            self.loaded = None  # free the previous run's weights before loading the next
            model, tokenizer = load_for_inference(*resolve_model_source(run_dir))
            self.loaded = (run_dir, model, tokenizer)
        return self.loaded[1], self.loaded[2]

    def stream(self, run_dir: Path, history: list[dict], text: str, system: str | None, tuned: bool,
               max_new_tokens: int):
        """Yield the growing reply to `text` after `history` (user / assistant messages)."""
        with self.lock:
            model, tokenizer = self.get(run_dir)
            session = ChatSession(model if tuned else BaseOnly(model), tokenizer,
                                  SamplingSettings(max_new_tokens=max_new_tokens), system=system or None)
            session.history += [{"role": m["role"], "content": message_text(m)} for m in history]
            reply = ""
            for piece in session.stream_reply(text):
                reply += piece
                yield reply


def message_text(message: dict) -> str:
    """A chat message's text (the page's chat box may hand content back as a list of parts)."""
    content = message.get("content", "")
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)
