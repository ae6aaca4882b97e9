"""Run directories: which states a fresh start, --resume and --overwrite accept, and what --overwrite deletes.
(The same on real runs: tests/test_train.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from phitune.errors import PhituneError
from phitune.run.output_dir import clear_old_run, prepare_output_dir, run_state


def _cfg(path):
    return SimpleNamespace(output_dir=path)


def _make(folder, names):
    folder.mkdir()
    for name in names:
        (folder / name).mkdir() if name.endswith("/") else (folder / name).write_text("x")
    return folder


def test_states_and_what_each_mode_accepts(tmp_path):
    absent, empty = tmp_path / "absent", _make(tmp_path / "empty", [])
    for folder in (absent, empty):
        assert run_state(folder) == "empty" and prepare_output_dir(_cfg(folder), False, False) == folder
        with pytest.raises(PhituneError, match="no complete checkpoint .* run without --resume to start"):
            prepare_output_dir(_cfg(folder), True, False)
    assert not absent.exists()  # checking creates nothing
    tensorboard = _make(tmp_path / "tb", ["runs/"])  # stopped before its first checkpoint
    (tensorboard / "runs" / "events.out.tfevents.1.host.1.0").write_text("x")
    assert run_state(tensorboard) == "interrupted"
    with pytest.raises(PhituneError, match="interrupted run \\(no checkpoint yet\\); pass --overwrite"):
        prepare_output_dir(_cfg(tensorboard), False, False)
    foreign = _make(tmp_path / "foreign", ["data.csv"])
    for resume, overwrite in ((False, False), (True, False), (False, True)):
        with pytest.raises(PhituneError, match="not empty and holds no phitune run"):
            prepare_output_dir(_cfg(foreign), resume, overwrite)
    with pytest.raises(PhituneError, match="contradict"):
        prepare_output_dir(_cfg(empty), True, True)


def test_overwrite_deletes_exactly_what_a_run_writes(tmp_path):
    run = _make(tmp_path / "run", ["checkpoint-3/", "checkpoint-6/", "adapter_config.json", "eval.json", "report.md",
                                   "runs/", "phitune_config.yaml", "phitune_complete"])
    (run / "runs" / "events.out.tfevents.1.host.1.0").write_text("x")
    prepare_output_dir(_cfg(run), False, True)
    assert len(list(run.iterdir())) == 8  # nothing deleted while checking
    clear_old_run(run, overwrite=False)
    assert len(list(run.iterdir())) == 8
    clear_old_run(run, overwrite=True)
    assert list(run.iterdir()) == []


def test_a_users_folders_named_like_a_runs_are_neither_a_run_nor_deleted(tmp_path):
    """runs/ counts as a run's only when it holds TensorBoard event files alone, ref/ only when it holds an adapter
    alone, checkpoint-N only as a folder: a user's `runs` of notes, `ref` of papers or `checkpoint-notes.txt` make a
    directory foreign (refused), never an interrupted run that --overwrite empties."""
    mine = _make(tmp_path / "mine", ["runs/"])
    (mine / "runs" / "2024-05.csv").write_text("my experiments")
    assert run_state(mine) == "foreign"
    with pytest.raises(PhituneError, match="holds no phitune run"):
        prepare_output_dir(_cfg(mine), False, True)
    run = _make(tmp_path / "run", ["checkpoint-3/", "phitune_config.yaml", "checkpoint-notes.txt", "ref/", "runs/"])
    (run / "ref" / "paper.pdf").write_text("%PDF")
    (run / "runs" / "Jan01_00-00-00_host").mkdir()
    (run / "runs" / "Jan01_00-00-00_host" / "events.out.tfevents.1.host.1.0").write_text("x")
    (run / "runs" / "Jan01_00-00-00_host" / "plot.py").write_text("mine")
    with pytest.raises(PhituneError, match="also holds checkpoint-notes.txt, ref, runs; move those out"):
        prepare_output_dir(_cfg(run), False, True)
    tensorboard = _make(tmp_path / "tb", ["runs/"])
    (tensorboard / "runs" / "Jan01_00-00-00_host").mkdir()
    (tensorboard / "runs" / "Jan01_00-00-00_host" / "events.out.tfevents.1.host.1.0").write_text("x")
    assert run_state(tensorboard) == "interrupted"
    prepare_output_dir(_cfg(tensorboard), False, True)
    clear_old_run(tensorboard, overwrite=True)
    assert list(tensorboard.iterdir()) == []
