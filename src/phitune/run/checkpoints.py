"""Complete checkpoints: markers, the newest complete one, and the batch layout a resume must match.

A checkpoint directory counts only once it holds CHECKPOINT_COMPLETE, written after the model, optimizer, scheduler,
RNG and trainer state are all on disk; so a run killed mid-save resumes from the previous, whole checkpoint.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

from transformers import TrainerCallback

from phitune.errors import PhituneError
from phitune.run.processes import barrier, world_size

log = logging.getLogger("phitune")

CHECKPOINT_COMPLETE = "phitune_complete"  # marker file: this directory was written to the end
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")  # the Trainer's checkpoint folders; only folders count


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


class CompleteCheckpoints(TrainerCallback):
    """After each checkpoint save: wait until every process has written its part (sharded model and optimizer
    states under FSDP / ZeRO-3, each worker's RNG state), then mark the checkpoint complete, and only then delete old
    checkpoints beyond `save_total_limit`, so a kill at any moment leaves at least one complete checkpoint. (The
    Trainer's own rotation runs before anything could mark the new checkpoint, so phitune turns it off.)"""

    def __init__(self, save_total_limit: int | None):
        self.save_total_limit = save_total_limit
        self.started, self.earlier = time.perf_counter(), 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        """Start the clock; a resumed run (its trainer state loaded: global_step is the checkpoint's) adds the
        seconds its checkpoint had trained."""
        self.started = time.perf_counter()
        self.earlier = trained_seconds(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_save(self, args, state, control, **kwargs):
        from transformers.trainer_utils import rotate_checkpoints

        barrier()
        if args.should_save:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            seconds = round(self.earlier + time.perf_counter() - self.started, 2)
            marker = {**batch_layout(args), "train_runtime_s": seconds}
            (folder / CHECKPOINT_COMPLETE).write_text(json.dumps(marker) + "\n", encoding="utf-8")
            rotate_checkpoints(args.output_dir, self.save_total_limit, state.best_model_checkpoint, use_mtime=False)
        barrier()  # nobody resumes work (or reads the directory) while rank 0 is still deleting
        return control


def batch_layout(args) -> dict:
    """How a run splits its global batch; saved in each checkpoint's completion marker and checked on resume."""
    world = world_size()
    per_device, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    return {"processes": world, "per_device_train_batch_size": per_device,
            "gradient_accumulation_steps": accumulation, "global_batch": world * per_device * accumulation}


def trained_seconds(checkpoint: Path | None) -> float:
    """Seconds of training a run had behind it when `checkpoint` was saved, as its completion marker records them
    (0 for no checkpoint, and for a marker from before phitune recorded them)."""
    if checkpoint is None:
        return 0.0
    try:
        return float(json.loads((Path(checkpoint) / CHECKPOINT_COMPLETE).read_text(encoding="utf-8"))
                     .get("train_runtime_s", 0.0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0.0


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
