"""Training: a RunConfig in, an output directory out, through TRL's SFTTrainer and PEFT.

`output_dir` ends up holding the PEFT adapter (or full model), the tokenizer, `phitune_config.yaml`,
`metrics.json`, `loss.png`, and `checkpoint-N/` directories. The steps are named functions so that each can be read
(and tested) alone: prepare_output_dir -> plan_run -> load model and data -> build_sft_config -> build_trainer -> fit
-> finish. plan_run (phitune.plan) resolves what the steps share (config.json, speed switches, dtype, attention) once;
each step takes the RunPlan rather than working it out again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from phitune.config import RunConfig, save_config
from phitune.errors import PhituneError, first_line
from phitune.modeling import DROPPED_GRADIENT_WARNING
from phitune.plan import RunPlan, plan_run
from phitune.run_dir import clear_old_run, prepare_output_dir
from phitune.train_support import (
    CHECKPOINT_COMPLETE,
    GracefulStop,
    NonFiniteLoss,
    PhituneTrainer,
    check_resume_layout,
    latest_complete_checkpoint,
    plot_losses,
)

log = logging.getLogger("phitune")


@dataclass
class RunResult:
    """What a finished run leaves behind, for the CLI and the demo to print."""

    output_dir: Path
    metrics: dict = field(default_factory=dict)
    model: object = None  # the trained model in memory (PeftModel for the peft backend)


def run_training(cfg: RunConfig, resume: bool = False, overwrite: bool = False, push_to_hub: str | None = None):
    """Fine-tune as `cfg` says and write the output directory; return its path and metrics."""
    from phitune.modeling import load_tokenizer

    if cfg.method != "sft":
        from phitune.preference import run_preference_training

        return run_preference_training(cfg, resume=resume, overwrite=overwrite, push_to_hub=push_to_hub)
    output_dir = prepare_output_dir(cfg, resume=resume, overwrite=overwrite)
    checkpoint = latest_complete_checkpoint(output_dir) if resume else None
    plan = plan_run(cfg)  # config.json, speed, dtype, attention: resolved once, before any weight is read
    tokenizer = load_tokenizer(cfg.model, padding_side="right")
    train_set, eval_set = tokenize_splits(cfg, None, tokenizer, plan)  # Arrow, cached, made once per machine
    args = build_sft_config(cfg, eval_set is not None, plan=plan)  # fails before weights load
    if checkpoint is not None:
        check_resume_layout(checkpoint, args)
    model, peft_config = load_model_for_training(cfg, plan)
    clear_old_run(output_dir, overwrite)  # only now: a bad config or bad data must not cost the old run
    trainer = build_trainer(cfg, model, tokenizer, train_set, eval_set, peft_config, args)
    metrics = fit(trainer, checkpoint, has_eval=eval_set is not None)
    metrics.update(dataset_metrics(train_set, eval_set))
    finish(cfg, trainer, tokenizer, metrics, push_to_hub)
    return RunResult(output_dir=output_dir, metrics=metrics, model=trainer.model)


def tokenize_splits(cfg: RunConfig, conversations, tokenizer, plan: RunPlan | None = None):
    """Train and eval sets with masked labels; log how many rows were truncated or skipped.

    `conversations` None: cfg.data is read and tokenized into the Arrow cache (phitune.data.prepare), by the first
    process of the machine while the others wait and reuse it. A Conversations from load_conversations (small,
    in-memory data, as tests use) is tokenized in memory. Both sets carry `format` and `skipped_rows` for metrics.
    `plan` gives the model's context length; without one (a caller outside a run) config.json is read here.
    """
    from phitune.data import tokenize_conversations
    from phitune.data.prepare import prepare_data, training_set
    from phitune.modeling import load_model_config

    if plan is not None:
        context = plan.context
    else:
        context = getattr(load_model_config(cfg.model), "max_position_embeddings", None)
    if context and cfg.data.max_seq_length > context:
        raise PhituneError(f"data.max_seq_length {cfg.data.max_seq_length} exceeds the model's context of {context}")
    if conversations is None:
        data = prepare_data(cfg.data, tokenizer)
        log.info("data %s (%s)", data.fingerprint, "reused from the cache" if data.reused else "prepared")
        fmt, skipped = data.format, list(data.skipped)
        train_set = training_set(data.train, "train", cfg.data.on_bad_row)
        eval_set = training_set(data.eval, "eval", cfg.data.on_bad_row) if data.eval is not None else None
    else:
        kwargs = dict(max_seq_length=cfg.data.max_seq_length, train_on=cfg.data.train_on,
                      on_bad_row=cfg.data.on_bad_row)
        fmt, skipped = conversations.format, conversations.skipped
        train_set = tokenize_conversations(conversations.train, tokenizer, name="train", **kwargs)
        eval_set = (tokenize_conversations(conversations.eval, tokenizer, name="eval", **kwargs)
                    if conversations.eval else None)
    for name, tset in (("train", train_set), ("eval", eval_set)):
        if tset is not None and tset.truncated:
            log.warning("%s: %d examples truncated to %d tokens", name, tset.truncated, cfg.data.max_seq_length)
    skipped += train_set.skipped + (eval_set.skipped if eval_set is not None else [])
    if skipped:
        log.warning("skipped %d bad rows; first: %s", len(skipped), "; ".join(skipped[:3]))
    train_set.format, train_set.skipped_rows = fmt, len(skipped)
    return train_set, eval_set


def load_model_for_training(cfg: RunConfig, plan: RunPlan | None = None):
    """The base model (4-bit for QLoRA), with LoRA layers injected for the loralib backend; the PEFT LoraConfig.

    The dtype, attention kernel and sharding come from `plan` (plan_run(cfg) when not given), which has also checked
    the target modules against the model's layers."""
    from phitune.modeling import load_base_model, resolve_peft_targets, untie_embeddings_for

    plan = plan if plan is not None else plan_run(cfg)
    if cfg.backend == "loralib" and cfg.model.quantization:
        raise PhituneError("peft_config.backend loralib wraps plain linear layers, not 4-bit ones; use backend: peft "
                           "for QLoRA")
    model = load_base_model(cfg.model, training=True, sharded=plan.sharded, dtype=plan.dtype,
                            attn_implementation=plan.attn_implementation)
    if cfg.backend == "full":
        if cfg.model.quantization:
            raise PhituneError("a quantized (4-bit) model cannot be fully fine-tuned; add a peft_config for QLoRA")
        return model, None
    settings = dict(cfg.peft_config)
    settings.pop("backend", None)
    settings.setdefault("task_type", "CAUSAL_LM")
    untie_embeddings_for(model, settings.get("target_modules"))  # LoRA on tied lm_head / embed_tokens: untie first
    if cfg.backend == "loralib":
        from transformers import set_seed

        from phitune.lora_backend import inject_for_training

        set_seed(cfg.training_config.get("seed", 42))  # LoRA A is random: same seed, same start (as PEFT via TRL)
        inject_for_training(model, settings)
        return model, None
    settings.update(resolve_peft_targets(model, settings))  # MoE: attention + experts by name, never the router
    from peft import LoraConfig

    try:
        return model, LoraConfig(**settings)
    except (TypeError, ValueError) as exc:
        raise PhituneError(f"peft_config: {exc}") from None


def build_sft_config(cfg: RunConfig, has_eval: bool, quantized: bool = False, plan: RunPlan | None = None):
    """SFTConfig from training_config over phitune's defaults, plus the keys phitune owns (data, speed).

    The speed switches are the run's `plan.speed`; without a plan (a caller outside a run) they are resolved here,
    for a 4-bit base when `quantized`."""
    from trl import SFTConfig

    from phitune.speed import resolve_speed

    settings = trainer_settings(cfg, has_eval)
    speed = plan.speed if plan is not None else resolve_speed(cfg.speed, quantized=quantized,
                                                              training_config=cfg.training_config)
    # Activation checkpointing (gradient_checkpointing in older names) is resolved with the speed switches.
    settings.update(speed.sft_kwargs())
    # phitune tokenizes, masks and truncates itself (see phitune.data), so TRL must not do it again.
    settings.update(max_length=None, dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False)
    try:
        return SFTConfig(**settings)
    except (TypeError, ValueError) as exc:
        raise PhituneError(f"training_config: {first_line(exc)}") from None


def trainer_settings(cfg: RunConfig, has_eval: bool) -> dict:
    """training_config over phitune's defaults (the same for every method): output_dir, no reporting, checkpoints
    every 100 steps, evaluation at each checkpoint, mixed precision only on GPUs."""
    import torch

    user = dict(cfg.training_config)
    settings = {
        "output_dir": str(cfg.output_dir),
        "report_to": "none",  # no surprise uploads; set report_to: wandb / tensorboard to opt in
        "logging_steps": 10,
        "save_strategy": "steps",
        "save_steps": 100,
        "save_total_limit": 2,
        "eval_strategy": "steps" if has_eval else "no",
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        "include_num_input_tokens_seen": "non_padding",
        "logging_nan_inf_filter": False,  # a NaN must show in the logs, not be averaged away
        "dataloader_pin_memory": torch.cuda.is_available(),
        # CPU workers under torchrun each train alone (and race on output_dir) unless told they share the CPU.
        "use_cpu": not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
    }
    settings.update(user)
    if not torch.cuda.is_available() and (settings.get("bf16") or settings.get("fp16")):
        log.warning("no GPU: bf16/fp16 mixed precision is off, training in the model's dtype on the CPU")
        settings["bf16"] = settings["fp16"] = False
    if not has_eval:
        settings["eval_strategy"] = "no"
    if settings["eval_strategy"] == "steps" and settings.get("eval_steps") is None:
        # transformers would fall back to logging_steps (logging_steps: 1 = an evaluation after every step, each
        # slower than the step). At each checkpoint instead: every checkpoint gets its eval loss (what picking the
        # best one needs), and evaluation costs no more often than the saving the user already chose.
        settings["eval_steps"] = settings["save_steps"]
    return settings


def build_trainer(cfg: RunConfig, model, tokenizer, train_set, eval_set, peft_config, args=None):
    """The SFTTrainer with phitune's callbacks (safe checkpoints, graceful stop, NaN guard); `args` from
    build_sft_config, built here when not given."""
    from phitune.speed import apply_activation_strategy

    if args is None:
        args = build_sft_config(cfg, has_eval=eval_set is not None, quantized=bool(cfg.model.quantization))
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


def warn_if_fsdp_fell_back(trainer) -> None:
    """accelerate runs FSDP only on accelerators: CPU workers asked for FSDP train with DDP instead (the same math,
    each worker holding the whole model). Say so rather than let a user believe the model is sharded."""
    asked = bool(trainer.args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and not trainer.is_fsdp_enabled and trainer.is_world_process_zero():
        log.warning("FSDP was asked for, but accelerate runs FSDP only on GPUs: these workers train with DDP, each "
                    "holding the whole model")


def fit(trainer, checkpoint: Path | None, has_eval: bool) -> dict:
    """Train (resuming from `checkpoint`) with an evaluation at the start and at the end; turn interruptions into
    clear errors.

    The first evaluation runs inside `train()` (eval_on_start), after accelerate has wrapped the model: a
    `trainer.evaluate()` before `train()` marks the bare model as prepared, and the processes of a multi-process run
    then train without synchronising their gradients. The final evaluation reuses an in-loop one at the last step.
    """
    from phitune.modeling import count_parameters

    trainable, total = count_parameters(trainer.model)
    log.info(
        "training %s of %s parameters (%.2f%%) on %d examples; output: %s%s",
        f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1), len(trainer.train_dataset),
        trainer.args.output_dir, f"; resuming from {checkpoint}" if checkpoint else "",
    )
    trainer.args.eval_on_start = has_eval and checkpoint is None
    start = time.perf_counter()
    with GracefulStop(trainer) as stopper:
        try:
            output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except NonFiniteLoss as exc:
            last = latest_complete_checkpoint(Path(trainer.args.output_dir))
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
            raise PhituneError(f"{exc}; training stopped and {kept}. Lower learning_rate or check the data") from None
        except UserWarning as exc:  # made an error by modeling.refuse_dropped_gradients
            if not re.match(DROPPED_GRADIENT_WARNING, str(exc), re.DOTALL):
                raise
            raise PhituneError(f"training stopped: backward went through an operator without a gradient, so the LoRA "
                               f"gradients would be silently wrong ({first_line(exc)[:160]}); rerun with "
                               "--debug and report it") from None
    stopper.raise_if_stopped()
    runtime = time.perf_counter() - start
    tokens = trainer.state.num_input_tokens_seen
    resumed_at = int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint else 0
    metrics = dict(
        # None when resumed from the last checkpoint: no step trained (transformers would say 0.0)
        train_loss=output.training_loss if trainer.state.global_step > resumed_at else None,
        train_runtime_s=round(runtime, 2),
        train_tokens=tokens,
        tokens_per_second=round(tokens / runtime, 1) if runtime > 0 else None,
        global_step=trainer.state.global_step,
        trainable_parameters=trainable,
        total_parameters=total,
    )
    if has_eval:
        metrics.update(evaluation_metrics(trainer, evaluated_at_start=trainer.args.eval_on_start))
    return metrics


def evaluation_metrics(trainer, evaluated_at_start: bool) -> dict:
    """eval_loss_before (the evaluation at step 0) and eval_loss_after (the one at the last step, run now unless
    the loop just did it), with their perplexities."""
    from phitune.metrics import perplexity

    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    last = evals[-1] if evals and evals[-1]["step"] == trainer.state.global_step else None
    after = last["eval_loss"] if last else trainer.evaluate(metric_key_prefix="eval")["eval_loss"]
    metrics = {"eval_loss_after": after, "perplexity_after": perplexity(after)}
    if evaluated_at_start and evals and evals[0]["step"] == 0:
        metrics.update(eval_loss_before=evals[0]["eval_loss"], perplexity_before=perplexity(evals[0]["eval_loss"]))
    return metrics


def dataset_metrics(train_set, eval_set) -> dict:
    """Counts for metrics.json; `train_set` as tokenize_splits returns it (it carries format and skipped_rows)."""
    return {
        "data_format": train_set.format,
        "train_examples": len(train_set),
        "eval_examples": len(eval_set) if eval_set is not None else 0,
        "truncated_examples": train_set.truncated + (eval_set.truncated if eval_set is not None else 0),
        "skipped_rows": train_set.skipped_rows,
    }


def finish(cfg: RunConfig, trainer, tokenizer, metrics: dict, push_to_hub: str | None) -> None:
    """Write the adapter, tokenizer, resolved config, metrics and loss curve; only the main process writes."""
    output_dir = cfg.output_dir
    trainer.save_model(str(output_dir))
    if not trainer.is_world_process_zero():
        return
    tokenizer.save_pretrained(output_dir)
    save_config(cfg, output_dir / "phitune_config.yaml")
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    plot_losses(trainer.state.log_history, output_dir / "loss.png")
    (output_dir / CHECKPOINT_COMPLETE).write_text("finished\n", encoding="utf-8")
    if push_to_hub:
        from phitune.hub import push_folder

        push_folder(output_dir, push_to_hub)
