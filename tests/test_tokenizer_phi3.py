"""The bundled Phi-3 tokenizer against llama.cpp's 46 reference tokenizations of it (tests/data/llama.cpp)."""

from __future__ import annotations

import json
from pathlib import Path

from phitune.tiny.phi3 import PHI3_TOKENIZER

REFERENCE = Path(__file__).parent / "data" / "llama.cpp" / "ggml-vocab-phi-3.gguf"


def reference_cases() -> list[tuple[str, list[int]]]:
    """(text, ids) pairs, split as llama.cpp's test-tokenizer-0 splits the .inp file."""
    texts = REFERENCE.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = [[int(i) for i in line.split()] for line in REFERENCE.with_suffix(".gguf.out").read_text().splitlines()]
    return list(zip(texts, ids, strict=False))


CASES = reference_cases()


def test_there_are_46_reference_cases_covering_the_hard_parts():
    assert len(CASES) == 46
    texts = "".join(text for text, _ in CASES)
    assert "\n" in texts and "\t" in texts and "🦙" in texts and any(ord(c) > 0x3000 for c in texts)


def test_sentencepiece_model_reproduces_every_reference_tokenization():
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(PHI3_TOKENIZER / "tokenizer.model"))
    assert sp.vocab_size() == 32000
    assert [sp.encode(text) for text, _ in CASES] == [ids for _, ids in CASES]


def test_tokenizer_json_reproduces_every_reference_tokenization():
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(PHI3_TOKENIZER / "tokenizer.json"))
    assert [tokenizer.encode(text, add_special_tokens=False).ids for text, _ in CASES] == [ids for _, ids in CASES]


def model_folder(tmp_path: Path) -> Path:
    """The tokenizer files next to a Phi-3 config.json, as in the hub repository and every model phitune loads."""
    import shutil

    from transformers import Phi3Config

    shutil.copytree(PHI3_TOKENIZER, tmp_path, dirs_exist_ok=True)
    Phi3Config(vocab_size=32064).save_pretrained(tmp_path)
    return tmp_path


def test_transformers_loading_a_model_folder_reproduces_every_reference_tokenization(tmp_path):
    """With config.json (model_type phi3) transformers 5.24 uses tokenizer.json as it is (TokenizersBackend)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder(tmp_path))
    assert [tokenizer(text, add_special_tokens=False).input_ids for text, _ in CASES] == [ids for _, ids in CASES]
    assert tokenizer.convert_ids_to_tokens(tokenizer("<|user|>\nLima", add_special_tokens=False).input_ids) == [
        "<|user|>", "\u2581Lima"]  # SentencePiece's word start after a chat token, as llama.cpp tokenizes it


def test_transformers_loading_the_tokenizer_files_alone_differs_on_text_that_starts_with_a_space():
    """Without config.json transformers 5.24 follows tokenizer_config's `LlamaTokenizer, legacy: false` and builds
    a Metaspace pre-tokenizer instead of the file's Prepend normalizer: one leading space becomes the word-start mark,
    and text after a chat token gets none (`<|user|>\nLima` -> `L`, `ima`). Measured, so a change is noticed; phitune
    always loads a model folder (docs/export.md, "Train/serve parity")."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(PHI3_TOKENIZER)
    assert tokenizer.convert_ids_to_tokens(tokenizer("<|user|>\nLima", add_special_tokens=False).input_ids) == [
        "<|user|>", "L", "ima"]
    differs = [text for text, ids in CASES if tokenizer(text, add_special_tokens=False).input_ids != ids]
    assert differs == [text for text, _ in CASES if text.startswith(" ")]
    assert len(differs) == 15
    for text, ids in CASES:  # the difference is that one leading "▁" (id 29871), or a run of spaces one shorter
        got = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(got) == tokenizer.decode(ids).removeprefix(" ") or got == ids


def test_ids_special_tokens_and_decoding_of_the_chat_tokens(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder(tmp_path))
    assert len(tokenizer) == 32011
    expected = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|endoftext|>": 32000, "<|assistant|>": 32001, "<|system|>": 32006,
                "<|end|>": 32007, "<|user|>": 32010}
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in expected} == expected
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 32000, 0)
    assert tokenizer("Hello").input_ids == tokenizer("Hello", add_special_tokens=False).input_ids  # no bos added
    text = "<|user|>\nಕರ್ನಾಟಕದ ರಾಜಧಾನಿ?<|end|>\n<|assistant|>\n"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids[0] == 32010 and ids[-2:] == [32007, 32001]  # the chat tokens swallow the "\n" after them (rstrip)
    assert tokenizer.decode(ids) == "<|user|> ಕರ್ನಾಟಕದ ರಾಜಧಾನಿ?<|end|><|assistant|>"  # "▁" word start after <|user|>


def test_added_tokens_and_config_agree_with_the_gguf():
    from gguf import GGUFReader

    fields = GGUFReader(REFERENCE).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    added = json.loads((PHI3_TOKENIZER / "added_tokens.json").read_text())
    assert added == {tokens[i]: i for i in range(32000, 32011)}
    config = json.loads((PHI3_TOKENIZER / "tokenizer_config.json").read_text())
    assert all(tokens[int(i)] == entry["content"] for i, entry in config["added_tokens_decoder"].items())
    assert {config[k] for k in ("eos_token", "pad_token")} == {tokens[32000]}
    assert config["bos_token"] == tokens[fields["tokenizer.ggml.bos_token_id"].contents()]


def test_the_build_script_rebuilds_the_committed_files_byte_for_byte(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("build", Path(__file__).parents[1] / "scripts" /
                                                  "build_phi3_tokenizer.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    monkeypatch.setattr(build, "REFERENCE", tmp_path / "reference")
    build.write(tmp_path / "out", REFERENCE)
    for path in PHI3_TOKENIZER.iterdir():
        if path.suffix != ".md":
            assert (tmp_path / "out" / path.name).read_bytes() == path.read_bytes(), path.name
