"""What the config layer knows of each training method: its name, the TRL config class whose keys
`training_config` holds, the rules DPO and ORPO add, and whether phitune builds (and may pack) its batches.

It sits beside phitune.config (which calls it while it validates) and imports nothing of phitune, so the config
layer never reaches up into a recipe; the recipes (phitune.recipes) take the classes from here too. Which code runs
a method is decided in one place above: phitune.train's RECIPES.
"""

from __future__ import annotations

import warnings

METHODS = ("sft", "dpo", "orpo", "vision")  # the top-level `method` key: what the trainer optimises
PACKING_METHODS = ("sft",)  # phitune builds these batches and may concatenate rows; TRL pads DPO / ORPO pairs
LORA_SHAPE_KEYS = ("r", "lora_alpha", "target_modules", "lora_dropout", "use_dora", "use_rslora")


def check_preference_config(method: str, model, data, peft_cfg, problems: list[str]) -> None:
    """Config rules of dpo / orpo, appended to `problems` with the others."""
    if model.adapter and method in ("sft", "vision"):
        problems.append("model.adapter (start from a trained adapter) needs method: dpo or orpo")
        return
    if method in ("sft", "vision"):  # vision: SFT on multimodal rows (recipes/vision.py)
        return
    if peft_cfg is None and not model.adapter:
        problems.append(f"method {method} trains a LoRA adapter: add a peft_config, or set model.adapter to the run "
                        "directory of the adapter to start from")
    if peft_cfg and peft_cfg.get("backend", "peft") != "peft":
        problems.append(f"method {method} needs peft_config.backend: peft")
    if model.adapter and peft_cfg and any(key in peft_cfg for key in LORA_SHAPE_KEYS):
        problems.append("model.adapter brings its own LoRA shape (r, alpha, targets); remove peft_config")
    if data.format != "auto":
        problems.append(f"method {method} reads prompt/chosen/rejected rows; leave data.format at auto")
    if data.train_on != "assistant":
        problems.append(f"method {method} scores the answers only; data.train_on must be assistant")


def training_config_class(method: str):
    """TRL's config dataclass of a method: SFTConfig, DPOConfig, or ORPOConfig (experimental in TRL 1.x)."""
    import trl  # import here: trl pulls in torch, and most config errors should be instant

    if method == "orpo":
        return orpo_classes()[0]
    return trl.DPOConfig if method == "dpo" else trl.SFTConfig


def orpo_classes():
    """(ORPOConfig, ORPOTrainer) from trl.experimental.orpo, without TRL's "experimental API" warning on every run
    (docs/preference.md says it once)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    return ORPOConfig, ORPOTrainer
