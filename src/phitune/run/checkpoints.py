"""Complete checkpoints: markers (with each file's size and checksum), the newest intact one, and the batch layout
a resume must match.

A checkpoint directory counts only once it holds CHECKPOINT_COMPLETE, written after the model, optimizer, scheduler,
RNG and trainer state are all on disk; so a run killed mid-save resumes from the previous, whole checkpoint. The
marker records the size and sha256 of every file it vouches for, so a file truncated, corrupted or lost since (a bad
disk, a copy cut short) is found before it is loaded, and the resume falls back to the checkpoint before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
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


def latest_intact_checkpoint(output_dir: Path, main_process: bool = True) -> Path | None:
    """The newest complete checkpoint whose files match its marker, for a resume; None when none is complete.

    Each damaged one is named in a warning and, on the main process, loses its marker (so it is not offered again,
    and the Trainer rewrites it when the run gets there); when complete ones exist but none is intact, PhituneError."""
    damaged = []
    for folder in (child for child in checkpoint_dirs(output_dir) if (child / CHECKPOINT_COMPLETE).is_file()):
        problem = checkpoint_problem(folder)
        if problem is None:
            if damaged:
                log.warning("resuming from %s instead", folder)
            return folder
        damaged.append(f"{folder.name} ({problem})")
        log.warning("%s is damaged: %s; it is no longer marked complete", folder, problem)
        if main_process:
            (folder / CHECKPOINT_COMPLETE).unlink(missing_ok=True)
    if damaged:
        raise PhituneError(f"no intact checkpoint left in {output_dir}: {'; '.join(damaged)}; start again with "
                           "--overwrite (or restore the files)")
    return None


def file_records(folder: Path) -> dict:
    """{relative path: {"size", "sha256"}} for every file under `folder` but the marker: what the marker vouches for.
    sha256 reads each file once at its disk's speed (about 1 GB/s), a second or so for a Phi-3-mini LoRA checkpoint."""
    records = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and CHECKPOINT_COMPLETE not in p.name):
        records[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return records


LAYOUT_KEYS = ("processes", "per_device_train_batch_size", "gradient_accumulation_steps", "global_batch")


def read_marker(folder: Path) -> dict | None:
    """A checkpoint's completion marker as phitune writes it (its batch layout, and a size and sha256 for each of
    its files), or None when the marker is unreadable or not of that shape: edited, cut short, or written by
    something else. Such a marker vouches for nothing."""
    try:
        marker = json.loads((Path(folder) / CHECKPOINT_COMPLETE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = marker.get("files") if isinstance(marker, dict) else None
    if not (isinstance(files, dict) and files and all(_is_count(marker.get(key)) for key in LAYOUT_KEYS)):
        return None
    records = files.values()
    if not all(isinstance(r, dict) and _is_count(r.get("size")) and isinstance(r.get("sha256"), str) for r in records):
        return None
    return marker


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with a marked checkpoint (a marker that vouches for nothing, or the first file that is missing,
    resized or changed), or None."""
    marker = read_marker(folder)
    if marker is None:
        return f"its {CHECKPOINT_COMPLETE} marker is unreadable or not one phitune wrote"
    for name, record in marker["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != record["size"]:
            return f"{name} has {path.stat().st_size} bytes, {record['size']} were written"
        if _sha256(path) != record["sha256"]:
            return f"{name} has changed since it was written (sha256 differs)"
    return None


def mark_complete(folder: Path, layout: dict) -> None:
    """Mark a checkpoint complete, recording its files; atomically, so a checkpoint is complete or unmarked, never
    half-marked."""
    write_atomically(folder / CHECKPOINT_COMPLETE, json.dumps({**layout, "files": file_records(folder)}) + "\n")


def write_atomically(path: Path, text: str) -> None:
    """Write a temporary file and rename it over `path`: a marker cut short by a full disk or a kill never exists
    (an empty marker would still mark a checkpoint, or a run, complete)."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


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
            seconds = round(self.earlier + time.perf_counter() - self.started, 2)
            mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}",
                          {**batch_layout(args), "train_runtime_s": seconds})
            rotate_checkpoints(args.output_dir, self.save_total_limit, state.best_model_checkpoint, use_mtime=False)
        barrier()  # nobody resumes work (or reads the directory) while rank 0 is still deleting
        return control


def batch_layout(args) -> dict:
    """How a run splits its global batch; saved in each checkpoint's completion marker and checked on resume."""
    world = world_size()
    per_device, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    return {"processes": world, "per_device_train_batch_size": per_device,
            "gradient_accumulation_steps": accumulation, "global_batch": world * per_device * accumulation}


def check_resume_layout(checkpoint: Path, args) -> None:
    """Resuming under another number of processes works when the global batch is the same (the sampler shards one
    shuffled order by global batch); a different global batch would silently change the run, so it stops here."""
    saved = read_marker(checkpoint)
    if saved is None:
        return  # not a checkpoint phitune marked (latest_intact_checkpoint skips those)
    now = batch_layout(args)
    if saved.get("global_batch") == now["global_batch"]:
        if saved.get("processes") != now["processes"]:
            log.warning("resuming a %s-process checkpoint with %s %s: same global batch of %s, so the same "
                        "rows per step; with dropout the random streams differ from an uninterrupted run",
                        saved.get("processes"), now["processes"], "process" if now["processes"] == 1 else "processes",
                        now["global_batch"])
        return
    raise PhituneError(
        f"{Path(checkpoint).name} was written with a global batch of {_describe(saved)}; this run's is "
        f"{_describe(now)}. Resume with the same global batch (processes x per_device_train_batch_size x "
        "gradient_accumulation_steps)"
    )



def trained_seconds(checkpoint: Path | None) -> float:
    """Seconds of training a run had behind it when `checkpoint` was saved, as its completion marker records them
    (0 for no checkpoint, and for a marker from before phitune recorded them)."""
    marker = read_marker(checkpoint) if checkpoint is not None else None
    try:
        return float(marker.get("train_runtime_s", 0.0)) if marker else 0.0
    except (TypeError, ValueError):
        return 0.0


def whole_run_train_loss(history: list[dict], resumed_at: int, session_loss: float, global_step: int) -> float:
    """A resumed run's train loss over all its steps, as the uninterrupted run reports it: the steps before the
    checkpoint from the losses the log history recorded for them (each logged loss is the mean of the steps since the
    log before, rounded to 4 decimals), and the Trainer's mean of this attempt's steps. Where the log history does
    not cover the checkpoint's steps exactly (a checkpoint between two logs), this attempt's mean is all there is."""
    last, total = 0, 0.0
    for entry in history:
        if "loss" in entry and entry.get("step", 0) <= resumed_at:
            total += entry["loss"] * (entry["step"] - last)
            last = entry["step"]
    if resumed_at == 0 or last != resumed_at or global_step <= resumed_at:
        return session_loss
    return (total + session_loss * (global_step - resumed_at)) / global_step


def _describe(layout: dict) -> str:
    processes = layout.get("processes")
    return (f"{layout.get('global_batch')} ({processes} {'process' if processes == 1 else 'processes'} x "
            f"{layout.get('per_device_train_batch_size')} per device x {layout.get('gradient_accumulation_steps')} "
            "accumulation steps)")
