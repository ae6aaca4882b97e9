"""The demo: the README's first command. Same code path as a real run; the loss curve is stored and compared."""

import json
from pathlib import Path

import pytest
from _fixtures_eval import demo_run  # noqa: F401  (the demo's run, trained once per session)

from phitune.demo import replaces_earlier_demo, run_demo
from phitune.errors import PhituneError

STORED = json.loads((Path(__file__).parent / "data" / "demo_loss_curve.json").read_text())


def test_demo_eval_loss_falls_by_a_quarter(demo_run):
    metrics = json.loads((demo_run / "metrics.json").read_text())
    assert metrics["eval_loss_after"] <= 0.75 * metrics["eval_loss_before"]
    assert (demo_run / "adapter_model.safetensors").exists()


def test_demo_loss_curve_matches_the_stored_one(demo_run):
    """A change to masking, batching or the optimizer shows here first. 2% covers CPU kernel differences."""
    output_dir = demo_run
    state = json.loads(next(output_dir.glob("checkpoint-*/trainer_state.json")).read_text())
    curve = [[e["step"], e["loss"]] for e in state["log_history"] if "loss" in e]
    assert [step for step, _ in curve] == [step for step, _ in STORED["train_loss"]]
    for (step, loss), (_, stored) in zip(curve, STORED["train_loss"]):
        assert loss == pytest.approx(stored, rel=0.02), f"step {step}"


def test_demo_reruns_over_its_own_output_but_not_over_a_user_run(demo_run, make_config):
    from phitune.train import run_training

    cfg = make_config(training_config={"max_steps": 1, "eval_strategy": "no"})
    run_training(cfg)
    with pytest.raises(PhituneError, match="not a demo run"):
        run_demo(cfg.output_dir, [])


def interrupt_like_a_kill(output_dir: Path) -> None:
    """Leave what a demo killed after its last checkpoint leaves: the checkpoints, none of what run.finish writes at
    the top (phitune_config.yaml, the adapter, metrics, the completion marker)."""
    import shutil

    for child in output_dir.iterdir():
        if not child.name.startswith("checkpoint-"):
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def test_demo_starts_again_over_its_own_interrupted_run(tmp_path, caplog):
    """`phitune demo` has no --resume or --overwrite: over an interrupted demo run it trains from scratch, says so,
    and the interrupted checkpoint is gone (a fresh run keeps no step of it). An interrupted run has no saved config:
    the demo knows its own by the base model its checkpoint's adapter names."""
    from phitune.run.checkpoints import finished_run

    output_dir = tmp_path / "demo"
    quick = ["training_config.eval_strategy=no", "data.max_train_examples=32"]
    run_demo(output_dir, ["training_config.max_steps=3", *quick])
    interrupt_like_a_kill(output_dir)
    assert [p.name for p in output_dir.iterdir()] == ["checkpoint-3"]
    with caplog.at_level("WARNING", logger="phitune"):
        run_demo(output_dir, ["training_config.max_steps=2", *quick])
    assert "interrupted demo run; the demo starts again from scratch" in caplog.text
    assert finished_run(output_dir) and not (output_dir / "checkpoint-3").exists()


def test_demo_refuses_an_interrupted_run_of_another_model(tmp_path):
    output_dir = tmp_path / "run"
    (output_dir / "checkpoint-40").mkdir(parents=True)
    config = {"base_model_name_or_path": "microsoft/Phi-3-mini-4k-instruct", "peft_type": "LORA"}
    (output_dir / "checkpoint-40" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(PhituneError, match="not a demo run"):
        run_demo(output_dir, [])
    assert (output_dir / "checkpoint-40" / "adapter_config.json").is_file()


def test_demo_says_it_replaces_its_own_finished_run(tmp_path, caplog):
    """A second `phitune demo` replaced the first run's adapter and eval results without a word (found by issue 35's
    stranger pass, where the first demo had trained for 44 minutes on a loaded CPU)."""
    from phitune.tiny.phi3 import tiny_base_path

    output_dir = tmp_path / "demo"
    output_dir.mkdir()
    (output_dir / "phitune_complete").write_text("finished\n")
    (output_dir / "phitune_config.yaml").write_text(f"model: {{name_or_path: '{tiny_base_path()}'}}\n")
    with caplog.at_level("WARNING", logger="phitune"):
        assert replaces_earlier_demo(output_dir)
    assert "holds a finished demo run; the demo starts again from scratch and replaces it" in caplog.text
    assert "--output-dir DIR keeps it" in caplog.text


def test_demo_refuses_to_replace_a_run_that_was_evaluated(tmp_path):
    """`phitune eval` (with benchmarks, many minutes on a CPU) wrote eval.json and report.md into the demo's run: a
    second `phitune demo` there says so in one line and deletes nothing (it used to delete them with the run)."""
    from phitune.tiny.phi3 import tiny_base_path

    output_dir = tmp_path / "demo"
    output_dir.mkdir()
    (output_dir / "phitune_complete").write_text("finished\n")
    (output_dir / "phitune_config.yaml").write_text(f"model: {{name_or_path: '{tiny_base_path()}'}}\n")
    (output_dir / "eval.json").write_text('{"benchmarks": {}}\n')
    (output_dir / "report.md").write_text("# report\n")
    before = sorted(p.name for p in output_dir.iterdir())
    with pytest.raises(PhituneError, match=r"holds an earlier demo run that is evaluated \(eval.json, report.md, "
                                           r"which a new demo would delete\); move those out"):
        run_demo(output_dir, [])
    assert sorted(p.name for p in output_dir.iterdir()) == before


def test_demo_refusal_names_everything_in_its_way_at_once(tmp_path):
    """An evaluated demo run beside a file of the user's (an export): one refusal names both, not one per try."""
    from phitune.tiny.phi3 import tiny_base_path

    output_dir = tmp_path / "demo"
    output_dir.mkdir()
    (output_dir / "phitune_complete").write_text("finished\n")
    (output_dir / "phitune_config.yaml").write_text(f"model: {{name_or_path: '{tiny_base_path()}'}}\n")
    for name in ("eval.json", "report.md", "eval.png", "model.gguf", "notes.txt"):
        (output_dir / name).write_text("x\n")
    with pytest.raises(PhituneError) as refused:
        run_demo(output_dir, [])
    assert str(refused.value) == (
        f"{output_dir} holds an earlier demo run that is evaluated (eval.json, report.md, eval.png, which a new demo "
        "would delete) and has beside it model.gguf, notes.txt, which the demo would not delete; move those out, or "
        "choose another --output-dir")
