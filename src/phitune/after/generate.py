"""Generation: load a base model with or without an adapter, answer conversations in batches, and chat.

Every command that uses a trained model starts from `resolve_model_source` (a run directory, or --model/--adapter).
Prompts are left-padded for generation (right padding would put pad tokens between a prompt and its answer), and
generation stops at `<|end|>` (end of a Phi-3 turn) or the eos token. `generate_file` serves `phitune generate`
(a .jsonl of prompts in, the same rows plus "answer" out); `ChatSession` serves `phitune chat` (history kept, the
reply streamed piece by piece; the CLI does the reading and printing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from phitune.config.schema import ModelConfig
from phitune.errors import PhituneError, replacing


@dataclass
class SamplingSettings:
    """The usual decoding knobs; greedy unless do_sample is set."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    seed: int = 0

    def generate_kwargs(self) -> dict:
        if not self.do_sample:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
        }


def stop_token_ids(tokenizer) -> list[int]:
    """eos and Phi-3's end-of-turn `<|end|>`, whichever the tokenizer has."""
    ids = [tokenizer.eos_token_id]
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    if end is not None and end != tokenizer.unk_token_id:
        ids.append(end)
    return [i for i in dict.fromkeys(ids) if i is not None]


def load_for_inference(model_cfg: ModelConfig, adapter: str | Path | None = None):
    """(model, tokenizer) in eval mode with the KV cache on, on the GPU when there is one; the adapter applied."""
    import torch

    from phitune.models.loading import load_base_model, load_tokenizer

    refuse_reward_model(adapter)  # before the base loads
    tokenizer = load_tokenizer(model_cfg, padding_side="left")
    model = load_base_model(model_cfg, training=False)
    if torch.cuda.is_available() and not model_cfg.quantization:  # 4-bit models are placed on the GPU as they load
        model = model.to("cuda")
    if adapter is not None:
        model = attach_adapter(model, adapter)
    model.eval()
    return model, tokenizer


def attach_adapter(model, adapter: str | Path):
    """Wrap `model` with the PEFT adapter saved in `adapter` (a language model's: see refuse_reward_model)."""
    from peft import PeftModel

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise PhituneError(f"{adapter} holds no PEFT adapter (adapter_config.json is missing)")
    refuse_reward_model(adapter)
    return PeftModel.from_pretrained(model, str(adapter))


def refuse_reward_model(adapter: Path | None) -> None:
    """One line for a reward model's adapter (method reward: PEFT task_type SEQ_CLS, a score head instead of the
    language-model head) where a model that writes text is needed: chat, generate, merge, export, serve, benchmarks."""
    import json

    config = Path(adapter) / "adapter_config.json" if adapter is not None else None
    if config is None or not config.is_file():
        return
    if json.loads(config.read_text(encoding="utf-8")).get("task_type") == "SEQ_CLS":
        raise PhituneError(f"{adapter} is a reward model (method reward): it scores conversations and writes no text; "
                           f"use it as a GRPO reward (rewards: [{{model: {adapter}}}]) or score its held-out pairs "
                           f"with phitune eval {adapter}")


def generate_replies(model, tokenizer, conversations: list[list[dict]], settings: SamplingSettings | None = None,
                     batch_size: int = 8, progress=None) -> list[str]:
    """The assistant's next reply to each conversation (each ends with a user turn)."""
    import torch

    settings = settings or SamplingSettings()
    torch.manual_seed(settings.seed)
    tokenizer.padding_side = "left"
    replies: list[str] = []
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start : start + batch_size]
        prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in batch]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            output = model.generate(
                **inputs,
                eos_token_id=stop_token_ids(tokenizer),
                pad_token_id=tokenizer.pad_token_id,
                **settings.generate_kwargs(),
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        replies += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        if progress is not None:
            progress(len(batch))
    return replies


def resolve_model_source(run_dir: str | Path | None = None, model: str | None = None,
                         adapter: str | Path | None = None) -> tuple[ModelConfig, Path | None]:
    """(base model settings, adapter directory or None) from a run directory, or from --model / --adapter.

    A run directory's `phitune_config.yaml` names the base and its loading settings (dtype, 4-bit); a run without
    adapter_config.json is a full fine-tune, whose directory is itself the model. `--adapter` alone reads the base
    from the adapter's own config; `--model` alone is a plain (for example merged) model.
    """
    if run_dir is None and model is None and adapter is None:
        raise PhituneError("name a run directory, or --model (and optionally --adapter)")
    if run_dir is not None and model is None and adapter is None:
        return _from_run_dir(Path(run_dir))
    if run_dir is not None:
        raise PhituneError("give either a run directory or --model/--adapter, not both")
    adapter = Path(adapter) if adapter is not None else None
    if adapter is not None and (adapter / "phitune_config.yaml").is_file() and model is None:
        return _from_run_dir(adapter)
    if model is None:
        model = _adapter_base(adapter)
    return ModelConfig(name_or_path=str(model)), adapter


def _from_run_dir(run_dir: Path) -> tuple[ModelConfig, Path | None]:
    from phitune.config.schema import load_run_config
    from phitune.runlock import refuse_while_training

    refuse_while_training(run_dir)  # its adapter is about to be replaced
    cfg = load_run_config(run_dir)
    if (run_dir / "adapter_config.json").is_file():
        return cfg.model, run_dir
    if (run_dir / "config.json").is_file():  # full fine-tune: the run directory is the model
        return ModelConfig(name_or_path=str(run_dir), torch_dtype=cfg.model.torch_dtype), None
    raise PhituneError(f"{run_dir} holds neither an adapter nor a model; did the run finish?")


def _adapter_base(adapter: Path) -> str:
    """The base model an adapter was trained on, from its adapter_config.json."""
    import json

    path = adapter / "adapter_config.json"
    if not path.is_file():
        raise PhituneError(f"{adapter} holds no PEFT adapter (adapter_config.json is missing)")
    base = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise PhituneError(f"{path} does not name its base model; pass --model BASE")
    return base


def read_prompts(path: str | Path) -> list[dict]:
    """Rows of a prompts file (.jsonl, .json, .csv, .parquet); each holds "prompt" or "messages" (a conversation)."""
    from phitune.data.readers import read_rows

    path = Path(path)
    if path.is_dir():
        raise PhituneError(f"{path} is a directory, not a prompts file; name the .jsonl file itself")
    if not path.is_file():
        raise PhituneError(f"input file not found: {path}")
    # the training reader: file:line on malformed JSON, a clear error on non-UTF-8 (data.on_bad_row is no option here)
    rows, _ = read_rows(str(path), hint="")
    if not rows:
        raise PhituneError(f"{path}: no prompts")
    for number, row in rows:
        prompt_conversation(row, f"{path}:{number}")  # validate now, before any model is loaded
    return [row for _, row in rows]


def prompt_conversation(row, where: str) -> list[dict]:
    """The conversation to answer: [{"role": "user", "content": prompt}] or the given messages (ending with a user)."""
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"].strip():
        return [{"role": "user", "content": row["prompt"]}]
    messages = row.get("messages") if isinstance(row, dict) else None
    if isinstance(messages, list) and messages and all(isinstance(m, dict) and "role" in m for m in messages):
        if messages[-1]["role"] != "user":
            raise PhituneError(f"{where}: the last message must be a user turn (the one to answer)")
        return [{"role": m["role"], "content": m.get("content", "")} for m in messages]
    raise PhituneError(f'{where}: expected {{"prompt": "..."}} or {{"messages": [...]}} ending with a user turn')


def check_output_file(path: str | Path, overwrite: bool) -> Path:
    """Refuse to replace an existing answers file unless asked, before hours of generation are spent."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise PhituneError(f"{path} already exists; pass --overwrite to replace it or choose another --output")
    return path


def generate_file(model, tokenizer, rows: list[dict], output: Path, settings: SamplingSettings,
                  batch_size: int = 8, progress=None) -> int:
    """Answer every row and write each, with its input fields and an added "answer", to `output`; return the count."""
    import json

    conversations = [prompt_conversation(row, f"row {i + 1}") for i, row in enumerate(rows)]
    answers = generate_replies(model, tokenizer, conversations, settings, batch_size=batch_size, progress=progress)
    output.parent.mkdir(parents=True, exist_ok=True)
    with replacing(output) as partial, partial.open("w", encoding="utf-8") as out:  # hours of answers: never half
        for row, answer in zip(rows, answers):  # a file, and a full disk is one line
            out.write(json.dumps({**row, "answer": answer}, ensure_ascii=False) + "\n")
    return len(answers)


CHAT_COMMANDS = {  # what `phitune chat` does itself rather than send to the model
    "/help": "list these commands",
    "/reset": "forget the conversation and start over (the system prompt stays)",
    "/exit": "end the chat (so do Ctrl-D and Ctrl-C)",
}


def chat_command(session: "ChatSession", text: str) -> str | None:
    """Run a chat command other than /exit (the caller's loop ends on it); return what to print, or None when
    `text` is a message for the model. A lone unknown /word is a mistyped command, not a message."""
    if text == "/help":
        return "\n".join(f"{name:<7} {what}" for name, what in CHAT_COMMANDS.items())
    if text == "/reset":
        session.reset()
        return "(conversation reset)"
    if re.fullmatch(r"/\w+", text):
        return f"unknown command {text}; /help lists the commands"
    return None


class ChatSession:
    """A multi-turn conversation with a model: history kept between turns, replies streamed as text pieces."""

    def __init__(self, model, tokenizer, settings: SamplingSettings | None = None, system: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.settings = settings or SamplingSettings()
        self.system = system
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history: list[dict] = [{"role": "system", "content": self.system}] if self.system else []

    def stream_reply(self, user_text: str):
        """Yield the reply to `user_text` piece by piece as it is generated; add both turns to the history.

        Generation runs in a worker thread that feeds a TextIteratorStreamer; it stops at `<|end|>` or eos.
        """
        import threading

        import torch
        from transformers import TextIteratorStreamer

        self.history.append({"role": "user", "content": user_text})
        prompt = self.tokenizer.apply_chat_template(self.history, tokenize=False, add_generation_prompt=True)
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        torch.manual_seed(self.settings.seed)
        kwargs = dict(**inputs, streamer=streamer, eos_token_id=stop_token_ids(self.tokenizer),
                      pad_token_id=self.tokenizer.pad_token_id, **self.settings.generate_kwargs())
        errors: list[BaseException] = []
        worker = threading.Thread(target=_generate_no_grad, args=(self.model, kwargs, errors), daemon=True)
        worker.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            yield piece
        worker.join()
        if errors:
            self.history.pop()
            raise errors[0]
        self.history.append({"role": "assistant", "content": "".join(pieces).strip()})


def _generate_no_grad(model, kwargs: dict, errors: list) -> None:
    """Run generate in the worker thread; an error ends the stream (so the reader never hangs) and is re-raised."""
    import torch

    try:
        with torch.no_grad():
            model.generate(**kwargs)
    except Exception as exc:  # handed to the main thread, which raises it
        errors.append(exc)
        kwargs["streamer"].end()
