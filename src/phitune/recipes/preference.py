"""The preference recipe: `method: dpo` (TRL's DPOTrainer), `method: orpo` (TRL's ORPOTrainer) and `method: simpo`
(TRL's CPOTrainer with its SimPO loss; ORPO and CPO are experimental in TRL 1.x).

The run goes through the lifecycle every method shares (phitune.run) with another trainer: the
same output directory, checkpoints, SIGTERM / NaN / resume guarantees, PEFT adapter and phitune_config.yaml. What
differs:

- data: prompt / chosen / rejected pairs (phitune.data.preference), handed to TRL as conversations, which TRL renders
  with the chat template and tokenizes itself;
- the starting point: a fresh LoRA adapter (`peft_config`), or the adapter of an earlier run (`model.adapter`, usually
  the SFT run), which is trained further. DPO's reference model is the starting point, without a second copy of the
  base: for a fresh adapter TRL disables the adapter (LoRA B starts at 0, so that is the start); for `model.adapter`
  TRL keeps a frozen copy of the starting adapter (a few MB) and switches to it. ORPO and SimPO need no reference
  (SimPO's reward is the answer's mean token log-probability, beta / |y| * log p(y | x));
- evaluation: on the held-out pairs, before and after training, preference accuracy = share of pairs where the summed
  log-probability of the chosen answer exceeds the rejected one's, and the mean margin
  log p(chosen | prompt) - log p(rejected | prompt), in nats (`score_pairs`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from phitune.config.methods import cpo_classes, orpo_classes, training_config_class
from phitune.config.schema import RunConfig
from phitune.errors import PhituneError, first_line
from phitune.run.lifecycle import drop_reference_adapter, load_policy, padded_trainer_settings
from phitune.run.plan import RunPlan

log = logging.getLogger("phitune")

def load_data(cfg: RunConfig, tokenizer, plan: RunPlan):
    """(PreferenceData, counts): the train and eval pairs, checked against data.max_seq_length."""
    return preference_splits(cfg, tokenizer)


def build_config(cfg: RunConfig, data, plan: RunPlan):
    """DPOConfig or ORPOConfig for this run (see build_preference_config)."""
    return build_preference_config(cfg, has_eval=bool(data[0].eval), plan=plan)


def load_model(cfg: RunConfig, plan: RunPlan):
    """(model, LoraConfig or None): see load_policy."""
    return load_policy(cfg, plan)


def make_trainer(cfg: RunConfig, model, tokenizer, data, peft_config, args):
    """The DPO or ORPO trainer over the pairs (see build_preference_trainer)."""
    return build_preference_trainer(cfg, model, tokenizer, data[0], peft_config, args)


def evaluate_before(cfg: RunConfig, trainer, tokenizer, data, checkpoint: Path | None) -> dict:
    """Preference accuracy and margins of the starting point on the held-out pairs (no in-loop evaluation at the
    start: TRL's own held-out metrics come at the end)."""
    trainer.args.eval_on_start = False
    pairs = data[0].eval
    return score_pairs(trainer.model, tokenizer, pairs, cfg.data.max_seq_length) if pairs else {}


def evaluate_after(cfg: RunConfig, trainer, tokenizer, data, before: dict) -> dict:
    """The held-out scores before and after, and TRL's own held-out metrics at the last step."""
    pairs = data[0].eval
    if not pairs:
        return {}
    after = score_pairs(trainer.model, tokenizer, pairs, cfg.data.max_seq_length)
    metrics = {f"{k}_before": v for k, v in before.items()} | {f"{k}_after": v for k, v in after.items()}
    return metrics | final_trainer_eval(trainer)


def data_metrics(cfg: RunConfig, data) -> dict:
    """The method, and counts for metrics.json: format, examples, truncated and skipped rows."""
    return dict(method=cfg.method, **data[1])


def tidy_output(output_dir: Path) -> None:
    """Drop DPO's frozen reference copy of a starting adapter (see drop_reference_adapter)."""
    drop_reference_adapter(output_dir)


def preference_splits(cfg: RunConfig, tokenizer):
    """Train and eval pairs with too-long prompts handled per data.on_bad_row; counts for metrics.json."""
    from phitune.data.mixture import log_mixture
    from phitune.data.preference import check_lengths, load_preference_data

    data = load_preference_data(cfg.data)
    log_mixture(log, data.shares)
    limit, skipped, truncated = cfg.data.max_seq_length, list(data.skipped), 0
    for name in ("train", "eval"):
        pairs = getattr(data, name)
        if pairs:
            kept, cut, dropped = check_lengths(pairs, tokenizer, limit, cfg.data.on_bad_row, name)
            setattr(data, name, kept)
            truncated, skipped = truncated + cut, skipped + dropped
    if truncated:
        log.warning("%d pairs have an answer cut by data.max_seq_length %d", truncated, limit)
    if skipped:
        log.warning("skipped %d bad rows; first: %s", len(skipped), "; ".join(skipped[:3]))
    counts = dict(data_format=data.format, train_examples=len(data.train), eval_examples=len(data.eval),
                  truncated_examples=truncated, skipped_rows=len(skipped))
    return data, counts


# SimPO through CPO: the paper's reference-free, length-normalised loss alone (cpo_alpha 0: no NLL term; CPO's own
# default of 1 adds one), at the SimPO paper's beta 2.0 and margin gamma 1.0 (gamma / beta = 0.5) instead of CPO's
# beta 0.1 and gamma 0.5, which on per-token averaged log-probabilities barely move the policy.
SIMPO_DEFAULTS = {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.0, "simpo_gamma": 1.0}


def build_preference_config(cfg: RunConfig, has_eval: bool, plan: RunPlan):
    """DPOConfig / ORPOConfig / CPOConfig (SimPO): training_config over phitune's defaults (as for SFT, see
    padded_trainer_settings), and for SimPO the paper's loss and settings where training_config leaves them out."""
    settings = padded_trainer_settings(cfg, has_eval, plan)
    if cfg.method == "simpo":
        settings.update({k: v for k, v in SIMPO_DEFAULTS.items() if k not in cfg.training_config})
    if cfg.method in ("orpo", "simpo") and "include_num_input_tokens_seen" not in cfg.training_config:
        settings["include_num_input_tokens_seen"] = "no"  # their batches have no input_ids for the Trainer to count
    try:
        return training_config_class(cfg.method)(**settings)
    except (TypeError, ValueError) as exc:
        raise PhituneError(f"training_config: {first_line(exc)}") from None


def build_preference_trainer(cfg: RunConfig, model, tokenizer, data, peft_config, args):
    """PhituneDPOTrainer or PhituneORPOTrainer: TRL's trainer with phitune's guards (NaN, complete checkpoints)."""
    import datasets

    from phitune.data import rows_dataset

    datasets.disable_progress_bars()  # TRL tokenizes the pairs with one bar per step; phitune logs the counts instead
    trainer_class = {"dpo": dpo_trainer_class, "orpo": orpo_trainer_class, "simpo": simpo_trainer_class}[cfg.method]()
    return trainer_class(
        model=model,
        args=args,
        train_dataset=rows_dataset(data.train),
        eval_dataset=rows_dataset(data.eval) if data.eval else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def dpo_trainer_class():
    from trl import DPOTrainer

    from phitune.run.guard import GuardedTraining

    class PhituneDPOTrainer(GuardedTraining, DPOTrainer):
        """DPOTrainer with phitune's NaN guard and complete-marked checkpoints."""

    return PhituneDPOTrainer


def orpo_trainer_class():
    from phitune.run.guard import GuardedTraining

    class PhituneORPOTrainer(GuardedTraining, orpo_classes()[1]):
        """ORPOTrainer (trl.experimental) with phitune's NaN guard and complete-marked checkpoints."""

    return PhituneORPOTrainer


def simpo_trainer_class():
    from phitune.run.guard import GuardedTraining

    class PhituneSimPOTrainer(GuardedTraining, cpo_classes()[1]):
        """CPOTrainer (trl.experimental) with loss_type simpo, phitune's NaN guard and complete-marked checkpoints."""

    return PhituneSimPOTrainer


def final_trainer_eval(trainer) -> dict:
    """TRL's own held-out metrics at the last step (DPO: implicit-reward accuracy and margin, beta-scaled)."""
    evals = [e for e in trainer.state.log_history if "eval_loss" in e and e["step"] == trainer.state.global_step]
    last = evals[-1] if evals else trainer.evaluate()
    keep = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected")
    return {key.replace("/", "_"): last[key] for key in keep if key in last}


def score_pairs(model, tokenizer, pairs, max_seq_length: int, batch_size: int = 8) -> dict:
    """Preference accuracy and margins of `model` on `pairs` (summed log-probabilities of each answer's tokens,
    sequences cut to max_seq_length as in training)."""
    import torch

    from phitune.after.metrics import answer_logps
    from phitune.data.preference import tokenize_pair

    chosen, rejected = [], []
    was_training = model.training
    model.eval()
    for start in range(0, len(pairs), batch_size):
        tokens = [tokenize_pair(tokenizer, pair) for pair in pairs[start : start + batch_size]]
        sequences = [(t.prompt_ids, t.chosen_ids) for t in tokens] + [(t.prompt_ids, t.rejected_ids) for t in tokens]
        sums = answer_logps(model, sequences, tokenizer.pad_token_id, max_seq_length)
        chosen += sums[: len(tokens)].tolist()
        rejected += sums[len(tokens) :].tolist()
    model.train(was_training)
    margins = torch.tensor(chosen, dtype=torch.float64) - torch.tensor(rejected, dtype=torch.float64)
    return {"preference_accuracy": (margins > 0).double().mean().item(), "reward_margin": margins.mean().item(),
            "chosen_logp": sum(chosen) / len(chosen), "rejected_logp": sum(rejected) / len(rejected)}


def run_preference_evaluation(model_cfg, adapter: Path | None, data_cfg, output_dir: Path,
                              use_eval_split: bool = True, batch_size: int = 8):
    """`phitune eval` on a DPO / ORPO run: preference accuracy and margins of the base, of the starting adapter
    (model.adapter, when the run had one) and of the trained adapter, on the run's held-out pairs or on every pair of
    --data. Writes eval.json."""
    from dataclasses import replace

    from phitune.after.evaluate import EvalResult, save_eval_json
    from phitune.after.generate import attach_adapter, load_for_inference
    from phitune.data.preference import load_preference_data

    if use_eval_split:
        pairs = load_preference_data(data_cfg).eval
    else:
        pairs = load_preference_data(data_cfg.whole_file_as_eval()).train  # --data FILE: the whole file is the eval set
    if not pairs:
        raise PhituneError("the run has no held-out pairs (data.eval_split is 0 and no data.eval); pass --data FILE")
    model, tokenizer = load_for_inference(replace(model_cfg, adapter=None))
    limit = data_cfg.max_seq_length
    metrics = {"base": score_pairs(model, tokenizer, pairs, limit, batch_size)}
    if adapter is not None:
        if model_cfg.adapter:
            model = attach_adapter(model, model_cfg.adapter)
            metrics["starting adapter"] = score_pairs(model, tokenizer, pairs, limit, batch_size)
            model.load_adapter(str(adapter), adapter_name="trained")
            model.set_adapter("trained")
        else:
            model = attach_adapter(model, adapter)
        metrics["fine-tuned"] = score_pairs(model, tokenizer, pairs, limit, batch_size)
    info = dict(model=model_cfg.name_or_path, adapter=str(adapter) if adapter else None, eval_examples=len(pairs),
                metric="preference accuracy: share of pairs with log p(chosen) > log p(rejected), answers' summed "
                       "token log-probabilities; reward_margin: mean of their difference (nats)")
    result = EvalResult(metrics=metrics, info=info, output_dir=Path(output_dir))
    save_eval_json(result)
    return result


def evaluate_run(model_cfg, adapter: Path | None, data_cfg, output_dir: Path, *, use_eval_split: bool,
                 batch_size: int, num_generate: int, settings):
    """`phitune eval` on a DPO / ORPO run: preference accuracy and margins (nothing is generated, so `num_generate`
    and the sampling `settings` do not apply)."""
    return run_preference_evaluation(model_cfg, adapter, data_cfg, output_dir, use_eval_split=use_eval_split,
                                     batch_size=batch_size)


def inspect_data(cfg: RunConfig, output: Path | None, example_index: int = 0):
    """`phitune data` on prompt / chosen / rejected pairs: the DataReport of phitune.data.preference."""
    from phitune.data.preference import inspect_preference_data

    return inspect_preference_data(cfg, output, example_index=example_index)
