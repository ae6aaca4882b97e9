"""The run's report files: loss.png."""

import warnings

from phitune.after.report import plot_losses


def test_loss_png_of_a_run_that_logged_no_loss_is_written_without_a_warning(tmp_path):
    """A 2-step GRPO run at logging_steps 10 logs no loss; matplotlib's legend warned on stderr about it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_losses([{"step": 2, "train_runtime": 1.0, "train_loss": 0.2}], tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0
