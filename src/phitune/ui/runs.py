"""Runs as the page sees them, read only from their output directories, so a reload, a second tab or a run started
with `phitune train` in a terminal shows the same thing: the progress log the trainer appends
(phitune.run.console.ProgressLog), metrics.json and the completion marker of a finished run, and, for a run without a
progress log, the log history of its newest checkpoint's trainer_state.json.

Training runs as its own process (`phitune train CONFIG`), started in a session of its own so that it outlives the
page; stop sends it SIGINT, which phitune's graceful stop turns into a checkpoint and exit code 130.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from phitune.errors import PhituneError
from phitune.run.checkpoints import checkpoint_dirs, finished_run
from phitune.run.console import PROGRESS_LOG
from phitune.run.output_dir import run_state
from phitune.terminal import format_duration, format_value


@dataclass
class RunProgress:
    """Where a run stands: state is running, finished, interrupted (stopped or killed) or empty."""

    output_dir: Path
    state: str = "empty"
    step: int = 0
    max_steps: int = 0
    loss: list[tuple[int, float]] = field(default_factory=list)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    tokens_per_second: float | None = None
    seconds_left: float | None = None
    pid: int | None = None

    def summary(self) -> str:
        """One line, as the console's: step / total, loss, eval loss, tokens/s, time left."""
        pieces = [f"{self.state}", f"step {self.step}/{self.max_steps or '?'}"]
        if self.loss:
            pieces.append(f"loss {format_value(self.loss[-1][1])}")
        if self.eval_loss:
            pieces.append(f"eval loss {format_value(self.eval_loss[-1][1])}")
        if self.tokens_per_second:
            pieces.append(f"{self.tokens_per_second:,.0f} tok/s")
        if self.state == "running" and self.seconds_left is not None:
            pieces.append(f"{format_duration(self.seconds_left)} left")
        return "  ·  ".join(pieces)


def read_progress_lines(output_dir: Path) -> list[dict]:
    """The progress log's lines; a line still being written (no newline yet, or cut) is left for the next read."""
    path = Path(output_dir) / PROGRESS_LOG
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    lines = []
    for raw in text.split("\n")[:-1]:
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    return lines


def pid_alive(pid: int | None) -> bool:
    """True when process `pid` runs (a zombie child counts as ended)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().split(") ", 1)[1][:1] != "Z"
    except OSError:  # no /proc (macOS): kill(pid, 0) answered
        return True


def read_progress(output_dir: Path) -> RunProgress:
    """Replay the progress log: the steps a resumed run trains again replace those it had logged before."""
    progress = RunProgress(Path(output_dir))
    lines = read_progress_lines(output_dir)
    if not lines:
        return _from_trainer_state(progress)
    begin = None
    for line in lines:
        if line["event"] == "begin":  # resumed at step N: keep what led to N; a new run at step 0: keep nothing
            begin = line
            progress.pid = line.get("pid")
            progress.loss = [p for p in progress.loss if p[0] <= line["step"] and line["step"]]
            progress.eval_loss = [p for p in progress.eval_loss if p[0] <= line["step"] and line["step"]]
        for key, series in (("loss", progress.loss), ("eval_loss", progress.eval_loss)):
            if key in line.get("logs", {}):
                series.append((line["step"], float(line["logs"][key])))
    last = lines[-1]
    progress.step, progress.max_steps = last["step"], last["max_steps"]
    _speed(progress, begin, last)
    progress.state = _state(output_dir, last, progress.pid)
    return progress


def _speed(progress: RunProgress, begin: dict | None, last: dict) -> None:
    """Tokens per second and time left over the steps of the latest process (as the console counts them)."""
    if begin is None:
        return
    elapsed, steps = last["time"] - begin["time"], last["step"] - begin["step"]
    if elapsed > 0 and last["tokens"] > begin["tokens"]:
        progress.tokens_per_second = (last["tokens"] - begin["tokens"]) / elapsed
    if elapsed > 0 and steps > 0:
        progress.seconds_left = elapsed / steps * max(0, last["max_steps"] - last["step"])


def _state(output_dir: Path, last: dict, pid: int | None) -> str:
    if finished_run(output_dir):
        return "finished"
    if pid_alive(pid):
        return "running"  # training, or the final evaluation and saving after its "end" line
    return "interrupted"


def _from_trainer_state(progress: RunProgress) -> RunProgress:
    """A run without a progress log (an older release's): its newest checkpoint's log history."""
    progress.state = run_state(progress.output_dir) if progress.output_dir.is_dir() else "empty"
    for checkpoint in checkpoint_dirs(progress.output_dir):
        try:
            state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        progress.step, progress.max_steps = state.get("global_step", 0), state.get("max_steps", 0)
        for entry in state.get("log_history", []):
            for key, series in (("loss", progress.loss), ("eval_loss", progress.eval_loss)):
                if key in entry:
                    series.append((entry["step"], float(entry[key])))
        break
    return progress


def find_runs(folders: list[Path], depth: int = 3) -> list[Path]:
    """Every run directory (a progress log, a completion marker or a checkpoint) under `folders`, newest first."""
    found: set[Path] = set()
    for folder in folders:
        _walk(Path(folder), depth, found)
    return sorted(found, key=lambda path: _mtime(path), reverse=True)


def _walk(folder: Path, depth: int, found: set[Path]) -> None:
    try:
        children = [child for child in folder.iterdir() if child.is_dir() and not child.is_symlink()]
    except OSError:
        return
    if (folder / PROGRESS_LOG).is_file() or finished_run(folder) or checkpoint_dirs(folder):
        found.add(folder)
        return
    for child in children:
        if depth > 0 and not child.name.startswith("."):
            _walk(child, depth - 1, found)


def _mtime(path: Path) -> float:
    try:
        return max((path / name).stat().st_mtime for name in (PROGRESS_LOG, ".") if (path / name).exists())
    except OSError:
        return 0.0


def run_row(output_dir: Path) -> dict:
    """One row of the runs table: the run's state and progress, and the numbers of its metrics.json."""
    progress = read_progress(output_dir)
    try:
        metrics = json.loads((Path(output_dir) / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        metrics = {}

    def number(key):
        value = metrics.get(key)
        return format_value(value) if isinstance(value, (int, float)) else "-"

    last_loss = progress.loss[-1][1] if progress.loss else None
    return {"run": str(output_dir), "state": progress.state, "step": f"{progress.step}/{progress.max_steps}",
            "train loss": number("train_loss") if metrics else format_value(last_loss) if last_loss else "-",
            "eval loss before": number("eval_loss_before"), "eval loss after": number("eval_loss_after"),
            "tokens/s": number("tokens_per_second"),
            "time": format_duration(metrics["train_runtime_s"]) if "train_runtime_s" in metrics else "-"}


def train_command(config_path: Path, resume: bool = False, overwrite: bool = False) -> list[str]:
    """The same command a person types: `phitune train CONFIG [--resume | --overwrite]`."""
    return [sys.executable, "-m", "phitune.cli", "train", str(config_path),
            *(["--resume"] if resume else []), *(["--overwrite"] if overwrite else [])]


def start_training(config_path: Path, output_dir: Path, cwd: Path, resume: bool = False,
                   overwrite: bool = False) -> subprocess.Popen:
    """Start `phitune train` as its own process and session (it keeps training when the page stops); its output
    goes to CONFIG.log beside the config. Refused while a run is training in `output_dir`."""
    if read_progress(output_dir).state == "running":
        raise PhituneError(f"{output_dir} is training already; stop it first")
    log_path = Path(config_path).with_suffix(".log")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "w", encoding="utf-8") as log:
        return subprocess.Popen(train_command(config_path, resume, overwrite), cwd=cwd, env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def stop_training(output_dir: Path) -> str:
    """Ask the run training in `output_dir` to stop gracefully (SIGINT: a checkpoint, then exit); the same as
    Ctrl-C in its terminal, so a run started from the command line stops too."""
    progress = read_progress(output_dir)
    if progress.state != "running":
        raise PhituneError(f"{output_dir} is not training ({progress.state})")
    os.kill(progress.pid, signal.SIGINT)
    return f"asked the run in {output_dir} to stop: it saves a checkpoint at the end of this step, then exits"


def evaluate_run(output_dir: Path, log_path: Path, cwd: Path) -> None:
    """`phitune eval RUN --num-generate 5 --max-new-tokens 32` as a process (a minute on a CPU for the demo, where
    the defaults take much longer); waits for it. Its report.md lands in the run; its one-line error is raised."""
    if read_progress(output_dir).state != "finished":
        raise PhituneError(f"{output_dir} holds no finished run to evaluate")
    log_path.parent.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "phitune.cli", "eval", str(output_dir), "--num-generate", "5",
               "--max-new-tokens", "32"]
    with open(log_path, "w", encoding="utf-8") as log:
        code = subprocess.run(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if code != 0:
        lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        raise PhituneError(lines[-1].removeprefix("error: ") if lines else f"phitune eval exited with code {code}")
