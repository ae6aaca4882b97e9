"""Bad input ends in one clear line on stderr and exit code 2, with no traceback, before the weights are loaded.

The table of bad input for every command is tests/test_promises.py (in-process); these run the real CLI in a
subprocess (`python -m phitune.cli train ...`): two of its rows as a user runs them, and data.on_bad_row: skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

GOOD = {"messages": [{"role": "user", "content": "Which colour is snow?"}, {"role": "assistant", "content": "White."}]}


def rows_file(*rows) -> dict:
    """A train.jsonl whose lines are the given rows (dicts are dumped as JSON, strings written as they are)."""
    return {"train.jsonl": "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)}


def messages(*turns) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def run_cli(args: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "phitune.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def write_case(directory: Path, model_dir: Path, files: dict) -> Path:
    """Write the case's files and a config for a one-step run of the tiny model on them; return the config path."""
    for name, content in files.items():
        (directory / name).write_text(content, encoding="utf-8")
    config = {
        "model": {"name_or_path": str(model_dir), "torch_dtype": "float32"},
        "data": {"train": str(directory / "train.jsonl"), "eval_split": 0, "max_seq_length": 128},
        "training_config": {"output_dir": str(directory / "out"), "max_steps": 1, "seed": 0},
        "peft_config": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
    }
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.mark.parametrize("files, overrides, words", [
    (rows_file(GOOD, GOOD, '{"messages": [{"role": "user"'), [], ["train.jsonl:3", "malformed JSON"]),
    (rows_file(GOOD), ["training_config.max_steps=ten"], ["training_config.max_steps must be int", "'ten'"]),
], ids=["bad_data", "bad_config"])
def test_a_real_process_says_one_line(tiny_model_dir, tmp_path, files, overrides, words):
    """The table of bad input (tests/test_promises.py) runs in-process; here two of its rows run as a user runs them,
    so whatever only a real process prints (warnings at import, library messages) would show."""
    config = write_case(tmp_path, tiny_model_dir, files)
    result = run_cli(["train", str(config), *[part for item in overrides for part in ("--set", item)]], tmp_path)
    stderr_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert len(stderr_lines) == 1 and stderr_lines[0].startswith("error: "), result.stderr
    assert all(word in stderr_lines[0] for word in words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml", "train.jsonl"]  # no output directory made


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


def test_a_failed_write_no_command_wraps_is_one_line(capsys):
    """A full disk, a quota or a read-only disk in a write no command wraps itself is one line and exit 2: the file
    when the error names it, the OS's reason otherwise. A permission error (a read as often as a write) and other
    crashes keep their traceback."""
    import errno

    from phitune.cli import _known_crash

    assert _known_crash(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "out/x.json")) == 2
    assert capsys.readouterr().err.strip() == "error: could not write out/x.json: No space left on device"
    assert _known_crash(OSError(errno.EROFS, os.strerror(errno.EROFS))) == 2
    assert capsys.readouterr().err.strip() == ("error: a write failed: Read-only file system (phitune --debug ... "
                                               "shows where)")
    for crash in (PermissionError(errno.EACCES, "Permission denied", "x"), ValueError("a bug")):
        with pytest.raises(type(crash)):
            _known_crash(crash)


def test_a_missing_extras_pip_line_fits_the_installation(tmp_path):
    """From a checkout the README's editable form, made absolute (pip reads the constraints file and the checkout
    from any folder); installed from a wheel (the package alone in site-packages) PyPI's form."""
    import shlex
    import shutil

    from phitune.errors import pip_install

    checkout = Path(__file__).parents[1]
    words = shlex.split(pip_install("bench"))
    assert words == ["pip", "install", "-c", str(checkout / "requirements" / "ci-constraints.txt"), "-e",
                     f"{checkout}[bench]"] and Path(words[3]).is_file()
    site = tmp_path / "site-packages" / "phitune"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("")
    shutil.copy(checkout / "src" / "phitune" / "errors.py", site)
    done = subprocess.run([sys.executable, "-c", "from phitune.errors import pip_install; print(pip_install('ui'))"],
                          env={**os.environ, "PYTHONPATH": str(site.parent)}, capture_output=True, text=True)
    assert done.stdout == "pip install 'phitune[ui]'\n", done.stderr
