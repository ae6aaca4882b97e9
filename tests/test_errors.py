"""Bad input ends in one clear line on stderr and exit code 2, with no traceback, before the weights are loaded.

Every case runs the real CLI in a subprocess (`python -m phitune.cli train ...`). A single stderr line also proves
that no model weights were loaded: loading prints progress bars and warnings on stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

DEMO_DATA = Path(__file__).parents[1] / "src" / "phitune" / "assets" / "demo_chat"
GOOD = {"messages": [{"role": "user", "content": "Which colour is snow?"}, {"role": "assistant", "content": "White."}]}
LONG_SYSTEM = {"role": "system", "content": "Please read all of this carefully before answering. " * 20}


def rows_file(*rows) -> dict:
    """A train.jsonl whose lines are the given rows (dicts are dumped as JSON, strings written as they are)."""
    return {"train.jsonl": "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)}


def messages(*turns) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


# (id, files written to the case directory, --set overrides, extra CLI args, words stderr must contain)
CASES = [
    ("missing_data_file", {}, ["data.train={d}/nope.jsonl"], [], ["data file not found", "nope.jsonl"]),
    ("data_path_is_directory", {"dir.jsonl/": ""}, ["data.train={d}/dir.jsonl"], [], ["is a directory"]),
    ("unreadable_data_file", {"train.jsonl": json.dumps(GOOD) + "\n"}, [], ["chmod"], ["cannot read", "train.jsonl"]),
    ("malformed_json_line", rows_file(GOOD, GOOD, '{"messages": [{"role": "user"'), [], [],
     ["train.jsonl:3", "malformed JSON"]),
    ("unknown_row_format", rows_file({"question": "a?", "answer": "b"}), [], [],
     ["unknown data format", "question"]),
    ("unknown_format_name", rows_file(GOOD), ["data.format=chatml"], [], ["data.format must be one of", "chatml"]),
    ("no_assistant_turn", rows_file(GOOD, messages(("user", "hi"))), [], [],
     ["train.jsonl:2", "no assistant turn"]),
    ("roles_out_of_order", rows_file(messages(("user", "a"), ("user", "b"), ("assistant", "c"))), [], [],
     ["train.jsonl:1", "roles out of order"]),
    ("empty_content", rows_file(GOOD, messages(("user", "a"), ("assistant", "  "))), [], [],
     ["train.jsonl:2", "empty content"]),
    ("empty_after_skipping", rows_file(messages(("user", "a")), "not json"), ["data.on_bad_row=skip"], [],
     ["empty after skipping 2 bad rows"]),
    ("every_label_masked", rows_file({"messages": [LONG_SYSTEM, *GOOD["messages"]]}), ["data.max_seq_length=32"], [],
     ["every label is masked", "max_seq_length"]),
    ("not_utf8", {"train.jsonl": json.dumps(GOOD).encode() + b"\n" + b'{"x": "caf\xe9"}\n'}, [], [],
     ["train.jsonl:2", "not UTF-8"]),
    ("unknown_config_key", rows_file(GOOD), ["data.trian=x.jsonl"], [], ["unknown key data.trian", "'train'"]),
    ("mistyped_training_key", rows_file(GOOD), ["training_config.learning_rte=0.1"], [],
     ["unknown key training_config.learning_rte", "'learning_rate'"]),
    ("wrong_type_data_value", rows_file(GOOD), ["data.max_seq_length=long"], [],
     ["data.max_seq_length must be int", "'long'"]),
    ("wrong_type_training_value", rows_file(GOOD), ["training_config.max_steps=ten"], [],
     ["training_config.max_steps must be int", "'ten'"]),
    ("invalid_training_value", rows_file(GOOD), ["training_config.lr_scheduler_type=cosin"], [],
     ["training_config.lr_scheduler_type must be one of linear, cosine,", "got 'cosin' (did you mean 'cosine'?)"]),
    ("training_values_the_trainer_rejects", rows_file(GOOD),
     ["training_config.load_best_model_at_end=true", "training_config.save_strategy=epoch"], [],
     ["training_config:", "load_best_model_at_end requires the save and eval strategy to match"]),
    ("model_path_missing", rows_file(GOOD), ["model.name_or_path={d}/no-such-model"], [],
     ["model path does not exist", "no-such-model"]),
    ("target_modules_match_nothing", rows_file(GOOD), ["peft_config.target_modules=[q_proj, o_proj]"], [],
     ["'q_proj' matches nothing; this model's linear layers are qkv_proj, o_proj, gate_up_proj, down_proj"]),
    ("max_seq_length_beyond_context", rows_file(GOOD), ["data.max_seq_length=4096"], [],
     ["max_seq_length 4096 exceeds the model's context of 1024"]),
    ("output_dir_holds_finished_run", {**rows_file(GOOD), "out/phitune_complete": "finished\n"}, [], [],
     ["already holds a finished run", "--overwrite", "--resume"]),
    ("resume_without_checkpoint", rows_file(GOOD), [], ["--resume"], ["no complete checkpoint"]),
]


def run_cli(args: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "phitune.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def write_case(directory: Path, model_dir: Path, files: dict) -> Path:
    """Write the case's files (a name ending in / is a directory) and a config for a one-step run of the tiny model
    on them; return the config path."""
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):  # a directory where a file is expected
            path.mkdir()
            continue
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
    config = {
        "model": {"name_or_path": str(model_dir), "torch_dtype": "float32"},
        "data": {"train": str(directory / "train.jsonl"), "eval_split": 0, "max_seq_length": 128},
        "training_config": {"output_dir": str(directory / "out"), "max_steps": 1, "seed": 0},
        "peft_config": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
    }
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def case_args(directory: Path, model_dir: Path, files: dict, overrides: list[str], extra: list[str]):
    """The CLI arguments of one case, after writing its files."""
    config = write_case(directory, model_dir, files)
    if "chmod" in extra:
        # Root reads any file whatever its mode, so as root the unreadable file is /proc/self/mem (reading it at
        # offset 0 fails with EIO for every user); otherwise a file with mode 000.
        if os.geteuid() == 0:
            (directory / "train.jsonl").unlink()
            (directory / "train.jsonl").symlink_to("/proc/self/mem")
        else:
            (directory / "train.jsonl").chmod(0)
        extra = []
    args = ["train", str(config), *extra]
    for item in overrides:
        args += ["--set", item.format(d=directory)]
    return args


@pytest.fixture(scope="module")
def outcomes(tiny_model_dir, tmp_path_factory) -> dict:
    """Run every case's CLI, three at a time: each process spends its few seconds mostly importing torch."""
    root = tmp_path_factory.mktemp("errors")
    jobs = {}
    for case_id, files, overrides, extra, _ in CASES:
        (root / case_id).mkdir()
        jobs[case_id] = case_args(root / case_id, tiny_model_dir, files, overrides, extra)

    def run(item):
        case_id, args = item
        return case_id, run_cli(args, cwd=root / case_id)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(run, jobs.items()))


@pytest.mark.parametrize("case_id, words", [(c[0], c[4]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(outcomes, case_id, words):
    result = outcomes[case_id]
    stderr_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert len(stderr_lines) == 1, result.stderr  # also proves no weights were loaded: loading writes to stderr
    assert stderr_lines[0].startswith("error: ")
    for word in words:
        assert word in stderr_lines[0]


def test_on_bad_row_skip_reports_count_and_lines(tiny_model_dir, tmp_path):
    """`data.on_bad_row: skip` trains on the good rows and says how many were skipped and where the first ones are."""
    config = write_case(tmp_path, tiny_model_dir, rows_file(GOOD, "not json", GOOD, messages(("user", "a")), GOOD))
    result = run_cli(["train", str(config), "--on-bad-row", "skip", "--set", "training_config.save_strategy=no"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    output = " ".join((result.stdout + result.stderr).split())
    assert "skipped 2 bad rows" in output
    assert "train.jsonl:2" in output and "train.jsonl:4" in output
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["skipped_rows"] == 2


def test_on_bad_row_flag_exists():
    """`phitune train --on-bad-row skip` is the flag spelling of data.on_bad_row."""
    result = run_cli(["train", "--help"], Path.cwd())
    assert "--on-bad-row" in result.stdout and "skip" in result.stdout
