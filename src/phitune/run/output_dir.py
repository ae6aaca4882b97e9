"""The output directory of a run, kept so that no work is lost by accident.

A directory is one of: absent or empty (a fresh run starts there), a finished run (the completion marker at its
top), an interrupted run (checkpoints or a saved config, no marker), or foreign (anything else that is not empty).
A fresh start is refused on a finished or interrupted run unless `--resume` continues it (an interrupted one only: a
finished run only when the config asks for more steps or epochs than it trained) or `--overwrite` replaces it, and always refused on a
foreign directory. `--overwrite` deletes only what a phitune run writes there, and only
once the new run's inputs have been checked (`clear_old_run`), so a typo in the config never costs the old run; a
directory that also holds other files is refused rather than emptied. The directory itself is made by the trainer
when it first writes, so a run that stops at a bad config or bad data leaves nothing behind.

`--auto-resume` (`auto_resume_mode`) picks the one right way on for whatever it finds, so one command serves every
attempt of a requeued job: start, continue, start again (killed before its first complete checkpoint), or nothing to
do; a run trained with another config (`training_differences`) is refused rather than continued.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
from pathlib import Path

from phitune.errors import PhituneError
from phitune.run.checkpoints import CHECKPOINT_COMPLETE, CHECKPOINT_DIR, checkpoint_dirs, finished_run, latest_complete_checkpoint
from phitune.run.console import PROGRESS_LOG
from phitune.run.processes import barrier
from phitune.runlock import LOCK_FILE

log = logging.getLogger("phitune")

SAVED_CONFIG = "phitune_config.yaml"  # the run's resolved config: recorded as it starts, written again as it ends

# Files phitune train (and eval, data into a run) writes at the top of a run directory: --overwrite removes these.
RUN_FILES = (
    CHECKPOINT_COMPLETE, "phitune_config.yaml", "metrics.json", "loss.png", PROGRESS_LOG,  # the run
    "eval.json", "report.md", "eval.png", "data_lengths.png",  # phitune eval, phitune data (older releases)
    "completions.jsonl",  # GRPO: held-out completions before and after
    "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "lora_state_dict.safetensors",
    "README.md", "training_args.bin",  # PEFT's model card, Trainer arguments
    "config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
    "pytorch_model*.bin", "pytorch_model.bin.index.json", "configuration_*.py", "modeling_*.py",  # full fine-tune
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.*", "tokenization_*.py",
)
# The folders a run writes, each known by what it holds, so a user's own folder of the same name is never taken for
# one: checkpoint-N/ (the Trainer's), runs/ (TensorBoard: runs/DATE_HOST/events.out.tfevents.*, report_to:
# tensorboard) and ref/ (DPO's and KTO's frozen reference adapter, a PEFT adapter named "ref").
TENSORBOARD_EVENTS = "events.out.tfevents.*"
REFERENCE_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md")


def is_run_file(path: Path) -> bool:
    """True for a file or folder that a phitune run wrote at the top of its output directory."""
    if path.is_symlink() or not path.is_dir():
        return path.is_file() and any(fnmatch.fnmatchcase(path.name, pattern) for pattern in RUN_FILES)
    if CHECKPOINT_DIR.match(path.name):
        return True
    if path.name == "runs":
        return _holds_only(path, lambda name: fnmatch.fnmatchcase(name, TENSORBOARD_EVENTS))
    return path.name == "ref" and _holds_only(path, lambda name: name in REFERENCE_ADAPTER_FILES)


def _holds_only(folder: Path, belongs) -> bool:
    """`folder` holds at least one file, and every file in it or its subfolders is one `belongs` accepts."""
    files = [path for path in folder.rglob("*") if not path.is_dir() or path.is_symlink()]
    return bool(files) and all(path.is_file() and not path.is_symlink() and belongs(path.name) for path in files)


def run_state(output_dir: Path) -> str:
    """"empty" (or absent), "finished", "interrupted" or "foreign"."""
    if not output_dir.is_dir():
        if output_dir.exists():
            raise PhituneError(f"training_config.output_dir {output_dir} is a file, not a directory")
        return "empty"
    children = _children(output_dir)
    # The progress log and the config a run records as it starts, alone: a run that failed before writing anything
    # worth keeping. A new run starts there and appends to the log (its begin line at step 0 makes readers drop the
    # old steps), as in an empty directory.
    if all(child.name in (PROGRESS_LOG, SAVED_CONFIG) and child.is_file() for child in children):
        return "empty"
    if finished_run(output_dir):
        return "finished"
    started = ("runs",)  # runs/: the TensorBoard logs of a run stopped before its checkpoint
    if any(is_run_file(child) and (child.name in started or CHECKPOINT_DIR.match(child.name)) for child in children):
        return "interrupted"
    return "foreign"


def prepare_output_dir(cfg, resume: bool, overwrite: bool) -> Path:
    """Check that the run may start in cfg.output_dir; nothing is created or deleted here (see clear_old_run)."""
    output_dir = cfg.output_dir
    if resume and overwrite:
        raise PhituneError("--resume and --overwrite contradict each other; pick one")
    state = run_state(output_dir)
    if state == "foreign":
        raise PhituneError(f"{output_dir} is not empty and holds no phitune run; set training_config.output_dir to "
                           "a new or empty directory (phitune never deletes files it did not write)")
    if state == "finished" and resume and not _asks_for_more(cfg, output_dir):  # nothing retrained or rewritten
        raise PhituneError(f"--resume: the run in {output_dir} is already complete, nothing to resume; pass "
                           "--overwrite to train it again, or set training_config.output_dir to a new directory")
    if state == "finished" and not (overwrite or resume):
        raise PhituneError(f"{output_dir} already holds a finished run; pass --overwrite to replace it, or set "
                           "training_config.output_dir to a new directory")
    if state == "interrupted" and not (resume or overwrite):
        raise PhituneError(f"{output_dir} already holds an interrupted run ({_checkpoints(output_dir)}); pass "
                           "--overwrite to replace it, --resume to continue it, or set training_config.output_dir "
                           "to a new directory")
    if state == "finished" and resume:
        warn_of_old_evaluation(output_dir)
    if resume and latest_complete_checkpoint(output_dir) is None:
        instead = "run without --resume to start" if state == "empty" else "pass --overwrite to start again there"
        raise PhituneError(f"--resume: no complete checkpoint in {output_dir} to resume from; {instead}")
    others = foreign_files(output_dir)
    if overwrite and others:
        raise PhituneError(f"--overwrite deletes only what a phitune run writes, and {output_dir} also holds "
                           f"{', '.join(others[:3])}; move those out or choose another output_dir")
    return output_dir


def foreign_files(output_dir: Path) -> list[str]:
    """The names at the top of `output_dir` that no phitune run wrote, sorted: what replacing a run must keep."""
    return sorted(child.name for child in _children(output_dir) if not is_run_file(child))


def _asks_for_more(cfg, output_dir: Path) -> bool:
    """True when the config trains past where the finished run stopped (a larger max_steps, or more epochs when
    max_steps is unset): `--resume` then continues it from its last checkpoint, as the Trainer allows."""
    checkpoint = latest_complete_checkpoint(output_dir)
    if checkpoint is None or not (checkpoint / "trainer_state.json").is_file():
        return False
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    max_steps = cfg.training_config.get("max_steps", -1)
    if max_steps and max_steps > 0:
        return max_steps > state.get("global_step", 0)
    return cfg.training_config.get("num_train_epochs", 3.0) > state.get("epoch", 0)


def clear_old_run(output_dir: Path, overwrite: bool, main_process: bool = True, auto_resume: bool = False) -> None:
    """With --overwrite, delete the old run's files (checkpoints, adapter, eval results, ...) so none mixes into the
    new run and a later --resume cannot restore it. Called once the new run's config, data and model are checked.
    Under torchrun every process calls it: the one that writes the run (`main_process`, TrainingArguments.should_save)
    deletes, and the others wait for it, so none starts writing into a directory still being emptied. `auto_resume`:
    the clearing is --auto-resume's (a run stopped before its first complete checkpoint), and the warning says so."""
    if not overwrite:
        return
    if main_process:
        removed = [child for child in _children(output_dir) if is_run_file(child)]
        for child in removed:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        names = ", ".join(sorted(child.name for child in removed))
        if removed and auto_resume:
            log.warning("--auto-resume: the run in %s stopped before its first complete checkpoint, so there is "
                        "nothing to continue; removed what it left (%s) and starting it again", output_dir, names)
        elif removed:
            log.warning("--overwrite: removed the previous run in %s (%d files and folders)", output_dir, len(removed))
    barrier()


def auto_resume_mode(cfg) -> str:
    """What `--auto-resume` does with cfg.output_dir: "start" (nothing there yet), "resume" (an interrupted run, or a
    finished one asked for more steps or epochs), "restart" (killed before its first complete checkpoint: nothing
    to keep) or "complete" (finished: nothing to do). A foreign directory, or a run trained with another config, is
    refused with one line."""
    output_dir = cfg.output_dir
    state = run_state(output_dir)
    if state == "empty":
        return "start"
    if state == "foreign":
        prepare_output_dir(cfg, resume=False, overwrite=False)  # its one line
    check_same_training(cfg, output_dir)
    if state == "finished":
        if not _asks_for_more(cfg, output_dir):
            return "complete"
        warn_of_old_evaluation(output_dir)
        return "resume"
    return "resume" if latest_complete_checkpoint(output_dir) else "restart"


EVALUATION_FILES = ("eval.json", "report.md", "eval.png")  # what `phitune eval` writes into a run


def warn_of_old_evaluation(output_dir: Path) -> None:
    """A finished run continued past its end (a raised max_steps or epochs) keeps what `phitune eval` wrote of it,
    which then describes the adapter it had: said once, as training continues (nothing is deleted)."""
    found = [name for name in EVALUATION_FILES if (output_dir / name).is_file()]
    if found:
        log.warning("%s in %s describe the adapter this run had before it continues; run phitune eval %s again "
                    "after training", ", ".join(found), output_dir, output_dir)


# What may change between the attempts of one run: how often it logs, evaluates and saves, what it evaluates, where
# its reports go, how fast it runs (speed: the same math), and how long it trains (a raised max_steps or
# num_train_epochs continues it). The global batch is checked against the checkpoint's layout instead
# (checkpoints.check_resume_layout), so 2 processes x 2 may resume as 1 x 4. Anything else changes what is trained.
FREE_TO_CHANGE = ("model.attn_implementation", "data.eval", "data.eval_hub_split", "data.max_eval_examples",
                  "data.num_proc", "data.cache_dir", "data.on_bad_row", "speed.*", "training_config.logging_*",
                  "training_config.eval_*", "training_config.save_*", "training_config.per_device_eval_batch_size",
                  "training_config.per_device_train_batch_size", "training_config.gradient_accumulation_steps",
                  "training_config.output_dir", "training_config.report_to", "training_config.run_name",
                  "training_config.disable_tqdm", "training_config.push_to_hub", "training_config.hub_*",
                  "training_config.max_steps", "training_config.num_train_epochs",
                  "training_config.load_best_model_at_end", "training_config.metric_for_best_model",
                  "training_config.greater_is_better", "training_config.include_num_input_tokens_seen",
                  "training_config.dataloader_*", "training_config.batch_eval_metrics",
                  "training_config.prediction_loss_only")


def training_differences(saved: dict, now: dict) -> list[str]:
    """The `section.key` names whose values differ between two configs (RunConfig.to_dict() of each) in what they
    train; a key set in one and absent in the other differs."""
    before, after = _flat(saved), _flat(now)
    return [name for name in sorted(before.keys() | after.keys())
            if before.get(name) != after.get(name) and not any(fnmatch.fnmatchcase(name, free) for free in FREE_TO_CHANGE)]


def check_same_training(cfg, output_dir: Path) -> None:
    """Refuse to continue a run whose recorded config trains something else; a run without a recorded config (from
    an older phitune) is taken as it is."""
    from phitune.config.schema import absolute_paths, load_run_config

    if not (output_dir / SAVED_CONFIG).is_file():
        return
    saved = load_run_config(output_dir).to_dict()
    differing = training_differences(saved, absolute_paths(cfg).to_dict())
    if differing:
        shown = ", ".join(f"{name} (was {_flat(saved).get(name)!r})" for name in differing[:5])
        raise PhituneError(f"the run in {output_dir} was trained with another config: {shown}; continuing it would "
                           "mix two runs. Set training_config.output_dir to a new directory, or restore those values")


def _flat(config: dict) -> dict:
    """{"section.key": value} from a config's sections ("method": value for a top-level value)."""
    items = {}
    for section, values in config.items():
        for key, value in (values.items() if isinstance(values, dict) else [(None, values)]):
            items[section if key is None else f"{section}.{key}"] = value
    return items


def _children(output_dir: Path) -> list[Path]:
    """What the directory holds, but the lock of the run that checks it (phitune.runlock)."""
    return [child for child in output_dir.iterdir() if child.name != LOCK_FILE] if output_dir.is_dir() else []


def _checkpoints(output_dir: Path) -> str:
    found = [child.name for child in checkpoint_dirs(output_dir)][:2]
    return ", ".join(reversed(found)) if found else "no checkpoint yet"
