"""What keeps a run safe: complete-checkpoint markers, graceful stop on signals (every process at the same step),
the NaN guard, a hub token kept out of saved files, and the loss plot.

A checkpoint directory counts only once it holds CHECKPOINT_COMPLETE, written after the model, optimizer, scheduler,
RNG and trainer state are all on disk; so a run killed mid-save resumes from the previous, whole checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import SFTTrainer

from phitune.console import use_console
from phitune.errors import PhituneError
from phitune.trainer_hooks import LoralibCheckpointing, check_private_hooks

log = logging.getLogger("phitune")

CHECKPOINT_COMPLETE = "phitune_complete"  # marker file: this directory was written to the end
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")  # the Trainer's checkpoint folders; only folders count
REPEAT_WINDOW_S = 1.0  # a second signal this soon after the first is the same stop, not "stop now"


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; raised before the optimizer step so no bad weights are saved."""


class Interrupted(PhituneError):
    """Training was stopped by SIGINT/SIGTERM after saving a checkpoint. The CLI exits with code 130."""

    exit_code = 130


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """The `checkpoint-N` folders in `output_dir`, newest (highest N) first, complete or not."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(match.group(1)), child) for child in output_dir.iterdir()
             if (match := CHECKPOINT_DIR.match(child.name)) and child.is_dir()]
    return [child for _, child in sorted(found, reverse=True)]


def latest_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest `checkpoint-N` that holds the completion marker; half-written ones are ignored."""
    return next((child for child in checkpoint_dirs(output_dir) if (child / CHECKPOINT_COMPLETE).is_file()), None)


def finished_run(output_dir: Path) -> bool:
    """A finished run leaves the completion marker at the top of its output directory."""
    return (Path(output_dir) / CHECKPOINT_COMPLETE).is_file()


class GuardedTraining:
    """What every phitune trainer (SFT, DPO, ORPO) adds to TRL's: a NaN guard that every process obeys, checkpoints
    marked complete only once every process has written them, and no hub token pickled into checkpoints."""

    def __init__(self, *args, loralib: bool = False, **kwargs):
        if loralib:
            check_private_hooks()
        self.loralib = loralib
        super().__init__(*args, **kwargs)
        keep_token_off_disk(self.args)
        # phitune deletes old checkpoints itself, after the new one is complete (CompleteCheckpoints)
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        self.add_callback(CompleteCheckpoints(limit))
        use_console(self)  # a progress bar and readable log lines instead of transformers' dicts

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = _ranks_where(not bool(torch.isfinite(loss).all()), loss.device)
        if bad:  # every process raises at this same step, before the optimizer step, so none waits forever
            where = "" if _world_size() == 1 else f" on process {', '.join(map(str, bad))}"
            raise NonFiniteLoss(f"the loss became NaN or infinite at step {self.state.global_step + 1}{where}")
        return loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """No batch once max_steps is reached. transformers checks max_steps only after a step, so a run resumed
        from its last checkpoint (killed between that save and the end of the run) would train a step past it."""
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True  # the loop ends before the next step, as after a last step
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)


class PhituneTrainer(GuardedTraining, LoralibCheckpointing, SFTTrainer):
    """SFTTrainer with phitune's guards (GuardedTraining) and a token-weighted sharded evaluation. `loralib=True`:
    checkpoints in the loralib backend's format (phitune.trainer_hooks)."""

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """Token-weighted evaluation (phitune.metrics), sharded: each process scores its share of the batches and the
        per-sequence sums are gathered, with the duplicates that accelerate adds to even out the last batch dropped
        (gather_for_metrics). So N processes report exactly the loss of one."""
        from transformers.trainer_utils import EvalLoopOutput

        from phitune.metrics import sequence_token_stats, summarize

        model = self.model_wrapped  # the DDP / FSDP / DeepSpeed wrapper once training has started
        model.eval()
        totals, sequences = torch.zeros(3, dtype=torch.float64), 0
        for inputs in dataloader:
            inputs = {k: v.to(self.args.device) if hasattr(v, "to") else v for k, v in inputs.items()}
            labels = inputs.pop("labels")
            packed = "attention_mask" not in inputs and "position_ids" in inputs and labels.shape[0] == 1
            with torch.no_grad():
                logits = model(**inputs).logits
            stats = sequence_token_stats(logits, labels, inputs["position_ids"] if packed else None)
            stats = self.accelerator.gather_for_metrics(stats)
            totals += stats.sum(0).cpu()
            sequences += stats.shape[0]
            self.control = self.callback_handler.on_prediction_step(self.args, self.state, self.control)
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in summarize(totals).items()}
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=sequences)


class CompleteCheckpoints(TrainerCallback):
    """After each checkpoint save: wait until every process has written its part (sharded model and optimizer
    states under FSDP / ZeRO-3, each worker's RNG state), then mark the checkpoint complete, and only then delete old
    checkpoints beyond `save_total_limit`, so a kill at any moment leaves at least one complete checkpoint. (The
    Trainer's own rotation runs before anything could mark the new checkpoint, so phitune turns it off.)"""

    def __init__(self, save_total_limit: int | None):
        self.save_total_limit = save_total_limit

    def on_save(self, args, state, control, **kwargs):
        from transformers.trainer_utils import rotate_checkpoints

        barrier()
        if args.should_save:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            (folder / CHECKPOINT_COMPLETE).write_text(json.dumps(batch_layout(args)) + "\n", encoding="utf-8")
            rotate_checkpoints(args.output_dir, self.save_total_limit, state.best_model_checkpoint, use_mtime=False)
        barrier()  # nobody resumes work (or reads the directory) while rank 0 is still deleting
        return control


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def keep_token_off_disk(args) -> None:
    """Move a hub token from the training arguments to this process's environment (HF_TOKEN), where the hub client
    still finds it: the Trainer pickles its arguments into every checkpoint as training_args.bin."""
    if getattr(args, "hub_token", None):
        os.environ.setdefault("HF_TOKEN", args.hub_token)
        args.hub_token = None


class GracefulStop:
    """On SIGINT or SIGTERM: finish the current step, save a checkpoint, stop, and tell the user how to resume."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.signal_name: str | None = None
        self._first_at = 0.0
        self._previous = {}

    def __enter__(self):
        stopper = self

        class _StopCallback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if _any_process(stopper.signal_name is not None, args.device):
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
                "Resume with: phitune train CONFIG --resume"
            )


def batch_layout(args) -> dict:
    """How a run splits its global batch; saved in each checkpoint's completion marker and checked on resume."""
    world = _world_size()
    per_device, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    return {"processes": world, "per_device_train_batch_size": per_device,
            "gradient_accumulation_steps": accumulation, "global_batch": world * per_device * accumulation}


def check_resume_layout(checkpoint: Path, args) -> None:
    """Resuming under another number of processes works when the global batch is the same (the sampler shards one
    shuffled order by global batch); a different global batch would silently change the run, so it stops here."""
    try:
        saved = json.loads((Path(checkpoint) / CHECKPOINT_COMPLETE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # a marker from before phitune recorded the layout
    now = batch_layout(args)
    if saved.get("global_batch") == now["global_batch"]:
        if saved.get("processes") != now["processes"]:
            log.warning("resuming a %s-process checkpoint with %s processes: same global batch of %s, so the same "
                        "rows per step; with dropout the random streams differ from an uninterrupted run",
                        saved.get("processes"), now["processes"], now["global_batch"])
        return
    raise PhituneError(
        f"{Path(checkpoint).name} was written with a global batch of {_describe(saved)}; this run's is "
        f"{_describe(now)}. Resume with the same global batch (processes x per_device_train_batch_size x "
        "gradient_accumulation_steps)"
    )


def _describe(layout: dict) -> str:
    return (f"{layout.get('global_batch')} ({layout.get('processes')} processes x "
            f"{layout.get('per_device_train_batch_size')} per device x {layout.get('gradient_accumulation_steps')} "
            "accumulation steps)")


def _world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _ranks_where(flag: bool, device) -> list[int]:
    """The processes on which `flag` is true, known to every process (one small all-reduce)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [0] if flag else []
    votes = torch.zeros(dist.get_world_size(), device=device)
    votes[dist.get_rank()] = float(flag)
    dist.all_reduce(votes, op=dist.ReduceOp.SUM)
    return [rank for rank, vote in enumerate(votes.tolist()) if vote]


def _any_process(flag: bool, device) -> bool:
    """True on every process if it is true on any: all must stop at the same step, or the others wait forever on
    the next gradient all-reduce. One small all-reduce per step, against the gradients' millions."""
    return bool(_ranks_where(flag, device))


def plot_losses(log_history: list[dict], path: Path) -> None:
    """Train and eval loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for points, label, style in ((train, "train loss", "-"), (evals, "eval loss", "o--")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
