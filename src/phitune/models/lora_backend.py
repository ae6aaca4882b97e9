"""`peft_config.backend: loralib`: train Phi-3 through phitune.lora layers instead of PEFT.

The loralib way, as the seed guide describes it: replace layers, mark only LoRA parameters trainable, save only
LoRA parameters, load the pretrained model and then the LoRA checkpoint with strict=False. Checkpoints hold
`lora_state_dict.safetensors`; every save also writes an equivalent PEFT adapter, so evaluation, chat and merge
work the same for both backends.
"""

from __future__ import annotations

import logging
from pathlib import Path

from phitune.errors import PhituneError

log = logging.getLogger("phitune")

LORA_WEIGHTS = "lora_state_dict.safetensors"

# LoraConfig keys this backend honours; anything else (use_dora, modules_to_save, ...) is PEFT-only.
SUPPORTED_KEYS = {"r", "lora_alpha", "lora_dropout", "bias", "target_modules", "task_type", "backend"}


def inject_for_training(model, settings: dict) -> dict[str, str]:
    """Inject phitune.lora layers as peft_config says and leave only LoRA parameters trainable."""
    from phitune import lora
    from phitune.models.loading import expert_parameter_names, linear_layer_names

    unsupported = sorted(k for k, v in settings.items() if k not in SUPPORTED_KEYS and v not in (None, False))
    if unsupported:
        raise PhituneError(
            f"peft_config.backend loralib does not support {', '.join(unsupported)}; remove them or use backend: peft"
        )
    targets = settings.get("target_modules") or "all-linear"
    if targets == "all-linear":
        targets = linear_layer_names(model)  # MoE routers excluded: their forward returns a tuple
        if expert_parameter_names(model):
            log.warning("backend loralib adapts this MoE model's attention only: its experts are 3-D parameters, "
                        "not layers loralib can wrap (backend: peft adapts them too)")
    bias = settings.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise PhituneError(f"peft_config.bias must be none, all or lora_only, got {bias!r}")
    replaced = lora.inject(
        model,
        targets,
        r=settings.get("r", 8),
        lora_alpha=settings.get("lora_alpha", 8),
        lora_dropout=settings.get("lora_dropout", 0.0),
        bias=bias,
    )
    model._phitune_lora_bias = bias  # lora_state_dict must save the same biases that train
    return replaced


def save_lora_checkpoint(model, output_dir: Path) -> None:
    """Write only the LoRA parameters (loralib style) and the equivalent PEFT adapter into `output_dir`."""
    from safetensors.torch import save_file

    from phitune import lora

    output_dir.mkdir(parents=True, exist_ok=True)
    bias = getattr(model, "_phitune_lora_bias", "none")
    state = {k: v.detach().contiguous() for k, v in lora.lora_state_dict(model, bias=bias).items()}
    save_file(state, str(output_dir / LORA_WEIGHTS))
    lora.export_peft_adapter(model, output_dir, base_model_name_or_path=model.config.name_or_path)


def load_lora_checkpoint(model, checkpoint: Path) -> None:
    """Load a LoRA checkpoint over the pretrained weights, loralib style (strict=False, but no silent misses)."""
    from safetensors.torch import load_file

    from phitune import lora

    path = checkpoint / LORA_WEIGHTS
    if not path.is_file():
        raise PhituneError(f"{checkpoint} holds no {LORA_WEIGHTS}; was it written by backend: loralib?")
    lora.load_lora_state_dict(model, load_file(str(path)))
