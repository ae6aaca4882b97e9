"""Train/serve parity on the real Phi-3 tokenizer: the ids a model is fine-tuned on are the ids each engine feeds it.

(a) phitune's training rendering, (b) `apply_chat_template(..., add_generation_prompt=True)` then tokenizing, as
`phitune chat` and vLLM do, and (c) llama.cpp on phitune's GGUF export (slow: needs llama-cpp-python, built in CI).
Also the GGUF tokenizer metadata against llama.cpp's own `ggml-vocab-phi-3.gguf` (docs/export.md lists each
difference and why it is right).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from phitune.data import render_with_mask, training_chat_template

gguf = pytest.importorskip("gguf")
REFERENCE = Path(__file__).parent / "data" / "llama.cpp" / "ggml-vocab-phi-3.gguf"
SYSTEM = {"role": "system", "content": "You are terse."}
CONVERSATIONS = [
    [SYSTEM, {"role": "user", "content": "What is the capital of Peru?"}, {"role": "assistant", "content": "Lima."},
     {"role": "user", "content": "ಕರ್ನಾಟಕದ ರಾಜಧಾನಿ?"}, {"role": "assistant", "content": "  ಬೆಂಗಳೂರು 🎉"}],
    [{"role": "user", "content": " leading space, 日本語"}, {"role": "assistant", "content": "\nनई दिल्ली"}],
    [{"role": "user", "content": "\n\tcode:\n```py\nx  =  1\n```"}, {"role": "assistant", "content": "x is 1.\n"}],
]


@pytest.fixture(scope="module")
def phi3_model(tmp_path_factory) -> Path:
    """A tiny random Phi-3 with the real tokenizer and Phi-3-mini's 32,064 embedding rows."""
    from phitune.tiny.phi3 import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("phi3-real"), real_tokenizer=True, hidden=64, layers=2)


@pytest.fixture(scope="module")
def tokenizer(phi3_model):
    from phitune.config.schema import ModelConfig
    from phitune.models.loading import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(phi3_model)))


@pytest.fixture(scope="module")
def exported(phi3_model, tmp_path_factory) -> Path:
    from phitune.after.export import export_run

    return export_run(None, tmp_path_factory.mktemp("gguf") / "phi3.gguf", model=str(phi3_model)).path


def served_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """(b): what `phitune chat` (generate.py) and vLLM feed the model for the next assistant turn."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def turns(messages: list[dict]):
    """(conversation so far, the assistant message that answers it) for each assistant turn."""
    return [(messages[:i], m) for i, m in enumerate(messages) if m["role"] == "assistant"]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["system-kannada", "leading-space", "code"])
def test_each_served_prompt_is_the_trained_prefix_and_the_answer_follows_it(tokenizer, messages):
    """(a) == (b): the prompt the server builds is exactly the trained ids before each answer, and the trained
    (labelled) ids right after it are that answer."""
    ids, mask = render_with_mask(tokenizer, messages, training_chat_template(tokenizer))
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    for history, answer in turns(messages):
        prompt = served_prompt_ids(tokenizer, history)
        assert ids[:len(prompt)] == prompt and prompt[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
        assert mask[len(prompt) - 1] == 0  # the header is the prompt's, not trained
        reply = ids[len(prompt):]
        end = reply.index(tokenizer.convert_tokens_to_ids("<|end|>"))
        assert all(mask[len(prompt):len(prompt) + end + 1]) and not any(mask[len(prompt) + end + 1:][:1])
        assert tokenizer.decode(reply[:end + 1]) == answer["content"].lstrip() + "<|end|>"


def test_transformers_loads_the_model_folder_as_sentencepiece_does_and_does_not_warn(phi3_model, caplog):
    from phitune.config.schema import ModelConfig
    from phitune.models.loading import load_tokenizer

    with caplog.at_level(logging.WARNING, logger="phitune"):
        tokenizer = load_tokenizer(ModelConfig(name_or_path=str(phi3_model)))
    assert type(tokenizer).__name__ == "TokenizersBackend"
    assert [r for r in caplog.records if "SentencePiece" in r.getMessage()] == []


def test_a_tokenizer_that_differs_from_its_sentencepiece_model_is_warned_about_once(tmp_path, caplog):
    """The tokenizer files alone (no config.json): transformers builds the Metaspace LlamaTokenizer. Every command
    loads its tokenizer with load_tokenizer (train, DPO/ORPO, data, eval, chat, generate, merge, export)."""
    from phitune.config.schema import ModelConfig
    from phitune.models.loading import load_tokenizer
    from phitune.tiny.phi3 import PHI3_TOKENIZER

    folder = shutil.copytree(PHI3_TOKENIZER, tmp_path / "tokenizer-only")  # a path no other test has checked
    with caplog.at_level(logging.WARNING, logger="phitune"):
        for padding_side in ("right", "left"):  # as train, then generate, in one process
            load_tokenizer(ModelConfig(name_or_path=str(folder)), padding_side=padding_side)
    said = [r.getMessage() for r in caplog.records if "SentencePiece" in r.getMessage()]
    assert len(said) == 1 and "[29871, 15043, 3186]" in said[0], said


def test_a_copy_of_the_same_tokenizer_is_not_warned_about_again(tmp_path, caplog):
    """`phitune export` loads the base's tokenizer (to merge) and then the merged model's copy of it (to write the
    GGUF): the same SentencePiece model in two folders is one warning, not two."""
    from phitune.config.schema import ModelConfig
    from phitune.models.loading import load_tokenizer
    from phitune.tiny.phi3 import PHI3_TOKENIZER

    base = shutil.copytree(PHI3_TOKENIZER, tmp_path / "base")
    # a model no other test has checked: the same one, with a field SentencePiece does not know (number 100, 1)
    (base / "tokenizer.model").write_bytes((base / "tokenizer.model").read_bytes() + b"\xa0\x06\x01")
    merged = shutil.copytree(base, tmp_path / "merged")
    with caplog.at_level(logging.WARNING, logger="phitune"):
        for folder in (base, merged):
            load_tokenizer(ModelConfig(name_or_path=str(folder)))
    assert len([r for r in caplog.records if "SentencePiece" in r.getMessage()]) == 1


def test_a_hub_model_is_checked_with_the_tokenizer_model_from_the_hub_cache(tmp_path):
    """A hub id, offline, from the hub cache (the layout huggingface_hub writes): its tokenizer.model is found
    there, not next to a folder named like the id. A process of its own, as the hub cache is read from the
    environment at import."""
    import os
    import subprocess
    import sys

    from phitune.tiny.phi3 import PHI3_TOKENIZER

    repo = tmp_path / "hub" / "models--someone--phi3-tokenizer-only"
    shutil.copytree(PHI3_TOKENIZER, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / ".no_exist" / "0123abcd").mkdir(parents=True)
    (repo / ".no_exist" / "0123abcd" / "config.json").touch()  # the hub said: no config.json (LlamaTokenizer)
    code = ("import logging; logging.basicConfig(); from phitune.config.schema import ModelConfig; "
            "from phitune.models.loading import load_tokenizer; "
            "load_tokenizer(ModelConfig(name_or_path='someone/phi3-tokenizer-only'))")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "SentencePiece" in line]
    assert len(said) == 1 and "[29871, 15043, 3186]" in said[0], done.stderr


# ---- GGUF tokenizer metadata against llama.cpp's own file -------------------------------------------------------


def test_gguf_tokens_scores_types_and_special_ids_equal_llama_cpps_but_the_documented_ones(exported):
    ours = {k: f.contents() for k, f in gguf.GGUFReader(exported).fields.items() if k.startswith("tokenizer.ggml")}
    ref = {k: f.contents() for k, f in gguf.GGUFReader(REFERENCE).fields.items() if k.startswith("tokenizer.ggml")}
    assert ours["tokenizer.ggml.tokens"] == ref["tokenizer.ggml.tokens"]
    assert ours["tokenizer.ggml.scores"] == ref["tokenizer.ggml.scores"]
    differ = [i for i, (a, b) in enumerate(zip(ours["tokenizer.ggml.token_type"], ref["tokenizer.ggml.token_type"]))
              if a != b]
    assert differ == list(range(32011, 32064))  # the padding rows: unused (llama.cpp's converter today), not unknown
    assert {ours["tokenizer.ggml.token_type"][i] for i in differ} == {gguf.TokenType.UNUSED}
    for key in ("model", "pre", "bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id",
                "add_eos_token"):
        assert ours[f"tokenizer.ggml.{key}"] == ref[f"tokenizer.ggml.{key}"], key
    assert ours["tokenizer.ggml.eot_token_id"] == 32007 and "tokenizer.ggml.eot_token_id" not in ref
    assert ours["tokenizer.ggml.add_bos_token"] is False and ref["tokenizer.ggml.add_bos_token"] is True
    assert "phi3" in gguf.GGUFReader(exported).fields["general.name"].contents()  # llama.cpp's rstrip rule


def test_gguf_name_says_phi3_exactly_when_the_tokenizer_strips_after_end(tokenizer):
    from phitune.after.export.gguf_vocab import gguf_name
    from phitune.tiny.phi3 import build_tokenizer

    assert gguf_name("merged", tokenizer) == "merged (phi3)"
    assert gguf_name("Phi-3-mini-ft", tokenizer) == "Phi-3-mini-ft"
    no_strip = build_tokenizer(["a small corpus"], vocab_size=300)  # chat tokens without rstrip
    assert gguf_name("Phi-3-mini-ft", no_strip) == "Phi-mini-ft" and gguf_name("tiny", no_strip) == "tiny"


# ---- slow: llama.cpp itself -------------------------------------------------------------------------------------


def llama_vocab(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


@pytest.mark.slow
def test_llama_cpp_feeds_the_exported_model_the_ids_it_was_trained_on(exported, tokenizer):
    """(c) == (a): every served prompt and every whole conversation, tokenized by llama.cpp from the GGUF."""
    runtime = llama_vocab(exported)
    try:
        add_bos = gguf.GGUFReader(exported).fields["tokenizer.ggml.add_bos_token"].contents()
        for messages in CONVERSATIONS:
            ids, _ = render_with_mask(tokenizer, messages, training_chat_template(tokenizer))
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            assert runtime.tokenize(text.encode(), add_bos=add_bos, special=True) == ids
            for history, _ in turns(messages):
                prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
                assert runtime.tokenize(prompt.encode(), add_bos=add_bos, special=True) == \
                    served_prompt_ids(tokenizer, history)
    finally:
        runtime.close()


@pytest.mark.slow
def test_llama_cpp_tokenizes_chat_text_as_with_its_own_file_and_padding_names_as_text(exported):
    """Why the documented differences are right: on chat text the export and llama.cpp's own file give the same ids
    (both named Phi-3, so llama.cpp strips after the chat tokens as transformers does); the reference file types the
    padding rows unknown, so their names in text become ids 32011..., which transformers reads as plain text."""
    text = "<|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\n"
    ref, ours = llama_vocab(REFERENCE), llama_vocab(exported)
    try:
        expected = [32006, 1522, 11473, 29889, 32007, 32010, 6324, 727, 32007, 32001]
        assert ours.tokenize(text.encode(), add_bos=False, special=True) == expected
        assert ref.tokenize(text.encode(), add_bos=False, special=True) == expected
        assert ref.tokenize(b"[PAD32011]", add_bos=False, special=True) == [32011]
        assert 32011 not in ours.tokenize(b"[PAD32011]", add_bos=False, special=True)
    finally:
        ref.close()
        ours.close()
