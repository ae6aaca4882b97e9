"""The SFT recipe: conversations, tokenized with masked labels, through TRL's SFTTrainer (phitune.run.trainer's
PhituneTrainer). Evaluation: eval loss and perplexity on the held-out conversations, at step 0 (inside the training
loop) and at the last step.

A recipe is a module with the functions phitune.train's driver calls (see phitune.recipes); it never imports another
recipe.
"""

from __future__ import annotations

import logging
from pathlib import Path

from phitune.config.schema import RunConfig
from phitune.errors import PhituneError, first_line
from phitune.run.chat_data import dataset_metrics, tokenize_splits
from phitune.run.lifecycle import (eval_loss_before_after, load_model_for_training, trainer_settings,
                                   warn_if_fsdp_fell_back)
from phitune.run.plan import RunPlan
from phitune.run.trainer import PhituneTrainer

log = logging.getLogger("phitune")


def load_data(cfg: RunConfig, tokenizer, plan: RunPlan):
    """(train set, eval set or None): the Arrow-cached, tokenized splits of cfg.data."""
    return tokenize_splits(cfg, None, tokenizer, plan)


def build_config(cfg: RunConfig, data, plan: RunPlan):
    """SFTConfig for this run (see build_sft_config)."""
    return build_sft_config(cfg, data[1] is not None, plan)


def load_model(cfg: RunConfig, plan: RunPlan):
    """(model, PEFT LoraConfig or None): the base with LoRA to come, as phitune.run.lifecycle loads it for every method."""
    return load_model_for_training(cfg, plan)


def make_trainer(cfg: RunConfig, model, tokenizer, data, peft_config, args):
    """The SFT trainer over the train and eval sets (see build_trainer)."""
    train_set, eval_set = data
    return build_trainer(cfg, model, tokenizer, train_set, eval_set, peft_config, args)


def evaluate_before(cfg: RunConfig, trainer, tokenizer, data, checkpoint: Path | None) -> dict:
    """Ask for the evaluation at step 0 inside `train()` (eval_on_start), after accelerate has wrapped the model: a
    `trainer.evaluate()` before `train()` marks the bare model as prepared, and the processes of a multi-process run
    then train without synchronising their gradients. A resumed run has had its start (its first attempt's
    evaluation comes back with the checkpoint's log history)."""
    trainer.args.eval_on_start = data[1] is not None and checkpoint is None
    return {}


def evaluate_after(cfg: RunConfig, trainer, tokenizer, data, before: dict) -> dict:
    """eval_loss before and after with their perplexities, when the run has an eval set."""
    if data[1] is None:
        return {}
    return {**eval_loss_before_after(trainer), **eval_loss_by_source(trainer, data[1])}


def eval_loss_by_source(trainer, eval_set) -> dict:
    """A mixture's eval loss after training, per source (the overall one is eval_loss_after): each source's
    held-out rows (or eval source) scored on their own."""
    groups = getattr(eval_set, "groups", None)
    if not groups:
        return {}
    dataset = eval_set.to_dataset()
    losses = {}
    for number, (name, rows) in enumerate(groups):
        prefix = f"eval_source{number}"
        losses[name] = trainer.evaluate(eval_dataset=dataset.select(rows), metric_key_prefix=prefix)[f"{prefix}_loss"]
    return {"eval_loss_after_by_source": losses}


def data_metrics(cfg: RunConfig, data) -> dict:
    """Counts for metrics.json: format, examples, truncated and skipped rows. A streamed run trained max_steps global
    batches of examples."""
    metrics = dataset_metrics(*data)
    if metrics.get("streaming"):
        from phitune.run.processes import world_size

        settings = cfg.training_config
        metrics["train_examples"] = (settings["max_steps"] * settings.get("per_device_train_batch_size", 8)
                                     * settings.get("gradient_accumulation_steps", 1) * world_size())
    return metrics


def tidy_output(output_dir: Path) -> None:
    """Nothing to tidy: the SFT output directory is complete as finish wrote it."""


def build_sft_config(cfg: RunConfig, has_eval: bool, plan: RunPlan):
    """SFTConfig from training_config over phitune's defaults, plus the keys phitune owns (data, speed); the speed
    switches are the run's `plan.speed`."""
    from trl import SFTConfig

    settings = trainer_settings(cfg, has_eval)
    speed = plan.speed
    # Activation checkpointing (gradient_checkpointing in older names) is resolved with the speed switches.
    settings.update(speed.sft_kwargs())
    # phitune tokenizes, masks and truncates itself (see phitune.data), so TRL must not do it again.
    settings.update(max_length=None, dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False)
    try:
        return SFTConfig(**settings)
    except (TypeError, ValueError) as exc:
        raise PhituneError(f"training_config: {first_line(exc)}") from None


def build_trainer(cfg: RunConfig, model, tokenizer, train_set, eval_set, peft_config, args):
    """The SFTTrainer with phitune's callbacks (safe checkpoints, graceful stop, NaN guard); `args` from
    build_sft_config."""
    from phitune.speed import apply_activation_strategy

    apply_activation_strategy(model, args)
    trainer = PhituneTrainer(
        model=model,
        args=args,
        train_dataset=train_set.to_dataset(),
        eval_dataset=eval_set.to_dataset() if eval_set is not None else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        loralib=cfg.backend == "loralib",
    )
    warn_if_fsdp_fell_back(trainer)
    return trainer


def evaluate_run(model_cfg, adapter: Path | None, data_cfg, output_dir: Path, *, use_eval_split: bool,
                 batch_size: int, num_generate: int, settings):
    """`phitune eval` on an SFT run (or a bare model): loss, perplexity, token accuracy, ROUGE-L, exact match."""
    from phitune.after.evaluate import run_evaluation

    return run_evaluation(model_cfg, adapter, data_cfg, output_dir, num_generate=num_generate, settings=settings,
                          batch_size=batch_size, use_eval_split=use_eval_split)


def inspect_data(cfg: RunConfig, output: Path | None, example_index: int = 0):
    """`phitune data` on conversations: the DataReport of phitune.data.inspect."""
    from phitune.data.inspect import inspect_data as inspect_conversations

    return inspect_conversations(cfg, output, example_index=example_index)
