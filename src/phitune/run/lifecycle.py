"""The run lifecycle every method shares: a RunConfig in, an output directory out.

phitune.train (the driver) takes these steps in order and asks the method's recipe (phitune.recipes) for the rest:
output_dir.prepare_output_dir -> plan_run -> the recipe's data, trainer config and model -> output_dir.clear_old_run ->
the recipe's trainer -> fit -> finish.
`output_dir` ends up holding the PEFT adapter (or full model), the tokenizer, `phitune_config.yaml`, `metrics.json`,
`loss.png`, and `checkpoint-N/` directories. What keeps a run safe while it trains (complete-checkpoint markers,
graceful stop, NaN guard, resume layout checks) lives beside it in phitune.run (checkpoints, signals, guard), and
what a run directory may hold and when an old run is cleared in phitune.run.output_dir.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from phitune.after.report import plot_losses
from phitune.config.schema import RunConfig, load_run_config, save_config
from phitune.errors import PhituneError, WriteFailed, first_line, is_write_failure, replacing, write_error
from phitune.models.loading import DROPPED_GRADIENT_WARNING
from phitune.run.checkpoints import (CHECKPOINT_COMPLETE, latest_complete_checkpoint, trained_seconds,
                                      whole_run_train_loss, write_atomically)
from phitune.run.console import close_console
from phitune.run.guard import NonFiniteLoss
from phitune.run.plan import RunPlan
from phitune.run.signals import GracefulStop

log = logging.getLogger("phitune")


@dataclass
class RunResult:
    """What a finished run leaves behind, for the CLI and the demo to print."""

    output_dir: Path
    metrics: dict = field(default_factory=dict)
    model: object = None  # the trained model in memory (PeftModel for the peft backend)
    already_complete: bool = False  # --auto-resume found the run finished: nothing was trained or written


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


def padded_trainer_settings(cfg: RunConfig, has_eval: bool, plan: RunPlan) -> dict:
    """trainer_settings for the methods whose batches TRL pads and tokenizes itself (DPO, ORPO, SimPO, KTO):
    data.max_seq_length as TRL's max_length, every column kept for TRL's collator, and activation checkpointing from
    the speed switches (the run's `plan.speed`) rather than TRL's default of on."""
    settings = trainer_settings(cfg, has_eval)
    checkpointing = {k: v for k, v in plan.speed.sft_kwargs().items() if k.startswith("activation_checkpointing")}
    settings.update(checkpointing, max_length=cfg.data.max_seq_length, remove_unused_columns=False)
    return settings


def load_model_for_training(cfg: RunConfig, plan: RunPlan, head: str = "lm"):
    """The base model (4-bit for QLoRA), with LoRA layers injected for the loralib backend; the PEFT LoraConfig.

    The dtype, attention kernel and sharding come from `plan`, which has also checked the target modules against the
    model's layers. Shared by the recipes: SFT's model, and DPO / ORPO's policy when it starts from a fresh adapter.
    `head="score"` (method reward): the base with a one-output reward head (models.loading.load_score_model), seeded
    with training_config.seed, and a SEQ_CLS LoraConfig whose modules_to_save keeps the trained head in the adapter."""
    from phitune.models.loading import (load_base_model, load_score_model, load_tokenizer, resolve_peft_targets,
                                        untie_embeddings_for)

    if cfg.backend == "loralib" and cfg.model.quantization:
        raise PhituneError("peft_config.backend loralib wraps plain linear layers, not 4-bit ones; use backend: peft "
                           "for QLoRA")
    if head == "score":
        model = load_score_model(cfg.model, load_tokenizer(cfg.model), training=True, sharded=plan.sharded,
                                 seed=cfg.training_config.get("seed", 42), dtype=plan.dtype,
                                 attn_implementation=plan.attn_implementation)
    else:
        model = load_base_model(cfg.model, training=True, sharded=plan.sharded, dtype=plan.dtype,
                                attn_implementation=plan.attn_implementation)
    if cfg.backend == "full":
        if cfg.model.quantization:
            raise PhituneError("a quantized (4-bit) model cannot be fully fine-tuned; add a peft_config for QLoRA")
        return model, None
    settings = dict(cfg.peft_config)
    settings.pop("backend", None)
    settings.setdefault("task_type", "SEQ_CLS" if head == "score" else "CAUSAL_LM")
    if head == "score":  # PEFT adds it for SEQ_CLS too; named here so adapter_config.json says it
        settings["modules_to_save"] = list(dict.fromkeys([*(settings.get("modules_to_save") or []), "score"]))
    untie_embeddings_for(model, settings.get("target_modules"))  # LoRA on tied lm_head / embed_tokens: untie first
    if cfg.backend == "loralib":
        from transformers import set_seed

        from phitune.models.lora_backend import inject_for_training

        set_seed(cfg.training_config.get("seed", 42))  # LoRA A is random: same seed, same start (as PEFT via TRL)
        inject_for_training(model, settings)
        return model, None
    settings.update(resolve_peft_targets(model, settings))  # MoE: attention + experts by name, never the router
    from peft import LoraConfig

    try:
        return model, LoraConfig(**settings)
    except (TypeError, ValueError) as exc:
        raise PhituneError(f"peft_config: {exc}") from None


def load_policy(cfg: RunConfig, plan: RunPlan):
    """(model, LoraConfig or None): the base with a fresh adapter to come (peft_config), or with model.adapter loaded
    trainable (an SFT run's adapter, where DPO, ORPO and GRPO usually start); dtype and attention as the run's `plan`
    resolved them."""
    if not cfg.model.adapter:
        return load_model_for_training(cfg, plan)
    from peft import PeftModel

    from phitune.models.loading import load_base_model

    adapter = starting_adapter(cfg)
    base = load_base_model(cfg.model, training=True, dtype=plan.dtype, attn_implementation=plan.attn_implementation)
    return PeftModel.from_pretrained(base, str(adapter), is_trainable=True), None


def drop_reference_adapter(output_dir: Path) -> None:
    """DPO and KTO from model.adapter keep a frozen reference copy of the starting adapter as a second adapter named
    "ref", which PEFT saves in a subdirectory; the run's adapter is the top-level one, so the copy goes."""
    import shutil

    reference = Path(output_dir) / "ref"
    if (reference / "adapter_config.json").is_file():
        shutil.rmtree(reference)


def starting_adapter(cfg: RunConfig) -> Path:
    """model.adapter checked: it holds a PEFT adapter, and a phitune run there was trained on the same base."""
    adapter = Path(cfg.model.adapter)
    if not adapter.exists():
        demo = " (the tiny examples start from `phitune demo --output-dir outputs/demo`)" if adapter.name == "demo" else ""
        raise PhituneError(f"model.adapter: {adapter} does not exist (relative to {Path.cwd()}); train the run it names "
                           f"first{demo}")
    if not (adapter / "adapter_config.json").is_file():
        raise PhituneError(f"model.adapter: {adapter} holds no PEFT adapter (adapter_config.json is missing)")
    if (adapter / "phitune_config.yaml").is_file():
        base = load_run_config(adapter).model.name_or_path
        if Path(base).resolve() != Path(cfg.model.name_or_path).resolve() and base != cfg.model.name_or_path:
            raise PhituneError(f"model.adapter: {adapter} was trained on {base}, not on model.name_or_path "
                               f"{cfg.model.name_or_path}")
    return adapter


def warn_if_fsdp_fell_back(trainer) -> None:
    """accelerate runs FSDP only on accelerators: CPU workers asked for FSDP train with DDP instead (the same math,
    each worker holding the whole model). Say so rather than let a user believe the model is sharded."""
    asked = bool(trainer.args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and not trainer.is_fsdp_enabled and trainer.is_world_process_zero():
        log.warning("FSDP was asked for, but accelerate runs FSDP only on GPUs: these workers train with DDP, each "
                    "holding the whole model")


def resume_hint(cfg: RunConfig, auto_resume: bool = False) -> str:
    """How to continue this run after a stop, as a person copies it: `phitune train` with the config file and the
    --set overrides it was started with, and --resume (or --auto-resume, when the run was started with it: then the
    same command again). Under torchrun the same torchrun command: one process alone would make another global
    batch, which a resume refuses."""
    import shlex

    from phitune.run.processes import world_size

    sets = [part for override in cfg.overrides for part in ("--set", override)]
    command = shlex.join(["phitune", "train", cfg.source or "CONFIG", *sets,
                          "--auto-resume" if auto_resume else "--resume"])
    processes = world_size()
    if processes > 1:
        again = "again" if auto_resume else "with --resume"
        return f"Resume with the same torchrun command ({processes} processes) {again}: {command}"
    if auto_resume:
        return f"Resume by running the same command again: {command}"
    return f"Resume with: {command}"


def fit(trainer, checkpoint: Path | None, resume: str) -> dict:
    """Train (resuming from `checkpoint`); turn interruptions into clear errors (`resume`: how to continue the
    run, see resume_hint). Any method's evaluation before and after is its recipe's
    (evaluate_before / evaluate_after), not fit's."""
    from phitune.models.loading import count_parameters

    trainable, total = count_parameters(trainer.model)
    examples = trainer.train_dataset
    log.info(
        "training %s of %s parameters (%.2f%%) on %s; output: %s%s",
        f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1),
        f"{len(examples):,} examples" if hasattr(examples, "__len__") else "a stream of examples",
        trainer.args.output_dir, f"; resuming from {checkpoint}" if checkpoint else "",
    )
    start = time.perf_counter()
    with GracefulStop(trainer, resume) as stopper:
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
        except Exception as exc:
            failure = save_failure(exc, trainer)
            if failure is None:
                raise
            raise failure from None
        finally:
            close_console(trainer)  # on an error the bar is still live, and the terminal's cursor hidden
    stopper.raise_if_stopped()
    runtime = time.perf_counter() - start + trained_seconds(checkpoint)  # the whole run's, as its tokens are
    tokens = trainer.state.num_input_tokens_seen
    resumed_at = int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint else 0
    metrics = dict(
        # None when resumed from the last checkpoint: no step trained (transformers would say 0.0)
        train_loss=whole_run_train_loss(trainer.state.log_history, resumed_at, output.training_loss,
                                        trainer.state.global_step) if trainer.state.global_step > resumed_at else None,
        train_runtime_s=round(runtime, 2),
        train_tokens=tokens,
        tokens_per_second=round(tokens / runtime, 1) if runtime > 0 else None,
        global_step=trainer.state.global_step,
        trainable_parameters=trainable,
        total_parameters=total,
    )
    return metrics


AGAIN = "free space, then run the same command with --auto-resume"


def save_failure(exc: Exception, trainer) -> PhituneError | None:
    """A checkpoint save that failed (a full disk, a quota), or a full disk anywhere in training, as one line; None
    for any other error. The checkpoint being written is not marked, so the last complete one is what a resume
    takes."""
    if not is_write_failure(exc):
        return None
    output_dir = Path(trainer.args.output_dir)
    saving = output_dir / f"checkpoint-{trainer.state.global_step}"
    partial = saving.is_dir() and not (saving / CHECKPOINT_COMPLETE).is_file()
    error = write_error(exc, saving if partial else output_dir)
    last = latest_complete_checkpoint(output_dir)
    kept = f"the last complete checkpoint is {last}" if last else "no checkpoint is complete yet"
    unmarked = f"{saving.name} is not marked complete and " if partial else ""
    return PhituneError(f"{error}; {unmarked}{kept}; {AGAIN}")


def eval_loss_before_after(trainer) -> dict:
    """eval_loss_before (the evaluation at step 0) and eval_loss_after (the one at the last step, run now unless
    the loop just did it), with their perplexities. A resumed run's step 0 was evaluated by its first attempt: that
    evaluation comes back with the checkpoint's log history, so a resumed run reports its whole run."""
    from phitune.after.metrics import perplexity

    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    last = evals[-1] if evals and evals[-1]["step"] == trainer.state.global_step else None
    after = last["eval_loss"] if last else trainer.evaluate(metric_key_prefix="eval")["eval_loss"]
    metrics = {"eval_loss_after": after, "perplexity_after": perplexity(after)}
    if evals and evals[0]["step"] == 0:
        metrics.update(eval_loss_before=evals[0]["eval_loss"], perplexity_before=perplexity(evals[0]["eval_loss"]))
    return metrics


def finish(cfg: RunConfig, trainer, tokenizer, metrics: dict, push_to_hub: str | None,
           tidy: Callable[[Path], None]) -> None:
    """Write the adapter, tokenizer, resolved config, metrics and loss curve; only the main process writes. `tidy`
    (the recipe's tidy_output) removes what the run must not leave, before the run is marked finished and pushed.
    A write that fails (a full disk) is one line, and the run is not marked finished."""
    output_dir = cfg.output_dir
    try:
        trainer.save_model(str(output_dir))
        if not trainer.is_world_process_zero():
            return
        tidy(output_dir)
        tokenizer.save_pretrained(output_dir)
        save_config(cfg, output_dir / "phitune_config.yaml")
        with replacing(output_dir / "metrics.json") as path:  # a full disk names the file it could not write
            path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        with replacing(output_dir / "loss.png") as path:
            plot_losses(trainer.state.log_history, path)
        write_atomically(output_dir / CHECKPOINT_COMPLETE, "finished\n")
    except Exception as exc:
        if not isinstance(exc, WriteFailed) and not is_write_failure(exc):
            raise
        failed = exc if isinstance(exc, WriteFailed) else write_error(exc, output_dir)
        raise PhituneError(f"{failed}; the run is not marked finished; {AGAIN}") from None
    if push_to_hub:
        from phitune.after.hub import push_folder

        push_folder(output_dir, push_to_hub)
