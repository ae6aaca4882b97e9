"""Killed and resumed under torchrun: a 2-worker run killed with kill -9 after its first complete checkpoint and
resumed with --resume (under torchrun, or by 1 process with the same global batch) trains only the remaining steps
and ends at the uninterrupted 1-worker adapter, SFT and DPO; a resume with another global batch is refused.
The uninterrupted runs it compares with are tests/_distributed.py's, shared with tests/test_distributed.py.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml
from _distributed import (
    DPO_TOLERANCE,
    SUMMARY_END,
    TRAIN_LINE,
    assert_resumed_under,
    assert_same_adapter,
    descendants,
    elastic_torchrun_command,
    kill_after_checkpoint_4,
    kill_all,
    launch,
    launcher,
    relative_difference,
    torchrun_command,
    wait,
    write_config,
    write_dpo_config,
)

from phitune.run.checkpoints import CHECKPOINT_COMPLETE, latest_complete_checkpoint

pytestmark = pytest.mark.processes  # torchrun jobs and runs killed and resumed: pyproject.toml's marker


def test_two_workers_killed_and_resumed_end_at_the_one_worker_adapter(one_and_two_workers, tiny_model_dir, tmp_path):
    """kill -9 of torchrun and both workers after the first complete checkpoint, then --resume under torchrun: the
    resumed workers train only the remaining steps, from the checkpoint's optimizer state (a restart, deterministic,
    would end at the same adapter: see test_train's break test), and end at the one-worker adapter."""
    config = write_config(tmp_path, tiny_model_dir, batch_size=2)
    kill_after_checkpoint_4(config, tmp_path)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()  # it really died mid-run

    checkpoint = latest_complete_checkpoint(tmp_path / "out")
    assert checkpoint.name == "checkpoint-4"
    resumed = launch([*torchrun_command(), str(launcher(tmp_path, watch=True)), "train", str(config), "--resume"],
                     tmp_path, ".2")
    wait(resumed, tmp_path, ".2")
    assert len(TRAIN_LINE.findall((tmp_path / "stdout.2").read_text())) == 12 - 4  # logged once, by rank 0
    assert " ".join((tmp_path / "stdout.2").read_text().split()).count(SUMMARY_END) == 1  # summed up once too
    assert_resumed_under(tmp_path, checkpoint, max_steps=12)  # each worker: steps 5..12, from its optimizer state
    assert_same_adapter(tmp_path / "out", one_and_two_workers / "single" / "out")


def test_a_two_worker_checkpoint_resumes_in_one_process_with_the_same_global_batch(one_and_two_workers, tmp_path):
    """2 workers x batch 2 stopped at step 4, resumed by 1 process x batch 4: the same rows per step, so the same
    adapter as the uninterrupted run (LoRA dropout 0, so no random stream is involved)."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(one_and_two_workers / "multi" / "out" / "checkpoint-4", out / "checkpoint-4")
    config = yaml.safe_load((one_and_two_workers / "single" / "run.yaml").read_text())
    config["training_config"]["output_dir"] = str(out)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    proc = launch([sys.executable, str(launcher(tmp_path, watch=True)), "train", str(tmp_path / "run.yaml"),
                   "--resume"], tmp_path)
    wait(proc, tmp_path)
    said = " ".join((tmp_path / "stderr").read_text().split()) + " ".join((tmp_path / "stdout").read_text().split())
    assert "resuming a 2-process checkpoint with 1 process:" in said
    assert len(TRAIN_LINE.findall((tmp_path / "stdout").read_text())) == 12 - 4
    assert_resumed_under(tmp_path, out / "checkpoint-4", max_steps=12)
    assert_same_adapter(out, one_and_two_workers / "single" / "out")


def test_resuming_with_another_global_batch_is_refused(one_and_two_workers, tmp_path):
    """A 2 x 2 checkpoint resumed by 1 process with batch 2 would silently halve the batch: one line instead."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(one_and_two_workers / "multi" / "out" / "checkpoint-4", out / "checkpoint-4")
    config = yaml.safe_load((one_and_two_workers / "multi" / "run.yaml").read_text())
    config["training_config"]["output_dir"] = str(out)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    proc = launch([sys.executable, "-m", "phitune.cli", "train", str(tmp_path / "run.yaml"), "--resume"], tmp_path)
    wait(proc, tmp_path, code=2)
    message = (tmp_path / "stderr").read_text().strip().splitlines()[-1]
    assert message == ("error: checkpoint-4 was written with a global batch of 4 (2 processes x 2 per device x 1 "
                       "accumulation steps); this run's is 2 (1 process x 2 per device x 1 accumulation steps). "
                       "Resume with the same global batch (processes x per_device_train_batch_size x "
                       "gradient_accumulation_steps)")



def test_two_dpo_workers_killed_and_resumed_end_at_the_one_worker_adapter(dpo_one_and_two_workers, tiny_model_dir,
                                                                          tmp_path):
    config = write_dpo_config(tmp_path, tiny_model_dir, batch_size=2)
    kill_after_checkpoint_4(config, tmp_path)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()

    checkpoint = latest_complete_checkpoint(tmp_path / "out")
    assert checkpoint.name == "checkpoint-4"
    resumed = launch([*torchrun_command(), str(launcher(tmp_path, watch=True)), "train", str(config), "--resume"],
                     tmp_path, ".2")
    wait(resumed, tmp_path, ".2")
    assert len(TRAIN_LINE.findall((tmp_path / "stdout.2").read_text())) == 8 - 4
    assert_resumed_under(tmp_path, checkpoint, max_steps=8)
    assert relative_difference(tmp_path / "out", dpo_one_and_two_workers / "single" / "out") < DPO_TOLERANCE


def test_torchrun_restarts_the_workers_after_a_kill_9_and_auto_resume_ends_at_the_one_worker_adapter(
        one_and_two_workers, tiny_model_dir, tmp_path):
    """`torchrun --max-restarts 2 (c10d rendezvous) phitune train CONFIG --auto-resume`, with worker 0 (the holder of
    the directory's lock) killed by kill -9 after checkpoint-4: torchrun restarts both workers with the same command,
    the new worker 0 takes the dead one's lock over, both resume from checkpoint-4 and train only steps 5..12, and
    the job exits 0 at the uninterrupted 1-worker adapter. Worker 0 is held before step 5 in the first attempt only,
    so the kill lands between checkpoints 4 and 8 however busy the machine; worker 1 meanwhile waits in step 5's
    gradient all-reduce, which fails when its peer dies."""
    config = write_config(tmp_path, tiny_model_dir, batch_size=2)
    entry = launcher(tmp_path, watch=True, hold_at=4, hold_ranks=("0",))
    job = launch([*elastic_torchrun_command(), str(entry), "train", str(config), "--auto-resume"], tmp_path,
                 TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", COLUMNS="200")  # a store per attempt; unwrapped log lines
    try:
        marker = tmp_path / "out" / "checkpoint-4" / CHECKPOINT_COMPLETE
        deadline = time.monotonic() + 240
        while not marker.is_file():
            assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr").read_text()[-3000:]
            time.sleep(0.05)
        worker_0 = [pid for pid in descendants(job.pid) if _environ(pid).issuperset({b"RANK=0",
                                                                                      b"TORCHELASTIC_RESTART_COUNT=0"})]
        assert len(worker_0) == 1, worker_0
        os.kill(worker_0[0], signal.SIGKILL)
        wait(job, tmp_path, timeout=300)
    finally:
        kill_all(job)
    stdout, stderr = ((tmp_path / name).read_text() for name in ("stdout", "stderr"))
    said = " ".join((stderr + stdout).split())
    assert "failed (exitcode: -9) local_rank: 0" in said  # torchrun saw the kill, and went on
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" not in said  # phitune's warning (run.plan) sees the store unshared
    assert said.count("taking over the lock of a run that is gone") == 1  # the restarted worker 0 only
    assert f"resuming from {tmp_path / 'out' / 'checkpoint-4'}" in said
    assert len(TRAIN_LINE.findall(stdout)) == 4 + 8  # steps 1..4, then 5..12 after the restart: none trained twice
    assert_resumed_under(tmp_path, tmp_path / "out" / "checkpoint-4", max_steps=12)  # each restarted worker
    assert_same_adapter(tmp_path / "out", one_and_two_workers / "single" / "out")


def _environ(pid: int) -> set[bytes]:
    """A process's environment as a set of b"NAME=value" (empty for a process that is gone)."""
    try:
        return set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
    except OSError:
        return set()
