"""The Phi family at toy size: Phi-3-medium, Phi-4-mini, Phi-4 and Phi-3.5-MoE shapes with each family's special
tokens and real chat template (phitune.data.templates), random weights, a small BPE.

Shapes keep each family's ratios:

| family        | real                                          | here                                        |
| ------------- | --------------------------------------------- | ------------------------------------------- |
| Phi-3-medium  | 40 heads / 10 kv, head 128, Phi-3 template    | 8 / 2, head 8                               |
| Phi-4-mini    | 24 / 8, partial rotary 0.75, LongRoPE, tied   | 6 / 2, head 16 (12 rotary), LongRoPE, tied  |
| Phi-4         | 40 / 10, ChatML-style template                | 8 / 2                                       |
| Phi-3.5-MoE   | PhiMoE: 32 / 8, 16 experts top-2, router      | 8 / 2, 4 experts top-2                      |

The tests build them on the fly; `scripts/build_tiny_families.py` writes the shipped tiny Phi-4-mini and Phi-4
(assets/tiny-phi4-mini, assets/tiny-phi4: bf16, under 1 MB each), whose BPE has also seen the bundled tool-call
data, so a tool-call run and Phi-4's template run offline on a CPU (examples/tiny-phi4-mini-tools.yaml).
"""

from __future__ import annotations

from pathlib import Path

from phitune.data.templates import PHI4_CHAT_TEMPLATE, PHI4_MINI_CHAT_TEMPLATE
from phitune.tiny.phi3 import ASSETS, SPECIAL_TOKENS, demo_texts

TINY_PHI4_MINI = ASSETS / "tiny-phi4-mini"
TINY_PHI4 = ASSETS / "tiny-phi4"
TOKENIZERS = {  # family -> (special tokens, unk, bos, eos, chat template; None: TRL's Phi-3 template)
    "phi-3": (SPECIAL_TOKENS, "<unk>", "<s>", "<|endoftext|>", None),
    "phi-4": (["<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>"], "<|endoftext|>", "<|endoftext|>",
              "<|im_end|>", PHI4_CHAT_TEMPLATE),
    # Phi-4-mini's config pads with its eos and has no unk token
    "phi-4-mini": (["<|endoftext|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|/tool|>",
                    "<|tool_call|>", "<|/tool_call|>"], None, "<|endoftext|>", "<|endoftext|>",
                   PHI4_MINI_CHAT_TEMPLATE),
}
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 256,
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5], "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]}
SHAPES = {  # name -> (tokenizer family, model class, config)
    "phi-3-medium": ("phi-3", "Phi3", dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2)),
    "phi-4-mini": ("phi-4-mini", "Phi3", dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                                              partial_rotary_factor=0.75, rope_parameters=LONGROPE,
                                              original_max_position_embeddings=256, tie_word_embeddings=True)),
    "phi-4": ("phi-4", "Phi3", dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2)),
    "phi-3.5-moe": ("phi-3", "Phimoe", dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                                            num_local_experts=4, num_experts_per_tok=2)),
}


def family_tokenizer(family: str, texts: list[str] | None = None, vocab_size: int = 512):
    """A byte-level BPE of `vocab_size` tokens trained on `texts` (default: the bundled corpus and demo chats), with
    the family's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from trl.chat_template_utils import phi3_chat_template

    specials, unk, bos, eos, template = TOKENIZERS[family]
    bpe = Tokenizer(models.BPE(unk_token=unk))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts or demo_texts(), trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    named = {unk, bos, eos}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token=unk, bos_token=bos, eos_token=eos, pad_token=unk or eos,
        additional_special_tokens=[t for t in specials if t not in named], model_max_length=1024)
    tokenizer.chat_template = template or phi3_chat_template
    return tokenizer


def build_family_model(name: str, path: Path, seed: int = 0, texts: list[str] | None = None, vocab_size: int = 512,
                       dtype=None, initializer_range: float = 0.02) -> Path:
    """Save a random tiny model of `name`'s shape (2 layers) with its family's tokenizer into `path`; `dtype` (e.g.
    torch.bfloat16) is the dtype the weights are stored in. `initializer_range` is the std of the random weights
    (transformers' 0.02 by default)."""
    import torch
    import transformers

    family, arch, shape = SHAPES[name]
    tokenizer = family_tokenizer(family, texts, vocab_size)
    config = getattr(transformers, f"{arch}Config")(
        vocab_size=len(tokenizer), intermediate_size=128, num_hidden_layers=2, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, initializer_range=initializer_range,
        **{"tie_word_embeddings": False, **shape})
    torch.manual_seed(seed)
    getattr(transformers, f"{arch}ForCausalLM")(config).to(dtype or torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)
