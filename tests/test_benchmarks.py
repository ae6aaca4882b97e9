"""phitune eval --benchmarks: lm-evaluation-harness run for real on two local tasks (tests/data/benchmarks: a YAML
file each over a small JSONL), on the base and the fine-tuned tiny model side by side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _fixtures_eval import demo_run, trained_run  # noqa: F401  (fixtures)
from conftest import extra_line
from typer.testing import CliRunner

pytest.importorskip("lm_eval", reason="the [bench] extra (lm-eval) is part of the test extras")
TASKS = Path(__file__).parent / "data" / "benchmarks"


def run_eval(*args: str):
    from phitune.cli import app

    return CliRunner().invoke(app, ["eval", *args])


def refused(capsys, *args: str) -> str:
    """stderr of `phitune eval ARGS` through main(), as the installed command runs: exit code 2 and one line."""
    from phitune.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["eval", *args])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.fixture
def in_tasks_folder(monkeypatch):
    monkeypatch.chdir(TASKS)  # the tasks named as a user in this folder names them


@pytest.fixture(scope="module")
def facts() -> list[dict]:
    return [json.loads(line) for line in (TASKS / "phitune_facts.jsonl").read_text(encoding="utf-8").splitlines()]


def phitune_answers(run_dir: Path, questions: list[str]) -> dict[str, list[str]]:
    """phitune's own greedy answers (generate_replies, as `phitune generate`) of the base and the tuned model."""
    from phitune.after.generate import SamplingSettings, attach_adapter, generate_replies, load_for_inference
    from phitune.after.generate import resolve_model_source

    model_cfg, adapter = resolve_model_source(run_dir)
    model, tokenizer = load_for_inference(model_cfg)
    conversations = [[{"role": "user", "content": q}] for q in questions]
    settings = SamplingSettings(max_new_tokens=24)
    base = generate_replies(model, tokenizer, conversations, settings)
    return {"base": base, "fine-tuned": generate_replies(attach_adapter(model, adapter), tokenizer, conversations,
                                                         settings)}


def test_local_tasks_score_base_and_fine_tuned_with_versions_counts_and_the_chat_template(
        demo_run, tmp_path, in_tasks_folder, facts):
    """The generated task's exact match is what phitune's own greedy answers give (so lm-eval prompted the model
    through the chat template and stopped at <|end|>): the base answers none, the tuned model some. The
    multiple-choice task is scored on the plain prompt. An earlier eval's metrics in eval.json are kept."""
    earlier = {"metrics": {"base": {"loss": 3.1}, "fine-tuned": {"loss": 1.2}}, "info": {"eval_examples": 40},
               "samples": []}
    (tmp_path / "eval.json").write_text(json.dumps(earlier))
    result = run_eval(str(demo_run), "--benchmarks", "phitune_facts.yaml, phitune_choices.yaml",
                      "--output", str(tmp_path), "--batch-size", "4")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["metrics"] == earlier["metrics"]
    generated, choices = saved["benchmarks"]["phitune_facts"], saved["benchmarks"]["phitune_choices"]
    assert (generated["version"], generated["examples"], generated["chat_template"]) == (1.0, 12, True)
    assert (choices["version"], choices["examples"], choices["chat_template"]) == (2.0, 6, False)
    assert generated["tasks"]["phitune_facts"]["scores"] == generated["scores"]  # a lone task: its own row
    answers = phitune_answers(demo_run, [row["question"] for row in facts])
    for name in ("base", "fine-tuned"):
        right = [a.lower() == row["answer"].lower() for a, row in zip(answers[name], facts)]
        assert generated["scores"][name]["exact_match,none"] == pytest.approx(sum(right) / len(right)), name
        assert 0.0 <= choices["scores"][name]["acc,none"] <= 1.0
    assert generated["scores"]["base"]["exact_match,none"] == 0.0
    assert generated["scores"]["fine-tuned"]["exact_match,none"] >= 3 / 12  # 5 of 12 here
    report = (tmp_path / "report.md").read_text()
    assert "| eval loss (assistant tokens) | 3.100 | 1.200 |" in report
    assert "| phitune_facts | exact_match | 1.0 | 12 | yes | 0.000 |" in report
    assert "| phitune_choices | acc | 2.0 | 6 | no |" in report
    assert (tmp_path / "eval.png").stat().st_size > 0


def test_chat_tasks_stop_at_the_end_of_turn_and_multiple_choice_tasks_are_left_alone(in_tasks_folder):
    """Hub tasks' stop strings are other models' (like the local task's "Question:"): the end of turn is added to
    a chat task's, once, and a multiple-choice task is not touched (it generates nothing)."""
    from phitune.after.benchmarks import load_benchmarks, stop_at_end_of_turn, task_manager

    names = ["phitune_facts.yaml", "phitune_choices.yaml"]
    facts, choices = load_benchmarks(names, task_manager(names))
    for _ in range(2):
        stop_at_end_of_turn([facts, choices], ["<|endoftext|>", "<|end|>"])
    assert facts["leaves"]["phitune_facts"].config.generation_kwargs["until"] == [
        "Question:", "<|endoftext|>", "<|end|>"]
    assert facts["chat"] and not choices["chat"]
    assert "<|end|>" not in str(choices["leaves"]["phitune_choices"].config.generation_kwargs)


def test_limit_caps_the_examples_per_task(demo_run, tmp_path, in_tasks_folder):
    result = run_eval(str(demo_run), "--benchmarks", "phitune_choices.yaml", "--limit", "2",
                      "--output", str(tmp_path))
    assert result.exit_code == 0, result.output
    bench = json.loads((tmp_path / "eval.json").read_text())["benchmarks"]["phitune_choices"]
    assert bench["examples"] == 2 and bench["limit"] == 2
    assert "at most 2 examples per task" in (tmp_path / "report.md").read_text()


def test_an_unknown_task_is_one_line_with_the_closest_names_and_writes_nothing(tmp_path, capsys):
    assert refused(capsys, str(tmp_path), "--benchmarks", "gsm8x", "--output", str(tmp_path / "out")) == (
        "error: unknown benchmark 'gsm8x' (not an lm-eval task, group or tag); did you mean gsm8k?")
    assert not (tmp_path / "out").exists()


def test_without_lm_eval_the_error_names_the_extra(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)  # as when lm-eval is not installed: import fails
    assert refused(capsys, str(tmp_path), "--benchmarks", "gsm8k") == (
        f"error: --benchmarks runs lm-evaluation-harness, which is not installed: {extra_line('bench')}")


def test_limit_without_benchmarks_and_data_with_them_are_refused(tmp_path, capsys):
    assert refused(capsys, str(tmp_path), "--limit", "3") == "error: --limit goes with --benchmarks"
    assert refused(capsys, str(tmp_path), "--benchmarks", "gsm8k", "--data", "x.jsonl") == (
        "error: --data does not apply to --benchmarks (lm-eval reads each task's own data)")


def test_a_task_yaml_reads_its_data_beside_it_from_any_folder_and_only_the_table_is_printed(
        trained_run, tmp_path):  # noqa: F811
    """As docs/benchmarks.md runs it, from the repository root: the YAML's relative data_files are found next to
    it; no progress bars or git messages around the table, which keeps whole names at 80 columns."""
    root = Path(__file__).parent.parent
    done = subprocess.run([sys.executable, "-m", "phitune.cli", "eval", str(trained_run), "--benchmarks",
                           "tests/data/benchmarks/phitune_choices.yaml", "--limit", "2", "--output", str(tmp_path)],
                          cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "80", "TERM": "dumb"})
    assert done.returncode == 0, done.stderr
    for noise in ("Running loglikelihood", "Generating test split", "fatal:", "%|"):
        assert noise not in done.stderr + done.stdout, done.stderr
    table = [line for line in done.stdout.splitlines() if line.strip()]
    assert all(len(line) <= 80 for line in table) and "…" not in done.stdout, done.stdout
    assert "phitune_choice" in done.stdout
    assert json.loads((tmp_path / "eval.json").read_text())["benchmarks"]["phitune_choices"]["examples"] == 2


def test_the_table_keeps_whole_names_at_80_columns(monkeypatch):
    from rich.console import Console

    from phitune.after import report

    scores = {"base": {"acc,none": 0.25}, "fine-tuned": {"acc,none": 0.5}}
    names = ("phitune_facts", "mmlu_high_school_european_history")
    benchmarks = {name: dict(version=1.0, examples=12, chat_template=False, metric="acc,none", scores=scores)
                  for name in names}
    console = Console(width=80, record=True)
    monkeypatch.setattr(report, "console", console)  # the width a user's terminal gives
    report.print_benchmark_table(type("Result", (), dict(benchmarks=benchmarks, output_dir=Path("out"))))
    text = console.export_text()
    assert "…" not in text and all(len(line) <= 80 for line in text.splitlines())
    cells = "".join(line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│"))
    assert all(name in cells for name in names), text
