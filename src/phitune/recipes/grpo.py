"""The GRPO recipe: `method: grpo`, reinforcement learning with verifiable rewards through TRL's GRPOTrainer.

The run goes through the lifecycle every method shares (phitune.run): the same output
directory, complete-marked checkpoints, SIGTERM / NaN / resume guarantees, PEFT adapter and phitune_config.yaml.
What differs:

- data: prompts (phitune.data.prompts), each a conversation ending with a user turn, with the row's other columns
  (e.g. `answer`) passed to every reward. A prompt's budget is data.max_seq_length minus max_completion_length;
- rewards: the `rewards:` section (phitune.after.rewards): built-in `answer`, `format`, `json`, `length` and a user's own
  functions, weighted (GRPOConfig.reward_weights); TRL logs each one's mean as `rewards/NAME/mean`;
- generation: transformers' generate, sampled with training_config's temperature / top_p / top_k, stopped at eos or
  Phi-3's end-of-turn `<|end|>`; vLLM instead on CUDA when it is installed (speed.vllm: auto; use_vllm wins);
- the starting point: a fresh LoRA adapter (peft_config) or the adapter of an earlier run (model.adapter, usually
  SFT), trained further. beta defaults to 0 in TRL: no reference model;
- evaluation: before and after training, greedy completions of the held-out prompts, scored with every reward:
  mean per reward, the weighted total, and the pass rate (share of prompts whose completion earns the full `answer`
  reward), in metrics.json; completions.jsonl holds the first few completions before and after.

With one pass per generation batch (num_iterations 1) the policy ratio is 1, so the logged loss is about 0 while its
gradient is not: the rewards, not the loss, show learning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from phitune.config.methods import training_config_class
from phitune.config.schema import RunConfig
from phitune.errors import PhituneError, first_line
from phitune.run.lifecycle import load_policy, trainer_settings
from phitune.run.plan import RunPlan

log = logging.getLogger("phitune")

COMPLETIONS_JSONL = "completions.jsonl"  # a few held-out completions before and after, for a person to read
SHOWN_COMPLETIONS = 8
DEFAULT_COMPLETION_LENGTH = 256  # tokens; TRL's default (512) is long for a CPU and for most verifiable answers


def load_data(cfg: RunConfig, tokenizer, plan: RunPlan):
    """(PromptData, rewards, counts): the train and eval prompts within the prompt budget, and the run's rewards
    (custom functions imported now, so a missing one fails before any weight loads)."""
    from phitune.after.rewards import build_rewards, try_rewards

    rewards = build_rewards(cfg.rewards or [])
    data, counts = prompt_splits(cfg, tokenizer)
    try_rewards(rewards, data.train[0])
    return data, rewards, counts


def build_config(cfg: RunConfig, data, plan: RunPlan):
    """GRPOConfig: training_config over phitune's defaults (as for SFT), the rewards' weights, and activation
    checkpointing from the speed switches rather than TRL's default."""
    settings = trainer_settings(cfg, has_eval=False)  # phitune scores the held-out prompts itself, greedily
    checkpointing = {k: v for k, v in plan.speed.sft_kwargs().items() if k.startswith("activation_checkpointing")}
    settings.update(checkpointing, remove_unused_columns=False, reward_weights=[r.weight for r in data[1]])
    settings.setdefault("max_completion_length", DEFAULT_COMPLETION_LENGTH)
    if "use_vllm" not in cfg.training_config and use_vllm(cfg.speed.vllm):
        settings.update(use_vllm=True, vllm_mode=settings.get("vllm_mode", "colocate"))
    if "include_num_input_tokens_seen" not in cfg.training_config:
        settings["include_num_input_tokens_seen"] = "no"  # GRPO's batches are generated: no input_ids to count
    try:
        return training_config_class("grpo")(**settings)
    except (TypeError, ValueError) as exc:
        raise PhituneError(f"training_config: {first_line(exc)}") from None


def use_vllm(switch: str) -> bool:
    """speed.vllm: "true", or "auto" on a CUDA machine where vllm imports (untested by phitune: docs/grpo.md)."""
    import importlib.util

    import torch

    if switch == "auto":
        on = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None
        if on:
            log.info("speed.vllm auto: CUDA and vllm found, GRPO generates with vLLM (colocate)")
        return on
    return switch == "true"


def load_model(cfg: RunConfig, plan: RunPlan):
    """(model, LoraConfig or None): see phitune.run.lifecycle.load_policy."""
    return load_policy(cfg, plan)


def make_trainer(cfg: RunConfig, model, tokenizer, data, peft_config, args):
    """TRL's GRPOTrainer with phitune's guards, the rewards, and generation stopped at eos or `<|end|>`."""
    import datasets

    from phitune.after.generate import stop_token_ids
    from phitune.data import rows_dataset

    datasets.disable_progress_bars()
    # GRPOTrainer stops a completion at the model's generation_config eos ids plus the tokenizer's eos: add <|end|>.
    stops = model.generation_config.eos_token_id
    stops = [stops] if isinstance(stops, int) else list(stops or [])
    model.generation_config.eos_token_id = list(dict.fromkeys(stops + stop_token_ids(tokenizer)))
    return grpo_trainer_class()(
        model=model,
        reward_funcs=[reward.func for reward in data[1]],
        args=args,
        train_dataset=rows_dataset(data[0].train),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def grpo_trainer_class():
    from trl import GRPOTrainer

    from phitune.run.guard import GuardedTraining, NonFiniteLoss

    class PhituneGRPOTrainer(GuardedTraining, GRPOTrainer):
        """GRPOTrainer with phitune's NaN guard and complete-marked checkpoints. Weights gone non-finite show first
        in sampling (torch.multinomial refuses NaN probabilities), before any loss: that stops the run as a NaN loss
        does, keeping the last good checkpoint."""

        def _generate(self, prompts: list):
            try:
                return super()._generate(prompts)
            except RuntimeError as exc:
                if "probability tensor contains" not in str(exc):
                    raise
                raise NonFiniteLoss(f"the loss became NaN or infinite at step {self.state.global_step + 1}: "
                                    "sampling met non-finite next-token probabilities") from None

    return PhituneGRPOTrainer


def evaluate_before(cfg: RunConfig, trainer, tokenizer, data, checkpoint: Path | None) -> dict:
    """Greedy completions of the held-out prompts by the starting point, scored (see score_prompts). A resumed run's
    checkpoint weights load inside train(), so this is the run's start in both cases."""
    return score_prompts(cfg, trainer.model, tokenizer, data) if data[0].eval else {}


def evaluate_after(cfg: RunConfig, trainer, tokenizer, data, before: dict) -> dict:
    """The held-out scores before and after; completions.jsonl with the first few completions of each."""
    if not data[0].eval:
        return {}
    before, after = dict(before), score_prompts(cfg, trainer.model, tokenizer, data)
    texts_before, texts_after = before.pop("completions"), after.pop("completions")
    if trainer.is_world_process_zero():
        write_completions(Path(trainer.args.output_dir), data[0].eval, texts_before, texts_after)
    return {f"{k}_before": v for k, v in before.items()} | {f"{k}_after": v for k, v in after.items()}


def score_prompts(cfg: RunConfig, model, tokenizer, data) -> dict:
    """The rewards' means, weighted total and pass rate of greedy completions of the eval prompts, plus
    `completions` (the texts) for completions.jsonl."""
    from phitune.after.rewards import score_completions

    length = cfg.training_config.get("max_completion_length", DEFAULT_COMPLETION_LENGTH)
    metrics, texts = score_completions(model, tokenizer, data[0].eval, data[1], max_new_tokens=length)
    return metrics | {"completions": texts}


def write_completions(output_dir: Path, rows, before: list[str], after: list[str]) -> None:
    """completions.jsonl: the first SHOWN_COMPLETIONS held-out prompts with their columns, greedy completion before
    and after training."""
    output_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": row.prompt, **row.columns, "before": b, "after": a}, ensure_ascii=False)
             for row, b, a in list(zip(rows, before, after))[:SHOWN_COMPLETIONS]]
    (output_dir / COMPLETIONS_JSONL).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def data_metrics(cfg: RunConfig, data) -> dict:
    """The method, and counts for metrics.json: format, prompts, skipped rows."""
    return dict(method=cfg.method, **data[2])


def tidy_output(output_dir: Path) -> None:
    """Nothing to tidy: GRPO (beta 0 or a fresh adapter) keeps no reference copy in the output directory."""


def prompt_budget(cfg: RunConfig) -> int:
    """Tokens a prompt may take: data.max_seq_length minus the completion's max_completion_length."""
    return cfg.data.max_seq_length - cfg.training_config.get("max_completion_length", DEFAULT_COMPLETION_LENGTH)


def prompt_splits(cfg: RunConfig, tokenizer):
    """Train and eval prompts, those over the prompt budget handled per data.on_bad_row; counts for metrics.json."""
    from phitune.data.mixture import log_mixture
    from phitune.data.prompts import check_prompt_lengths, load_prompt_data

    budget = prompt_budget(cfg)
    if budget < 1:
        raise PhituneError(f"data.max_seq_length {cfg.data.max_seq_length} leaves no room for a prompt beside "
                           f"max_completion_length {cfg.data.max_seq_length - budget}; raise data.max_seq_length")
    data = load_prompt_data(cfg.data)
    log_mixture(log, data.shares)
    skipped = list(data.skipped)
    for name in ("train", "eval"):
        kept, dropped = check_prompt_lengths(getattr(data, name), tokenizer, budget, cfg.data.on_bad_row, name)
        setattr(data, name, kept)
        skipped += dropped
    if skipped:
        log.warning("skipped %d bad rows; first: %s", len(skipped), "; ".join(skipped[:3]))
    counts = dict(data_format=data.format, train_examples=len(data.train), eval_examples=len(data.eval),
                  skipped_rows=len(skipped))
    return data, counts


def evaluate_run(model_cfg, adapter: Path | None, data_cfg, output_dir: Path, *, use_eval_split: bool,
                 batch_size: int, num_generate: int, settings):
    """`phitune eval` on a GRPO run: the rewards and pass rate of greedy completions of the held-out prompts (or of
    --data), for the base, the starting adapter (model.adapter, when the run had one) and the trained adapter.
    `settings.max_new_tokens` caps the completions. Writes eval.json."""
    from dataclasses import replace

    from phitune.after.evaluate import EvalResult, save_eval_json
    from phitune.after.generate import attach_adapter, load_for_inference
    from phitune.after.rewards import build_rewards, score_completions
    from phitune.config.schema import load_run_config

    run = load_run_config(adapter) if adapter is not None else None
    rewards = build_rewards(run.rewards if run is not None and run.rewards else [{"name": "answer"}])
    rows = eval_prompts(data_cfg, use_eval_split, num_generate)
    model, tokenizer = load_for_inference(replace(model_cfg, adapter=None))

    def score(current):
        return score_completions(current, tokenizer, rows, rewards, settings.max_new_tokens, batch_size)[0]

    metrics = {"base": score(model)}
    if adapter is not None:
        if model_cfg.adapter:
            model = attach_adapter(model, model_cfg.adapter)
            metrics["starting adapter"] = score(model)
            model.load_adapter(str(adapter), adapter_name="trained")
            model.set_adapter("trained")
        else:
            model = attach_adapter(model, adapter)
        metrics["fine-tuned"] = score(model)
    info = dict(model=model_cfg.name_or_path, adapter=str(adapter) if adapter else None, eval_examples=len(rows),
                unit="held-out prompts (greedy)",
                metric="mean reward per function of greedy completions (reward: weighted total); pass_rate: share "
                       "of prompts whose completion earns the full answer reward")
    result = EvalResult(metrics=metrics, info=info, output_dir=Path(output_dir))
    save_eval_json(result)
    return result


def eval_prompts(data_cfg, use_eval_split: bool, limit: int | None):
    """The run's held-out prompts, or (--data FILE) every prompt of the file; the first `limit` of them."""
    from phitune.data.prompts import load_prompt_data

    if use_eval_split:
        rows = load_prompt_data(data_cfg).eval
    else:
        rows = load_prompt_data(data_cfg.whole_file_as_eval()).train  # --data FILE: the whole file is the eval set
    if not rows:
        raise PhituneError("the run has no held-out prompts (data.eval_split is 0 and no data.eval); pass --data FILE")
    return rows[:limit] if limit else rows


def inspect_data(cfg: RunConfig, output: Path | None, example_index: int = 0):
    """`phitune data` on prompts: the PromptDataReport of phitune.data.prompts, with the prompt budget and the
    columns the `answer` rewards compare with."""
    from phitune.data.prompts import inspect_prompt_data

    needed = tuple(dict.fromkeys(entry.get("column", "answer") for entry in cfg.rewards or []
                                 if entry.get("name") == "answer"))
    return inspect_prompt_data(cfg, output, example_index=example_index, budget=prompt_budget(cfg),
                               needed_columns=needed)
