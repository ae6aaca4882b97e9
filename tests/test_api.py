"""phitune.api: configs from a dict or a file, errors as PhituneError (the pipeline itself: tests/test_notebook.py)."""

from __future__ import annotations

import pytest

from phitune import api
from phitune.demo import DEMO_CONFIG


def test_a_dict_config_takes_overrides_without_changing_the_callers_dict():
    raw = {"data": {"train": "train.jsonl"}, "training_config": {"max_steps": 5}}
    cfg = api.load_run(raw, ["training_config.max_steps=7", "data.max_seq_length=128"])
    assert cfg.training_config["max_steps"] == 7 and cfg.data.max_seq_length == 128
    assert raw == {"data": {"train": "train.jsonl"}, "training_config": {"max_steps": 5}}


def test_a_yaml_path_loads_like_the_cli():
    assert api.load_run(DEMO_CONFIG, ["training_config.max_steps=3"]).training_config["max_steps"] == 3


def test_config_problems_raise_phitune_error_listing_all_of_them():
    with pytest.raises(api.PhituneError) as err:
        api.train({"modle": {}, "data": {"max_seq_lenght": 4}})
    assert "modle" in str(err.value) and "max_seq_lenght" in str(err.value)


def test_missing_runs_and_bad_sampling_settings_raise_phitune_error(tmp_path):
    with pytest.raises(api.PhituneError):
        api.merge(tmp_path / "no-run", tmp_path / "merged")
    with pytest.raises(api.PhituneError, match="sampling"):
        api._settings({"temprature": 0.5})


def test_the_api_hides_only_peft_s_call_of_a_renamed_transformers_property():
    """PEFT asks every model for `is_gradient_checkpointing`, which transformers 5 deprecates: once phitune.api is
    imported, that FutureWarning is gone from a notebook's output, and every other warning still shows. Checked in
    a fresh interpreter, whose warning filters are Python's own."""
    import subprocess
    import sys

    code = """
import warnings
import phitune.api
from transformers import AutoModelForCausalLM
from phitune.tiny.phi3 import tiny_base_path
model = AutoModelForCausalLM.from_pretrained(tiny_base_path())
model.is_gradient_checkpointing
warnings.warn("a user's own warning", FutureWarning)
"""
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "is_gradient_checkpointing" not in done.stderr and "a user's own warning" in done.stderr
