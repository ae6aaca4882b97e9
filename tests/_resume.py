"""What a resume must look like from inside the trainer, for the resume tests of every method.

An uninterrupted run and a run that silently starts over end at the same adapter (training is deterministic), so
equal adapters do not prove a resume. What does: the resumed `Trainer.train` call trains only the steps after the
checkpoint, and its optimizer starts from the checkpoint's optimizer state (Adam's moments), not from zero.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch


def watch_training(monkeypatch) -> list[dict]:
    """Record, for each `Trainer.train` call from now on, the global step each optimizer step ends at and the
    optimizer's state at its first training step; return the list the records are appended to."""
    from transformers import Trainer

    runs: list[dict] = []
    train, training_step = Trainer.train, Trainer.training_step

    def watched_train(self, *args, **kwargs):
        runs.append({"steps": [], "optimizer": None})
        return train(self, *args, **kwargs)

    def watched_step(self, model, inputs, num_items_in_batch=None):
        run = runs[-1]
        if run["optimizer"] is None:
            run["optimizer"] = copy.deepcopy(self.optimizer.state_dict()["state"])
        if self.state.global_step + 1 not in run["steps"]:  # once per optimizer step, whatever the accumulation
            run["steps"].append(self.state.global_step + 1)
        return training_step(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(Trainer, "train", watched_train)
    monkeypatch.setattr(Trainer, "training_step", watched_step)
    return runs


def assert_resumed(run: dict, checkpoint: Path, max_steps: int) -> None:
    """`run` (from watch_training) trained exactly steps checkpoint+1..max_steps, starting from the optimizer state
    saved in `checkpoint`; from the last checkpoint (`max_steps` reached), no step at all."""
    done = int(checkpoint.name.rsplit("-", 1)[1])
    assert run["steps"] == list(range(done + 1, max_steps + 1)), (
        f"the resumed run trained steps {run['steps'][:3]}...{run['steps'][-1:]}, not {done + 1}..{max_steps}")
    if done >= max_steps:
        return  # no step, so no optimizer state to compare
    saved = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)["state"]
    started = run["optimizer"]
    assert saved and started.keys() == saved.keys(), "the resumed optimizer did not start from the checkpoint's state"
    for index, moments in saved.items():
        for name, value in moments.items():
            assert torch.equal(started[index][name], value), f"optimizer state {index}.{name} differs from the checkpoint"


def assert_same_trained_adapter(straight: Path, resumed: Path, rtol: float, atol: float) -> None:
    """The resumed run's adapter equals the uninterrupted run's, which trained (B starts at zero: it moved)."""
    from safetensors.torch import load_file

    a, b = (load_file(str(run / "adapter_model.safetensors")) for run in (straight, resumed))
    assert a.keys() == b.keys() and any(t.abs().sum() > 0 for k, t in a.items() if "lora_B" in k)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol)


def assert_sigterm_stops_with_a_checkpoint(cfg, folder: Path, line=None) -> None:
    """A real `phitune train` of `cfg` (its output_dir under `folder`), sent SIGTERM once it logs a step (`line`, a
    regex; test_reliability's TRAIN_LINE by default): exit code 130, no traceback, the resume command said, a
    complete checkpoint saved and the run not marked finished. The shared SIGTERM check of every method."""
    import signal

    from phitune.config.schema import save_config
    from phitune.run.checkpoints import CHECKPOINT_COMPLETE, latest_complete_checkpoint
    from test_reliability import TRAIN_LINE, finish, start_train, wait_for

    line = line or TRAIN_LINE
    save_config(cfg, folder / "run.yaml")
    proc = start_train(folder / "run.yaml")
    wait_for(lambda: line.search((folder / "train.out").read_text()), proc, timeout=240)
    proc.send_signal(signal.SIGTERM)
    code, stderr = finish(proc)
    assert code == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert f"Resume with: phitune train {folder / 'run.yaml'} --resume" in stderr
    assert latest_complete_checkpoint(cfg.output_dir) is not None
    assert not (cfg.output_dir / CHECKPOINT_COMPLETE).exists()


def killed_and_resumed(config_of, folder: Path, line=None) -> tuple[dict, dict]:
    """(resumed adapter, uninterrupted adapter) of a method's 4-step run (`config_of(name)`: its config with
    output_dir folder/name/out, save_steps 2): a real `phitune train` held after step 2 and killed with SIGKILL (the
    newest complete checkpoint then checkpoint-2), resumed with --resume for 2 more logged steps (`line`: the
    method's console line, test_reliability's TRAIN_LINE by default), beside an uninterrupted one. The shared kill -9
    check of every method; the caller compares the two."""
    from safetensors.torch import load_file

    from phitune.config.schema import save_config
    from phitune.run.checkpoints import latest_complete_checkpoint
    from test_reliability import TRAIN_LINE, finish, start_train, wait_for

    def config(name):
        (folder / name).mkdir()
        save_config(config_of(name), folder / name / "run.yaml")
        return folder / name / "run.yaml"

    reference = start_train(config("reference"))
    killed = config("killed")
    out = folder / "killed" / "out"
    proc = start_train(killed, hold_at=2)
    wait_for(lambda: latest_complete_checkpoint(out) is not None, proc, timeout=240)
    proc.kill()
    proc.wait()
    assert latest_complete_checkpoint(out).name == "checkpoint-2" and not (out / "checkpoint-4").exists()
    code, stderr = finish(start_train(killed, "--resume"))
    assert code == 0, stderr[-3000:]
    assert len((line or TRAIN_LINE).findall((folder / "killed" / "resume.out").read_text())) == 2  # steps 3, 4 only
    assert finish(reference)[0] == 0, reference.stderr_path.read_text()[-3000:]
    return (load_file(str(out / "adapter_model.safetensors")),
            load_file(str(folder / "reference" / "out" / "adapter_model.safetensors")))
