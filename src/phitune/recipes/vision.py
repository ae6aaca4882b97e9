"""The vision recipe (`method: vision`): LoRA fine-tuning of Phi-4-multimodal on chat rows with images (and audio).

Data: phitune.data.multimodal reads the rows (every picture checked, file:line errors), phitune.data.multimodal_batch
expands each picture's placeholder to its tokens, masks every label but the assistant's text, and batches the
pictures through the model's own image processor. Model: the native `Phi4MultimodalForCausalLM`; the LoRA goes on
the language model's layers (`all-linear` means those, never the vision tower or the audio encoder, whose layer
names repeat the language model's), and on a vision or audio part only when named by its path (see
`language_model_targets`). A converted checkpoint's built-in adapters are applied row by row as the original model
applies them (phitune.models.built_in_lora): `vision-lora` for rows with pictures, `speech-lora` for rows with audio
only, neither for text; they stay active under the user's LoRA, in training and at inference alike, and a merged
model keeps them in their folders. Training, checkpoints, resume, the NaN guard and evaluation at step 0
and at the end are the SFT trainer's (phitune.run.trainer). docs/multimodal.md says what was run and what was not.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

from phitune.config.schema import RunConfig
from phitune.errors import PhituneError, first_line
from phitune.run.lifecycle import eval_loss_before_after, load_model_for_training, trainer_settings
from phitune.run.plan import RunPlan
from phitune.run.trainer import PhituneTrainer

log = logging.getLogger("phitune")

LANGUAGE_LAYERS = r"model\.layers\.\d+\.(?:self_attn|mlp)\."  # the language model's decoder layers, by full name
LANGUAGE_LINEAR = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # Phi-4-multimodal's fused projections


@dataclass
class VisionData:
    """The encoded train and eval sets and the processor their batches go through."""

    train: object
    eval: object
    processor: object


def load_data(cfg: RunConfig, tokenizer, plan: RunPlan) -> VisionData:
    """Read, check and encode the train and eval rows; log truncated and skipped rows."""
    from phitune.data import load_splits_and_shares, training_chat_template
    from phitune.data.mixture import log_mixture, source_label
    from phitune.data.multimodal import read_media_rows
    from phitune.data.multimodal_batch import (MediaProcessor, check_multimodal_model, encode_media_rows,
                                               require_torchvision)

    check_multimodal_model(plan.model_config, cfg.model.trust_remote_code)
    if plan.context and cfg.data.max_seq_length > plan.context:
        raise PhituneError(f"data.max_seq_length {cfg.data.max_seq_length} exceeds the model's context of "
                           f"{plan.context}")
    # a bad picture fails before torchvision is used; a mixture logs what each source gave
    train, evals, _, skipped, shares = load_splits_and_shares(cfg.data, read_media_rows)
    log_mixture(log, shares)
    if any(media.kind == "image" for row in [*train, *evals] for media in row.media):
        require_torchvision()  # now, before any weight loads: the one pip line that fits this torch
    warn_mixed_batches(train, cfg)
    processor = MediaProcessor(cfg.model.name_or_path, plan.model_config, tokenizer, cfg.model.trust_remote_code)
    template = training_chat_template(tokenizer, cfg.data.train_on)
    kwargs = dict(train_on=cfg.data.train_on, max_seq_length=cfg.data.max_seq_length, on_bad_row=cfg.data.on_bad_row)
    train_set = encode_media_rows(train, tokenizer, processor, template, **kwargs)
    eval_set = encode_media_rows(evals, tokenizer, processor, template, **kwargs) if evals else None
    for name, dataset in (("train", train_set), ("eval", eval_set)):
        if dataset is not None and dataset.truncated:
            log.warning("%s: %d examples truncated to %d tokens", name, dataset.truncated, cfg.data.max_seq_length)
        skipped += dataset.skipped if dataset is not None else []
    if skipped:
        log.warning("skipped %d bad rows; first: %s", len(skipped), "; ".join(skipped[:3]))
    if not len(train_set):
        raise PhituneError(f"{source_label(cfg.data)}: no usable rows")
    train_set.skipped_rows = len(skipped)
    return VisionData(train_set, eval_set, processor)


def warn_mixed_batches(rows: list, cfg: RunConfig) -> None:
    """Say when pictures and audio-only rows may share a batch: transformers' Phi-4-multimodal picks the audio
    projector per batch (the vision-speech one whenever the batch has a picture), so such a row's sound is projected
    as if a picture came with it. The built-in adapters are chosen per row and are not affected."""
    kinds = [{m.kind for m in row.media} for row in rows]
    batch = cfg.training_config.get("per_device_train_batch_size", 8)
    if batch > 1 and any("image" in k for k in kinds) and any(k == {"audio"} for k in kinds):
        log.warning("the data mixes rows with pictures and rows with audio only: in a batch with a picture, "
                    "transformers projects every row's audio with the vision-speech projector; "
                    "per_device_train_batch_size: 1 keeps each row as the model serves it")


def build_config(cfg: RunConfig, data: VisionData, plan: RunPlan):
    """SFTConfig: phitune's defaults and the user's training_config; phitune builds the batches (MediaCollator),
    so TRL neither prepares the rows nor drops their media column; rows are never concatenated (padding-free)."""
    from trl import SFTConfig

    settings = trainer_settings(cfg, data.eval is not None)
    speed = plan.speed.sft_kwargs()
    if not (speed.get("activation_checkpointing_kwargs") or {}).get("fused_lora"):  # a Phi-3 decoder rewrite
        settings.update({k: v for k, v in speed.items() if k.startswith("activation_checkpointing")})
    settings.update(max_length=None, dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
                    padding_free=False)
    try:
        return SFTConfig(**settings)
    except (TypeError, ValueError) as exc:
        raise PhituneError(f"training_config: {first_line(exc)}") from None


def load_model(cfg: RunConfig, plan: RunPlan):
    """(model, PEFT LoraConfig): the base (its built-in adapters per row), the LoRA aimed at the language model."""
    if cfg.peft_config is not None and cfg.backend == "peft":
        targets = language_model_targets(cfg.peft_config.get("target_modules"))
        cfg = replace(cfg, peft_config={**cfg.peft_config, "target_modules": targets})
    elif cfg.backend == "loralib":
        raise PhituneError("method vision trains with peft_config.backend: peft (loralib wraps Phi-3's layers only)")
    return load_model_for_training(cfg, plan)  # models.loading.load_base_model attaches the built-in adapters


def language_model_targets(targets) -> str:
    """PEFT's target_modules as one regex over full module names: `all-linear` (or none) is the language model's
    four projections; a listed name without a dot is a layer of the language model; a dotted name (such as
    `image_embed.img_projection_up`) is matched as the end of a full name anywhere, vision tower and audio encoder
    included. A regex string is the user's own and passes as it is."""
    if isinstance(targets, str) and targets != "all-linear":
        return targets
    names = LANGUAGE_LINEAR if targets in (None, "all-linear") else targets
    plain = [re.escape(n) for n in names if "." not in n]
    dotted = [re.escape(n) for n in names if "." in n]
    parts = ([f"{LANGUAGE_LAYERS}(?:{'|'.join(plain)})"] if plain else []) + [f"(?:.*\\.)?{d}" for d in dotted]
    return "|".join(f"(?:{p})" for p in parts)


def make_trainer(cfg: RunConfig, model, tokenizer, data: VisionData, peft_config, args):
    """The SFT trainer (phitune's guards) over the encoded sets, batched by MediaCollator."""
    from phitune.data.multimodal_batch import MediaCollator
    from phitune.speed import apply_activation_strategy

    apply_activation_strategy(model, args)
    return PhituneTrainer(model=model, args=args, train_dataset=data.train.to_dataset(),
                          eval_dataset=data.eval.to_dataset() if data.eval is not None else None,
                          processing_class=tokenizer, peft_config=peft_config,
                          data_collator=MediaCollator(data.processor, tokenizer.pad_token_id))


def evaluate_before(cfg: RunConfig, trainer, tokenizer, data: VisionData, checkpoint: Path | None) -> dict:
    """The evaluation at step 0 runs inside `train()` (eval_on_start), as for SFT; a resumed run has had it."""
    trainer.args.eval_on_start = data.eval is not None and checkpoint is None
    return {}


def evaluate_after(cfg: RunConfig, trainer, tokenizer, data: VisionData, before: dict) -> dict:
    """eval_loss at step 0 and at the last step, with their perplexities."""
    return eval_loss_before_after(trainer) if data.eval is not None else {}


def data_metrics(cfg: RunConfig, data: VisionData) -> dict:
    """Counts for metrics.json, with the pictures and clips trained on."""
    media = [m for example in data.train.examples for m in example["media"]]
    return {"data_format": "messages", "train_examples": len(data.train),
            "eval_examples": len(data.eval) if data.eval is not None else 0,
            "train_images": sum(m.kind == "image" for m in media), "train_audio": sum(m.kind == "audio" for m in media),
            "truncated_examples": data.train.truncated + (data.eval.truncated if data.eval is not None else 0),
            "skipped_rows": data.train.skipped_rows}


def tidy_output(output_dir: Path) -> None:
    """Nothing to tidy: the output directory is complete as finish wrote it."""


def evaluate_run(model_cfg, adapter: Path | None, data_cfg, output_dir: Path, *, use_eval_split: bool,
                 batch_size: int, num_generate: int, settings):
    """`phitune eval` on a vision run: loss, perplexity, token accuracy, exact match and ROUGE-L, base vs tuned."""
    from phitune.after.vision_eval import run_media_evaluation

    return run_media_evaluation(model_cfg, adapter, data_cfg, output_dir, num_generate=num_generate,
                                settings=settings, batch_size=batch_size, use_eval_split=use_eval_split)


def inspect_data(cfg: RunConfig, output: Path | None, example_index: int = 0):
    """`phitune data` on multimodal rows: an example with its pictures named and sized, token counts with the
    image tokens, the length histogram."""
    from phitune.after.vision_eval import inspect_media_data

    return inspect_media_data(cfg, output, example_index=example_index)
