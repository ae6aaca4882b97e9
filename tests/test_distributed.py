"""Beyond one process: `phitune train` under torchrun with two CPU workers (gloo) equals one worker with the same
global batch, and only the main process writes files.

`accelerate launch --cpu --num_processes 2` starts a single process on a 2-core machine, so the test uses torchrun,
which starts both. 2 workers x batch 2 sees the same 4 rows per step as 1 worker x batch 4 (the sampler shards one
shuffled order), so the adapters differ only by the order of float reductions in the gradient all-reduce.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from phitune.train_support import CHECKPOINT_COMPLETE

DEMO_DATA = Path(__file__).parents[1] / "src" / "phitune" / "assets" / "demo_chat"
TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # measured: max |difference| 1.1e-7 on weights of size ~0.13


def write_config(directory: Path, model_dir: Path, batch_size: int, max_steps: int = 12) -> Path:
    config = {
        "model": {"name_or_path": str(model_dir), "torch_dtype": "float32"},
        "data": {"train": str(DEMO_DATA / "train.jsonl"), "eval_split": 0, "max_seq_length": 128,
                 "max_train_examples": 64},
        "training_config": {"output_dir": str(directory / "out"), "max_steps": max_steps, "learning_rate": 5e-3,
                            "per_device_train_batch_size": batch_size, "save_steps": 4, "save_total_limit": 10,
                            "logging_steps": 1, "seed": 0, "disable_tqdm": True},
        "peft_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"},
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return directory / "run.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(command: list[str], directory: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(directory / "stdout", "w") as out, open(directory / "stderr", "w") as err:
        return subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=directory)


def listing(out: Path) -> dict[str, list[str]]:
    """File names in the output directory and in each checkpoint."""
    return {str(p.relative_to(out)): sorted(c.name for c in p.iterdir()) for p in [out, *out.glob("checkpoint-*")]}


def torchrun_command() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def test_two_cpu_workers_equal_one_with_the_same_global_batch(tiny_model_dir, tmp_path):
    single_config = write_config(tmp_path / "single", tiny_model_dir, batch_size=4)
    multi_config = write_config(tmp_path / "multi", tiny_model_dir, batch_size=2)
    single = launch([sys.executable, "-m", "phitune.cli", "train", str(single_config)], tmp_path / "single")
    multi = launch([*torchrun_command(), "-m", "phitune.cli", "train", str(multi_config)], tmp_path / "multi")
    for proc, name in ((multi, "multi"), (single, "single")):
        assert proc.wait(timeout=300) == 0, (tmp_path / name / "stderr").read_text()[-3000:]

    single_out, multi_out = tmp_path / "single" / "out", tmp_path / "multi" / "out"
    expected = load_file(single_out / "adapter_model.safetensors")
    got = load_file(multi_out / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, **TOLERANCE, msg=name)

    # One writer: the same files as the single-process run (each worker keeps its own RNG state, by design),
    # every checkpoint complete, logs printed once.
    expected_files = listing(single_out)
    for name, files in expected_files.items():
        if "rng_state.pth" in files:
            expected_files[name] = sorted({*files, "rng_state_0.pth", "rng_state_1.pth"} - {"rng_state.pth"})
    assert listing(multi_out) == expected_files
    for checkpoint in multi_out.glob("checkpoint-*"):
        assert (checkpoint / CHECKPOINT_COMPLETE).is_file()
        assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == int(checkpoint.name[11:])
    single_metrics, multi_metrics = (json.loads((o / "metrics.json").read_text()) for o in (single_out, multi_out))
    assert multi_metrics["global_step"] == 12
    assert multi_metrics["train_tokens"] == single_metrics["train_tokens"]  # both workers' tokens, counted once
    assert abs(multi_metrics["train_loss"] - single_metrics["train_loss"]) < 1e-5
    assert (tmp_path / "multi" / "stdout").read_text().count("'loss':") == 12
    assert yaml.safe_load((multi_out / "phitune_config.yaml").read_text())["training_config"]["output_dir"]


def test_shipped_accelerate_configs_load():
    """Each file in examples/accelerate parses with accelerate's own loader and opens with its launch command."""
    from accelerate.commands.config.config_args import load_config_from_file

    folder = Path(__file__).parents[1] / "examples" / "accelerate"
    kinds = {}
    for path in sorted(folder.glob("*.yaml")):
        config = load_config_from_file(str(path))
        kinds[path.stem] = str(config.distributed_type)
        launch_line = f"accelerate launch --config_file examples/accelerate/{path.name} -m phitune.cli train"
        assert launch_line in path.read_text()
    assert kinds == {"ddp": "DistributedType.MULTI_GPU", "deepspeed_zero3": "DistributedType.DEEPSPEED",
                     "fsdp": "DistributedType.FSDP"}


def test_sigterm_stops_every_worker_at_the_same_step(tiny_model_dir, tmp_path):
    """torchrun forwards SIGTERM to each worker; they agree on the step, so one complete checkpoint is saved."""
    config = write_config(tmp_path, tiny_model_dir, batch_size=2, max_steps=500)
    proc = launch([*torchrun_command(), "-m", "phitune.cli", "train", str(config)], tmp_path)
    deadline = time.monotonic() + 180
    while "'loss'" not in (tmp_path / "stdout").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr").read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)  # torchrun itself exits 1 after forwarding the signal; the workers' messages matter
    steps = re.findall(r"error: stopped by SIGTERM at step (\d+);", (tmp_path / "stderr").read_text())
    assert len(steps) == 1, steps  # said once, by rank 0; both ranks' RNG states below show both saved that step
    checkpoint = tmp_path / "out" / f"checkpoint-{steps[0]}"
    assert (checkpoint / CHECKPOINT_COMPLETE).is_file()
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
