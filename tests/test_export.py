"""phitune export: GGUF files read back with llama.cpp's own gguf reader, and (slow) run by llama.cpp itself.

Fast tests check what was written: metadata, tokenizer, special ids, chat template, tensor values and types.
The `slow` tests need llama-cpp-python (built from source, about 9 minutes on 2 cores: see .ci/run) and compare
llama.cpp's logits and greedy continuations with transformers on the same model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _fixtures_eval import run_config, trained_run  # noqa: F401  (fixture)
from typer.testing import CliRunner

from phitune.after.export import export_run
from phitune.errors import PhituneError
from phitune.tiny.phi3 import TINY_BASE, tiny_config

gguf = pytest.importorskip("gguf")
PROMPT = "<|user|>\nWhat noise does a cow make?<|end|>\n<|assistant|>\n"
PHI3_TOKENS = ["<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
# llama.cpp multiplies f16 weights with activations rounded to f16; on the tiny models (logits up to ~15) that moves
# logits by ~0.01. A wrong tensor layout, scale or rope moves them by whole units.
F16_ATOL = 0.05
Q8_ATOL = 0.5  # q8_0 weights: ~0.2 observed on the demo-trained tiny model


def run_export(*args: str):
    from phitune.cli import app

    return CliRunner().invoke(app, ["export", *args])


def fields(path: Path) -> dict:
    """{key: value} of a GGUF file's metadata, token lists as python lists."""
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}


def tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def merged_model(run_dir: Path, tmp_path: Path):
    """The run merged with phitune merge and loaded with plain transformers (the reference for the export)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phitune.after.generate import resolve_model_source
    from phitune.after.merge import merge_adapter

    out = tmp_path / "merged"
    merge_adapter(*resolve_model_source(run_dir), out)
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(out)


def save_tiny_model(path: Path, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 4,
                    tokenizer_dir: Path = TINY_BASE, **config) -> Path:
    """A random tiny Phi-3 with the bundled tokenizer (or another), with config overrides (tying, rope...)."""
    from transformers import AutoTokenizer, Phi3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = tiny_config(config.pop("vocab_size", len(tokenizer)), hidden=hidden, layers=layers, heads=heads,
                      kv_heads=kv_heads)
    config.setdefault("initializer_range", 0.1)  # logits of a few units: a wrong rope or layout moves them by ~1
    for key, value in config.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    Phi3ForCausalLM(cfg).save_pretrained(path)
    for file in tokenizer_dir.iterdir():
        if file.name.startswith(("tokenizer", "chat_template", "added_tokens")) and tokenizer_dir != path:
            shutil.copyfile(file, path / file.name)
    return path


@pytest.fixture(scope="module")
def sentencepiece_base(tmp_path_factory) -> Path:
    """A tiny Phi-3 whose tokenizer is a SentencePiece model trained on the bundled corpus, laid out as the real
    Phi-3's: tokenizer.model, the chat tokens added above it in added_tokens.json, vocab_size padded beyond them."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer

    tok_dir = tmp_path_factory.mktemp("sp-tokenizer")
    spm.SentencePieceTrainer.train(input=str(TINY_BASE.parent / "corpus.txt"), model_prefix=str(tok_dir / "sp"),
                                   vocab_size=600, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (tok_dir / "tokenizer.model").write_bytes((tok_dir / "sp.model").read_bytes())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": PHI3_TOKENS})
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.chat_template = (TINY_BASE / "chat_template.jinja").read_text()
    out = tmp_path_factory.mktemp("sp-base")
    tokenizer.save_pretrained(out)
    shutil.copyfile(tok_dir / "tokenizer.model", out / "tokenizer.model")
    (out / "added_tokens.json").write_text(json.dumps({t: tokenizer.convert_tokens_to_ids(t) for t in PHI3_TOKENS}))
    return save_tiny_model(out, tokenizer_dir=out, vocab_size=len(tokenizer) + 11)


@pytest.fixture(scope="module")
def sentencepiece_run(sentencepiece_base, tmp_path_factory) -> Path:
    """A short LoRA run on the SentencePiece base: its merged directory lacks tokenizer.model, export copies it."""
    from phitune.config.schema import config_from_dict
    from phitune.train import run_training

    out = tmp_path_factory.mktemp("sp-run")
    run_training(config_from_dict(run_config(sentencepiece_base, out, max_steps=2)), overwrite=True)
    return out


@pytest.fixture(scope="module")
def loralib_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A short run of the loralib backend on q, v (slices of the fused qkv_proj) and o: ranks differ per module."""
    from phitune.config.schema import config_from_dict
    from phitune.train import run_training

    out = tmp_path_factory.mktemp("loralib-run")
    raw = run_config(tiny_model_dir, out, max_steps=4, learning_rate=2e-2)
    raw["peft_config"] = {"backend": "loralib", "target_modules": ["q_proj", "v_proj", "o_proj"], "r": 4,
                          "lora_alpha": 8}
    run_training(config_from_dict(raw), overwrite=True)
    return out


# ---- fast: what the file holds -------------------------------------------------------------------------------


def test_export_writes_merged_weights_tokenizer_template_and_end_of_turn(trained_run, tmp_path):  # noqa: F811
    out = tmp_path / "model.gguf"
    result = run_export(str(trained_run), "--output", str(out))
    assert result.exit_code == 0, result.output
    model, tokenizer = merged_model(trained_run, tmp_path)
    meta, weights = fields(out), tensors(out)
    assert meta["general.architecture"] == "phi3" and meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert meta["phi3.block_count"] == model.config.num_hidden_layers
    assert meta["phi3.attention.head_count_kv"] == model.config.num_key_value_heads
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert meta["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids("<|end|>")
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    assert len(meta["tokenizer.ggml.merges"]) > 1000
    state = model.state_dict()
    qkv = weights["blk.1.attn_qkv.weight"]
    assert qkv.tensor_type == gguf.GGMLQuantizationType.F16
    np.testing.assert_array_equal(np.asarray(qkv.data), state["model.layers.1.self_attn.qkv_proj.weight"].half())
    np.testing.assert_array_equal(np.asarray(weights["blk.3.ffn_up.weight"].data),
                                  state["model.layers.3.mlp.gate_up_proj.weight"].half())
    assert weights["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert len(weights) == len(state)


def test_q8_0_quantizes_rows_that_fit_and_keeps_the_rest_f16(trained_run, tmp_path):  # noqa: F811
    out = tmp_path / "q8.gguf"
    result = export_run(trained_run, out, quant="q8_0")
    weights = tensors(out)
    qkv = weights["blk.0.attn_qkv.weight"]
    assert qkv.tensor_type == gguf.GGMLQuantizationType.Q8_0
    # the bundled model's feed-forward is 336 wide: ffn_down rows of 336 are not whole 32-blocks
    assert weights["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert len(result.kept_f16) == 4 and "ffn_down" in result.kept_f16[0]
    f16 = tensors(export_run(trained_run, tmp_path / "f16.gguf").path)["blk.0.attn_qkv.weight"]
    dequantized = gguf.quants.dequantize(qkv.data, qkv.tensor_type)
    reference = np.asarray(f16.data, dtype=np.float32)
    assert np.abs(dequantized - reference).max() <= np.abs(reference).max() / 127  # q8_0: one step of 1/127


def test_a_quant_no_tensor_fits_is_a_one_line_error_and_writes_nothing(tmp_path):
    model = save_tiny_model(tmp_path / "odd", hidden=40)  # rows of 40 and 104: no 32-blocks anywhere
    out = tmp_path / "odd.gguf"
    result = run_export("--model", str(model), "--output", str(out), "--quant", "q8_0")
    assert result.exit_code != 0 and not out.exists() and not list(tmp_path.glob("*.partial"))
    with pytest.raises(PhituneError, match="no weight of this model has rows that fit"):
        export_run(None, out, quant="q8_0", model=str(model))
    with pytest.raises(PhituneError, match="--quant q3 is not one of: f32, f16, bf16, q8_0, q4_0"):
        export_run(None, out, quant="q3", model=str(model))
    (tmp_path / "taken.gguf").write_text("keep")
    with pytest.raises(PhituneError, match="exists"):
        export_run(None, tmp_path / "taken.gguf", model=str(model))


def test_sentencepiece_tokenizer_is_written_as_phi3_does(sentencepiece_run, sentencepiece_base, tmp_path):
    from sentencepiece import SentencePieceProcessor
    from transformers import AutoTokenizer

    out = tmp_path / "sp.gguf"
    export_run(sentencepiece_run, out)  # tokenizer.model is copied from the base into the merged model
    meta = fields(out)
    sp = SentencePieceProcessor(model_file=str(sentencepiece_base / "tokenizer.model"))
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    config = json.loads((sentencepiece_base / "config.json").read_text())
    assert meta["tokenizer.ggml.model"] == "llama" and len(tokens) == config["vocab_size"]
    assert tokens[:sp.vocab_size()] == [sp.IdToPiece(i) for i in range(sp.vocab_size())]
    assert meta["tokenizer.ggml.unknown_token_id"] == 0 and types[1] == gguf.TokenType.CONTROL
    assert types[3] == gguf.TokenType.BYTE  # byte-fallback pieces <0x00>...
    end = tokens.index("<|end|>")
    assert end == sp.vocab_size() + 1 and types[end] == gguf.TokenType.CONTROL
    assert meta["tokenizer.ggml.eot_token_id"] == end
    assert meta["tokenizer.ggml.eos_token_id"] == tokens.index("<|endoftext|>")
    assert tokens[-1] == f"[PAD{len(tokens) - 1}]" and types[-1] == gguf.TokenType.UNUSED
    hf_adds_bos = AutoTokenizer.from_pretrained(sentencepiece_run)("a").input_ids[0] == 1
    assert meta["tokenizer.ggml.add_bos_token"] is hf_adds_bos  # llama.cpp must put <s> first exactly when HF does
    assert meta["tokenizer.ggml.scores"][5] == sp.GetScore(5)
    assert "tokenizer.ggml.add_space_prefix" in meta  # what HF does after <|user|>; the slow test runs it


def test_ollama_modelfile_names_the_file_the_template_and_the_stops(trained_run, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "phi.gguf"
    result = run_export(str(trained_run), "--output", str(out), "--ollama")
    assert result.exit_code == 0, result.output
    assert f"run: cd {tmp_path} && ollama create phi -f Modelfile" in " ".join(result.output.split())
    text = (tmp_path / "Modelfile").read_text()
    assert text.startswith("FROM ./phi.gguf\n")
    assert 'PARAMETER stop "<|end|>"' in text and 'PARAMETER stop "<|endoftext|>"' in text
    assert "<|{{ .Role }}|>\n{{ .Content }}<|end|>\n" in text and "<|assistant|>\n" in text
    again = run_export(str(trained_run), "--output", str(tmp_path / "other.gguf"), "--ollama")
    assert isinstance(again.exception, PhituneError) and "Modelfile exists" in str(again.exception)
    here = tmp_path / "here"  # the file written where the command runs: the line printed `cd . && ... NAME`
    here.mkdir()
    monkeypatch.chdir(here)
    result = run_export(str(trained_run), "--output", "mine.gguf", "--ollama")
    assert "run: ollama create mine -f Modelfile" in " ".join(result.output.split()), result.output


def test_gguf_lora_carries_the_peft_matrices_under_llama_cpp_names(trained_run, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    out = tmp_path / "adapter.gguf"
    assert run_export(str(trained_run), "--format", "gguf-lora", "--output", str(out)).exit_code == 0
    meta, weights = fields(out), tensors(out)
    config = json.loads((trained_run / "adapter_config.json").read_text())
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == config["lora_alpha"]
    peft = load_file(trained_run / "adapter_model.safetensors")
    assert len(weights) == len(peft)
    key = "base_model.model.model.layers.2.self_attn.qkv_proj.lora_{}.weight"
    np.testing.assert_array_equal(np.asarray(weights["blk.2.attn_qkv.weight.lora_a"].data), peft[key.format("A")])
    np.testing.assert_array_equal(np.asarray(weights["blk.2.attn_qkv.weight.lora_b"].data), peft[key.format("B")])


# vLLM's Phi-3 takes LoRA on its fused modules only (vllm#4715: q_proj/k_proj/v_proj adapters were rejected)
FUSED_PHI3_MODULES = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_adapters_of_both_backends_target_the_fused_modules_servers_load(trained_run, loralib_run):  # noqa: F811
    from safetensors.torch import load_file

    for run in (trained_run, loralib_run):
        keys = load_file(run / "adapter_model.safetensors")
        assert {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in keys} <= FUSED_PHI3_MODULES, run
    assert export_run(loralib_run, loralib_run.parent / "loralib.gguf", fmt="gguf-lora").path.is_file()


def test_gguf_lora_refuses_a_full_model(tmp_path):
    model = save_tiny_model(tmp_path / "full")
    with pytest.raises(PhituneError, match="needs a run with a LoRA adapter"):
        export_run(None, tmp_path / "a.gguf", fmt="gguf-lora", model=str(model))


def test_longrope_gqa_and_tied_embeddings_are_written(tmp_path):
    head_dim = 16
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
            "short_factor": [1.0 + i / 10 for i in range(head_dim // 2)],
            "long_factor": [2.0 + i / 5 for i in range(head_dim // 2)], "original_max_position_embeddings": 256}
    model = save_tiny_model(tmp_path / "long", kv_heads=2, tie_word_embeddings=True, rope_parameters=rope,
                            max_position_embeddings=1024, original_max_position_embeddings=256)
    out = export_run(None, tmp_path / "long.gguf", model=str(model)).path
    meta, weights = fields(out), tensors(out)
    assert meta["phi3.attention.head_count_kv"] == 2 and weights["blk.0.attn_qkv.weight"].shape.tolist() == [64, 128]
    assert "output.weight" not in weights  # tied: llama.cpp reuses token_embd
    assert meta["phi3.rope.scaling.original_context_length"] == 256 and meta["phi3.context_length"] == 1024
    np.testing.assert_allclose(weights["rope_factors_short.weight"].data, rope["short_factor"], rtol=1e-6)
    np.testing.assert_allclose(weights["rope_factors_long.weight"].data, rope["long_factor"], rtol=1e-6)
    assert meta["phi3.rope.scaling.attn_factor"] == pytest.approx((1 + np.log(4) / np.log(256)) ** 0.5)


# ---- slow: llama.cpp itself runs the files ---------------------------------------------------------------------


def llama(path: Path, **options):
    """A llama.cpp model (llama-cpp-python) that keeps the logits of every position."""
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(path), n_ctx=options.pop("n_ctx", 256), logits_all=True, verbose=False, seed=0,
                           n_threads=2, **options)


def llama_logits(path: Path, ids: list[int], **options) -> np.ndarray:
    model = llama(path, **options)
    try:
        model.eval(ids)
        return np.array(model.scores[:len(ids)])
    finally:
        model.close()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def llama_greedy(model, ids: list[int], stop: int, max_new: int) -> list[int]:
    """llama.cpp's greedy tokens after `ids`, up to and including `stop`."""
    out = []
    for token in model.generate(ids, top_k=1, temp=0.0, reset=True):
        out.append(token)
        if token == stop or len(out) == max_new:
            return out
    return out


def hf_greedy(model, tokenizer, ids: list[int], max_new: int) -> list[int]:
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=[end],
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, len(ids):].tolist()


@pytest.mark.slow
def test_llama_cpp_runs_the_f16_export_like_transformers_and_stops_at_end(trained_run, tmp_path):  # noqa: F811
    out = export_run(trained_run, tmp_path / "model.gguf").path
    model, tokenizer = merged_model(trained_run, tmp_path)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    ids = tokenizer(PROMPT).input_ids
    expected = hf_greedy(model, tokenizer, ids, 40)
    assert expected[-1] == end  # the fine-tuned model ends its answer, so there is a stop to check
    runtime = llama(out)
    try:
        assert runtime.tokenize(PROMPT.encode(), add_bos=True, special=True) == ids
        assert llama_greedy(runtime, ids, end, 40) == expected
        completion = runtime.create_completion(PROMPT, max_tokens=40, temperature=0.0, top_k=1)["choices"][0]
        assert completion["finish_reason"] == "stop"  # llama.cpp itself ended the turn at <|end|>
        assert completion["text"] == tokenizer.decode(expected[:-1])
    finally:
        runtime.close()
    answer = ids + expected[:-1]
    assert np.abs(llama_logits(out, answer) - hf_logits(model, answer)).max() < F16_ATOL


@pytest.mark.slow
def test_llama_cpp_runs_the_q8_0_export_close_to_transformers(trained_run, tmp_path):  # noqa: F811
    out = export_run(trained_run, tmp_path / "q8.gguf", quant="q8_0").path
    model, tokenizer = merged_model(trained_run, tmp_path)
    ids = tokenizer(PROMPT).input_ids
    runtime = llama(out)
    try:
        assert llama_greedy(runtime, ids, -1, 5) == hf_greedy(model, tokenizer, ids, 5)
    finally:
        runtime.close()
    assert np.abs(llama_logits(out, ids) - hf_logits(model, ids)).max() < Q8_ATOL


@pytest.mark.slow
def test_llama_cpp_quantises_q4_k_m_and_the_file_answers(trained_run, tmp_path):  # noqa: F811
    out = export_run(trained_run, tmp_path / "q4.gguf", quant="q4_k_m").path
    assert fields(out)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    model, tokenizer = merged_model(trained_run, tmp_path)
    ids = tokenizer(PROMPT).input_ids
    assert llama_logits(out, ids)[-1].argmax() == hf_logits(model, ids)[-1].argmax()


@pytest.mark.slow
def test_export_quant_prints_llama_cpps_log_only_with_debug(trained_run, tmp_path):  # noqa: F811
    """llama.cpp's quantiser logs its loader and every tensor (some 80 lines) through llama-cpp-python's log
    callback: `phitune export --quant` shows its own line alone, `phitune --debug export` the whole log."""
    import subprocess
    import sys

    pytest.importorskip("llama_cpp")
    said = {}
    for debug in ((), ("--debug",)):
        done = subprocess.run([sys.executable, "-m", "phitune.cli", *debug, "export", str(trained_run), "--output",
                               str(tmp_path / f"q4{len(debug)}.gguf"), "--quant", "q4_k_m"],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        said[bool(debug)] = done.stdout + done.stderr
    # what stays is llama.cpp's word on tensors it could not quantise as asked: the tiny model's 128-wide rows do not
    # fill q4_K's 256-wide blocks (Phi-3-mini's 3072 do); a person needs to know that, so it is not silenced
    own = [line for line in said[False].splitlines() if "falling back to" not in line
           and "required fallback quantization" not in line]
    assert "llama_model_loader" not in said[False] and len(own) <= 3, said[False][-3000:]
    assert "llama_model_loader" in said[True]


@pytest.mark.slow
def test_llama_cpp_applies_the_gguf_lora_like_the_merged_model(trained_run, tmp_path):  # noqa: F811
    from phitune.after.generate import resolve_model_source

    base = export_run(None, tmp_path / "base.gguf", model=resolve_model_source(trained_run)[0].name_or_path).path
    lora = export_run(trained_run, tmp_path / "lora.gguf", fmt="gguf-lora").path
    merged = export_run(trained_run, tmp_path / "merged.gguf").path
    ids = gguf_prompt_ids(merged)
    reference = llama_logits(merged, ids)
    assert np.abs(llama_logits(base, ids, lora_path=str(lora)) - reference).max() < F16_ATOL
    assert np.abs(llama_logits(base, ids) - reference).max() > 1.0  # the adapter matters


@pytest.mark.slow
def test_llama_cpp_applies_the_loralib_backend_adapter_like_the_merged_model(loralib_run, tiny_model_dir, tmp_path):
    """loralib's q+v slices become one rank-8 LoRA on qkv_proj next to o_proj's rank 4: one alpha in the file."""
    base = export_run(None, tmp_path / "base.gguf", model=str(tiny_model_dir)).path
    lora = export_run(loralib_run, tmp_path / "lora.gguf", fmt="gguf-lora").path
    merged = export_run(loralib_run, tmp_path / "merged.gguf").path
    ids = gguf_prompt_ids(merged)
    reference = llama_logits(merged, ids)
    assert np.abs(llama_logits(base, ids, lora_path=str(lora)) - reference).max() < F16_ATOL
    assert np.abs(llama_logits(base, ids) - reference).max() > 10 * F16_ATOL


def gguf_prompt_ids(path: Path) -> list[int]:
    runtime = llama(path)
    try:
        return runtime.tokenize(PROMPT.encode(), add_bos=True, special=True)
    finally:
        runtime.close()


@pytest.mark.slow
def test_llama_cpp_tokenizes_and_runs_a_sentencepiece_phi3_like_transformers(sentencepiece_run, tmp_path):
    out = export_run(sentencepiece_run, tmp_path / "sp.gguf").path
    model, tokenizer = merged_model(sentencepiece_run, tmp_path)
    lines = (TINY_BASE.parent / "corpus.txt").read_text(encoding="utf-8").splitlines()[:40]
    runtime = llama(out)
    try:
        for line in [*lines, "  two  spaces, tabs\tand ünïcode ✓"]:
            text = f"<|system|>\nBe brief.<|end|>\n<|user|>\n{line}<|end|>\n<|assistant|>\n"
            assert runtime.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text).input_ids, text
    finally:
        runtime.close()
    ids = tokenizer(PROMPT).input_ids
    assert np.abs(llama_logits(out, ids) - hf_logits(model, ids)).max() < F16_ATOL


@pytest.mark.slow
@pytest.mark.parametrize("n_ctx, length", [(128, 40), (512, 300)], ids=["short-factors", "long-factors"])
def test_llama_cpp_runs_longrope_gqa_tied_like_transformers(tmp_path, n_ctx, length):
    """LongRoPE uses its short factors up to original_max_position_embeddings (256 here), its long ones beyond."""
    from transformers import AutoModelForCausalLM

    head_dim = 16
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
            "short_factor": [1.0 + i / 10 for i in range(head_dim // 2)],
            "long_factor": [2.0 + i / 5 for i in range(head_dim // 2)], "original_max_position_embeddings": 256}
    path = save_tiny_model(tmp_path / "long", kv_heads=2, tie_word_embeddings=True, rope_parameters=rope,
                           max_position_embeddings=1024, original_max_position_embeddings=256)
    out = export_run(None, tmp_path / "long.gguf", model=str(path)).path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = [int(i) for i in torch.randint(7, 2048, (length,), generator=torch.Generator().manual_seed(0))]
    assert np.abs(llama_logits(out, ids, n_ctx=n_ctx) - hf_logits(model, ids)).max() < F16_ATOL
