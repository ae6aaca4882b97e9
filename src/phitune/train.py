"""The driver: `phitune train`, `phitune eval` and `phitune data` for every method, and the one place where a
run's `method` picks its recipe.

run_training takes the lifecycle steps of phitune.run.lifecycle once, in order, and asks the method's recipe
(phitune.recipes) for what differs between methods:

    output directory -> checkpoint -> plan -> tokenizer -> recipe = RECIPES[cfg.method] -> its data, trainer config
    and model -> clear an old run (--overwrite) -> its trainer -> its evaluation before -> fit -> its evaluation
    after -> its counts -> finish (with its tidy-up, before the run is marked finished)

The CLI and phitune.api call the same three functions here, so both give the same results.
"""

from __future__ import annotations

import json
from pathlib import Path

from phitune.config.schema import RunConfig, save_config
from phitune.errors import PhituneError
from phitune.recipes import distill, grpo, kto, preference, reward, sft, vision
from phitune.run.checkpoints import check_resume_layout, latest_intact_checkpoint
from phitune.run.lifecycle import RunResult, finish, fit, resume_hint
from phitune.run.output_dir import (SAVED_CONFIG, auto_resume_mode, check_same_training, clear_old_run,
                                    prepare_output_dir)
from phitune.run.plan import machine_description, plan_run
from phitune.run.processes import job_lock
from phitune.runlock import is_main_process

RECIPES = {"sft": sft, "dpo": preference, "orpo": preference, "simpo": preference, "kto": kto, "reward": reward,
           "grpo": grpo, "vision": vision, "distill": distill}  # config.methods.METHODS names the same keys


def run_training(cfg: RunConfig, resume: bool = False, overwrite: bool = False,
                 push_to_hub: str | None = None, auto_resume: bool = False) -> RunResult:
    """Fine-tune as `cfg` says and write the output directory; return its path and metrics.

    The output directory is locked first, before anything is written there (one run per directory; under torchrun
    the main process holds it for the job, and the others wait for its answer before they read the directory).
    `auto_resume` decides between starting and resuming by what it finds."""
    if auto_resume and (resume or overwrite):
        raise PhituneError("--auto-resume decides between starting and resuming itself; leave out --resume and "
                           "--overwrite")
    with job_lock(cfg.output_dir):
        if auto_resume:
            mode = auto_resume_mode(cfg)
            if mode == "complete":
                return _already_complete(cfg.output_dir)
            resume, overwrite = mode == "resume", mode == "restart"
        return _train(cfg, resume, overwrite, push_to_hub, auto_resume)


def _already_complete(output_dir: Path) -> RunResult:
    """A finished run that --auto-resume finds: nothing loaded or written, its metrics as it left them."""
    metrics = output_dir / "metrics.json"
    return RunResult(output_dir=output_dir, already_complete=True,
                     metrics=json.loads(metrics.read_text(encoding="utf-8")) if metrics.is_file() else {})


def _train(cfg: RunConfig, resume: bool, overwrite: bool, push_to_hub: str | None,
           auto_resume: bool = False) -> RunResult:
    """The lifecycle's steps, in order, under the directory's lock."""
    from phitune.models.loading import load_tokenizer

    recipe = RECIPES[cfg.method]
    output_dir = prepare_output_dir(cfg, resume=resume, overwrite=overwrite)
    if resume:
        check_same_training(cfg, output_dir)
    checkpoint = latest_intact_checkpoint(output_dir, main_process=is_main_process()) if resume else None
    plan = plan_run(cfg)  # config.json, speed, dtype, attention: resolved once, before any weight is read
    tokenizer = load_tokenizer(cfg.model, padding_side="right")
    data = recipe.load_data(cfg, tokenizer, plan)  # SFT: Arrow, cached, made once per machine
    args = recipe.build_config(cfg, data, plan)  # fails before weights load
    if checkpoint is not None:
        check_resume_layout(checkpoint, args)
    model, peft_config = recipe.load_model(cfg, plan)
    # only now: a bad config or bad data must not cost the old run
    clear_old_run(output_dir, overwrite, main_process=args.should_save, auto_resume=auto_resume)
    if args.should_save:  # recorded now, so an interrupted run can be told apart from another config's
        save_config(cfg, output_dir / SAVED_CONFIG)
    trainer = recipe.make_trainer(cfg, model, tokenizer, data, peft_config, args)
    before = recipe.evaluate_before(cfg, trainer, tokenizer, data, checkpoint)
    metrics = fit(trainer, checkpoint, resume_hint(cfg, auto_resume))
    metrics.update(recipe.evaluate_after(cfg, trainer, tokenizer, data, before))
    metrics.update(recipe.data_metrics(cfg, data), machine=machine_description())
    finish(cfg, trainer, tokenizer, metrics, push_to_hub, tidy=recipe.tidy_output)
    return RunResult(output_dir=output_dir, metrics=metrics, model=trainer.model)


def evaluate_run(run_dir: Path | None = None, model: str | None = None, adapter: Path | None = None,
                 data: str | None = None, num_generate: int = 50, max_new_tokens: int = 64, batch_size: int = 8,
                 output: Path | None = None):
    """`phitune eval`: the model (and adapter) scored as the method of the run it comes from says; a bare model
    or adapter without a phitune run is scored as SFT. Writes eval.json (and, for SFT, report.md and eval.png)."""
    from phitune.after.evaluate import evaluation_data
    from phitune.after.generate import SamplingSettings, resolve_model_source

    model_cfg, adapter_dir = resolve_model_source(run_dir, model, adapter)
    data_cfg, source = evaluation_data(run_dir or adapter, data)
    return RECIPES[run_method(source)].evaluate_run(
        model_cfg, adapter_dir, data_cfg, Path(output or source or Path.cwd()), use_eval_split=data is None,
        batch_size=batch_size, num_generate=num_generate, settings=SamplingSettings(max_new_tokens=max_new_tokens))


def inspect_run_data(cfg: RunConfig, output: Path | None = None, example_index: int = 0):
    """`phitune data`: the data as the method's training reads it (a DataReport for report.print_data_report)."""
    return RECIPES[cfg.method].inspect_data(cfg, output, example_index=example_index)


def run_method(run_dir) -> str:
    """The method a phitune run directory was trained with; "sft" for anything else (a bare model, a PEFT adapter)."""
    from phitune.config.schema import load_run_config

    if run_dir is None or not (Path(run_dir) / "phitune_config.yaml").is_file():
        return "sft"
    return load_run_config(run_dir).method
