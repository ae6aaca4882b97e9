"""What the torchrun tests share (tests/test_distributed.py, tests/test_distributed_resume.py): configs, launching
torchrun and the test's own instrumented `phitune` entry point, adapter comparisons, and the uninterrupted runs
(1 worker x batch 4 and 2 workers x batch 2, SFT and DPO) that both modules compare with.

The runs are built once per test session (conftest.shared_build), so the two modules share one build of each.
"""

from __future__ import annotations

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
from conftest import shared_build
from safetensors.torch import load_file

from phitune.run.checkpoints import CHECKPOINT_COMPLETE


TRAIN_LINE = re.compile(r"^step +\d+/\d+  loss ", re.M)  # phitune.run.console's line per logging step
EVAL_LINE = re.compile(r"^step +\d+/\d+  eval loss ", re.M)
SUMMARY_END = "adapter, tokenizer, metrics.json and loss.png are in"  # phitune.after.report's run summary, last line

DEMO_DATA = Path(__file__).parents[1] / "src" / "phitune" / "assets" / "demo_chat"
TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # measured: max |difference| 1.1e-7 on weights of size ~0.13


def write_config(directory: Path, model_dir: Path, batch_size: int, max_steps: int = 12, **data) -> Path:
    """The demo data with the default held-out eval set (data.eval_split 0.05), evaluated every 4 steps."""
    config = {
        "model": {"name_or_path": str(model_dir), "torch_dtype": "float32"},
        "data": {"train": str(DEMO_DATA / "train.jsonl"), "max_seq_length": 128, "max_train_examples": 64, **data},
        "training_config": {"output_dir": str(directory / "out"), "max_steps": max_steps, "learning_rate": 5e-3,
                            "per_device_train_batch_size": batch_size, "save_steps": 4, "save_total_limit": 10,
                            "eval_steps": 4, "logging_steps": 1, "seed": 0, "disable_tqdm": True},
        "peft_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"},
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return directory / "run.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(command: list[str], directory: Path, log: str = "", **env: str) -> subprocess.Popen:
    """Start `command` in its own process group (so a test can kill torchrun and its workers together), with the
    environment variables `env` added."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    with open(directory / f"stdout{log}", "w") as out, open(directory / f"stderr{log}", "w") as err:
        return subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=directory, start_new_session=True)


def torchrun_command() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def elastic_torchrun_command(max_restarts: int = 2) -> list[str]:
    """2 workers that torchrun restarts (up to `max_restarts` times) when one fails, with c10d rendezvous. Launch it
    with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: without it every attempt shares the first one's store, and in this
    test both restarts failed in gloo's connectFullMesh on the previous attempt's address (docs/scale-out.md)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
            "--max-restarts", str(max_restarts), "--monitor-interval", "0.1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]


def kill_all(proc: subprocess.Popen) -> None:
    """kill -9 `proc`, its process group and every process below it (torchrun starts each worker in a session of
    its own, which killpg misses), and reap `proc`: for a test's `finally`, so nothing outlives a failed test."""
    below = descendants(proc.pid) if proc.poll() is None else []
    for kill, target in ((os.killpg, proc.pid), *((os.kill, pid) for pid in below)):
        try:
            kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait(timeout=30)


def wait(proc: subprocess.Popen, directory: Path, log: str = "", code: int = 0, timeout: int = 300) -> None:
    assert proc.wait(timeout=timeout) == code, (directory / f"stderr{log}").read_text()[-3000:]


def assert_same_adapter(got_dir: Path, expected_dir: Path, **tolerance) -> None:
    expected = load_file(expected_dir / "adapter_model.safetensors")
    got = load_file(got_dir / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, **(tolerance or TOLERANCE), msg=name)


LAUNCHER = """
import os, sys
sys.path.insert(0, {tests!r})
import pytest, torch
from phitune.run.trainer import PhituneTrainer

rank, world = os.environ.get("RANK", "0"), int(os.environ.get("WORLD_SIZE", "1"))
patch = pytest.MonkeyPatch()
if {gradients!r}:  # each optimizer step's raw gradients (after the all-reduce), saved by rank 0
    from _equivalence import GradientRecorder

    recorder, init = GradientRecorder(), PhituneTrainer.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(recorder)

    patch.setattr(PhituneTrainer, "__init__", recording_init)
if {scale_by_world!r}:  # the deliberate break: the loss's gradient times the process count, its value unchanged
    compute_loss = PhituneTrainer.compute_loss

    def scaled(self, *args, **kwargs):
        loss = compute_loss(self, *args, **kwargs)
        return world * loss - (world - 1) * loss.detach()

    patch.setattr(PhituneTrainer, "compute_loss", scaled)
if {hold_at!r}:  # the run stops moving once this step is reached, so a kill -9 finds checkpoint-{hold_at} the last;
    import time  # only the ranks named, and never in workers that torchrun restarted (they must run on)

    from transformers import Trainer

    training_step = Trainer.training_step  # every method's trainer (SFT, DPO) runs it
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

    def held(self, *args, **kwargs):
        if self.state.global_step >= {hold_at!r} and first_attempt and rank in {hold_ranks!r}:
            time.sleep(3600)
        return training_step(self, *args, **kwargs)

    patch.setattr(Trainer, "training_step", held)
if {watch!r}:  # the steps this run trains and the optimizer state it starts from (tests/_resume.py)
    from _resume import watch_training

    runs = watch_training(patch)
sys.argv[0] = "phitune"
from phitune.cli import main

try:
    main()
finally:
    if {gradients!r} and rank == "0":
        torch.save(recorder.steps, "gradients.pt")
    if {watch!r}:
        torch.save(runs[-1] if runs else None, f"resume_watch_rank{{rank}}.pt")
"""


def launcher(directory: Path, gradients: bool = False, scale_by_world: bool = False, watch: bool = False,
             hold_at: int = 0, hold_ranks: tuple[str, ...] = ("0", "1")) -> Path:
    """A `phitune` entry point for the test's own processes, instrumented as asked (the breaks live here, in the
    test, never in phitune). `hold_at`: the ranks in `hold_ranks` wait before training that step, so that a kill -9
    lands after checkpoint-`hold_at` and before the next one however busy the machine (the tiny run's 12 steps take
    about a second: a polling test on a loaded machine saw checkpoint-12, not 4); workers restarted by torchrun
    (--max-restarts) are never held."""
    path = directory / f"phitune_launcher{'_held' if hold_at else ''}{'_watched' if watch else ''}.py"
    path.write_text(LAUNCHER.format(tests=str(Path(__file__).parent), gradients=gradients, scale_by_world=scale_by_world,
                                    watch=watch, hold_at=hold_at, hold_ranks=hold_ranks), encoding="utf-8")
    return path


def kill_after_checkpoint_4(config: Path, directory: Path) -> None:
    """Start `phitune train config` under torchrun, held after step 4 (see `launcher`), and kill -9 torchrun and both
    workers once checkpoint-4 is complete: an interrupted run whose last complete checkpoint is checkpoint-4."""
    first = launch([*torchrun_command(), str(launcher(directory, hold_at=4)), "train", str(config)], directory)
    marker = directory / "out" / "checkpoint-4" / CHECKPOINT_COMPLETE
    deadline = time.monotonic() + 240
    while not marker.is_file():
        assert first.poll() is None and time.monotonic() < deadline, (directory / "stderr").read_text()[-3000:]
        time.sleep(0.02)
    workers = descendants(first.pid)  # torchrun starts each worker in a session of its own: killpg misses them
    os.killpg(first.pid, signal.SIGKILL)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    first.wait(timeout=60)
    deadline = time.monotonic() + 30
    while [pid for pid in workers if _state(pid) != "Z"]:  # a held worker would otherwise sleep on for an hour
        assert time.monotonic() < deadline, "a torchrun worker survived kill -9"
        time.sleep(0.1)


def descendants(pid: int) -> list[int]:
    """The pids of every process below `pid`, read from Linux's /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _state(pid: int) -> str:
    """A process's state letter from /proc ("Z" also for one that is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def assert_resumed_under(directory: Path, checkpoint: Path, max_steps: int) -> None:
    """Every worker of the resumed run (launched with watch=True) trained only the steps after `checkpoint`, from
    the optimizer state it saved."""
    from _resume import assert_resumed

    watched = sorted(directory.glob("resume_watch_rank*.pt"))
    assert watched, "the resumed run left no record"
    for path in watched:
        assert_resumed(torch.load(path, weights_only=False), checkpoint, max_steps)


def uninterrupted_sft_runs(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """The same 12 steps with the default eval set, once as 1 worker x batch 4 and once as 2 workers x batch 2."""
    return shared_build(tmp_path_factory, "distributed-sft", lambda tmp_path: train_sft_pair(tiny_model_dir, tmp_path))


def train_sft_pair(tiny_model_dir: Path, tmp_path: Path) -> None:
    single_config = write_config(tmp_path / "single", tiny_model_dir, batch_size=4)
    multi_config = write_config(tmp_path / "multi", tiny_model_dir, batch_size=2)
    single = launch([sys.executable, "-m", "phitune.cli", "train", str(single_config)], tmp_path / "single")
    multi = launch([*torchrun_command(), "-m", "phitune.cli", "train", str(multi_config)], tmp_path / "multi")
    wait(multi, tmp_path / "multi")
    wait(single, tmp_path / "single")


def write_dpo_config(directory: Path, model_dir: Path, batch_size: int, method: str = "dpo") -> Path:
    """DPO (or another pair method) with a held-out eval set evaluated every 4 steps (so the first evaluation comes
    before any training step), 8 steps, a checkpoint every 4; DPO's reference model is the policy with the adapter
    disabled."""
    from conftest import write_jsonl
    from test_preference import make_pairs

    directory.mkdir(parents=True, exist_ok=True)
    train = write_jsonl(directory / "train.jsonl", make_pairs(0, 64))
    evals = write_jsonl(directory / "eval.jsonl", make_pairs(1, 16))
    config = {
        "method": method,
        "model": {"name_or_path": str(model_dir), "torch_dtype": "float32"},
        "data": {"train": str(train), "eval": str(evals), "max_seq_length": 64},
        "training_config": {"output_dir": str(directory / "out"), "max_steps": 8, "learning_rate": 1e-2,
                            "per_device_train_batch_size": batch_size, "per_device_eval_batch_size": batch_size,
                            "save_steps": 4, "eval_strategy": "steps", "eval_steps": 4, "logging_steps": 1, "seed": 0,
                            "disable_tqdm": True},
        "peft_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
    }
    (directory / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return directory / "run.yaml"


def relative_difference(got_dir: Path, expected_dir: Path) -> float:
    """Relative Frobenius norm of the difference of two adapters (all tensors together)."""
    expected = load_file(expected_dir / "adapter_model.safetensors")
    got = load_file(got_dir / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    difference = sum(float(((got[k] - expected[k]) ** 2).sum()) for k in expected) ** 0.5
    return difference / sum(float((expected[k] ** 2).sum()) for k in expected) ** 0.5


# Measured: 7.5e-6 between 2 workers x 2 and 1 worker x 4 (DPO's sigmoid of log-ratio differences at learning rate
# 1e-2 amplifies the reduction-order differences more than SFT does). With a `trainer.evaluate()` put back before
# training (the SFT bug), the workers trained without gradient sync and ended 39% apart.
DPO_TOLERANCE = 1e-4


def uninterrupted_dpo_runs(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """8 DPO steps with an eval set, once as 1 worker x batch 4 and once as 2 workers x batch 2."""
    return shared_build(tmp_path_factory, "distributed-dpo", lambda tmp_path: train_dpo_pair(tiny_model_dir, tmp_path))


def train_dpo_pair(tiny_model_dir: Path, tmp_path: Path, method: str = "dpo") -> None:
    single = launch([sys.executable, "-m", "phitune.cli", "train",
                     str(write_dpo_config(tmp_path / "single", tiny_model_dir, 4, method))], tmp_path / "single")
    multi = launch([*torchrun_command(), "-m", "phitune.cli", "train",
                    str(write_dpo_config(tmp_path / "multi", tiny_model_dir, 2, method))], tmp_path / "multi")
    wait(multi, tmp_path / "multi")
    wait(single, tmp_path / "single")
