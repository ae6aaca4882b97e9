"""The one place phitune overrides private `Trainer` methods, checked against the installed transformers.

The loralib backend's checkpoints hold `lora_state_dict.safetensors` (and an equivalent PEFT adapter), a format the
Trainer's own save and load do not know, and the Trainer has no public hook for "save / load the model my way". So
`LoralibCheckpointing` overrides `_save` and `_load_from_checkpoint`, and `check_private_hooks` stops with one line,
when a loralib trainer is built, if the installed transformers no longer has them with the parameters they had.
Everything else phitune adds to the Trainer goes through public methods (`training_step`, `evaluation_loop`,
`get_batch_samples`) and callbacks (`on_save`, `on_step_end`).
"""

from __future__ import annotations

import inspect
from pathlib import Path

from phitune.errors import PhituneError

# Trainer method -> its parameters in the transformers versions phitune was tested with (5.x).
PRIVATE_HOOKS = {
    "_save": ("self", "output_dir", "state_dict"),
    "_load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),
}


def check_private_hooks(trainer_class=None) -> None:
    """One-line PhituneError if `trainer_class` (transformers' Trainer) lacks a hook or changed its parameters."""
    import transformers

    trainer_class = trainer_class or transformers.Trainer
    for name, expected in PRIVATE_HOOKS.items():
        method = getattr(trainer_class, name, None)
        found = tuple(inspect.signature(method).parameters) if callable(method) else None
        if found != expected:
            raise PhituneError(
                f"peft_config.backend loralib needs Trainer.{name}{expected}, but transformers "
                f"{transformers.__version__} has {'no such method' if found is None else found}; use backend: peft "
                "or install transformers 5.24"
            )


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
