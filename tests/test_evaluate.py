"""phitune.after.evaluate: base vs fine-tuned metrics on the held-out demo set, and the files the report leaves."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from _fixtures_eval import trained_run  # noqa: F401  (fixture)
from typer.testing import CliRunner

from phitune.after.evaluate import evaluation_data, generation_metrics, run_evaluation, split_prompts
from phitune.after.generate import SamplingSettings, resolve_model_source


def test_finetuned_beats_base_on_loss_and_rouge(trained_run, tmp_path):  # noqa: F811
    model_cfg, adapter = resolve_model_source(trained_run)
    data_cfg, _ = evaluation_data(trained_run, None)
    result = run_evaluation(model_cfg, adapter, data_cfg, tmp_path, num_generate=16,
                            settings=SamplingSettings(max_new_tokens=24), batch_size=16)
    base, tuned = result.metrics["base"], result.metrics["fine-tuned"]
    assert tuned["loss"] < base["loss"]
    assert tuned["token_accuracy"] > base["token_accuracy"]
    assert tuned["rougeL_f1"] > base["rougeL_f1"]
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["metrics"]["fine-tuned"]["loss"] == pytest.approx(tuned["loss"])
    assert len(saved["samples"]) == 16
    assert (tmp_path / "eval.png").stat().st_size > 0
    assert "![metrics](eval.png)" in (tmp_path / "report.md").read_text()
    # One definition (phitune.after.metrics), the same tokens and masks as training: our loss equals the trainer's eval
    # loss on the same rows, though the trainer scored them in one batch of 40 and this in batches of 16.
    trainer_loss = json.loads((trained_run / "metrics.json").read_text())["eval_loss_after"]
    assert tuned["loss"] == pytest.approx(trainer_loss, rel=1e-5)


def test_eval_command_writes_into_output_and_keeps_earlier_benchmarks(trained_run, tmp_path):  # noqa: F811
    """`phitune eval --benchmarks` and then a plain `phitune eval` into the same folder: the benchmarks stay in
    eval.json and in report.md's table (the reverse order is test_benchmarks'); the command prints its own table."""
    from phitune.cli import app

    scores = {"base": {"acc,none": 0.25}, "fine-tuned": {"acc,none": 0.5}}
    bench = dict(version=2.0, examples=6, chat_template=False, metric="acc,none", scores=scores, tasks={})
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "eval.json").write_text(json.dumps({"metrics": {}, "info": {}, "samples": [],
                                                           "benchmarks": {"phitune_choices": bench}}))
    result = CliRunner().invoke(app, ["eval", str(trained_run), "--num-generate", "2", "--max-new-tokens", "4",
                                      "--output", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    assert "fine-tuned" in result.output and "eval loss" in result.output
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert set(saved["metrics"]) == {"base", "fine-tuned"} and saved["benchmarks"] == {"phitune_choices": bench}
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "| eval loss (assistant tokens) |" in report
    assert "| phitune_choices | acc | 2.0 | 6 | no | 0.2500 | 0.5000 |" in report


def test_a_full_disk_keeps_the_earlier_eval_whole_and_leaves_no_half_written_file(trained_run, tmp_path,  # noqa: F811
                                                                                   capsys):
    """A real 1 MiB tmpfs, filled: `phitune eval --output` and `phitune generate --output` into it each stop with one
    line naming the file and "No space left on device", exit 2; the earlier eval.json is whole (its benchmarks kept)
    and no partial file is left. Before, eval.json was cut to nothing (its benchmarks lost) and the command ended
    in a traceback. Needs root (mount); skipped without."""
    from phitune.cli import main

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)]).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        earlier = json.dumps({"metrics": {}, "info": {}, "samples": [], "benchmarks": {"phitune_choices": dict(
            version=2.0, examples=6, chat_template=False, metric="acc,none", scores={"base": {"acc,none": 0.25}},
            tasks={})}})
        (disk / "eval.json").write_text(earlier)
        (tmp_path / "prompts.jsonl").write_text('{"prompt": "What noise does a cow make?"}\n')
        with open(disk / "filler", "wb", buffering=0) as filler, pytest.raises(OSError):  # the disk is full
            while True:
                filler.write(b"\0" * 4096)
        commands = {disk / "eval.json": ["eval", str(trained_run), "--num-generate", "1", "--max-new-tokens", "2",
                                         "--output", str(disk)],
                    disk / "answers.jsonl": ["generate", str(trained_run), "--input", str(tmp_path / "prompts.jsonl"),
                                             "--output", str(disk / "answers.jsonl"), "--max-new-tokens", "2"]}
        for written, argv in commands.items():
            with pytest.raises(SystemExit) as stop:
                main(argv)
            err = capsys.readouterr().err
            assert stop.value.code == 2 and "Traceback" not in err, err[-2000:]
            assert err.strip().splitlines()[-1] == f"error: could not write {written}: No space left on device"
        assert (disk / "eval.json").read_text() == earlier
        assert sorted(path.name for path in disk.iterdir()) == ["eval.json", "filler"]
    finally:
        subprocess.run(["umount", "--lazy", str(disk)])


def test_generation_metrics_rouge_and_exact_match():
    metrics = generation_metrics(["The cat  sat.", "a dog"], ["the cat sat.", "the cat sat"])
    assert metrics["exact_match"] == 0.5
    assert metrics["rougeL_f1"] == pytest.approx((1.0 + 0.0) / 2)


def test_split_prompts_uses_the_last_assistant_turn(phi3_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(phi3_tokenizer_dir)
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    prompts, references = split_prompts([messages], tokenizer)
    assert prompts == [messages[:3]] and references == ["d"]
