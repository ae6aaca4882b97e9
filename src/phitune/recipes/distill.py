"""The distillation recipe: `method: distill`, a student (the run's model, with a LoRA adapter) learns a frozen
teacher's next-token distributions on SFT's chat rows, through TRL's GKDTrainer (trl.experimental.gkd).

On every trained token t (the assistant tokens SFT's labels keep), with p_T and p_S the teacher's and the student's
next-token distributions over the shared vocabulary, the loss is GKD's generalized Jensen-Shannon divergence

    beta 0 (phitune's default):  KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v))
    beta 1:                      KL(p_S || p_T)
    0 < beta < 1:                beta KL(p_T || m) + (1 - beta) KL(p_S || m),   m = beta p_T + (1 - beta) p_S

averaged over the trained tokens. The teacher runs once per batch, under no_grad, on the same input ids.

Off-policy only (GKD's lmbda 0): the tokens are the data's own completions, as in SFT, so a run costs one teacher and
one student forward per batch; on-policy GKD (lmbda > 0) would generate the student's own completions at every step,
which on a CPU, or with a 4-bit teacher, costs far more than the step itself (docs/distill.md). The run goes through
the lifecycle every method shares (phitune.run): output directory, checkpoints, SIGTERM / NaN / resume guarantees, a
PEFT adapter on the student. Evaluation, before and after, on the held-out conversations: the student's mean KL to
the teacher per trained token (`kl_to_teacher`) and its loss on the data's tokens (`eval_loss`), with the teacher's
own loss beside them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from phitune.config.schema import RunConfig
from phitune.errors import PhituneError, first_line
from phitune.run.chat_data import dataset_metrics, tokenize_splits
from phitune.run.lifecycle import load_model_for_training, padded_trainer_settings, warn_if_fsdp_fell_back
from phitune.run.plan import RunPlan

log = logging.getLogger("phitune")

DEFAULT_BETA = 0.0  # forward KL(teacher || student): the quantity the evaluation reports (GKD's own default is 0.5)


@dataclass
class StudentAndTeacher:
    """What load_model hands make_trainer: the student to train and the frozen teacher, both loaded before an old
    run is cleared (a teacher that fails to load must not cost it)."""

    student: object
    teacher: object


def load_data(cfg: RunConfig, tokenizer, plan: RunPlan):
    """(train set, eval set or None): SFT's tokenized, masked splits (phitune.run.chat_data), once the teacher's
    tokenizer is known to be the student's."""
    from phitune.models.teacher import check_shared_vocabulary

    check_shared_vocabulary(cfg.model, tokenizer, cfg.teacher)
    return tokenize_splits(cfg, None, tokenizer, plan)


def build_config(cfg: RunConfig, data, plan: RunPlan):
    """GKDConfig: training_config over phitune's defaults, off-policy (lmbda 0), beta 0 unless training_config says
    otherwise; phitune has tokenized and truncated the rows, so TRL prepares nothing."""
    from phitune.config.methods import gkd_classes

    settings = padded_trainer_settings(cfg, has_eval=data[1] is not None, plan=plan)
    settings.setdefault("beta", DEFAULT_BETA)
    settings.update(lmbda=0.0, max_length=None, dataset_kwargs={"skip_prepare_dataset": True})
    try:
        return gkd_classes()[0](**settings)
    except (TypeError, ValueError) as exc:
        raise PhituneError(f"training_config: {first_line(exc)}") from None


def load_model(cfg: RunConfig, plan: RunPlan):
    """(StudentAndTeacher, LoraConfig): the student as every method loads it (phitune.run.lifecycle), the teacher
    frozen (phitune.models.teacher), in 4 bits if teacher.quantization says so."""
    from phitune.models.teacher import load_teacher

    student, peft_config = load_model_for_training(cfg, plan)
    return StudentAndTeacher(student, load_teacher(cfg.teacher, plan.attn_implementation)), peft_config


def make_trainer(cfg: RunConfig, model: StudentAndTeacher, tokenizer, data, peft_config, args):
    """TRL's GKDTrainer with phitune's guards (NaN, complete checkpoints), over SFT's padded batches."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from phitune.config.methods import gkd_classes
    from phitune.run.guard import GuardedTraining
    from phitune.speed import apply_activation_strategy

    class PhituneGKDTrainer(GuardedTraining, gkd_classes()[1]):
        """GKDTrainer with phitune's NaN guard and complete-marked checkpoints, and its loss on N processes made the
        one process's (see compute_loss)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """TRL 1.16's GKD loss divides each process's KL sum by the tokens of all processes (num_items_in_batch,
            summed across them), then DDP averages the gradients over the N processes: 1/N of the one-process
            gradient and logged loss (measured: train_loss 0.0114 on 2 workers against 0.0228 on one; Adam hid most
            of it, the adapters 1.7e-3 apart). transformers' own compute_loss multiplies by N for this; GKD's
            override does not, so it is done here."""
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
            if num_items_in_batch is None or not self.args.average_tokens_across_devices:
                return result
            scale = self.accelerator.num_processes
            return (result[0] * scale, result[1]) if return_outputs else result * scale

    apply_activation_strategy(model.student, args)
    train_set, eval_set = data
    trainer = PhituneGKDTrainer(
        model=model.student,
        teacher_model=model.teacher,
        args=args,
        data_collator=DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id),
        train_dataset=train_set.to_dataset(),
        eval_dataset=eval_set.to_dataset() if eval_set is not None else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    warn_if_fsdp_fell_back(trainer)
    return trainer


def evaluate_before(cfg: RunConfig, trainer, tokenizer, data, checkpoint: Path | None) -> dict:
    """The starting point's held-out KL to the teacher and loss, and the teacher's own loss. A fresh adapter starts
    with lora_B = 0, so the student with its adapter disabled is the start exactly, also for a resumed run."""
    trainer.args.eval_on_start = False
    if data[1] is None:
        return {}
    from phitune.after.evaluate import teacher_forced_metrics

    held_out = eval_tokens(data[1])
    with trainer.model.disable_adapter():
        before = distill_scores(trainer.model, trainer.teacher_model, tokenizer, held_out)
    teacher = teacher_forced_metrics(trainer.teacher_model, tokenizer, held_out)
    return {**before, "teacher_eval_loss": teacher["loss"], "teacher_perplexity": teacher["perplexity"]}


def evaluate_after(cfg: RunConfig, trainer, tokenizer, data, before: dict) -> dict:
    """kl_to_teacher, eval_loss and perplexity before and after, and the teacher's eval loss."""
    if data[1] is None:
        return {}
    after = distill_scores(trainer.model, trainer.teacher_model, tokenizer, eval_tokens(data[1]))
    teacher = {key: before.pop(key) for key in ("teacher_eval_loss", "teacher_perplexity")}
    return {f"{k}_before": v for k, v in before.items()} | {f"{k}_after": v for k, v in after.items()} | teacher


def eval_tokens(eval_set) -> tuple[list, list]:
    """(input_ids, labels) of a tokenized eval set, in memory or in the Arrow cache."""
    rows = eval_set.to_dataset()
    return rows["input_ids"], rows["labels"]


def distill_scores(student, teacher, tokenizer, held_out: tuple[list, list], batch_size: int = 8) -> dict:
    """kl_to_teacher, eval_loss and perplexity of the student (phitune.after.evaluate.distillation_metrics)."""
    from phitune.after.evaluate import distillation_metrics

    scores = distillation_metrics(student, teacher, held_out, tokenizer.pad_token_id, batch_size)
    return {"kl_to_teacher": scores["kl_to_teacher"], "eval_loss": scores["loss"], "perplexity": scores["perplexity"]}


def data_metrics(cfg: RunConfig, data) -> dict:
    """The method, the teacher, and SFT's counts for metrics.json: format, examples, truncated and skipped rows."""
    return dict(method=cfg.method, teacher=cfg.teacher.name_or_path, **dataset_metrics(*data))


def tidy_output(output_dir: Path) -> None:
    """Nothing to tidy: the teacher is never saved with the student's adapter."""


def evaluate_run(model_cfg, adapter: Path | None, data_cfg, output_dir: Path, *, use_eval_split: bool,
                 batch_size: int, num_generate: int, settings):
    """`phitune eval` on a distill run: the base student and the distilled one (and the teacher itself), each by its
    KL to the run's teacher and its loss on the run's held-out conversations, or on every row of --data; writes
    eval.json. Nothing is generated, so `num_generate` and the sampling `settings` do not apply."""
    from phitune.after.evaluate import EvalResult, eval_conversations, save_eval_json, tokenize_eval_set
    from phitune.after.generate import attach_adapter, load_for_inference
    from phitune.config.schema import load_run_config
    from phitune.models.teacher import load_teacher

    if adapter is None or not (Path(adapter) / "phitune_config.yaml").is_file():
        raise PhituneError("phitune eval on a distill run needs its run directory (its phitune_config.yaml names the "
                           "teacher)")
    teacher_cfg = load_run_config(adapter).teacher
    model, tokenizer = load_for_inference(model_cfg)
    held_out = tokenize_eval_set(eval_conversations(data_cfg, use_eval_split), tokenizer, data_cfg)
    teacher = load_teacher(teacher_cfg)
    if model.device.type == "cuda" and not teacher_cfg.quantization:
        teacher = teacher.to("cuda")
    metrics = {"base": distill_scores(model, teacher, tokenizer, held_out, batch_size)}
    tuned = attach_adapter(model, adapter).eval()
    metrics["fine-tuned"] = distill_scores(tuned, teacher, tokenizer, held_out, batch_size)
    metrics["teacher"] = distill_scores(teacher, teacher, tokenizer, held_out, batch_size)
    info = dict(model=model_cfg.name_or_path, adapter=str(adapter), teacher=teacher_cfg.name_or_path,
                eval_examples=len(held_out[0]), unit="held-out conversations",
                metric="kl_to_teacher: mean KL(teacher || model) per trained token (nats); eval_loss: mean "
                       "cross-entropy of the data's trained tokens")
    result = EvalResult(metrics=metrics, info=info, output_dir=Path(output_dir))
    save_eval_json(result)
    return result


def inspect_data(cfg: RunConfig, output: Path | None, example_index: int = 0):
    """`phitune data` on a distill run's rows: SFT's conversations and masks (phitune.data.inspect), the tokens whose
    teacher distributions the student learns; first, as training does, the teacher's tokenizer is checked to be the
    student's (tokenizers only, no weights)."""
    from phitune.data.inspect import inspect_data as inspect_conversations
    from phitune.models.loading import load_tokenizer
    from phitune.models.teacher import check_shared_vocabulary

    check_shared_vocabulary(cfg.model, load_tokenizer(cfg.model), cfg.teacher)
    return inspect_conversations(cfg, output, example_index=example_index)
