"""Nothing lost: a signal saves a checkpoint, a killed run resumes to the same adapter, a NaN stops the run cleanly.

Runs are real `phitune train` subprocesses on the tiny Phi-3 (12 steps of 4 rows), one thread each so that two can
run side by side and float reductions happen in the same order in every run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from phitune.run.checkpoints import (CHECKPOINT_COMPLETE, checkpoint_dirs, checkpoint_problem,
                                      latest_complete_checkpoint, latest_intact_checkpoint, trained_seconds)
from phitune.run.console import PROGRESS_LOG
from phitune.run.signals import REPEAT_WINDOW_S

pytestmark = pytest.mark.processes  # torchrun jobs and runs killed and resumed: pyproject.toml's marker

DEMO_DATA = Path(__file__).parents[1] / "src" / "phitune" / "assets" / "demo_chat"
ADAPTER = "adapter_model.safetensors"
TRAIN_LINE = re.compile(r"^step +\d+/\d+  loss ", re.M)  # phitune.run.console's line per logging step


def write_config(directory: Path, model_dir: Path, data: dict | None = None, **training) -> Path:
    """A short LoRA run on the tiny model: 12 steps of 4 rows, a complete checkpoint every 4 steps; `data` adds to
    the data section (no eval set unless it names one)."""
    config = {
        "model": {"name_or_path": str(model_dir), "torch_dtype": "float32"},
        "data": {"train": str(DEMO_DATA / "train.jsonl"), "eval_split": 0, "max_seq_length": 128,
                 "max_train_examples": 64, **(data or {})},
        "training_config": {"output_dir": str(directory / "out"), "max_steps": 12, "learning_rate": 5e-3,
                            "per_device_train_batch_size": 4, "save_steps": 4, "save_total_limit": 10,
                            "logging_steps": 1, "seed": 0, "disable_tqdm": True, **training},
        "peft_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"},
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


HELD_LAUNCHER = """
import sys, time
from transformers import Trainer

training_step = Trainer.training_step


def held(self, *args, **kwargs):  # the run stops moving once step {hold_at} is done
    if self.state.global_step >= {hold_at}:
        time.sleep(3600)
    return training_step(self, *args, **kwargs)


Trainer.training_step = held
sys.argv[0] = "phitune"
from phitune.cli import main

main()
"""


def start_train(config: Path, *args: str, hold_at: int = 0) -> subprocess.Popen:
    """`phitune train CONFIG ARGS` in the background; stdout and stderr go to files next to the config. `hold_at`:
    the run waits (through the test's own launcher, never phitune) once that step is done, so a kill -9 lands after
    checkpoint-`hold_at` and before the next one however busy the machine."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200"}
    tag = "-".join(a.strip("-") for a in args) or "train"
    entry = ["-m", "phitune.cli"]
    if hold_at:
        entry = [str(config.parent / "phitune_held.py")]
        Path(entry[0]).write_text(HELD_LAUNCHER.format(hold_at=hold_at), encoding="utf-8")
    with open(config.parent / f"{tag}.out", "w") as out, open(config.parent / f"{tag}.err", "w") as err:
        proc = subprocess.Popen([sys.executable, *entry, "train", str(config), *args], stdout=out, stderr=err, env=env)
    proc.stderr_path = config.parent / f"{tag}.err"
    return proc


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    """Wait for the process; return its exit code and stderr text."""
    code = proc.wait(timeout=timeout)
    return code, proc.stderr_path.read_text(encoding="utf-8")


def wait_for(condition, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"process ended early with {proc.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tiny_model_dir, tmp_path):
    """The resume command is the one to copy: the config file and the --set options the run was started with."""
    config = write_config(tmp_path, tiny_model_dir, max_steps=500, save_steps=1000)
    proc = start_train(config, "--set", "training_config.max_steps=400")
    wait_for(lambda: TRAIN_LINE.search(proc.stderr_path.with_suffix(".out").read_text()), proc)
    proc.send_signal(signal.SIGTERM)
    code, stderr = finish(proc)
    assert code == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    message = last_line(stderr)
    assert message.startswith("error: stopped by SIGTERM at step ")
    assert f"Resume with: phitune train {config} --set training_config.max_steps=400 --resume" in message
    checkpoint = latest_complete_checkpoint(tmp_path / "out")
    assert checkpoint is not None and str(checkpoint) in message
    assert (checkpoint / ADAPTER).is_file() and (checkpoint / "optimizer.pt").is_file()
    assert not (tmp_path / "out" / CHECKPOINT_COMPLETE).exists()  # the run is not marked finished


def test_sigterm_of_an_auto_resume_run_says_to_run_the_same_command_again(tiny_model_dir, tmp_path):
    """A run started with --auto-resume (a requeued job's one line) is continued by that line, not by --resume."""
    config = write_config(tmp_path, tiny_model_dir, max_steps=500, save_steps=1000)
    proc = start_train(config, "--auto-resume")
    wait_for(lambda: TRAIN_LINE.search(proc.stderr_path.with_suffix(".out").read_text()), proc)
    proc.send_signal(signal.SIGTERM)
    code, stderr = finish(proc)
    assert code == 130, stderr[-2000:]
    assert last_line(stderr).endswith(f". Resume by running the same command again: phitune train {config} "
                                      "--auto-resume"), stderr[-2000:]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_stops_at_once_and_fails_with_130(tiny_model_dir, tmp_path, signum):
    """The first signal asks for a checkpoint at the end of the step; a second one does not wait for it. Either way
    the run must not look like a success to `phitune train c.yaml && phitune merge ...`."""
    config = write_config(tmp_path, tiny_model_dir, max_steps=500, save_steps=1000)
    proc = start_train(config, hold_at=1)  # step 2 never ends: the first signal's checkpoint cannot come first
    wait_for(lambda: TRAIN_LINE.search((tmp_path / "train.out").read_text()), proc)
    proc.send_signal(signum)
    time.sleep(REPEAT_WINDOW_S + 0.5)  # sooner, it counts as the same stop delivered twice (next test)
    proc.send_signal(signum)
    code, stderr = finish(proc)
    assert code == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    message = last_line(stderr)
    assert message.startswith("error: interrupted by SIG"), message
    assert not (tmp_path / "out" / CHECKPOINT_COMPLETE).exists()


def test_a_signal_delivered_twice_at_once_is_one_graceful_stop(tiny_model_dir, tmp_path):
    """`timeout -s INT 60 phitune train ...` signals phitune and then its process group: two SIGINTs a moment apart.
    They are one request (a checkpoint, then stop), not the "second Ctrl-C: stop now without saving" that lost the
    checkpoint."""
    config = write_config(tmp_path, tiny_model_dir, max_steps=500, save_steps=1000)
    proc = start_train(config)
    wait_for(lambda: TRAIN_LINE.search((tmp_path / "train.out").read_text()), proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    code, stderr = finish(proc)
    assert code == 130, stderr[-2000:]
    assert last_line(stderr).startswith("error: stopped by SIGINT at step "), stderr[-2000:]
    assert "stopping now without saving" not in stderr + (tmp_path / "train.out").read_text()
    assert latest_complete_checkpoint(tmp_path / "out") is not None


def test_kill_9_then_resume_gives_the_adapter_of_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """Bitwise on CPU: the resumed run restores weights, optimizer, scheduler, RNG and the data order. The first run
    is held after step 4: polling alone, on a loaded machine the 12 quick steps passed checkpoint-8 or -12 first.
    The resumed run reports the whole run: the first attempt's evaluation at step 0 (eval loss before -> after) and
    the training time of both attempts, as its token count has."""
    held_out = {"eval": str(DEMO_DATA / "eval.jsonl"), "max_eval_examples": 8}
    reference = start_train(write_config(tmp_path / "reference", tiny_model_dir, held_out))
    config = write_config(tmp_path / "killed", tiny_model_dir, held_out)
    out = tmp_path / "killed" / "out"
    proc = start_train(config, hold_at=4)
    wait_for(lambda: latest_complete_checkpoint(out) is not None, proc)
    proc.kill()  # SIGKILL: no handler runs, whatever was being written stays half-written
    proc.wait()
    complete = latest_complete_checkpoint(out)
    assert complete.name == "checkpoint-4" and not (out / "checkpoint-8").exists()
    half_written = out / "checkpoint-10"  # a later checkpoint cut off mid-save: no marker, truncated weights
    half_written.mkdir(exist_ok=True)
    (half_written / ADAPTER).write_bytes(b"\0" * 10)
    assert latest_complete_checkpoint(out) == complete

    code, stderr = finish(start_train(config, "--resume"))
    assert code == 0, stderr[-3000:]
    steps_done = int(complete.name.split("-")[1])
    resumed_log = (tmp_path / "killed" / "resume.out").read_text()
    assert len(TRAIN_LINE.findall(resumed_log)) == 12 - steps_done  # resumed, not redone
    assert finish(reference)[0] == 0
    resumed, uninterrupted = load_file(out / ADAPTER), load_file(tmp_path / "reference" / "out" / ADAPTER)
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert resumed[name].equal(tensor), name
    metrics, straight = (json.loads((run / "metrics.json").read_text()) for run in (out, tmp_path / "reference" / "out"))
    for key in ("eval_loss_before", "perplexity_before", "eval_loss_after"):
        assert metrics[key] == straight[key], key
    progress = [json.loads(line) for line in (out / PROGRESS_LOG).read_text().splitlines()]
    begin, end = (next(e["time"] for e in reversed(progress) if e["event"] == event) for event in ("begin", "end"))
    first_attempt = trained_seconds(complete)
    assert first_attempt > 0 and metrics["train_runtime_s"] >= first_attempt + (end - begin), metrics


def test_half_written_checkpoints_are_ignored(tmp_path):
    for step, complete in ((4, True), (8, True), (12, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / CHECKPOINT_COMPLETE).write_text("complete\n")
    (tmp_path / "checkpoint-x").mkdir()
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-8"
    assert latest_complete_checkpoint(tmp_path / "missing") is None


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path):
    """learning_rate 1e30 blows the weights up after one step; the guard stops before a bad step is taken."""
    import torch

    config = write_config(tmp_path, tiny_model_dir, learning_rate=1e30, save_steps=1, max_steps=10)
    code, stderr = finish(start_train(config))
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    message = last_line(stderr)
    assert message.startswith("error: the loss became ")
    assert "training stopped and the last good checkpoint is" in message and "learning_rate" in message
    good = latest_complete_checkpoint(tmp_path / "out")
    assert good is not None and str(good) in message
    bad_step = int(message.split(" at step ")[1].split(";")[0])
    assert good.name == f"checkpoint-{bad_step - 1}"
    assert not (tmp_path / "out" / f"checkpoint-{bad_step}").exists()
    assert all(torch.isfinite(t).all() for t in load_file(good / ADAPTER).values())


# Runs that survive without a person (issue 34): one command, `--auto-resume`, for every attempt of a requeued job.

@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory) -> Path:
    """The 12 steps of write_config, run straight through: the adapter every recovered run must end at."""
    directory = tmp_path_factory.mktemp("uninterrupted")
    code, stderr = finish(start_train(write_config(directory, tiny_model_dir)))
    assert code == 0, stderr[-2000:]
    return directory / "out"


@pytest.fixture(scope="module")
def killed_after_8(tiny_model_dir, tmp_path_factory) -> Path:
    """An interrupted run's output directory: complete checkpoints 4 and 8, then kill -9 during step 9."""
    directory = tmp_path_factory.mktemp("killed")
    proc = start_train(write_config(directory, tiny_model_dir), hold_at=8)
    wait_for(lambda: (directory / "out" / "checkpoint-8" / CHECKPOINT_COMPLETE).is_file(), proc)
    proc.kill()
    proc.wait()
    return directory / "out"


def _copy_run(out: Path, directory: Path, tiny_model_dir: Path) -> Path:
    """The same config in `directory`, its output directory a copy of `out`."""
    import shutil

    config = write_config(directory, tiny_model_dir)
    shutil.copytree(out, directory / "out")
    return config


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {  # what a bad disk, a cut copy or a cleaning script does to a file, and what phitune then says
    "truncated adapter": (lambda c: (c / ADAPTER).write_bytes((c / ADAPTER).read_bytes()[:1000]),
                          "adapter_model.safetensors has 1000 bytes"),
    "flipped byte in optimizer.pt": (lambda c: _flip_a_byte(c / "optimizer.pt"),
                                     "optimizer.pt has changed since it was written (sha256 differs)"),
    "missing rng file": (lambda c: (c / "rng_state.pth").unlink(), "rng_state.pth is missing"),
    # an edited marker: it traced back (null, a list, a size where a record belongs) or, holding no batch layout,
    # stopped every resume with "a global batch of None" instead of trying the checkpoint before it
    **{f"marker {name}": (lambda c, text=text: (c / CHECKPOINT_COMPLETE).write_text(text),
                          f"its {CHECKPOINT_COMPLETE} marker is unreadable or not one phitune wrote")
       for name, text in (("null", "null\n"), ("a list", "[]\n"), ("without a layout", '{"files": {}}\n'),
                          ("with a size for a record", '{"processes": 1, "per_device_train_batch_size": 2, '
                           '"gradient_accumulation_steps": 1, "global_batch": 2, "files": {"optimizer.pt": 5}}\n'))},
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_named_and_the_previous_intact_one_taken(killed_after_8, tmp_path, damage, caplog):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(killed_after_8, out)
    harm, said = DAMAGES[damage]
    harm(out / "checkpoint-8")
    assert latest_complete_checkpoint(out) == out / "checkpoint-8"  # the marker alone trusts it
    assert latest_intact_checkpoint(out) == out / "checkpoint-4"
    assert f"checkpoint-8 is damaged: {said}" in caplog.text
    assert latest_complete_checkpoint(out) == out / "checkpoint-4"  # no longer offered as complete


def test_auto_resume_continues_past_a_damaged_checkpoint_then_says_complete_and_refuses_another_config(
        killed_after_8, uninterrupted, tiny_model_dir, tmp_path):
    """kill -9 after checkpoint-8, whose optimizer.pt then loses a byte: --auto-resume names it, resumes from
    checkpoint-4 and ends at the uninterrupted adapter; once finished, the same command says so and writes nothing;
    another learning rate is refused, a raised max_steps continues."""
    config = _copy_run(killed_after_8, tmp_path, tiny_model_dir)
    out = tmp_path / "out"
    _flip_a_byte(out / "checkpoint-8" / "optimizer.pt")
    code, stderr = finish(start_train(config, "--auto-resume"))
    assert code == 0, stderr[-3000:]
    log = (tmp_path / "auto-resume.out").read_text()
    said = " ".join((stderr + log).split())
    assert "checkpoint-8 is damaged: optimizer.pt has changed since it was written" in said
    assert f"resuming from {out / 'checkpoint-4'}" in said
    assert len(TRAIN_LINE.findall(log)) == 12 - 4
    resumed, straight = load_file(out / ADAPTER), load_file(uninterrupted / ADAPTER)
    assert all(resumed[name].equal(tensor) for name, tensor in straight.items())
    metrics, whole = (json.loads((run / "metrics.json").read_text()) for run in (out, uninterrupted))
    assert metrics["train_loss"] == pytest.approx(whole["train_loss"], abs=1e-4)  # all 12 steps', not the last 8's

    before = {path: path.stat().st_mtime_ns for path in out.rglob("*")}
    started = time.monotonic()
    code, stderr = finish(start_train(config, "--auto-resume"))
    seconds = time.monotonic() - started
    assert code == 0 and (tmp_path / "auto-resume.out").read_text().strip() == (
        f"the run in {out} is already complete; nothing to do"), stderr[-2000:]
    # measured: 15 s wall, 6.7 s CPU at a load of 4.6 on 2 cores, all of it imports (43 s at a load of 14)
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*")} == before and seconds < 120

    code, stderr = finish(start_train(config, "--auto-resume", "--set", "training_config.learning_rate=1e-4",
                                      "--set", "data.max_seq_length=64", "--set", "training_config.logging_steps=5"))
    assert code == 2, stderr[-2000:]
    message = last_line(stderr)
    assert message.startswith(f"error: the run in {out} was trained with another config: data.max_seq_length "
                              "(was 128), training_config.learning_rate (was 0.005);"), message
    assert "logging_steps" not in message  # how often it logs is free to change

    (out / "report.md").write_text("# phitune eval of the step-12 adapter\n", encoding="utf-8")  # as phitune eval
    code, stderr = finish(start_train(config, "--auto-resume", "--set", "training_config.max_steps=14"))
    assert code == 0, stderr[-2000:]
    log = (tmp_path / "auto-resume-set-training_config.max_steps=14.out").read_text()
    assert len(TRAIN_LINE.findall(log)) == 2
    assert (f"report.md in {out} describe the adapter this run had before it continues; run phitune eval {out} "
            "again") in " ".join((stderr + log).split()) and (out / "report.md").is_file()  # said; nothing deleted


def test_auto_resume_of_a_run_killed_before_its_first_checkpoint_says_once_what_it_removed_and_why(
        killed_after_8, uninterrupted, tiny_model_dir, tmp_path):
    """No complete checkpoint left (checkpoint-4 unmarked, as a kill during its save leaves it): --auto-resume starts
    again, and one warning in its own words names what it removed (it used to speak as --overwrite, never passed)."""
    import shutil

    config = _copy_run(killed_after_8, tmp_path, tiny_model_dir)
    out = tmp_path / "out"
    shutil.rmtree(out / "checkpoint-8")
    (out / "checkpoint-4" / CHECKPOINT_COMPLETE).unlink()
    left = ", ".join(sorted(child.name for child in out.iterdir() if child.name != "phitune.lock"))
    code, stderr = finish(start_train(config, "--auto-resume"))
    assert code == 0, stderr[-3000:]
    said = " ".join((stderr + (tmp_path / "auto-resume.out").read_text()).split())
    assert "--overwrite" not in said, said[-3000:]
    assert said.count("--auto-resume") == 1 and (
        f"--auto-resume: the run in {out} stopped before its first complete checkpoint, so there is nothing to "
        f"continue; removed what it left ({left}) and starting it again") in said, said[-3000:]
    resumed, straight = load_file(out / ADAPTER), load_file(uninterrupted / ADAPTER)
    assert all(resumed[name].equal(tensor) for name, tensor in straight.items())  # a fresh start, all 12 steps


def test_a_full_disk_stops_with_one_line_and_auto_resume_continues_once_space_is_freed(uninterrupted, tiny_model_dir,
                                                                                       tmp_path):
    """A real 6 MiB tmpfs: checkpoint-4 (3.7 MB, 3.6 of them the Phi-3 tokenizer) fits, checkpoint-8 does not. Needs
    root (mount); skipped without."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)]).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        config = write_config(tmp_path, tiny_model_dir, output_dir=str(disk / "out"))
        code, stderr = finish(start_train(config, "--auto-resume"))
        assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
        message = last_line(stderr)
        assert re.match(rf"error: could not write {disk}/out/checkpoint-8(/\S+)?: No space left on device; checkpoint-8 "
                        rf"is not marked complete and the last complete checkpoint is {disk}/out/checkpoint-4; free "
                        "space, then run the same command with --auto-resume$", message), message
        assert latest_intact_checkpoint(disk / "out") == disk / "out" / "checkpoint-4"
        assert not (disk / "out" / "checkpoint-8" / CHECKPOINT_COMPLETE).exists()

        subprocess.run(["mount", "-o", "remount,size=32m", str(disk)], check=True)  # space freed
        code, stderr = finish(start_train(config, "--auto-resume"))
        assert code == 0, stderr[-3000:]
        resumed, straight = load_file(disk / "out" / ADAPTER), load_file(uninterrupted / ADAPTER)
        assert all(resumed[name].equal(tensor) for name, tensor in straight.items())
    finally:  # lazily: the adapter just compared is memory-mapped from the tmpfs until the test's frame goes
        subprocess.run(["umount", "--lazy", str(disk)])


PREEMPTED_LAUNCHER = """
import builtins, io, os, sys, time
from pathlib import Path
from transformers import Trainer

training_step, real_open = Trainer.training_step, builtins.open


def held(self, *args, **kwargs):  # before step {hold_at} + 1: wait until the test has sent SIGTERM and says go
    if self.state.global_step == {hold_at}:
        Path("held").touch()
        while not Path("go").exists():
            time.sleep(0.05)
    return training_step(self, *args, **kwargs)


class CutShort:  # the marker's first write: half of it reaches the disk, then the process waits for its SIGKILL
    def __init__(self, handle):
        self.handle = handle

    def write(self, text):
        self.handle.write(text[:len(text) // 2])
        self.handle.flush()
        os.fsync(self.handle.fileno())
        Path("marking").touch()
        time.sleep(3600)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)


def cut_short(file, mode="r", *args, **kwargs):  # any file named for checkpoint-{stop}'s marker, opened to write
    handle = real_open(file, mode, *args, **kwargs)
    path = Path(os.fsdecode(file)) if isinstance(file, (str, bytes, os.PathLike)) else None
    if path and set(mode) & set("wax+") and "{marker}" in path.name and path.parent.name == "checkpoint-{stop}":
        return CutShort(handle)
    return handle


Trainer.training_step, builtins.open, io.open = held, cut_short, cut_short
sys.argv[0] = "phitune"
from phitune.cli import main

main()
"""


def test_sigkill_in_the_grace_after_sigterm_leaves_the_checkpoint_unmarked_and_auto_resume_finishes(
        uninterrupted, tiny_model_dir, tmp_path):
    """Pre-emption: SIGTERM, then SIGKILL when the grace period (30 s in SLURM and Kubernetes) runs out, here at the
    worst instant: the checkpoint that SIGTERM asked for is on disk and half of its completion marker is written.
    Every checkpoint left is then complete (its files match its marker) or unmarked, never half-marked, and the same
    `--auto-resume` command continues from the last complete one to the uninterrupted adapter. (The test's launcher
    cuts any write of a file named for the marker, wherever phitune writes it, so a marker written in place would be
    found half-written here.)"""
    config = write_config(tmp_path, tiny_model_dir)
    out = tmp_path / "out"
    (tmp_path / "phitune_preempted.py").write_text(
        PREEMPTED_LAUNCHER.format(hold_at=4, stop=5, marker=CHECKPOINT_COMPLETE), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(tmp_path / "preempted.out", "w") as log, open(tmp_path / "preempted.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "phitune_preempted.py", "train", str(config), "--auto-resume"],
                                stdout=log, stderr=err, env=env, cwd=tmp_path, start_new_session=True)
    try:
        wait_for(lambda: (tmp_path / "held").exists() and latest_complete_checkpoint(out) is not None, proc)
        proc.send_signal(signal.SIGTERM)  # pre-empted during step 5: it finishes the step and saves checkpoint-5
        (tmp_path / "go").touch()
        wait_for(lambda: (tmp_path / "marking").exists(), proc)
        proc.kill()  # the grace is over
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    said = " ".join(((tmp_path / "preempted.out").read_text() + (tmp_path / "preempted.err").read_text()).split())
    assert "SIGTERM received: saving a checkpoint after this step, then stopping" in said
    assert [folder.name for folder in checkpoint_dirs(out)] == ["checkpoint-5", "checkpoint-4"]
    assert (out / "checkpoint-5" / ADAPTER).is_file()  # the save had reached the marker
    for folder in checkpoint_dirs(out):
        if (folder / CHECKPOINT_COMPLETE).exists():
            assert checkpoint_problem(folder) is None, folder
            vouched = json.loads((folder / CHECKPOINT_COMPLETE).read_text())["files"]
            assert {ADAPTER, "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= vouched.keys()
    assert latest_complete_checkpoint(out) == out / "checkpoint-4"

    code, stderr = finish(start_train(config, "--auto-resume"))
    assert code == 0, stderr[-3000:]
    log = (tmp_path / "auto-resume.out").read_text()
    assert f"resuming from {out / 'checkpoint-4'}" in " ".join((stderr + log).split())
    assert len(TRAIN_LINE.findall(log)) == 12 - 4
    resumed, straight = load_file(out / ADAPTER), load_file(uninterrupted / ADAPTER)
    assert all(resumed[name].equal(tensor) for name, tensor in straight.items())


def test_when_every_checkpoint_is_damaged_the_resume_stops_with_one_line(killed_after_8, tiny_model_dir, tmp_path):
    config = _copy_run(killed_after_8, tmp_path, tiny_model_dir)
    for step in (4, 8):
        _flip_a_byte(tmp_path / "out" / f"checkpoint-{step}" / "optimizer.pt")
    code, stderr = finish(start_train(config, "--auto-resume"))
    assert code == 2 and "Traceback" not in stderr, stderr[-2000:]
    assert last_line(stderr).startswith(f"error: no intact checkpoint left in {tmp_path / 'out'}: checkpoint-8 "
                                        "(optimizer.pt has changed since it was written (sha256 differs)); checkpoint-4")


LATE_SIGNAL_LAUNCHER = """
import os, signal, sys
import phitune.after.report
from phitune.cli import main

summary = phitune.after.report.print_run_summary

def print_run_summary(result):  # the run is complete on disk; the signal lands as phitune reports it
    os.kill(os.getpid(), signal.{name})
    summary(result)

phitune.after.report.print_run_summary = print_run_summary
sys.argv[0] = "phitune"
main()
"""


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_after_the_run_is_complete_changes_nothing(tiny_model_dir, tmp_path, name):
    """Ctrl-C (or SIGTERM) in the last moments, once the run is complete on disk: exit code 0 and the summary, not
    130 with no line said (Python died of the signal while shutting down, or printed a traceback from an atexit
    hook): `phitune train ... && phitune merge ...` goes on, as the run is there."""
    config = write_config(tmp_path, tiny_model_dir, max_steps=2, save_steps=2)
    launcher = tmp_path / "late.py"
    launcher.write_text(LATE_SIGNAL_LAUNCHER.replace("{name}", name), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, str(launcher), "train", str(config)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "adapter, tokenizer, metrics.json and loss.png are in" in done.stdout
    assert (tmp_path / "out" / "phitune_complete").is_file()
