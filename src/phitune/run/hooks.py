"""The one place phitune overrides private `Trainer` methods, checked against the installed transformers.

The loralib backend's checkpoints hold `lora_state_dict.safetensors` (and an equivalent PEFT adapter), a format the
Trainer's own save and load do not know, and the Trainer has no public hook for "save / load the model my way". So
`LoralibCheckpointing` overrides `_save` and `_load_from_checkpoint`, and `check_private_hooks` stops with one line,
when a loralib trainer is built, if the installed transformers no longer has them with the parameters they had.
Under several processes every trainer also wraps `_save_checkpoint` (`AgreedCheckpointSaves`): no public hook runs
after a failed save, and every process must learn of it. Everything else phitune adds to the Trainer goes through
public methods (`training_step`, `evaluation_loop`, `get_batch_samples`) and callbacks (`on_save`, `on_step_end`).
"""

from __future__ import annotations

import inspect
from pathlib import Path

from phitune.errors import PhituneError
from phitune.run.processes import failures_elsewhere

# Trainer method -> its parameters in the transformers versions phitune was tested with (5.x).
PRIVATE_HOOKS = {
    "_save": ("self", "output_dir", "state_dict"),
    "_load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),
}
SAVE_HOOKS = {"_save_checkpoint": ("self", "model", "trial")}  # AgreedCheckpointSaves, under several processes


def check_private_hooks(trainer_class=None, hooks: dict = PRIVATE_HOOKS,
                        needed_by: str = "peft_config.backend loralib", instead: str = "use backend: peft or ") -> None:
    """One-line PhituneError if `trainer_class` (transformers' Trainer) lacks a hook or changed its parameters."""
    import transformers

    trainer_class = trainer_class or transformers.Trainer
    for name, expected in hooks.items():
        method = getattr(trainer_class, name, None)
        found = tuple(inspect.signature(method).parameters) if callable(method) else None
        if found != expected:
            raise PhituneError(
                f"{needed_by} needs Trainer.{name}{expected}, but transformers {transformers.__version__} has "
                f"{'no such method' if found is None else found}; {instead}install transformers 5.24"
            )


class AgreedCheckpointSaves:
    """A checkpoint save that fails on one process fails on every process, with the failed write's own message.

    Every process saves its part of a checkpoint (its RNG state; its shards under FSDP), and the marker waits at a
    barrier until all have (CompleteCheckpoints). A process whose write failed (a full disk) left the run instead, so
    the others waited at that barrier until the process group broke ("Connection closed by peer" and a traceback on
    gloo; on NCCL, its timeout or torchrun's SIGKILL), and its one line was never printed: only process 0 speaks.
    Now the processes agree after each save (one small all-reduce) and, when one failed, all raise its error. (A
    failure inside a collective of the save itself, FSDP gathering a full state dict, still leaves the others there.)"""

    def _save_checkpoint(self, model, trial):
        try:
            super()._save_checkpoint(model, trial)
            failure = None
        except Exception as exc:  # any error: the other processes must not wait for this one at the barrier
            failure = exc
        elsewhere = failures_elsewhere(failure, self.args.device)
        if failure is not None:
            raise failure
        if elsewhere:
            raise elsewhere[0]


class LoralibCheckpointing:
    """Checkpoints of the loralib backend: only LoRA weights (loralib style) plus a PEFT adapter; resume loads them
    over the pretrained weights with strict=False. A no-op unless `loralib` is set."""

    loralib = False

    def _save(self, output_dir=None, state_dict=None):
        if not self.loralib:
            return super()._save(output_dir, state_dict)
        from phitune.models.lora_backend import save_lora_checkpoint

        save_lora_checkpoint(self.model, Path(output_dir or self.args.output_dir))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self.loralib:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from phitune.models.lora_backend import load_lora_checkpoint

        load_lora_checkpoint(model or self.model, Path(resume_from_checkpoint))
