"""The run's report files: loss.png."""

import warnings

from phitune.after.report import plot_losses


def test_loss_png_of_a_run_that_logged_no_loss_is_written_without_a_warning(tmp_path):
    """A 2-step GRPO run at logging_steps 10 logs no loss; matplotlib's legend warned on stderr about it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_losses([{"step": 2, "train_runtime": 1.0, "train_loss": 0.2}], tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0


def bench_entry(examples: int, limit: int | None) -> dict:
    """A benchmark as collect_scores makes it and eval.json keeps it."""
    return dict(version=1, examples=examples, chat_template=False, metric="acc,none", backend="hf", limit=limit,
                harness="0.4.13", higher_is_better=True, scores={"base": {"acc,none": 0.5}}, tasks={})


def test_report_says_which_benchmarks_ran_under_limit(tmp_path):
    """eval.json keeps the benchmarks of an earlier `phitune eval` that had no --limit: report.md's note on the
    limit names the rows it covers, not all of them."""
    from phitune.after.benchmarks import write_benchmark_results

    write_benchmark_results(tmp_path, {"gsm8k": bench_entry(1319, None)}, {"model": "tiny"})
    assert "--limit" not in (tmp_path / "report.md").read_text()
    write_benchmark_results(tmp_path, {"ifeval": bench_entry(3, 3), "arc_easy": bench_entry(3, 3)}, {"model": "tiny"})
    report = (tmp_path / "report.md").read_text()
    assert "hf backend; gsm8k: every example (no --limit); ifeval, arc_easy: at most 3 examples per task (--limit); " \
           "a chat task's" in report
    write_benchmark_results(tmp_path, {"gsm8k": bench_entry(3, 3)}, {"model": "tiny"})  # all limited alike now
    assert "hf backend; at most 3 examples per task (--limit); a chat task's" in (tmp_path / "report.md").read_text()
