"""Fixtures shared by the eval / generate / merge / hub tests: one short LoRA run on the bundled tiny Phi-3.

Kept out of conftest.py (owned by another part of the suite); each test module imports the fixtures it needs.
The builds are cached per process in _CACHE, so modules that import the same fixture share one build.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phitune.tiny.phi3 import DEMO_DATA, tiny_base_path

_CACHE: dict[str, Path] = {}

TRAIN_STEPS = 30  # enough for the LoRA run to beat the base on loss and ROUGE-L; about 15 s on 2 free cores


def run_config(base: Path, output_dir: Path, **training) -> dict:
    """A demo-like LoRA run on the bundled chat data, short enough for a test."""
    return {
        "model": {"name_or_path": str(base), "torch_dtype": "float32"},
        "data": {"train": str(DEMO_DATA / "train.jsonl"), "eval": str(DEMO_DATA / "eval.jsonl"),
                 "max_seq_length": 128, "max_eval_examples": 40},
        "training_config": {"output_dir": str(output_dir), "max_steps": TRAIN_STEPS, "learning_rate": 3e-3,
                            "per_device_train_batch_size": 12, "per_device_eval_batch_size": 40,
                            "logging_steps": 10, "save_strategy": "no", "eval_strategy": "no", "seed": 0,
                            "report_to": "none", **training},
        "peft_config": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
    }


def trained_run_dir(tmp_path_factory) -> Path:
    """A finished LoRA run on the bundled (pretrained) tiny Phi-3: adapter, tokenizer, config, metrics.json."""
    if "run" not in _CACHE:
        from phitune.config.schema import config_from_dict
        from phitune.train import run_training

        output_dir = tmp_path_factory.mktemp("run")
        run_training(config_from_dict(run_config(tiny_base_path(), output_dir)), overwrite=True)
        _CACHE["run"] = output_dir
    return _CACHE["run"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    return trained_run_dir(tmp_path_factory)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path
