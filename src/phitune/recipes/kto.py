"""The KTO recipe: `method: kto`, preference tuning from single completions judged desirable or not, through TRL's
KTOTrainer.

KTO (Ethayarajh et al. 2024) needs no pairs: each row is a prompt, one completion and a label. With r = log p(y | x)
- log p_ref(y | x), the policy's log-ratio to the reference, and z a batch estimate of KL(policy || reference) (each
completion scored under its batch neighbour's prompt, detached, clamped at 0), the loss per row is

    desirable:    1 - sigmoid(beta * (r - z))        undesirable:    1 - sigmoid(beta * (z - r))

weighted by desirable_weight / undesirable_weight. The run goes through the lifecycle every method shares
(phitune.run): output directory, checkpoints, SIGTERM / NaN / resume guarantees, PEFT adapter. What differs:

- data: prompt / completion / label rows (phitune.data.unpaired), shuffled once with data.seed (TRL reads KTO rows in
  order, since its KL pairs are fixed batch neighbours; a file sorted by label would give one-label batches);
- the starting point and reference, as for DPO: a fresh adapter (reference = adapter disabled), or model.adapter,
  usually an SFT run, which TRL copies into a frozen "ref" adapter (dropped from the finished run);
- evaluation: on the held-out completions, before and after training, the mean summed log-probability of the
  desirable and of the undesirable completions, and their difference, `logp_margin`, in nats (`score_completions`).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from phitune.config.schema import RunConfig
from phitune.errors import PhituneError, first_line
from phitune.run.lifecycle import drop_reference_adapter, load_policy, padded_trainer_settings
from phitune.run.plan import RunPlan

log = logging.getLogger("phitune")


def load_data(cfg: RunConfig, tokenizer, plan: RunPlan):
    """(UnpairedData, counts): train and eval completions checked against data.max_seq_length, train shuffled."""
    from phitune.data.mixture import log_mixture
    from phitune.data.unpaired import check_lengths, label_counts, load_unpaired_data

    data = load_unpaired_data(cfg.data)
    log_mixture(log, data.shares)
    limit, skipped, truncated = cfg.data.max_seq_length, list(data.skipped), 0
    for name in ("train", "eval"):
        examples = getattr(data, name)
        if examples:
            kept, cut, dropped = check_lengths(examples, tokenizer, limit, cfg.data.on_bad_row, name)
            setattr(data, name, kept)
            truncated, skipped = truncated + cut, skipped + dropped
    random.Random(cfg.data.seed).shuffle(data.train)
    if truncated:
        log.warning("%d completions are cut by data.max_seq_length %d", truncated, limit)
    if skipped:
        log.warning("skipped %d bad rows; first: %s", len(skipped), "; ".join(skipped[:3]))
    desirable, undesirable = label_counts(data.train)
    counts = dict(data_format=data.format, train_examples=len(data.train), eval_examples=len(data.eval),
                  train_desirable=desirable, train_undesirable=undesirable, truncated_examples=truncated,
                  skipped_rows=len(skipped))
    return data, counts


def build_config(cfg: RunConfig, data, plan: RunPlan):
    """KTOConfig: training_config over phitune's defaults (phitune.run.lifecycle.padded_trainer_settings)."""
    from trl import KTOConfig

    try:
        return KTOConfig(**padded_trainer_settings(cfg, has_eval=bool(data[0].eval), plan=plan))
    except (TypeError, ValueError) as exc:
        raise PhituneError(f"training_config: {first_line(exc)}") from None


def load_model(cfg: RunConfig, plan: RunPlan):
    """(model, LoraConfig or None): see phitune.run.lifecycle.load_policy."""
    return load_policy(cfg, plan)


def make_trainer(cfg: RunConfig, model, tokenizer, data, peft_config, args):
    """TRL's KTOTrainer with phitune's guards (NaN, complete checkpoints), over the completions as conversations."""
    import datasets
    from trl import KTOTrainer

    from phitune.data import rows_dataset
    from phitune.run.guard import GuardedTraining

    class PhituneKTOTrainer(GuardedTraining, KTOTrainer):
        """KTOTrainer with phitune's NaN guard and complete-marked checkpoints."""

    datasets.disable_progress_bars()  # TRL maps the rows with one bar per step; phitune logs the counts instead
    examples = data[0]
    return PhituneKTOTrainer(
        model=model,
        args=args,
        train_dataset=rows_dataset(examples.train),
        eval_dataset=rows_dataset(examples.eval) if examples.eval else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def evaluate_before(cfg: RunConfig, trainer, tokenizer, data, checkpoint: Path | None) -> dict:
    """Held-out log-probabilities of the starting point (TRL's own held-out metrics come at the end)."""
    trainer.args.eval_on_start = False
    examples = data[0].eval
    return score_completions(trainer.model, tokenizer, examples, cfg.data.max_seq_length) if examples else {}


def evaluate_after(cfg: RunConfig, trainer, tokenizer, data, before: dict) -> dict:
    """The held-out scores before and after, and TRL's own held-out KTO metrics at the last step."""
    examples = data[0].eval
    if not examples:
        return {}
    after = score_completions(trainer.model, tokenizer, examples, cfg.data.max_seq_length)
    metrics = {f"{k}_before": v for k, v in before.items()} | {f"{k}_after": v for k, v in after.items()}
    evals = [e for e in trainer.state.log_history if "eval_loss" in e and e["step"] == trainer.state.global_step]
    last = evals[-1] if evals else trainer.evaluate()
    keep = ("eval_loss", "eval_kl", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins")
    return metrics | {key.replace("/", "_"): last[key] for key in keep if key in last}


def data_metrics(cfg: RunConfig, data) -> dict:
    """The method, and counts for metrics.json: format, examples per label, truncated and skipped rows."""
    return dict(method=cfg.method, **data[1])


def tidy_output(output_dir: Path) -> None:
    """Drop KTO's frozen reference copy of a starting adapter (phitune.run.lifecycle.drop_reference_adapter)."""
    drop_reference_adapter(output_dir)


def score_completions(model, tokenizer, examples, max_seq_length: int, batch_size: int = 8) -> dict:
    """Mean summed log-probability of the desirable and of the undesirable completions (log p(y | x), the sequences
    cut to max_seq_length as in training), and `logp_margin`, desirable minus undesirable, in nats. KTO raises the
    first and lowers the second relative to the reference, so the margin grows; a set with one label has no margin."""
    from phitune.after.metrics import answer_logps
    from phitune.data.preference import tokenize_answer

    scores: dict[bool, list[float]] = {True: [], False: []}
    was_training = model.training
    model.eval()
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        sequences = [tokenize_answer(tokenizer, e.prompt, e.completion) for e in batch]
        for example, logp in zip(batch, answer_logps(model, sequences, tokenizer.pad_token_id, max_seq_length)):
            scores[example.desirable].append(logp.item())
    model.train(was_training)
    means = {label: sum(values) / len(values) for label, values in scores.items() if values}
    metrics = {}
    if True in means:
        metrics["desirable_logp"] = means[True]
    if False in means:
        metrics["undesirable_logp"] = means[False]
    if len(means) == 2:
        metrics["logp_margin"] = means[True] - means[False]
    return metrics


def evaluate_run(model_cfg, adapter: Path | None, data_cfg, output_dir: Path, *, use_eval_split: bool,
                 batch_size: int, num_generate: int, settings):
    """`phitune eval` on a KTO run: the held-out log-probabilities and margin of the base, of the starting adapter
    (model.adapter, when the run had one) and of the trained adapter, on the run's held-out completions or on every
    row of --data; writes eval.json. Nothing is generated, so `num_generate` and the sampling `settings` do not
    apply."""
    from dataclasses import replace

    from phitune.after.evaluate import EvalResult, save_eval_json
    from phitune.after.generate import attach_adapter, load_for_inference
    from phitune.data.unpaired import load_unpaired_data

    if use_eval_split:
        examples = load_unpaired_data(data_cfg).eval
    else:
        examples = load_unpaired_data(data_cfg.whole_file_as_eval()).train  # --data FILE: all of it is the eval set
    if not examples:
        raise PhituneError("the run has no held-out completions (data.eval_split is 0 and no data.eval); pass "
                           "--data FILE")
    model, tokenizer = load_for_inference(replace(model_cfg, adapter=None))
    limit = data_cfg.max_seq_length
    metrics = {"base": score_completions(model, tokenizer, examples, limit, batch_size)}
    if adapter is not None:
        if model_cfg.adapter:
            model = attach_adapter(model, model_cfg.adapter)
            metrics["starting adapter"] = score_completions(model, tokenizer, examples, limit, batch_size)
            model.load_adapter(str(adapter), adapter_name="trained")
            model.set_adapter("trained")
        else:
            model = attach_adapter(model, adapter)
        metrics["fine-tuned"] = score_completions(model, tokenizer, examples, limit, batch_size)
    info = dict(model=model_cfg.name_or_path, adapter=str(adapter) if adapter else None, eval_examples=len(examples),
                unit="held-out labelled completions",
                metric="desirable_logp / undesirable_logp: mean summed token log-probability of the desirable / "
                       "undesirable completions; logp_margin: their difference (nats)")
    result = EvalResult(metrics=metrics, info=info, output_dir=Path(output_dir))
    save_eval_json(result)
    return result


def inspect_data(cfg: RunConfig, output: Path | None, example_index: int = 0):
    """`phitune data` on prompt / completion / label rows: the report of phitune.data.unpaired."""
    from phitune.data.unpaired import inspect_unpaired_data

    return inspect_unpaired_data(cfg, output, example_index=example_index)
