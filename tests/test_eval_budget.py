"""Evaluation budgets: how often a run evaluates by default, and the time `phitune eval` announces on a CPU."""

from __future__ import annotations

import logging
import time

from phitune.recipes.sft import build_sft_config
from phitune.run.plan import plan_run

TRIES = 3  # timings per side; the best of them is compared


def test_eval_steps_default_to_save_steps_not_every_logging_step(make_config):
    cfg = make_config(training_config={"logging_steps": 1, "save_steps": 4})
    del cfg.training_config["eval_steps"]
    args = build_sft_config(cfg, has_eval=True, plan=plan_run(cfg))
    assert args.eval_strategy == "steps" and args.eval_steps == 4  # transformers alone would say 1


def test_eval_steps_set_by_the_user_are_kept(make_config):
    cfg = make_config(training_config={"logging_steps": 1, "eval_steps": 3})
    args = build_sft_config(cfg, has_eval=True, plan=plan_run(cfg))
    assert args.eval_steps == 3


def _eval_inputs(tiny_model_dir, demo_data):
    from phitune.after.evaluate import eval_conversations, tokenize_eval_set
    from phitune.after.generate import load_for_inference
    from phitune.config.schema import DataConfig, ModelConfig

    model, tokenizer = load_for_inference(ModelConfig(name_or_path=str(tiny_model_dir), torch_dtype="float32"))
    data_cfg = DataConfig(train=str(demo_data / "train.jsonl"), eval=str(demo_data / "eval.jsonl"),
                          max_seq_length=128, max_eval_examples=16)
    conversations = eval_conversations(data_cfg, use_eval_split=True)
    return model, tokenizer, conversations, tokenize_eval_set(conversations, tokenizer, data_cfg)


def test_eval_time_estimate_comes_with_advice_and_is_the_right_size(tiny_model_dir, demo_data, caplog):
    """The estimate grows with what is asked, says how to shorten a long evaluation, and is within a factor of a
    few of the real time (on the tiny model, Python's per-step overhead counts more than on Phi-3-mini).

    Both sides are single-shot wall-clock timings of a few milliseconds, so a busy moment on a shared machine can
    inflate either one several times over: each is the best of TRIES (the time this machine takes when nothing else
    gets in the way), which is what the comparison is about; the two sides are timed in turns."""
    from phitune.after.evaluate import announce_eval_time, split_prompts, teacher_forced_metrics
    from phitune.after.generate import SamplingSettings, generate_replies

    model, tokenizer, conversations, tokenized = _eval_inputs(tiny_model_dir, demo_data)
    with caplog.at_level(logging.INFO, logger="phitune"):
        small = announce_eval_time(model, tokenized, 4, 16, batch_size=8, n_models=1)
        large = announce_eval_time(model, tokenized, 16, 64, batch_size=8, n_models=2, advise_above_s=0)
    assert 0 < small < large
    assert "--num-generate 5 --max-new-tokens 32 would take about" in caplog.text
    assert "2 models x (16 conversations scored, 16 answers of up to 64 new tokens)" in caplog.text
    prompts, _ = split_prompts(conversations[:4], tokenizer)

    def evaluate() -> float:
        start = time.perf_counter()
        teacher_forced_metrics(model, tokenizer, tokenized, batch_size=8)
        generate_replies(model, tokenizer, prompts, SamplingSettings(max_new_tokens=16), batch_size=8)
        return time.perf_counter() - start

    # Estimate and evaluation taken in turns, so that a busy stretch of the machine weighs on both sides alike
    # (all estimates first, then all evaluations, failed here with an estimate 7 times the time taken).
    estimates, actuals = [small], []
    for _ in range(TRIES):
        actuals.append(evaluate())
        estimates.append(announce_eval_time(model, tokenized, 4, 16, batch_size=8, n_models=1))
    estimate, actual = min(estimates), min(actuals)
    assert estimate / 5 < actual < estimate * 5, f"estimated {estimate:.2f} s, took {actual:.2f} s (best of {TRIES})"
