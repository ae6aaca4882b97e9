"""Shared fixtures: one tiny random Phi-3 per session, small chat data, and a config builder."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pyproject's addopts start pytest-xdist workers: each gets its share of the cores (at most 2 threads, as before),
# and the phitune processes a test starts inherit the same share through OMP_NUM_THREADS; set with one worker too,
# so a test's thread count never follows the machine's load (phitune.speed.threads; its own test unsets it).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 2) // WORKERS))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
torch.set_num_threads(THREADS)

DEMO_DATA = Path(__file__).parents[1] / "src" / "phitune" / "assets" / "demo_chat"
CHECKOUT = Path(__file__).parents[1]


def extra_line(extra: str) -> str:
    """The pip line a missing extra's error gives when phitune runs from this checkout (the README's, made absolute)."""
    return f"pip install -c {CHECKOUT}/requirements/ci-constraints.txt -e '{CHECKOUT}[{extra}]'"

# The files that take longest, longest first (from --durations=0 of the suite; the rest keep their order after them).
# pytest-xdist's loadfile hands files to the two workers in collection order, so a long file handed out last would
# leave the other worker idle at the end. test_benchmarks builds the demo's run that test_promises and test_demo use
# after it, while the other worker runs the notebook.
LONGEST_FIRST = ["test_benchmarks.py", "test_notebook.py", "test_kto.py", "test_reward.py", "test_distill.py",
                 "test_families.py",
                 "test_errors.py", "test_grpo_tiny.py", "test_modeling_dtype.py", "test_safety.py", "test_console.py",
                 "test_promises.py", "test_preference.py", "test_speed.py", "test_data_prepare.py",
                 "test_data_text.py", "test_train.py", "test_speech.py", "test_vision_data.py", "test_grpo.py"]


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order is kept


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Phi-3 (hidden 64) with the real Phi-3 tokenizer and its 32,064 embedding rows,
    built once per test session: masks, evaluation, generation, merge, export and DPO see the real vocabulary."""
    from phitune.tiny.phi3 import build_tiny_model

    return shared_build(tmp_path_factory, "tiny-phi3", lambda folder: build_tiny_model(
        folder, seed=0, real_tokenizer=True, hidden=64, layers=2))


@pytest.fixture(scope="session")
def phi3_tokenizer_dir(tmp_path_factory) -> Path:
    """The bundled Phi-3 tokenizer files next to a Phi-3 config.json, as in the hub repository: transformers then
    loads tokenizer.json as it is (without config.json it builds a LlamaTokenizer that tokenizes differently)."""
    from transformers import Phi3Config

    from phitune.tiny.phi3 import PHI3_TOKENIZER, PHI3_VOCAB_SIZE

    folder = tmp_path_factory.mktemp("phi3-tokenizer")
    shutil.copytree(PHI3_TOKENIZER, folder, dirs_exist_ok=True)
    Phi3Config(vocab_size=PHI3_VOCAB_SIZE).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def demo_data() -> Path:
    return DEMO_DATA


def shared_build(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """A folder that `build(folder)` fills once per test session, also under pytest-xdist: the first worker that asks
    builds it into the session's shared temp folder under a file lock; the others wait for it and reuse it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-of-USER/pytest-N: the session's folder, above each worker's own
    folder, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with FileLock(f"{folder}.lock"):
        if not done.is_file():  # never built, or a build that failed in another worker: start clean
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def make_config(tiny_model_dir, tmp_path):
    """Build a RunConfig for a short CPU run on the tiny model; keyword sections update the defaults."""
    from phitune.config.schema import config_from_dict

    def make(**sections):
        raw = {
            "model": {"name_or_path": str(tiny_model_dir), "torch_dtype": "float32"},
            "data": {"train": str(DEMO_DATA / "train.jsonl"), "eval": str(DEMO_DATA / "eval.jsonl"),
                     "max_seq_length": 128, "max_train_examples": 64, "max_eval_examples": 16},
            "training_config": {"output_dir": str(tmp_path / "run"), "max_steps": 8, "learning_rate": 2e-2,
                                "per_device_train_batch_size": 8, "logging_steps": 2, "save_steps": 4,
                                "eval_steps": 4, "seed": 0, "disable_tqdm": True},
            "peft_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
        }
        for name, values in sections.items():
            if values is None or name not in raw or raw[name] is None:
                raw[name] = values
            else:
                raw[name].update(values)
        return config_from_dict(raw)

    return make


@pytest.fixture(scope="session")
def one_and_two_workers(tiny_model_dir, tmp_path_factory):
    """The torchrun tests' SFT pair: the same 12 steps with the default eval set, as 1 worker x batch 4 and as 2
    workers x batch 2 (tests/_distributed.py)."""
    from _distributed import uninterrupted_sft_runs

    return uninterrupted_sft_runs(tiny_model_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def dpo_one_and_two_workers(tiny_model_dir, tmp_path_factory):
    """The torchrun tests' DPO pair: 8 steps with an eval set, as 1 worker x batch 4 and as 2 workers x batch 2."""
    from _distributed import uninterrupted_dpo_runs

    return uninterrupted_dpo_runs(tiny_model_dir, tmp_path_factory)
