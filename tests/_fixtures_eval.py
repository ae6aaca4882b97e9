"""Trained runs shared by the test modules: one short LoRA run on the bundled tiny Phi-3 (the eval / generate /
merge / hub tests) and the demo's own run (the demo and benchmark tests).

Kept out of conftest.py; each test module imports the fixtures it needs. Each run is built once per test session,
also under pytest-xdist (conftest.shared_build).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import shared_build

from phitune.tiny.phi3 import DEMO_DATA, tiny_base_path

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
    from phitune.config.schema import config_from_dict
    from phitune.train import run_training

    return shared_build(tmp_path_factory, "run", lambda output_dir: run_training(
        config_from_dict(run_config(tiny_base_path(), output_dir)), overwrite=True))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    return trained_run_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """The run `phitune demo` trains (its config and data, 270 steps): it answers several held-out questions
    exactly ("A cow says moo."), where the 30-step run of `trained_run` answers none."""
    from phitune.config.schema import load_config
    from phitune.demo import DEMO_CONFIG, demo_overrides
    from phitune.train import run_training

    return shared_build(tmp_path_factory, "demo",
                      lambda output_dir: run_training(load_config(DEMO_CONFIG, demo_overrides(output_dir))))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path
