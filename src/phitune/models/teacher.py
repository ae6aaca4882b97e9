"""The teacher of `method: distill`: a frozen model that shares the student's tokenizer, loaded in its own dtype or in
4 bits, with an adapter folded in when it is a phitune run (base + adapter).

Distillation compares the two models' next-token distributions position by position, so the teacher must read the
same token ids and score the same vocabulary: the tokenizers and the logit widths are compared before any weight is
read (Phi-3-medium -> Phi-3-mini share the Phi-3 tokenizer; Phi-4 (100,352 ids) -> Phi-4-mini (200,064) do not).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from phitune.config.schema import ModelConfig, load_run_config
from phitune.errors import PhituneError
from phitune.models.loading import load_base_model, load_model_config, load_tokenizer

log = logging.getLogger("phitune")


def resolve_teacher(teacher: ModelConfig) -> ModelConfig:
    """The teacher's base and adapter: `teacher.name_or_path` a phitune run directory trained with an adapter means
    its base (from its phitune_config.yaml) with that directory as the adapter, loaded with the teacher section's
    own settings (dtype, 4-bit); a full fine-tune's directory is itself the model."""
    path = Path(teacher.name_or_path)
    if not (path / "phitune_config.yaml").is_file() or not (path / "adapter_config.json").is_file():
        return teacher
    if teacher.adapter:
        raise PhituneError(f"teacher: {path} is a phitune run with its own adapter; leave teacher.adapter out")
    base = load_run_config(path).model
    return replace(teacher, name_or_path=base.name_or_path, revision=teacher.revision or base.revision,
                   adapter=str(path))


def check_shared_vocabulary(student: ModelConfig, student_tokenizer, teacher: ModelConfig) -> None:
    """Refuse, in one line naming both, a teacher whose tokenizer or logit width differs from the student's: without
    the same ids for the same tokens, KL between their distributions compares unrelated words."""
    try:
        teacher_tokenizer = load_tokenizer(teacher)  # a run directory holds the tokenizer it trained with
    except PhituneError as exc:
        raise PhituneError(f"teacher: {exc}") from None
    ours, theirs = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if ours != theirs:
        raise PhituneError(f"method distill needs a teacher that shares the student's tokenizer: the student's "
                           f"({student.name_or_path}, {len(ours):,} tokens) and the teacher's ({teacher.name_or_path}, "
                           f"{len(theirs):,} tokens) differ; pick a teacher of the student's family (Phi-3-medium -> "
                           "Phi-3-mini)")
    widths = [load_model_config(cfg).get_text_config().vocab_size for cfg in (student, resolve_teacher(teacher))]
    if widths[0] != widths[1]:
        raise PhituneError(f"method distill needs a teacher with the student's vocabulary size: the student "
                           f"{student.name_or_path} scores {widths[0]:,} tokens and the teacher "
                           f"{teacher.name_or_path} {widths[1]:,}")


def load_teacher(teacher: ModelConfig, attn_implementation: str | None = None):
    """The teacher in eval mode with no parameter that trains: its base in teacher.torch_dtype (or 4-bit with
    teacher.quantization), and its adapter merged in (kept as a PEFT layer over a 4-bit base, which cannot merge)."""
    cfg = resolve_teacher(teacher)
    model = load_base_model(replace(cfg, adapter=None), training=False, attn_implementation=attn_implementation)
    if cfg.adapter:
        from peft import PeftModel

        if not (Path(cfg.adapter) / "adapter_config.json").is_file():
            raise PhituneError(f"teacher.adapter: {cfg.adapter} holds no PEFT adapter (adapter_config.json is "
                               "missing)")
        model = PeftModel.from_pretrained(model, cfg.adapter)
        if not cfg.quantization:
            model = model.merge_and_unload()
    model.config.use_cache = False  # one forward pass per batch, no generation: no KV cache to keep
    model.requires_grad_(False)
    log.info("teacher %s%s loaded%s", cfg.name_or_path, f" + adapter {cfg.adapter}" if cfg.adapter else "",
             " in 4 bits" if cfg.quantization else "")
    return model.eval()
