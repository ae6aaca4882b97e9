"""One run per output directory (phitune.runlock): a second `phitune train` into a directory being trained is
refused at once, naming the first; so are the commands that read the run; a lock whose holder died is taken over."""

from __future__ import annotations

import logging
import subprocess
import time

import pytest
from test_reliability import TRAIN_LINE, finish, last_line, start_train, wait_for, write_config

from phitune.cli import main
from phitune.errors import PhituneError
from phitune.run.checkpoints import finished_run
from phitune.runlock import LOCK_FILE, RunLock, holder


def _files(folder):
    """Every file under `folder` with its size and modification time: what a refused command must leave as it was."""
    return {path: (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.rglob("*") if path.is_file()}


def test_a_lock_refuses_a_second_holder_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out"
    with RunLock(out):
        assert holder(out).startswith("pid ") and "started" in holder(out)
        with pytest.raises(PhituneError, match=r"out is being trained by another run \(pid \d+ on host"):
            RunLock(out).acquire()
    assert holder(out) is None and not out.exists()  # the lock made the directory, and removed it again


def test_a_lock_whose_holder_died_is_taken_over_with_a_warning(tmp_path, caplog):
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs, as after kill -9 (the kernel let go of its flock)
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(f'{{"host": "h", "pid": {gone.pid}, "started": "then", "command": "phitune train"}}')
    with caplog.at_level(logging.WARNING, logger="phitune"), RunLock(out):
        assert f"pid {gone.pid}" not in holder(out)
    assert f"taking over the lock of a run that is gone (pid {gone.pid} on host h" in caplog.text
    assert not (out / LOCK_FILE).exists()


@pytest.mark.processes
def test_a_second_train_eval_into_a_run_being_trained_are_refused_and_a_dead_runs_lock_is_taken_over(
        tiny_model_dir, tmp_path, capsys):
    config = write_config(tmp_path, tiny_model_dir)
    out = tmp_path / "out"
    first = start_train(config, hold_at=1)  # holds the directory, training, until killed
    wait_for(lambda: TRAIN_LINE.search((tmp_path / "train.out").read_text()), first)
    before = _files(out)

    started = time.monotonic()
    code, stderr = finish(start_train(config, "--overwrite"))
    seconds = time.monotonic() - started
    assert code == 2 and "Traceback" not in stderr, stderr[-2000:]
    assert last_line(stderr).startswith(f"error: {out} is being trained by another run (pid {first.pid} on host ")
    assert "phitune train" in last_line(stderr) and seconds < 120  # the imports: see test_reliability
    with pytest.raises(SystemExit) as exited:
        main(["eval", str(out)])
    assert exited.value.code == 2 and "is being trained now (pid" in capsys.readouterr().err
    assert _files(out) == before  # the refused commands wrote nothing

    first.kill()  # kill -9 before its first checkpoint: the lock file stays, naming a dead process
    first.wait()
    code, stderr = finish(start_train(config, "--auto-resume"))
    assert code == 0, stderr[-2000:]
    said = " ".join((stderr + (tmp_path / "auto-resume.out").read_text()).split())
    assert f"taking over the lock of a run that is gone (pid {first.pid}" in said
    assert len(TRAIN_LINE.findall((tmp_path / "auto-resume.out").read_text())) == 12  # nothing to keep: from step 1
    assert finished_run(out) and not (out / LOCK_FILE).exists()
