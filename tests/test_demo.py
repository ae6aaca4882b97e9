"""The demo: the README's first command. Same code path as a real run; the loss curve is stored and compared."""

import json
from pathlib import Path

import pytest

from phitune.demo import run_demo
from phitune.errors import PhituneError

STORED = json.loads((Path(__file__).parent / "data" / "demo_loss_curve.json").read_text())


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("demo") / "run"
    overrides = ["training_config.num_train_epochs=2", "training_config.logging_steps=10"]
    return run_demo(output_dir, overrides), output_dir


def test_demo_eval_loss_falls_by_a_quarter(demo_run, capsys):
    result, output_dir = demo_run
    metrics = result.metrics
    assert metrics["eval_loss_after"] <= 0.75 * metrics["eval_loss_before"]
    assert (output_dir / "adapter_model.safetensors").exists()


def test_demo_loss_curve_matches_the_stored_one(demo_run):
    """A change to masking, batching or the optimizer shows here first. 2% covers CPU kernel differences."""
    _, output_dir = demo_run
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


def test_demo_starts_again_over_its_own_interrupted_run(tmp_path, caplog):
    """`phitune demo` has no --resume or --overwrite: over an interrupted demo run it trains from scratch, says so,
    and the interrupted checkpoint is gone (a fresh run keeps no step of it)."""
    import yaml

    from phitune.tiny import tiny_base_path
    from phitune.train_support import finished_run

    output_dir = tmp_path / "demo"
    (output_dir / "checkpoint-90").mkdir(parents=True)  # the layout run_dir.run_state calls interrupted
    (output_dir / "phitune_config.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_base_path())}}))
    overrides = ["training_config.max_steps=2", "training_config.eval_strategy=no", "data.max_train_examples=32"]
    with caplog.at_level("WARNING", logger="phitune"):
        run_demo(output_dir, overrides)
    assert "interrupted demo run; the demo starts again from scratch" in caplog.text
    assert finished_run(output_dir) and not (output_dir / "checkpoint-90").exists()
