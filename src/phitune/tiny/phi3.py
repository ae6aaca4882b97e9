"""The embedded small Phi-3: a real `Phi3ForCausalLM` of a few MB and a tokenizer with Phi-3's special tokens.

It lets the demo and the tests run the same loading, training and saving code as `microsoft/Phi-3-mini-4k-instruct`
(`from_pretrained` on a directory), offline and on a CPU. `scripts/build_tiny_base.py` pretrains it on the bundled
corpus and stores it in `assets/tiny-phi3`; `build_tiny_model` makes a randomly initialised one for tests.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parents[1] / "assets"
TINY_BASE = ASSETS / "tiny-phi3"
DEMO_DATA = ASSETS / "demo_chat"
CORPUS = ASSETS / "corpus.txt"
PHI3_TOKENIZER = ASSETS / "phi3-tokenizer"  # the real Phi-3 tokenizer, rebuilt offline (see its README.md)
PHI3_VOCAB_SIZE = 32064  # Phi-3-mini's embedding rows: 32,011 tokens padded to a multiple of 64

# Phi-3's special tokens, with the same roles: <unk> pads, <|endoftext|> is eos, <|end|> closes every turn.
SPECIAL_TOKENS = ["<unk>", "<s>", "<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


def tiny_config(vocab_size: int, hidden: int = 128, layers: int = 4, heads: int = 4, kv_heads: int = 4):
    """A Phi3Config with Phi-3-mini's structure (fused qkv and gate-up, RoPE, RMSNorm) at toy size."""
    from transformers import Phi3Config

    return Phi3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,  # Phi-3-mini: 3072
        intermediate_size=hidden * 8 // 3 // 8 * 8,  # Phi-3-mini: 8192 = 2.67 x hidden
        num_hidden_layers=layers,  # Phi-3-mini: 32
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,  # Phi-3-mini-4k: 4096
        original_max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        use_cache=True,
    )


def build_tokenizer(texts: list[str], vocab_size: int = 2048):
    """Train a small byte-level BPE on `texts` and wrap it with Phi-3's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from trl.chat_template_utils import phi3_chat_template

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        model_max_length=1024,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = phi3_chat_template
    return tokenizer


def demo_texts() -> list[str]:
    """The text the tiny tokenizer is trained on: the corpus and every rendered demo conversation."""
    import json

    texts = CORPUS.read_text(encoding="utf-8").splitlines() if CORPUS.exists() else []
    for name in ("train.jsonl", "eval.jsonl"):
        path = DEMO_DATA / name
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                texts += [m["content"] for m in json.loads(line)["messages"]]
    return texts or ["The capital of France is Paris."]


def build_tiny_model(output_dir: str | Path, seed: int = 0, vocab_size: int = 2048, real_tokenizer: bool = False,
                     **shape) -> Path:
    """Write a randomly initialised tiny Phi-3 and its tokenizer to `output_dir`; return the directory.

    real_tokenizer: Phi-3's own tokenizer files (copied as they are) and its 32,064 embedding rows, instead of a
    byte-level BPE of `vocab_size` pieces trained here."""
    import shutil

    import torch
    from transformers import AutoTokenizer, Phi3ForCausalLM

    output_dir = Path(output_dir)
    if real_tokenizer:
        shutil.copytree(PHI3_TOKENIZER, output_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.md"))
        tokenizer, rows = AutoTokenizer.from_pretrained(output_dir), PHI3_VOCAB_SIZE
    else:
        tokenizer = build_tokenizer(demo_texts(), vocab_size=vocab_size)
        tokenizer.save_pretrained(output_dir)
        rows = len(tokenizer)
    torch.manual_seed(seed)
    config = tiny_config(rows, **shape)
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model = Phi3ForCausalLM(config)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output_dir)
    return output_dir


def tiny_base_path() -> Path:
    """The shipped pretrained tiny base; raises if the package was installed without its assets."""
    from phitune.errors import PhituneError

    if not (TINY_BASE / "config.json").exists():
        raise PhituneError(f"the bundled tiny model is missing from {TINY_BASE}; run scripts/build_tiny_base.py")
    return TINY_BASE
