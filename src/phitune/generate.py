"""Generation: load a base model with or without an adapter, and answer conversations in batches.

Prompts are left-padded for generation (right padding would put pad tokens between a prompt and its answer), and
generation stops at `<|end|>` (end of a Phi-3 turn) or the eos token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phitune.config import ModelConfig
from phitune.errors import PhituneError


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
    """(model, tokenizer) in eval mode with the KV cache on; the adapter (a PEFT directory) applied when given."""
    from phitune.modeling import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(model_cfg, padding_side="left")
    model = load_base_model(model_cfg, training=False)
    if adapter is not None:
        model = attach_adapter(model, adapter)
    model.eval()
    return model, tokenizer


def attach_adapter(model, adapter: str | Path):
    """Wrap `model` with the PEFT adapter saved in `adapter`."""
    from peft import PeftModel

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise PhituneError(f"{adapter} holds no PEFT adapter (adapter_config.json is missing)")
    return PeftModel.from_pretrained(model, str(adapter))


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
