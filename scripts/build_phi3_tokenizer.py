"""Rebuild microsoft/Phi-3-mini-4k-instruct's tokenizer offline from llama.cpp's copy of its vocabulary.

    python scripts/build_phi3_tokenizer.py                      # downloads the llama-cpp-python 0.3.36 sdist
    python scripts/build_phi3_tokenizer.py --source SDIST.tar.gz  # or a given sdist
    python scripts/build_phi3_tokenizer.py --source ggml-vocab-phi-3.gguf

llama.cpp keeps Phi-3's vocabulary, with reference tokenizations, as `models/ggml-vocab-phi-3.gguf` (+ `.inp`,
`.out`); the llama-cpp-python sdist ships that folder. From its pieces, scores and token types this script writes the
files the hub repository has, into src/phitune/assets/phi3-tokenizer/:

- tokenizer.model: the SentencePiece BPE model (32,000 pieces, byte fallback), rebuilt from the GGUF's first 32,000
  entries. The GGUF overwrote ids 0-2 with its added-token values (score -1000, types control / user-defined); a
  SentencePiece model of this kind has score 0 and types unknown / control / control there, as Llama 2's has.
- tokenizer.json: the same BPE for the `tokenizers` library, laid out as the hub file is (merges ordered by piece score,
  a Prepend("▁") normalizer, no pre-tokenizer), plus the added tokens 0-2 and 32000-32010 with the hub's rstrip flags.
- tokenizer_config.json, special_tokens_map.json, added_tokens.json: the hub's fields (see the folder's README.md).
and copies the GGUF with its reference tokenizations to tests/data/llama.cpp/ (tests/test_tokenizer_phi3.py checks
the tokenizer against all 46; tests/test_export.py the exported GGUF's vocabulary against the file itself).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "phitune" / "assets" / "phi3-tokenizer"
REFERENCE = ROOT / "tests" / "data" / "llama.cpp"  # the GGUF and its reference tokenizations, for the tests
SDIST = "llama-cpp-python==0.3.36"
VOCAB = "vendor/llama.cpp/models/ggml-vocab-phi-3.gguf"
SP_PIECES = 32000  # the SentencePiece model's size; ids 32000-32010 are added tokens, the rest model padding

# microsoft/Phi-3-mini-4k-instruct's tokenizer_config.json "chat_template" (system turns supported).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# The hub's added_tokens_decoder: every chat token strips the whitespace after it, except <|endoftext|>; </s> is
# not special. llama.cpp applies the same rstrip rule to models named phi-3/phi3 (llama-vocab.cpp).
NO_RSTRIP = {"<unk>", "<s>", "<|endoftext|>"}
NOT_SPECIAL = {"</s>"}


def find_gguf(source: str | None, work: Path) -> Path:
    """The vocabulary file: `source` itself, the member of a given sdist, or of a freshly downloaded one."""
    if source and source.endswith(".gguf"):
        return Path(source)
    if source is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
                        "-d", str(work)], check=True)
        source = str(next(work.glob("llama_cpp_python-*.tar.gz")))
    with tarfile.open(source) as tar:
        for member in tar.getmembers():
            if member.name.split("/", 1)[-1].startswith(VOCAB):
                tar.extract(member, work, filter="data")
    return next(work.glob(f"*/{VOCAB}"))


def read_vocab(path: Path) -> tuple[list[str], list[float], list[int]]:
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    return tuple(fields[f"tokenizer.ggml.{name}"].contents() for name in ("tokens", "scores", "token_type"))


def sentencepiece_model(tokens: list[str], scores: list[float], types: list[int]) -> bytes:
    """A SentencePiece BPE ModelProto with byte fallback, Llama 2's normalizer settings, and these pieces."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = SP_PIECES
    spec.byte_fallback = True
    spec.split_digits = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    spec.max_sentencepiece_length = 16
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = True
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    for i in range(SP_PIECES):
        piece = proto.pieces.add()
        piece.piece = tokens[i]
        # ids 0-2 carry the GGUF converter's added-token values; SentencePiece's own are score 0, unk/control.
        piece.score = 0.0 if i < 3 else scores[i]
        piece.type = (pb.ModelProto.SentencePiece.UNKNOWN if i == 0 else pb.ModelProto.SentencePiece.CONTROL
                      if i < 3 else types[i])
    return proto.SerializeToString()


def added_tokens(tokens: list[str]) -> dict[int, dict]:
    """ids 0-2 and the chat tokens 32000-32010 as the hub's added_tokens_decoder lists them."""
    ids = [0, 1, 2] + [i for i in range(SP_PIECES, len(tokens)) if not tokens[i].startswith("[PAD")]
    return {i: {"content": tokens[i], "lstrip": False, "normalized": False, "rstrip": tokens[i] not in NO_RSTRIP,
                "single_word": False, "special": tokens[i] not in NOT_SPECIAL} for i in ids}


def tokenizer_json(tokens: list[str], scores: list[float], added: dict[int, dict]) -> dict:
    """The hub's tokenizer.json: byte-fallback BPE whose merges follow the piece scores, a Prepend("▁") normalizer
    (legacy Llama mode: every piece of text after a special token starts a word), and the added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import generate_merges

    vocab = {tokens[i]: i for i in range(SP_PIECES)}
    merges = generate_merges(vocab, {tokens[i]: scores[i] for i in range(3, SP_PIECES)})
    backend = Tokenizer(BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_tokens([AddedToken(a["content"], lstrip=False, rstrip=a["rstrip"], normalized=False,
                                   single_word=False, special=a["special"]) for a in added.values()])
    data = json.loads(backend.to_str())
    assert [t["id"] for t in data["added_tokens"]] == list(added), "added tokens landed on other ids"
    return data


def tokenizer_config(added: dict[int, dict]) -> dict:
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): a for i, a in added.items()},
        "bos_token": "<s>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


def write(out: Path, gguf_path: Path) -> None:
    tokens, scores, types = read_vocab(gguf_path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(sentencepiece_model(tokens, scores, types))
    added = added_tokens(tokens)
    dump = {
        "tokenizer.json": tokenizer_json(tokens, scores, added),
        "tokenizer_config.json": tokenizer_config(added),
        "special_tokens_map.json": {name: {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                                           "single_word": False}
                                    for name, text in (("bos_token", "<s>"), ("eos_token", "<|endoftext|>"),
                                                       ("pad_token", "<|endoftext|>"), ("unk_token", "<unk>"))},
        "added_tokens.json": {a["content"]: i for i, a in sorted(added.items(), key=lambda x: x[1]["content"])
                              if i >= SP_PIECES},
    }
    for name, data in dump.items():  # tokenizer.json compact: 1.9 MB instead of 3.6 MB
        indent = None if name == "tokenizer.json" else 2
        (out / name).write_text(json.dumps(data, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
    REFERENCE.mkdir(parents=True, exist_ok=True)
    for suffix in ("", ".inp", ".out"):
        shutil.copyfile(f"{gguf_path}{suffix}", REFERENCE / f"ggml-vocab-phi-3.gguf{suffix}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="a llama-cpp-python sdist (.tar.gz) or ggml-vocab-phi-3.gguf itself")
    parser.add_argument("--output", type=Path, default=OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        write(args.output, find_gguf(args.source, Path(work)))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
