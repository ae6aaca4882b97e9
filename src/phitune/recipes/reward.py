"""The reward recipe: `method: reward`, a reward model trained on preference pairs through TRL's RewardTrainer.

The base loads with a one-output `score` head instead of its language-model head (transformers'
*ForSequenceClassification; the head starts random, seeded with training_config.seed), and a LoRA adapter trains with
the head (PEFT task_type SEQ_CLS, the head saved whole through modules_to_save). For a pair with chosen answer y+ and
rejected y-, r(x, y) the score of prompt + answer read whole, the loss is Bradley-Terry's

    -log sigmoid(r(x, y+) - r(x, y-))        (minus a margin column, or plus center_rewards_coefficient * (r+ + r-)^2)

The run goes through the lifecycle every method shares (phitune.run): output directory, checkpoints, SIGTERM / NaN /
resume guarantees, PEFT adapter. What differs:

- data: the same prompt / chosen / rejected pairs as DPO (phitune.data.preference), handed to TRL as conversations;
  a pair longer than data.max_seq_length is a bad row (TRL would drop it silently);
- evaluation: on the held-out pairs, before (the untrained head) and after training, pairwise accuracy = share of
  pairs whose chosen answer scores above the rejected one, and the mean score margin (phitune.after.reward_model);
- use: the finished run is a GRPO reward, `rewards: [{model: RUN_DIR}]` (phitune.after.rewards).
"""

from __future__ import annotations

import logging
from pathlib import Path

from phitune.config.methods import training_config_class
from phitune.config.schema import RunConfig
from phitune.errors import PhituneError, first_line
from phitune.run.lifecycle import load_model_for_training, padded_trainer_settings
from phitune.run.plan import RunPlan

log = logging.getLogger("phitune")


def load_data(cfg: RunConfig, tokenizer, plan: RunPlan):
    """(PreferenceData, counts): the train and eval pairs, those longer than data.max_seq_length handled per
    data.on_bad_row."""
    from phitune.data.mixture import log_mixture
    from phitune.data.preference import check_whole_lengths, load_preference_data

    data = load_preference_data(cfg.data)
    log_mixture(log, data.shares)
    skipped = list(data.skipped)
    for name in ("train", "eval"):
        pairs = getattr(data, name)
        if pairs:
            kept, dropped = check_whole_lengths(pairs, tokenizer, cfg.data.max_seq_length, cfg.data.on_bad_row, name)
            setattr(data, name, kept)
            skipped += dropped
    if skipped:
        log.warning("skipped %d bad rows; first: %s", len(skipped), "; ".join(skipped[:3]))
    counts = dict(data_format=data.format, train_examples=len(data.train), eval_examples=len(data.eval),
                  skipped_rows=len(skipped))
    return data, counts


def build_config(cfg: RunConfig, data, plan: RunPlan):
    """RewardConfig: training_config over phitune's defaults (phitune.run.lifecycle.padded_trainer_settings)."""
    settings = padded_trainer_settings(cfg, has_eval=bool(data[0].eval), plan=plan)
    try:
        return training_config_class("reward")(**settings)
    except (TypeError, ValueError) as exc:
        raise PhituneError(f"training_config: {first_line(exc)}") from None


def load_model(cfg: RunConfig, plan: RunPlan):
    """(the base with a seeded `score` head, its SEQ_CLS LoraConfig): see load_model_for_training."""
    return load_model_for_training(cfg, plan, head="score")


def make_trainer(cfg: RunConfig, model, tokenizer, data, peft_config, args):
    """TRL's RewardTrainer with phitune's guards (NaN, complete checkpoints), over the pairs as conversations."""
    import datasets
    from trl import RewardTrainer

    from phitune.data import rows_dataset
    from phitune.run.guard import GuardedTraining

    class PhituneRewardTrainer(GuardedTraining, RewardTrainer):
        """RewardTrainer with phitune's NaN guard and complete-marked checkpoints."""

    datasets.disable_progress_bars()  # TRL tokenizes the pairs with one bar per step; phitune logs the counts instead
    pairs = data[0]
    trainer = PhituneRewardTrainer(
        model=model,
        args=args,
        train_dataset=rows_dataset(pairs.train),
        eval_dataset=rows_dataset(pairs.eval) if pairs.eval else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    dropped = len(pairs.train) - len(trainer.train_dataset)
    if dropped:  # load_data's length check is TRL's own filter, so this is a bug, not a data problem: say so loudly
        raise PhituneError(f"TRL's RewardTrainer dropped {dropped} train pairs longer than max_length that phitune's "
                           "length check kept; report it with phitune --debug")
    if cfg.model.quantization:
        head_in_hidden_dtype(trainer.model)
    return trainer


def head_in_hidden_dtype(model) -> None:
    """Over a 4-bit base TRL casts every trainable parameter to bf16 (the QLoRA paper's adapter dtype). LoRA layers
    cast their input to their own dtype; the `score` head, a plain linear layer, does not, so it goes back to the dtype
    of the hidden states it reads (the embeddings'), or its first forward fails on mixed dtypes."""
    dtype = model.get_input_embeddings().weight.dtype
    for name, param in model.named_parameters():
        if param.requires_grad and ".score." in f".{name}" and param.dtype != dtype:
            param.data = param.data.to(dtype)


def evaluate_before(cfg: RunConfig, trainer, tokenizer, data, checkpoint: Path | None) -> dict:
    """Pairwise accuracy of the starting point, the untrained head, on the held-out pairs (TRL's own held-out
    metrics come at the end). A resumed run's weights load inside train(), so this is the run's start either way."""
    from phitune.after.reward_model import score_pairs

    trainer.args.eval_on_start = False
    pairs = data[0].eval
    return score_pairs(trainer.model, tokenizer, pairs) if pairs else {}


def evaluate_after(cfg: RunConfig, trainer, tokenizer, data, before: dict) -> dict:
    """The held-out scores before and after, and TRL's own held-out metrics at the last step."""
    from phitune.after.reward_model import score_pairs

    pairs = data[0].eval
    if not pairs:
        return {}
    after = score_pairs(trainer.model, tokenizer, pairs)
    metrics = {f"{k}_before": v for k, v in before.items()} | {f"{k}_after": v for k, v in after.items()}
    evals = [e for e in trainer.state.log_history if "eval_loss" in e and e["step"] == trainer.state.global_step]
    last = evals[-1] if evals else trainer.evaluate()
    return metrics | {key: last[key] for key in ("eval_loss", "eval_accuracy", "eval_margin") if key in last}


def data_metrics(cfg: RunConfig, data) -> dict:
    """The method, and counts for metrics.json: format, pairs, skipped rows."""
    return dict(method=cfg.method, **data[1])


def tidy_output(output_dir: Path) -> None:
    """Nothing to tidy: a reward run starts from the base and keeps no reference copy."""


def evaluate_run(model_cfg, adapter: Path | None, data_cfg, output_dir: Path, *, use_eval_split: bool,
                 batch_size: int, num_generate: int, settings):
    """`phitune eval` on a reward run: pairwise accuracy and score margin of the untrained head (the base with the
    run's seeded head, where training started) and of the trained reward model, on the run's held-out pairs or on
    every pair of --data; writes eval.json. Nothing is generated, so `num_generate` and `settings` do not apply."""
    from peft import PeftModel

    from phitune.after.evaluate import EvalResult, save_eval_json
    from phitune.after.reward_model import score_pairs
    from phitune.config.schema import load_run_config
    from phitune.data.preference import load_preference_data
    from phitune.models.loading import load_score_model, load_tokenizer

    if use_eval_split:
        pairs = load_preference_data(data_cfg).eval
    else:
        pairs = load_preference_data(data_cfg.whole_file_as_eval()).train  # --data FILE: the whole file is the eval set
    if not pairs:
        raise PhituneError("the run has no held-out pairs (data.eval_split is 0 and no data.eval); pass --data FILE")
    seed = load_run_config(adapter).training_config.get("seed", 42) if adapter is not None else 42
    tokenizer = load_tokenizer(model_cfg, padding_side="right")
    model = load_score_model(model_cfg, tokenizer, seed=seed)
    metrics = {"untrained head": score_pairs(model, tokenizer, pairs, batch_size)}
    if adapter is not None:
        metrics["fine-tuned"] = score_pairs(PeftModel.from_pretrained(model, str(adapter)), tokenizer, pairs,
                                            batch_size)
    info = dict(model=model_cfg.name_or_path, adapter=str(adapter) if adapter else None, eval_examples=len(pairs),
                unit="held-out preference pairs",
                metric="pairwise_accuracy: share of pairs whose chosen answer scores above the rejected one; "
                       "score_margin: mean score difference (chosen - rejected)")
    result = EvalResult(metrics=metrics, info=info, output_dir=Path(output_dir))
    save_eval_json(result)
    return result


def inspect_data(cfg: RunConfig, output: Path | None, example_index: int = 0):
    """`phitune data` on prompt / chosen / rejected pairs: the DataReport of phitune.data.preference (pairs longer
    than data.max_seq_length flagged as the bad rows method reward makes them)."""
    from phitune.data.preference import inspect_preference_data

    return inspect_preference_data(cfg, output, example_index=example_index)
