"""What a person reads while phitune trains: a progress bar and one line per logging step, in place of
transformers' raw log dicts (`{'loss': '5.375', 'grad_norm': '2.902', ...}`).

Everything goes through one rich console (rich's global one, which phitune's log handler also writes to), so log
lines print above a live bar on a terminal; on a pipe or a file the bar is drawn once, when training ends, and the
lines carry the same numbers (step / total, loss, eval loss, learning rate, tokens/s, time left).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import TrainerCallback

from phitune.terminal import console, format_duration, format_value

# (log key, label, format) in the order a line shows them; keys absent from a log are left out. Eval keys come from
# evaluation logs; TRL's DPO / ORPO add the reward keys: reward accuracy, the share of pairs whose chosen answer
# gets the higher implicit reward; reward margin, chosen minus rejected reward (signed: it starts at 0 and should grow).
TRAIN_FIELDS = [
    ("loss", "loss", "loss"), ("rewards/accuracies", "reward accuracy", "percent"),
    ("rewards/margins", "reward margin", "signed"), ("mean_token_accuracy", "token accuracy", "percent"),
    ("grad_norm", "grad norm", "loss"), ("learning_rate", "lr", "rate"),
]
EVAL_FIELDS = [
    ("eval_loss", "eval loss", "loss"), ("eval_perplexity", "perplexity", "loss"),
    ("eval_token_accuracy", "token accuracy", "percent"), ("eval_rewards/accuracies", "reward accuracy", "percent"),
    ("eval_rewards/margins", "reward margin", "signed"),
]
# Shown for SFT only. TRL 1.16's DPOTrainer also logs mean_token_accuracy (top-1 next-token accuracy on the chosen
# answers), a score DPO does not optimise: next to the reward accuracy it reads as the run failing (0.0% on a tiny
# model whose pairs rank right); it stays in trainer_state.json. ORPO does not log it.
SFT_ONLY = ("mean_token_accuracy", "eval_mean_token_accuracy")


# GRPO (TRL's GRPOTrainer) logs the weighted reward of its sampled completions (`reward`) and each reward's mean
# (`rewards/NAME/mean`): what shows learning. Its loss is about 0 by construction (one pass per generation batch:
# the policy ratio is 1), so a GRPO line leads with the rewards and leaves the loss out.
GRPO_FIELDS = [("reward", "reward", "loss"), ("completions/mean_length", "completion length", "loss"),
               ("grad_norm", "grad norm", "loss"), ("learning_rate", "lr", "rate")]
REWARD_MEAN = re.compile(r"^rewards/(.+)/mean$")


def is_grpo_log(logs: dict) -> bool:
    """A log of GRPO's training: it holds the sampled completions' reward means."""
    return any(REWARD_MEAN.match(key) for key in logs)


def describe_log(logs: dict, fields: list[tuple[str, str, str]]) -> list[str]:
    """The `label value` pieces of one log, in the fields' order; a preference log (reward keys) without SFT's; a
    GRPO log as GRPO_FIELDS, each reward's mean after the total."""
    if is_grpo_log(logs):
        pieces = [f"{label} {format_value(logs[key], kind)}" for key, label, kind in GRPO_FIELDS if key in logs]
        means = [f"{found.group(1)} {format_value(value)}" for key, value in logs.items()
                 if (found := REWARD_MEAN.match(key))]
        return pieces[:1] + means + pieces[1:]
    preference = any("rewards/" in key for key in logs)
    return [f"{label} {format_value(logs[key], kind)}" for key, label, kind in fields
            if key in logs and not (preference and key in SFT_ONLY)]


class TrainingConsole(TrainerCallback):
    """A progress bar (step / total, loss, eval loss, learning rate, tokens/s, time left) and one readable line per
    log; on the main process only. Replaces transformers' ProgressCallback / PrinterCallback (see `use_console`)."""

    def __init__(self, show_bar: bool = True):
        self.show_bar = show_bar
        self.progress: Progress | None = None
        self.task = None
        self.stats = {"loss": "-", "eval loss": "-", "lr": "-"}
        self.start_time = self.start_step = self.start_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.start_time, self.start_step = time.perf_counter(), state.global_step
        self.start_tokens = state.num_input_tokens_seen or 0
        if self.show_bar:
            self.progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=console)
            self.task = self.progress.add_task("training", total=state.max_steps, completed=state.global_step,
                                               stats=self._stats_text(state))
            self.progress.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, stats=self._stats_text(state))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        evaluation = any(key.startswith("eval_") for key in logs)
        pieces = describe_log(logs, EVAL_FIELDS if evaluation else TRAIN_FIELDS)
        if not pieces:  # the Trainer's closing log (train_runtime, ...): the summary table shows it
            return
        self._remember(logs)
        where = f"step {state.global_step:>{len(str(state.max_steps))}}/{state.max_steps}"
        if not evaluation:
            pieces += self._speed(state)
        console.print("  ".join([where, *pieces]), highlight=False, soft_wrap=True)
        if self.progress is not None:
            self.progress.update(self.task, stats=self._stats_text(state))

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, stats=self._stats_text(state))
        self.close()

    def close(self) -> None:
        """Stop the live bar (rich shows the terminal's cursor again). on_train_end never runs when training stops
        with an error (a NaN, a second Ctrl-C, an exception), so phitune.run.lifecycle.fit calls `close_console` as well."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def _remember(self, logs: dict) -> None:
        if is_grpo_log(logs) and "loss" in self.stats:  # the bar too shows GRPO's reward, not its loss
            self.stats = {"reward": "-", "lr": "-"}
        for key, label, kind in (("loss", "loss", "loss"), ("eval_loss", "eval loss", "loss"),
                                 ("reward", "reward", "loss"), ("learning_rate", "lr", "rate")):
            if key in logs and label in self.stats:
                self.stats[label] = format_value(logs[key], kind)

    def _speed(self, state) -> list[str]:
        """Tokens per second and the time left, over the steps of this process (a resumed run counts from its
        resume point)."""
        elapsed = time.perf_counter() - self.start_time
        steps = state.global_step - self.start_step
        if elapsed <= 0 or steps <= 0:
            return []
        left = elapsed / steps * max(0, state.max_steps - state.global_step)
        return [*self._tokens_per_second(state, elapsed), f"{format_duration(left)} left"]

    def _tokens_per_second(self, state, elapsed: float) -> list[str]:
        tokens = (state.num_input_tokens_seen or 0) - self.start_tokens
        return [f"{tokens / elapsed:,.0f} tok/s"] if tokens > 0 and elapsed > 0 else []

    def _stats_text(self, state) -> str:
        """The bar's numbers; rich's own column shows the time left."""
        speed = self._tokens_per_second(state, time.perf_counter() - self.start_time)
        return "  ".join([*(f"{label} {value}" for label, value in self.stats.items()), *speed])


PROGRESS_LOG = "phitune_progress.jsonl"  # in the run's output directory; phitune.ui reads it (phitune.ui.runs)


class ProgressLog(TrainerCallback):
    """The console's numbers as lines of JSON in output_dir/phitune_progress.jsonl, so a page (phitune ui) or a
    script can follow a run it did not start: a "begin" line (pid, step, max_steps, tokens seen, time), one
    "log" line per training or evaluation log, a "step" line at most every `every_s` seconds, an "end" line.
    Appended, never rewritten: a resumed run adds a begin line, from which a reader drops the steps it retrains."""

    def __init__(self, every_s: float = 2.0):
        self.every_s = every_s
        self.last = 0.0

    def _write(self, args, state, event: str, **extra) -> None:
        if not state.is_world_process_zero:
            return
        self.last = time.time()
        line = {"event": event, "time": round(self.last, 3), "step": state.global_step,
                "max_steps": state.max_steps, "tokens": state.num_input_tokens_seen or 0, **extra}
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(args.output_dir) / PROGRESS_LOG, "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        self._write(args, state, "begin", pid=os.getpid())

    def on_step_end(self, args, state, control, **kwargs):
        if time.time() - self.last >= self.every_s:
            self._write(args, state, "step")

    def on_log(self, args, state, control, logs=None, **kwargs):
        numbers = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if numbers:
            self._write(args, state, "log", logs=numbers)

    def on_train_end(self, args, state, control, **kwargs):
        self._write(args, state, "end")


def use_console(trainer) -> None:
    """Swap transformers' progress bar and dict printer for TrainingConsole (a public Trainer hook)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    # On a pipe or a file a live bar draws nothing useful; the log lines carry its numbers there. (disable_tqdm is
    # no guide: transformers turns it on by itself when its log level is above warning, as phitune sets it.)
    trainer.add_callback(TrainingConsole(show_bar=console.is_terminal))
    trainer.add_callback(ProgressLog())


def close_console(trainer) -> None:
    """Stop the trainer's live bar, if it has one; safe to call more than once."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TrainingConsole):
            callback.close()
