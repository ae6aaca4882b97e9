"""phitune.run.lifecycle: what every method's run shares. Here: the adapter a DPO, ORPO or GRPO run starts from, and
the resume hint a stopped run prints."""

from __future__ import annotations

import dataclasses

import pytest
from _fixtures_eval import trained_run  # noqa: F401  (fixture)

from phitune.errors import PhituneError
from phitune.run.lifecycle import resume_hint, starting_adapter


def with_adapter(cfg, adapter):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, adapter=str(adapter)))


def test_a_starting_adapter_is_a_peft_adapter_trained_on_the_same_base(make_config, trained_run, tmp_path):
    """model.adapter (DPO, ORPO and GRPO share the check): a folder without adapter_config.json, or a phitune run
    trained on another base, is one line naming the problem; the run's own base is accepted."""
    cfg = make_config()  # the random tiny Phi-3; trained_run was trained on the bundled pretrained one
    with pytest.raises(PhituneError, match="holds no PEFT adapter"):
        starting_adapter(with_adapter(cfg, tmp_path))
    with pytest.raises(PhituneError, match=r"outputs/demo does not exist \(relative to .*\); train the run it names "
                                           r"first \(the tiny examples start from `phitune demo"):
        starting_adapter(with_adapter(cfg, "outputs/demo"))  # the KTO example before `phitune demo`
    with pytest.raises(PhituneError, match="was trained on .*, not on model.name_or_path"):
        starting_adapter(with_adapter(cfg, trained_run))
    from phitune.config.schema import load_run_config

    same_base = dataclasses.replace(cfg, model=load_run_config(trained_run).model)
    assert starting_adapter(with_adapter(same_base, trained_run)) == trained_run


def test_the_resume_hint_keeps_the_launcher_and_the_auto_resume_the_run_was_started_with(make_config, monkeypatch):
    """One process: the command with --resume, or the same command again after --auto-resume. Under torchrun
    (WORLD_SIZE, as torchrun sets it for each worker) the same torchrun command: one process alone would make
    another global batch, which a resume refuses."""
    cfg = dataclasses.replace(make_config(), source="run.yaml", overrides=["training_config.max_steps=9"])
    command = "phitune train run.yaml --set training_config.max_steps=9"
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resume_hint(cfg) == f"Resume with: {command} --resume"
    assert resume_hint(cfg, auto_resume=True) == f"Resume by running the same command again: {command} --auto-resume"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resume_hint(cfg) == f"Resume with the same torchrun command (2 processes) with --resume: {command} --resume"
    assert (resume_hint(cfg, auto_resume=True) ==
            f"Resume with the same torchrun command (2 processes) again: {command} --auto-resume")
