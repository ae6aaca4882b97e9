"""Safe defaults: no remote code unless asked, safetensors only, no secret printed or written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from phitune.config.schema import ModelConfig, config_from_dict

PACKAGE = Path(__file__).parents[1] / "src" / "phitune"
DEMO_DATA = PACKAGE / "assets" / "demo_chat"
FAKE_TOKEN = "hf_FAKEfakeFAKEfake0123456789secret"


@pytest.fixture
def spy_from_pretrained(monkeypatch):
    """Record the keyword arguments of AutoTokenizer / AutoModelForCausalLM.from_pretrained, then load as usual."""
    import transformers

    calls = {}
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained

        def spy(*args, _original=original, _name=cls.__name__, **kwargs):
            calls[_name] = kwargs
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return calls


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_only_when_the_config_says_so(tiny_model_dir, spy_from_pretrained, trust):
    from phitune.models.loading import load_base_model, load_tokenizer

    cfg = ModelConfig(name_or_path=str(tiny_model_dir), torch_dtype="float32", trust_remote_code=trust)
    load_tokenizer(cfg)
    load_base_model(cfg)
    assert spy_from_pretrained["AutoTokenizer"]["trust_remote_code"] is trust
    assert spy_from_pretrained["AutoModelForCausalLM"]["trust_remote_code"] is trust
    assert spy_from_pretrained["AutoModelForCausalLM"]["use_safetensors"] is True


def test_trust_remote_code_defaults_off():
    assert ModelConfig().trust_remote_code is False
    assert config_from_dict({"data": {"train": "x.jsonl"}}).model.trust_remote_code is False


def package_sources() -> dict[Path, str]:
    return {path: path.read_text(encoding="utf-8") for path in PACKAGE.rglob("*.py")}


def test_no_unsafe_loading_in_the_package():
    """Pickle loads run code: every torch.load passes weights_only=True; no call hard-codes trust_remote_code."""
    for path, text in package_sources().items():
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in match.group(1), f"{path}: {match.group(0)}"
        assert "trust_remote_code=True" not in text, path
        assert "use_safetensors=False" not in text, path


def test_secrets_are_stripped_from_saved_configs():
    cfg = config_from_dict({"data": {"train": "x.jsonl"},
                            "training_config": {"hub_token": FAKE_TOKEN, "learning_rate": 1e-4}})
    saved = cfg.to_dict()
    assert "hub_token" not in saved["training_config"]
    assert saved["training_config"]["learning_rate"] == 1e-4
    assert FAKE_TOKEN not in yaml.safe_dump(saved)


def test_a_run_never_prints_or_writes_the_token(tiny_model_dir, tmp_path):
    """A real run with training_config.hub_token set: the token is nowhere in the output or in any written file."""
    config = {
        "model": {"name_or_path": str(tiny_model_dir), "torch_dtype": "float32"},
        "data": {"train": str(DEMO_DATA / "train.jsonl"), "eval_split": 0, "max_seq_length": 64,
                 "max_train_examples": 8},
        "training_config": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "save_steps": 1, "logging_steps": 1,
                            "per_device_train_batch_size": 4, "hub_token": FAKE_TOKEN},
        "peft_config": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-m", "phitune.cli", "train", str(tmp_path / "run.yaml")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert FAKE_TOKEN not in result.stdout + result.stderr
    out = tmp_path / "out"
    written = [p for p in out.rglob("*") if p.is_file()]
    assert (out / "phitune_config.yaml") in written and (out / "checkpoint-2" / "training_args.bin") in written
    for path in written:
        assert FAKE_TOKEN.encode() not in path.read_bytes(), path
    # Adapters are written as safetensors, never as pickles.
    assert (out / "adapter_model.safetensors").is_file()
    assert not list(out.rglob("*.bin")) or all(p.name == "training_args.bin" for p in out.rglob("*.bin"))
