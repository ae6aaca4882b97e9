"""The Python API: what the commands do, as functions for notebooks and scripts.

    from phitune import api

    run = api.train({"model": {...}, "data": {...}, "training_config": {...}, "peft_config": {...}})
    report = api.evaluate(run.output_dir, num_generate=5)
    session = api.chat(run.output_dir)
    api.chat_turn(session, "What noise does a cow make?")
    api.merge(run.output_dir, "merged/")

Each function is a thin wrapper over the code the CLI calls (`phitune train`, `eval`, `chat`, `generate`, `merge`),
so both give the same results. Problems raise `PhituneError` with the message the CLI would print; nothing here
prints or exits. The functions live in `phitune.api` rather than on the package itself because `phitune.train`,
`phitune.after.evaluate`, `phitune.after.generate` and `phitune.after.merge` are the modules that do the work.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

from phitune.config.schema import RunConfig, apply_overrides, config_from_dict, load_config
from phitune.errors import PhituneError

# PEFT asks every model it wraps for `is_gradient_checkpointing`, which transformers 5 renamed: a warning about a
# library's own call, on every model phitune loads, that the user cannot act on (the CLI hides transformers'
# FutureWarnings altogether; a notebook keeps every other warning)
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)

__all__ = ["PhituneError", "load_run", "train", "evaluate", "inspect_data", "generate", "chat", "chat_turn", "merge"]


def load_run(config: dict | str | Path | RunConfig, overrides: list[str] | None = None) -> RunConfig:
    """A validated RunConfig from a dict (the YAML file's sections), a YAML path, or a RunConfig as it is.

    `overrides` are `section.key=value` strings, as `--set` takes them. Every problem is reported in one error.
    """
    if isinstance(config, RunConfig):
        if overrides:
            raise PhituneError("overrides apply to a dict or a YAML file, not to a RunConfig; edit it directly")
        return config
    if isinstance(config, dict):
        raw = copy.deepcopy(config)  # overrides must not change the caller's dict
        apply_overrides(raw, overrides or [])
        return config_from_dict(raw)
    return load_config(config, overrides)


def train(config: dict | str | Path | RunConfig, overrides: list[str] | None = None, resume: bool = False,
          overwrite: bool = False, push_to_hub: str | None = None, auto_resume: bool = False):
    """Fine-tune as `config` says (`phitune train`); returns a RunResult: output_dir, metrics, the trained model.

    `auto_resume` (`--auto-resume`): start, continue an interrupted run, or, for a finished one, return at once with
    `already_complete` set and its metrics.json (no model).

    `metrics` holds what metrics.json holds: train_loss, eval_loss_before/after, perplexities, step and token counts.
    """
    from phitune.train import run_training

    return run_training(load_run(config, overrides), resume=resume, overwrite=overwrite, push_to_hub=push_to_hub,
                        auto_resume=auto_resume)


def evaluate(run_dir: str | Path | None = None, model: str | None = None, adapter: str | Path | None = None,
             data: str | None = None, num_generate: int = 50, max_new_tokens: int = 64, batch_size: int = 8,
             output: str | Path | None = None, benchmarks: list[str] | None = None, limit: int | None = None):
    """Base and fine-tuned model side by side (`phitune eval`); returns an EvalResult whose `metrics` maps
    "base" / "fine-tuned" (or "model") to loss, perplexity, token_accuracy, rougeL_f1, exact_match; for a DPO / ORPO /
    SimPO run, to preference_accuracy, reward_margin, chosen_logp, rejected_logp; for a KTO run, to desirable_logp,
    undesirable_logp, logp_margin; for a reward run, "untrained head" / "fine-tuned" to pairwise_accuracy,
    score_margin, chosen_score, rejected_score; for a distill run, "base" / "fine-tuned" / "teacher" to
    kl_to_teacher, eval_loss, perplexity.

    `benchmarks` (`phitune eval --benchmarks`): lm-evaluation-harness task names or task YAML files instead, at
    most `limit` examples each; the scores are in the result's `benchmarks` (docs/benchmarks.md).
    Writes eval.json (and for SFT report.md and eval.png) into `output` (default: the run directory).
    """
    from phitune.train import evaluate_run

    if limit is not None and benchmarks is None:
        raise PhituneError("limit goes with benchmarks")
    if benchmarks is not None:
        from phitune.after.benchmarks import parse_benchmark_names, run_benchmarks

        return run_benchmarks(Path(run_dir) if run_dir else None, model, Path(adapter) if adapter else None,
                              parse_benchmark_names(",".join(benchmarks)), limit=limit, batch_size=batch_size,
                              output=Path(output) if output else None)
    return evaluate_run(Path(run_dir) if run_dir else None, model, Path(adapter) if adapter else None, data,
                        num_generate=num_generate, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        output=Path(output) if output else None)


def inspect_data(config: dict | str | Path | RunConfig, overrides: list[str] | None = None,
                 output: str | Path | None = None, example: int = 0):
    """The data as training reads it (`phitune data`): a report with format, counts, lengths, one example and
    warnings."""
    from phitune.train import inspect_run_data

    return inspect_run_data(load_run(config, overrides), Path(output) if output else None, example_index=example)


def _load(run_dir, model, adapter):
    from phitune.after.generate import load_for_inference, resolve_model_source

    model_cfg, adapter_dir = resolve_model_source(run_dir, model, adapter)
    return load_for_inference(model_cfg, adapter_dir)


def generate(prompts: list, run_dir: str | Path | None = None, model: str | None = None,
             adapter: str | Path | None = None, batch_size: int = 8, **sampling) -> list[str]:
    """The model's reply to each prompt (`phitune generate`); a prompt is a string (one user turn) or a list of
    {"role", "content"} messages ending with a user turn. `sampling`: SamplingSettings fields (max_new_tokens,
    do_sample, temperature, top_p, top_k, seed); greedy by default."""
    from phitune.after.generate import SamplingSettings, generate_replies

    conversations = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    loaded, tokenizer = _load(run_dir, model, adapter)
    return generate_replies(loaded, tokenizer, conversations, _settings(sampling), batch_size=batch_size)


def chat(run_dir: str | Path | None = None, model: str | None = None, adapter: str | Path | None = None,
         system: str | None = None, **sampling):
    """A ChatSession (`phitune chat`): the model loaded once, the history kept between turns; see chat_turn."""
    from phitune.after.generate import ChatSession

    loaded, tokenizer = _load(run_dir, model, adapter)
    return ChatSession(loaded, tokenizer, _settings(sampling), system=system)


def chat_turn(session, text: str) -> str:
    """Say `text` in `session` and return the whole reply (ChatSession.stream_reply gives it piece by piece)."""
    return "".join(session.stream_reply(text)).strip()


def _settings(sampling: dict):
    from phitune.after.generate import SamplingSettings

    try:
        return SamplingSettings(**sampling)
    except TypeError as exc:
        raise PhituneError(f"sampling settings: {exc}") from None


def merge(run_dir: str | Path | None, output: str | Path, adapter: str | Path | None = None,
          model: str | None = None, dtype: str = "auto", push_to_hub: str | None = None):
    """Fold the adapter into its base and save a standalone model in `output` (`phitune merge`); returns a
    MergeResult (output_dir, dtype, size_bytes)."""
    from phitune.after.generate import resolve_model_source
    from phitune.after.merge import merge_adapter

    model_cfg, adapter_dir = resolve_model_source(run_dir, model, adapter)
    return merge_adapter(model_cfg, adapter_dir, Path(output), push_to_hub=push_to_hub, dtype=dtype)

