"""What the config layer knows of each training method: its name, the TRL config class whose keys
`training_config` holds, the rules DPO, ORPO, SimPO, KTO, reward, GRPO and distill add (GRPO's `rewards:` section
and distill's `teacher:` too), and whether phitune builds (and may pack) its batches.

It sits beside phitune.config.schema (which calls it while it validates) and imports nothing of phitune but errors and config.types, so
the config layer never reaches up into a recipe; the recipes (phitune.recipes) take the classes from here too. Which code runs
a method is decided in one place above: phitune.train's RECIPES.
"""

from __future__ import annotations

import re
import warnings

from phitune.config.types import did_you_mean

# the top-level `method` key: what is optimised
METHODS = ("sft", "dpo", "orpo", "simpo", "kto", "reward", "grpo", "vision", "distill")
PAIR_METHODS = ("dpo", "orpo", "simpo")  # prompt / chosen / rejected pairs (phitune.recipes.preference; reward too)
PACKING_METHODS = ("sft",)  # phitune builds these batches and may concatenate rows; TRL pads the other methods'
LORA_SHAPE_KEYS = ("r", "lora_alpha", "target_modules", "lora_dropout", "use_dora", "use_rslora")


def check_preference_config(method: str, model, data, peft_cfg, problems: list[str]) -> None:
    """Config rules of the methods that train a LoRA adapter on preferences or rewards (dpo, orpo, simpo, kto,
    reward, grpo), appended to `problems` with the others."""
    if model.adapter and method in ("sft", "vision"):
        problems.append("model.adapter (start from a trained adapter) needs method: dpo, orpo, simpo, kto or grpo")
        return
    if model.adapter and method == "reward":
        problems.append("method reward trains a new reward head and adapter on the base; model.adapter (a policy's "
                        "adapter to start from) does not apply: remove it")
    if method == "reward" and peft_cfg and peft_cfg.get("task_type", "SEQ_CLS") != "SEQ_CLS":
        problems.append(f"method reward trains a sequence classification head: peft_config.task_type must be SEQ_CLS "
                        f"(or left out), got {peft_cfg['task_type']!r}")
    if method in ("sft", "vision"):  # vision: SFT on multimodal rows (recipes/vision.py)
        return
    if method == "distill":  # SFT's chat rows, any of their formats; a fresh adapter on the student
        if model.adapter:
            problems.append("method distill trains a fresh LoRA adapter on the student; remove model.adapter")
        if peft_cfg is None:
            problems.append("method distill trains a LoRA adapter on the student: add a peft_config")
        elif peft_cfg.get("backend", "peft") != "peft":
            problems.append("method distill needs peft_config.backend: peft")
        return
    if peft_cfg is None and not model.adapter:
        problems.append(f"method {method} trains a LoRA adapter: add a peft_config, or set model.adapter to the run "
                        "directory of the adapter to start from")
    if peft_cfg and peft_cfg.get("backend", "peft") != "peft":
        problems.append(f"method {method} needs peft_config.backend: peft")
    if model.adapter and peft_cfg and any(key in peft_cfg for key in LORA_SHAPE_KEYS):
        problems.append("model.adapter brings its own LoRA shape (r, alpha, targets); remove peft_config")
    if data.format != "auto":
        rows = {"grpo": "prompt rows", "kto": "prompt/completion/label rows"}.get(method, "prompt/chosen/rejected rows")
        problems.append(f"method {method} reads {rows}; leave data.format at auto")
    if data.train_on != "assistant":
        problems.append(f"method {method} scores the answers only; data.train_on must be assistant")


def check_method_training(method: str, training: dict, problems: list[str]) -> None:
    """training_config values a method cannot train with, said now rather than by TRL once the model has loaded:
    SimPO is CPO's `simpo` loss; KTO's KL estimate pairs each completion with its batch neighbour's prompt, so it needs
    at least 2 rows per device batch and TRL's sequential sampling."""
    if method == "simpo" and training.get("loss_type", "simpo") not in ("simpo", "alphapo"):
        problems.append(f"method simpo trains CPO's simpo loss; training_config.loss_type {training['loss_type']!r} is "
                        "another CPO loss (leave loss_type out, or use simpo / alphapo)")
    if method != "kto" or training.get("loss_type", "kto") != "kto":
        return  # apo_zero_unpaired estimates no KL term
    if isinstance(training.get("per_device_train_batch_size"), int) and training["per_device_train_batch_size"] < 2:
        problems.append("method kto needs training_config.per_device_train_batch_size of at least 2 (its KL estimate "
                        "pairs each completion with another row's prompt in the same batch)")
    if training.get("train_sampling_strategy", "sequential") != "sequential":
        problems.append("method kto needs training_config.train_sampling_strategy: sequential (its KL pairs are "
                        "fixed neighbours in batch order; phitune shuffles the rows once, with data.seed, instead)")


def training_config_class(method: str):
    """TRL's config dataclass of a method: SFTConfig, DPOConfig, KTOConfig, RewardConfig, GRPOConfig, or the
    experimental ORPOConfig and CPOConfig (SimPO) of TRL 1.x."""
    import trl  # import here: trl pulls in torch, and most config errors should be instant

    if method == "orpo":
        return orpo_classes()[0]
    if method == "simpo":
        return cpo_classes()[0]
    if method == "distill":
        return gkd_classes()[0]
    return {"dpo": trl.DPOConfig, "kto": trl.KTOConfig, "reward": trl.RewardConfig,
            "grpo": trl.GRPOConfig}.get(method, trl.SFTConfig)


def orpo_classes():
    """(ORPOConfig, ORPOTrainer) from trl.experimental.orpo, without TRL's "experimental API" warning on every run
    (docs/preference.md says it once)."""
    return _experimental("orpo", "ORPOConfig", "ORPOTrainer")


def cpo_classes():
    """(CPOConfig, CPOTrainer) from trl.experimental.cpo, where TRL 1.16 has SimPO (CPO's loss_type simpo), without
    TRL's "experimental API" warning on every run (docs/preference.md says it once)."""
    return _experimental("cpo", "CPOConfig", "CPOTrainer")


def gkd_classes():
    """(GKDConfig, GKDTrainer) from trl.experimental.gkd, where TRL 1.16 has generalized knowledge distillation
    (method distill), without TRL's "experimental API" warning on every run."""
    return _experimental("gkd", "GKDConfig", "GKDTrainer")


def check_distill_config(method: str, teacher, training: dict, problems: list[str]) -> None:
    """Rules of `method: distill` and its `teacher:` section (a ModelConfig, or None when the YAML has none).

    phitune distills off-policy, on the data's own completions (GKD with lmbda 0 and no seq_kd), so GKDConfig's
    sampling keys (lmbda above 0, seq_kd, temperature, max_new_tokens) would do nothing or need generation that
    method distill does not run; they are refused rather than ignored (docs/distill.md says why)."""
    if method != "distill":
        if teacher is not None:
            problems.append(f"teacher applies to method: distill, not {method}")
        return
    if teacher is None:
        problems.append("method distill needs a teacher: {name_or_path: the teacher model, or a phitune run "
                        "directory}, which shares the student's tokenizer")
    sampling = [key for key in ("temperature", "max_new_tokens") if key in training]
    sampling += [key for key, off in (("lmbda", 0), ("seq_kd", False)) if training.get(key, off) != off]
    for key in sampling:
        problems.append(f"training_config.{key}: method distill learns from the teacher's distributions on the "
                        "data's own completions (GKD's lmbda 0, nothing sampled); on-policy and sequence-level "
                        "distillation are not supported, so leave it out")
    beta = training.get("beta", 0.0)
    if isinstance(beta, (int, float)) and not 0 <= beta <= 1:
        problems.append(f"training_config.beta must be in [0, 1] (0: KL(teacher || student), 1: KL(student || "
                        f"teacher), between: generalized JSD), got {beta!r}")


def _experimental(module: str, *names: str) -> tuple:
    """Classes of trl.experimental.MODULE; a TRL release that moved or dropped them is one line, at config time."""
    import importlib

    from phitune.errors import PhituneError

    method = {"orpo": "orpo", "cpo": "simpo", "gkd": "distill"}[module]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            found = importlib.import_module(f"trl.experimental.{module}")
            return tuple(getattr(found, name) for name in names)
        except (ImportError, AttributeError) as exc:
            import trl

            raise PhituneError(f"method {method} needs trl.experimental.{module}.{names[1]}, which TRL {trl.__version__} "
                               f"does not have ({exc}); install trl 1.16 (requirements/ci-constraints.txt)") from None


# GRPO's built-in rewards (phitune.after.rewards) and the keys each takes besides `weight`; a user's own function is
# `function: module:name` or `function: path/to/file.py:name`; a reward model is `model: RUN_DIR` (a method reward run).
BUILTIN_REWARDS = {
    "answer": ("column", "extract", "pattern", "reference_pattern"),
    "format": ("pattern",),
    "json": ("schema",),
    "length": ("max_tokens",),
}
ANSWER_EXTRACTS = ("last_number", "boxed", "regex", "text")
MODEL_REWARD_KEYS = ("model", "weight", "batch_size")


def check_rewards(method: str, rewards, problems: list[str]) -> list[dict] | None:
    """The `rewards:` list of a grpo config, each entry checked (name or function, its keys, weight, regexes);
    problems are appended with the others. Custom functions are imported later, by the recipe."""
    if method != "grpo":
        if rewards is not None:
            problems.append(f"rewards apply to method: grpo, not {method}")
        return None
    if not isinstance(rewards, list) or not rewards:
        problems.append("method grpo needs rewards: a list such as [{name: answer}, {name: format, pattern: ...}]")
        return None
    for index, entry in enumerate(rewards):
        where = f"rewards[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{where} must be a mapping such as {{name: answer, weight: 1.0}}, got {entry!r}")
            continue
        _check_reward(entry, where, problems)
    return [dict(entry) for entry in rewards if isinstance(entry, dict)]


def _check_reward(entry: dict, where: str, problems: list[str]) -> None:
    weight = entry.get("weight", 1.0)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool):
        problems.append(f"{where}.weight must be a number, got {weight!r}")
    if sum(key in entry for key in ("name", "function", "model")) != 1:
        problems.append(f"{where} needs one of name (one of {', '.join(BUILTIN_REWARDS)}), function "
                        "(module:function or path/to/file.py:function) or model (the output directory of a method: "
                        "reward run)")
        return
    if "model" in entry:
        _unknown_keys(entry, MODEL_REWARD_KEYS, where, problems)
        _check_model_reward(entry, where, problems)
        return
    if "function" in entry:
        spec = entry["function"]
        if not isinstance(spec, str) or not re.fullmatch(r"[^:]+:[A-Za-z_]\w*", spec.strip()):
            problems.append(f"{where}.function must be module:function or path/to/file.py:function, got {spec!r}")
        _unknown_keys(entry, ("function", "weight"), where, problems)
        return
    name = entry["name"]
    if name not in BUILTIN_REWARDS:
        problems.append(f"{where}.name must be one of {', '.join(BUILTIN_REWARDS)}, got {name!r}"
                        f"{did_you_mean(name, BUILTIN_REWARDS)}")
        return
    _unknown_keys(entry, ("name", "weight", *BUILTIN_REWARDS[name]), where, problems)
    _check_builtin(name, entry, where, problems)


def _check_model_reward(entry: dict, where: str, problems: list[str]) -> None:
    """`model: RUN_DIR` names a finished method: reward run (its phitune_config.yaml says so, its adapter is there);
    `batch_size`, the completions scored per forward pass, is a positive count."""
    from pathlib import Path

    import yaml

    size = entry.get("batch_size", 8)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        problems.append(f"{where}.batch_size must be a positive number of completions, got {size!r}")
    path = entry["model"]
    if not isinstance(path, str) or not path.strip():
        problems.append(f"{where}.model must be the output directory of a method: reward run, got {path!r}")
        return
    run = Path(path).expanduser()
    saved = run / "phitune_config.yaml"
    if not run.is_dir():
        problems.append(f"{where}.model: {path} does not exist (train the reward model first: a config with "
                        "method: reward)")
        return
    if not saved.is_file():
        problems.append(f"{where}.model: {path} is not a phitune run (no phitune_config.yaml); it must be the output "
                        "directory of a method: reward run")
        return
    try:
        method = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("method") or "sft"
    except (yaml.YAMLError, AttributeError):
        method = "unreadable"
    if method != "reward":
        problems.append(f"{where}.model: {path} is a method {method} run, not a reward model (method: reward)")
    elif not (run / "adapter_config.json").is_file():
        problems.append(f"{where}.model: {path} holds no adapter (adapter_config.json is missing): its training has "
                        "not finished; finish it with phitune train --resume")


def _check_builtin(name: str, entry: dict, where: str, problems: list[str]) -> None:
    """The values of a built-in reward's keys: regexes compile, the extraction is known, counts are positive."""
    for key in ("pattern", "reference_pattern"):
        if key in entry:
            try:
                re.compile(str(entry[key]))
            except re.error as exc:
                problems.append(f"{where}.{key} is not a valid regular expression ({exc})")
    if name == "format" and "pattern" not in entry:
        problems.append(f"{where}: the format reward needs a pattern (a regular expression the completion must match)")
    if name == "answer":
        extract = entry.get("extract", "last_number")
        if extract not in ANSWER_EXTRACTS:
            problems.append(f"{where}.extract must be one of {', '.join(ANSWER_EXTRACTS)}, got {extract!r}"
                            f"{did_you_mean(extract, ANSWER_EXTRACTS)}")
        elif extract == "regex" and "pattern" not in entry:
            problems.append(f"{where}: extract: regex needs a pattern (its first group is the answer)")
    if name == "length":
        limit = entry.get("max_tokens")
        if limit is None:
            problems.append(f"{where}: the length reward needs max_tokens (the most tokens an answer earns its "
                            "full reward at)")
        elif not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            problems.append(f"{where}.max_tokens must be a positive number of tokens, got {limit!r}")
    if name == "json" and "schema" in entry and not isinstance(entry["schema"], (dict, str)):
        problems.append(f"{where}.schema must be a JSON schema (a mapping) or the path of a .json file")


def _unknown_keys(entry: dict, valid, where: str, problems: list[str]) -> None:
    for key in entry:
        if key not in valid:
            problems.append(f"unknown key {where}.{key}{did_you_mean(key, valid)}")

