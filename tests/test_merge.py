"""phitune merge: merged weights give the logits of base + adapter, and load with plain transformers."""

from __future__ import annotations

import pytest
import torch
from _fixtures_eval import trained_run  # noqa: F401  (fixture)
from typer.testing import CliRunner

from phitune.errors import PhituneError
from phitune.generate import load_for_inference, resolve_model_source
from phitune.merge import merge_adapter

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


def test_merge_refuses_a_non_empty_output(trained_run, tmp_path):  # noqa: F811
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(PhituneError, match="not empty"):
        merge_adapter(*resolve_model_source(trained_run), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
