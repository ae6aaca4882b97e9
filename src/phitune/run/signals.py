"""Graceful stop: on SIGINT or SIGTERM every process finishes the same step, saves a checkpoint and stops."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

from transformers import TrainerCallback

from phitune.errors import PhituneError
from phitune.run.checkpoints import latest_complete_checkpoint
from phitune.run.processes import any_process

log = logging.getLogger("phitune")

REPEAT_WINDOW_S = 1.0  # a second signal this soon after the first is the same stop, not "stop now"


class Interrupted(PhituneError):
    """Training was stopped by SIGINT/SIGTERM after saving a checkpoint. The CLI exits with code 130."""

    exit_code = 130


class GracefulStop:
    """On SIGINT or SIGTERM: finish the current step, save a checkpoint, stop, and tell the user how to resume."""

    def __init__(self, trainer, resume_hint: str):
        self.trainer = trainer
        self.resume_hint = resume_hint
        self.signal_name: str | None = None
        self._first_at = 0.0
        self._previous = {}

    def __enter__(self):
        stopper = self

        class _StopCallback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if any_process(stopper.signal_name is not None, args.device):
                    stopper.signal_name = stopper.signal_name or "a signal to another process"
                    control.should_save = True
                    control.should_training_stop = True
                return control

        self.trainer.add_callback(_StopCallback())
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals to the caller
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal_name and time.monotonic() - self._first_at < REPEAT_WINDOW_S:
            return  # the same stop delivered twice (`timeout -s INT` signals the process and then its group)
        if self.signal_name:  # a second signal means: stop now, as the handler before ours would (the CLI's says so)
            last = latest_complete_checkpoint(Path(self.trainer.args.output_dir))
            log.warning("second %s: stopping now without saving; %s", signal.Signals(signum).name,
                        f"resume from {last} with --resume" if last else "no complete checkpoint was written")
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        self.signal_name, self._first_at = signal.Signals(signum).name, time.monotonic()
        log.warning("%s received: saving a checkpoint after this step, then stopping", self.signal_name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def raise_if_stopped(self) -> None:
        if self.signal_name:
            output_dir = Path(self.trainer.args.output_dir)
            last = latest_complete_checkpoint(output_dir)
            raise Interrupted(
                f"stopped by {self.signal_name} at step {self.trainer.state.global_step}; checkpoint saved to {last}. "
                f"{self.resume_hint}"
            )
