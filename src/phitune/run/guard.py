"""What every phitune trainer adds to TRL's: the NaN guard every process obeys, checkpoints marked complete only once
every process has written them, the console, and no hub token pickled into checkpoints."""

from __future__ import annotations

import os

import torch

from phitune.run.checkpoints import CompleteCheckpoints
from phitune.run.console import use_console
from phitune.run.hooks import SAVE_HOOKS, AgreedCheckpointSaves, check_private_hooks
from phitune.run.processes import ranks_where, world_size


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; raised before the optimizer step so no bad weights are saved."""


class GuardedTraining(AgreedCheckpointSaves):
    """What every phitune trainer (SFT, DPO, ORPO) adds to TRL's: a NaN guard that every process obeys, checkpoints
    marked complete only once every process has written them (a save that fails on one fails on all), and no hub
    token pickled into checkpoints."""

    def __init__(self, *args, loralib: bool = False, **kwargs):
        if loralib:
            check_private_hooks()
        if world_size() > 1:
            check_private_hooks(hooks=SAVE_HOOKS, needed_by="training on several processes", instead="")
        self.loralib = loralib
        if kwargs.get("args") is not None and kwargs["args"].ddp_find_unused_parameters is None:
            kwargs["args"].ddp_find_unused_parameters = may_leave_parameters_unused(kwargs.get("model"))
        super().__init__(*args, **kwargs)
        keep_token_off_disk(self.args)
        # phitune deletes old checkpoints itself, after the new one is complete (CompleteCheckpoints)
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        self.add_callback(CompleteCheckpoints(limit))
        use_console(self)  # a progress bar and readable log lines instead of transformers' dicts

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = ranks_where(not bool(torch.isfinite(loss).all()), loss.device)
        if bad:  # every process raises at this same step, before the optimizer step, so none waits forever
            where = "" if world_size() == 1 else f" on process {', '.join(map(str, bad))}"
            raise NonFiniteLoss(f"the loss became NaN or infinite at step {self.state.global_step + 1}{where}")
        return loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """No batch once max_steps is reached. transformers checks max_steps only after a step, so a run resumed
        from its last checkpoint (killed between that save and the end of the run) would train a step past it."""
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True  # the loop ends before the next step, as after a last step
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)


def may_leave_parameters_unused(model) -> bool:
    """DDP's find_unused_parameters, unless the user set it (training_config.ddp_find_unused_parameters). transformers
    turns it on for any model but a bare PreTrainedModel without activation checkpointing (so for every PEFT model),
    and DDP then walks the autograd graph after every forward and, finding nothing unused, warns so from every rank.
    Off where every trainable parameter takes part in every forward: a LoRA's adapters (the frozen base is not
    tracked at all), a reward model's head, a full fine-tune of a dense text model; activation checkpointing needs it
    off too. On for an MoE (an expert no token was routed to gets no gradient) and a multimodal model (its image or
    audio parts sit out a text-only batch), where DDP would otherwise fail."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return True
    text = config.get_text_config()
    moe = any(getattr(text, name, None) for name in ("num_local_experts", "num_experts"))
    multimodal = any(getattr(config, name, None) is not None for name in ("vision_config", "audio_config"))
    return moe or multimodal


def keep_token_off_disk(args) -> None:
    """Move a hub token from the training arguments to this process's environment (HF_TOKEN), where the hub client
    still finds it: the Trainer pickles its arguments into every checkpoint as training_args.bin."""
    if getattr(args, "hub_token", None):
        os.environ.setdefault("HF_TOKEN", args.hub_token)
        args.hub_token = None
