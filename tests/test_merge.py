"""phitune merge: merged weights give the logits of base + adapter, and load with plain transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _fixtures_eval import trained_run  # noqa: F401  (fixture)
from typer.testing import CliRunner

from phitune.after.generate import load_for_inference, resolve_model_source
from phitune.after.merge import merge_adapter
from phitune.errors import PhituneError

# float32: W0 x + (alpha/r) B A x and (W0 + (alpha/r) B A) x differ only by rounding, which four layers carry to
# logits of size ~10 as differences of ~1e-5; an unmerged or wrongly scaled adapter differs by > 1e-2.
ATOL, RTOL = 1e-4, 1e-5


def _logits(model, tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(model.device)
    with torch.no_grad():
        return model(input_ids=ids).logits.cpu()


def test_merged_model_matches_adapter_and_loads_with_plain_transformers(trained_run, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phitune.cli import app

    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", str(trained_run), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert list(out.glob("*.safetensors")) and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids("<|end|>") in merged.generation_config.eos_token_id
    assert not any("lora" in name for name, _ in merged.named_parameters())
    adapted, _ = load_for_inference(*resolve_model_source(trained_run))
    text = "<|user|>\nWhat is the capital of France?<|end|>\n<|assistant|>\n"
    expected, actual = _logits(adapted, tokenizer, text), _logits(merged, tokenizer, text)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)
    base, _ = load_for_inference(resolve_model_source(trained_run)[0])
    assert (_logits(base, tokenizer, text) - expected).abs().max() > 1e-2  # the adapter did change something


def test_merge_into_the_empty_current_directory(trained_run, tmp_path, monkeypatch):  # noqa: F811
    """`--output .` names no folder (Path(".").name is empty): the merge must still work beside it, and fill the
    folder in place, so the working directory (a user's shell's) is not left a deleted folder."""
    from phitune.cli import app

    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    result = CliRunner().invoke(app, ["merge", str(trained_run), "--output", "."])
    assert result.exit_code == 0, result.output
    assert list(here.glob("*.safetensors")) and (here / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]  # no work folder left beside it
    assert sorted(p.name for p in Path.cwd().iterdir()) == sorted(p.name for p in here.iterdir())


def test_merge_refuses_a_non_empty_output(trained_run, tmp_path):  # noqa: F811
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(PhituneError, match="not empty"):
        merge_adapter(*resolve_model_source(trained_run), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.fixture(scope="module")
def bf16_base_with_sentencepiece(tmp_path_factory):
    """The bundled tiny base stored in bf16, plus the extra tokenizer files a real Phi-3 base carries
    (a sentencepiece tokenizer.model and added_tokens.json), which llama.cpp's converter reads."""
    import io
    import json

    import sentencepiece
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phitune.tiny.phi3 import demo_texts, tiny_base_path

    out = tmp_path_factory.mktemp("bf16-base")
    AutoModelForCausalLM.from_pretrained(tiny_base_path(), dtype=torch.bfloat16).save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_path())
    tokenizer.save_pretrained(out)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(demo_texts()), model_writer=model, vocab_size=300)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    added = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|end|>", "<|user|>", "<|assistant|>")}
    (out / "added_tokens.json").write_text(json.dumps(added), encoding="utf-8")
    return out


def _safetensors_bytes(directory) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


@pytest.mark.parametrize("dtype, expected, size_ratio", [("auto", torch.bfloat16, 1), ("float32", torch.float32, 2)])
def test_merge_keeps_the_base_dtype_unless_told(trained_run, bf16_base_with_sentencepiece, tmp_path,  # noqa: F811
                                                 dtype, expected, size_ratio):
    """A bf16 base merges to bf16 (the run's adapter trained in float32 changes nothing), the size a bf16 model has;
    --dtype float32 doubles it; the message says which; every tokenizer file of the base is in the merged model."""
    from transformers import AutoModelForCausalLM

    from phitune.cli import app

    base, out = bf16_base_with_sentencepiece, tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", "--adapter", str(trained_run), "--model", str(base),
                                      "--output", str(out), "--dtype", dtype])
    assert result.exit_code == 0, result.output
    assert f"{expected}".replace("torch.", "") in result.output and " GB" in result.output
    merged = AutoModelForCausalLM.from_pretrained(out)  # transformers 5 loads in the stored dtype
    assert {p.dtype for p in merged.parameters()} == {expected}
    assert _safetensors_bytes(out) == pytest.approx(size_ratio * _safetensors_bytes(base), rel=0.01)
    for name in ("tokenizer.model", "added_tokens.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()


def test_merge_refuses_an_unknown_dtype(trained_run, tmp_path):  # noqa: F811
    with pytest.raises(PhituneError, match="--dtype must be one of"):
        merge_adapter(*resolve_model_source(trained_run), tmp_path / "merged", dtype="int8")


def test_a_full_disk_names_what_was_asked_for_and_leaves_nothing(trained_run, tmp_path, capsys):  # noqa: F811
    """A real 2 MiB tmpfs, too small for the tiny model (5.7 MB in float32): `phitune merge --output` and `phitune
    export --output` into it each stop with one line naming the path the user gave and "No space left on device",
    exit 2, and leave the disk as they found it. Export merges in a scratch folder beside its output; its line named
    that folder, which no longer existed. Needs root (mount); skipped without."""
    import os
    import subprocess

    from phitune.cli import main

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)]).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        for command, output in (("merge", disk / "merged"), ("export", disk / "model.gguf")):
            with pytest.raises(SystemExit) as stop:
                main([command, str(trained_run), "--output", str(output)])
            err = capsys.readouterr().err
            assert stop.value.code == 2 and "Traceback" not in err, err[-2000:]
            assert err.strip().splitlines()[-1].startswith(f"error: could not write {output}: No space left on "
                                                           "device; "), err
            assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", "--lazy", str(disk)])
