"""The tokenizer inside a GGUF file: token list, scores, types, merges, special ids, chat template.

Two kinds of Phi-3 tokenizer reach us. The real Phi-3 ships a SentencePiece `tokenizer.model` (llama.cpp's
"llama" tokenizer); its Phi-3 chat tokens live outside the SentencePiece model, in `added_tokens.json`,
`tokenizer_config.json` and `tokenizer.json`, and are laid over the padding slots between the SentencePiece vocabulary
and the model's `vocab_size`. That overlay is a port of `Phi3MiniModel.set_vocab` in llama.cpp's
`convert_hf_to_gguf.py`; the `gguf` package on PyPI ships the writer and `SpecialVocab` but not the converter.
A byte-level BPE `tokenizer.json` (the bundled tiny model's, GPT-2 style) becomes llama.cpp's "gpt2" tokenizer, a
port of the converter's `get_vocab_base`.

`<|end|>` (Phi-4: `<|im_end|>`) is written as the end-of-turn token (`tokenizer.ggml.eot_token_id`), so llama.cpp,
Ollama and LM Studio end a turn there instead of generating past it.

Phi-3's chat tokens strip the whitespace after them (`rstrip` in the hub's tokenizer). GGUF has no per-token flags
for that; llama.cpp sets them itself, on every special token but `<unk>`, `<s>` and `<|endoftext|>`, exactly when
`general.name` contains "phi-3" or "phi3" (llama-vocab.cpp). `gguf_name` makes the name say so exactly when the
tokenizer strips, so llama.cpp feeds a fine-tuned model the ids it was trained on (docs/export.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import re

from phitune.data.encode import END_OF_TURN
from phitune.errors import PhituneError

END_OF_TURN_TOKENS = (END_OF_TURN, "<|im_end|>")  # Phi-3 and Phi-4-mini; Phi-4's ChatML-style turns
# The GPT-2 pre-tokenizer regex: what a `ByteLevel(use_regex=True)` pre-tokenizer splits with, and what llama.cpp
# runs for tokenizer.ggml.pre = "gpt-2". Any other pre-tokenizer would tokenize differently in llama.cpp.
GPT2_PRE = "gpt-2"
PHI3_NAME = re.compile(r"phi-?3", re.IGNORECASE)  # what llama.cpp looks for in general.name, lower-cased


def add_vocab(writer, model_dir: Path, vocab_size: int, tokenizer) -> dict:
    """Write the tokenizer of `model_dir` into `writer`; return the special ids written (for the summary and tests)."""
    import gguf

    if (model_dir / "tokenizer.model").is_file():
        kind = "llama"
        tokens, scores, types = _sentencepiece_tokens(model_dir, vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
    elif (model_dir / "tokenizer.json").is_file():
        kind = "gpt2"
        tokens, types = _byte_level_bpe_tokens(model_dir, vocab_size)
        scores = None
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(GPT2_PRE)
    else:
        raise PhituneError(f"{model_dir} has neither tokenizer.model nor tokenizer.json; GGUF needs the tokenizer")
    writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=kind == "gpt2", n_vocab=len(tokens))
    if special.chat_template is None and tokenizer.chat_template:  # phitune's fallback template (models/loading.py)
        special.chat_template = tokenizer.chat_template
    special.add_special_token.update(_added_specials(tokenizer))
    special.add_to_gguf(writer, quiet=True)
    if kind == "llama":
        writer.add_add_space_prefix(_space_after_special(tokenizer))
    ids = dict(special.special_token_ids)
    end = next((tokens.index(t.encode()) for t in END_OF_TURN_TOKENS if t.encode() in tokens), None)
    if end is not None:
        writer.add_eot_token_id(end)
        ids["eot"] = end
    return {"tokenizer": kind, **{f"{k}_id": v for k, v in ids.items()}}


def gguf_name(name: str, tokenizer) -> str:
    """general.name, with "phi3" added when the tokenizer strips whitespace after `<|end|>` and llama.cpp would not,
    or Phi-3 taken out of it (phi-3 -> phi) when llama.cpp would strip and the tokenizer does not."""
    end = tokenizer.added_tokens_decoder.get(tokenizer.convert_tokens_to_ids(END_OF_TURN))
    strips = end is not None and end.content == END_OF_TURN and end.rstrip
    if strips and not PHI3_NAME.search(name):
        return f"{name} (phi3)"
    if not strips and PHI3_NAME.search(name):
        return PHI3_NAME.sub(lambda m: m.group(0)[:3], name)
    return name


def _added_specials(tokenizer) -> dict[str, bool]:
    """Whether the HF tokenizer puts bos / eos around plain text, read from what it does, not from its settings."""
    with_specials = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {"bos": bos is not None and with_specials[:1] == [bos] and plain[:1] != [bos],
            "eos": eos is not None and with_specials[-1:] == [eos] and plain[-1:] != [eos]}


def _space_after_special(tokenizer) -> bool:
    """Whether the HF tokenizer starts the text after a special token with SentencePiece's "▁" (its legacy mode).

    llama.cpp's SentencePiece tokenizer adds "▁" to every piece of text after a special token unless
    `add_space_prefix` is false; the converter leaves it at that default. A tokenizer saved in non-legacy mode (as
    transformers 5 saves a new one) adds it only at the very start of the text. Phi-3's chat text always follows a
    special token, so the flag is set to what HF does there; plain text that does not start with a special token
    then differs by that first "▁" under llama.cpp (stated in docs/export.md).
    """
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if end is None or end == tokenizer.unk_token_id:
        return True
    ids = tokenizer(END_OF_TURN + "a", add_special_tokens=False).input_ids
    return len(ids) > 1 and tokenizer.convert_ids_to_tokens(ids[1]).startswith("\u2581")


def _sentencepiece_tokens(model_dir: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """Port of llama.cpp's Phi3MiniModel.set_vocab: SentencePiece pieces, then the added tokens laid over them."""
    from gguf import TokenType
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model_dir / "tokenizer.model"))
    vocab_size = max(vocab_size, sp.vocab_size())
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [TokenType.UNUSED] * vocab_size
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.IdToPiece(i).encode(), sp.GetScore(i)
        types[i] = (TokenType.UNKNOWN if sp.IsUnknown(i) else TokenType.CONTROL if sp.IsControl(i)
                    else TokenType.UNUSED if sp.IsUnused(i) else TokenType.BYTE if sp.IsByte(i) else TokenType.NORMAL)
    for token_id, text, is_special in _added_tokens(model_dir):
        if token_id >= vocab_size:
            raise PhituneError(f"added token {text!r} has id {token_id}, beyond the model's vocab_size {vocab_size}")
        tokens[token_id], scores[token_id] = text.encode(), -1000.0
        types[token_id] = TokenType.CONTROL if is_special else TokenType.USER_DEFINED
    return tokens, scores, [int(t) for t in types]


def _added_tokens(model_dir: Path) -> list[tuple[int, str, bool]]:
    """(id, text, special) of the tokens added on top of the base vocabulary, from every file that may list them."""
    found: dict[int, tuple[str, bool]] = {}
    added = model_dir / "added_tokens.json"
    if added.is_file():
        found.update({i: (text, False) for text, i in _read_json(added).items()})
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        for i, data in _read_json(config).get("added_tokens_decoder", {}).items():
            found[int(i)] = (data["content"], bool(data.get("special")))
    tok_json = model_dir / "tokenizer.json"
    if tok_json.is_file():
        for data in _read_json(tok_json).get("added_tokens", []):
            found[int(data["id"])] = (data["content"], bool(data.get("special")))
    return [(i, text, special) for i, (text, special) in sorted(found.items())]


def _byte_level_bpe_tokens(model_dir: Path, vocab_size: int) -> tuple[list[bytes], list[int]]:
    """Port of llama.cpp's get_vocab_base for a byte-level BPE tokenizer.json; refuses other pre-tokenizers."""
    from gguf import TokenType

    data = _read_json(model_dir / "tokenizer.json")
    model, pre = data.get("model", {}), data.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) \
            or pre.get("add_prefix_space") or data.get("normalizer"):
        raise PhituneError(f"{model_dir / 'tokenizer.json'} is not a byte-level BPE tokenizer with GPT-2 "
                           "pre-tokenization, and there is no tokenizer.model; phitune cannot write it to GGUF")
    by_id = {i: text for text, i in model["vocab"].items()}
    added = {i: (text, special) for i, text, special in _added_tokens(model_dir)}
    by_id.update({i: text for i, (text, _) in added.items()})
    vocab_size = max(vocab_size, max(by_id) + 1)
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]".encode())
            types.append(TokenType.UNUSED)
            continue
        tokens.append(by_id[i].encode())
        types.append(TokenType.NORMAL if i not in added else
                     TokenType.CONTROL if added[i][1] else TokenType.USER_DEFINED)
    return tokens, [int(t) for t in types]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PhituneError(f"cannot read {path}: {exc}") from None
