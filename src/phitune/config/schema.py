"""RunConfig: one YAML file with `model`, `data`, `training_config`, `peft_config` (and optional `speed`).

Precedence is defaults, then the YAML file, then `--set section.key=value` overrides. Validation collects every
problem before raising, so a user fixes a config in one pass rather than one typo per run. Nothing here imports
torch or loads a model: a bad config fails in well under a second.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from phitune.config.methods import (METHODS, check_distill_config, check_method_training, check_preference_config,
                                    check_rewards, training_config_class)
from phitune.config.sources import Source, default_name, parse_sources
from phitune.config.types import check_value, did_you_mean, field_types, yaml_value
from phitune.errors import PhituneError, first_line

SECTIONS = ("model", "data", "training_config", "peft_config", "speed", "rewards", "teacher")

# SFTConfig keys that phitune sets itself from another section; naming them in training_config is a mistake.
MANAGED_TRAINING_KEYS = {
    "max_length": "data.max_seq_length",
    "max_seq_length": "data.max_seq_length",
    "assistant_only_loss": "data.train_on",
    "completion_only_loss": "data.train_on",
    "dataset_text_field": "data (phitune renders the chat template itself)",
    "padding_free": "speed.padding_free",
    "use_liger_kernel": "speed.liger",
    "reward_weights": "rewards[].weight",
}

# Keys of older transformers releases that recipes still use, mapped to today's name. transformers 5 folded
# warmup_ratio into warmup_steps (a float below 1 is a ratio of the total steps).
RENAMED_TRAINING_KEYS = {"warmup_ratio": "warmup_steps"}

PHI3_MINI = "microsoft/Phi-3-mini-4k-instruct"


@dataclass
class ModelConfig:
    """Which base model to load, and how."""

    name_or_path: str = field(default=PHI3_MINI, metadata={"help": "hub id or local directory of the base model"})
    torch_dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="auto", metadata={"help": "auto (bfloat16 where supported, float32 on CPU) | bfloat16 | float16 | float32"}
    )
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager", "flex_attention"] = field(
        default="auto",
        metadata={"help": "auto (flash_attention_2 on GPU when installed, else sdpa) | sdpa | eager | flex_attention"},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "run code shipped with the model (off: safe)"})
    revision: str | None = field(default=None, metadata={"help": "hub revision (branch, tag or commit)"})
    quantization: dict | None = field(
        default=None, metadata={"help": "bitsandbytes 4-bit settings for QLoRA, e.g. {load_in_4bit: true}"}
    )
    adapter: str | None = field(
        default=None,
        metadata={"help": "dpo/orpo/simpo/kto/grpo: a phitune run directory or PEFT adapter to start from (trained "
                          "on); under teacher: (distill), an adapter applied to the teacher"},
    )


@dataclass
class DataConfig:
    """Where the chat data comes from and how it becomes training tokens."""

    train: str | list | None = field(
        default=None, metadata={"help": "local .jsonl/.json/.csv/.parquet file, dataset folder or hub dataset; or a "
                                        "list of sources {path, subset, split, format, weight | rows, ...} to mix"}
    )
    eval: str | list | None = field(
        default=None, metadata={"help": "eval file or hub dataset, or a list of sources; else eval_split is used"}
    )
    eval_split: float = field(default=0.05, metadata={"help": "fraction of train (of each source) held out when eval "
                                                              "is not given"})
    split: str = field(default="train", metadata={"help": "split name for hub datasets"})
    eval_hub_split: str | None = field(default=None, metadata={"help": "split name of the hub eval set"})
    subset: str | None = field(default=None, metadata={"help": "the hub dataset's config name (`main` of "
                                                               "openai/gsm8k): load_dataset's `name`"})
    data_dir: str | None = field(default=None, metadata={"help": "hub dataset: the folder of the repository to read"})
    data_files: str | list | dict | None = field(
        default=None, metadata={"help": "hub dataset: the files to read (a path, a list, or {split: paths})"}
    )
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"] = field(
        default="auto", metadata={"help": "auto | messages | sharegpt | alpaca | prompt_completion | text (raw "
                                          "documents: .txt files or a `text` column, packed, every token trained)"}
    )
    max_seq_length: int = field(default=2048, metadata={"help": "tokens per example; longer ones are truncated"})
    train_on: Literal["assistant", "answer", "all"] = field(
        default="assistant", metadata={"help": "assistant (loss on assistant turns, <think> traces included) | answer "
                                               "(assistant turns less their <think> trace, which stays in the "
                                               "context) | all"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the eval_split shuffle and of a mixture's rows"})
    on_bad_row: Literal["error", "skip"] = field(
        default="error", metadata={"help": "error | skip: what to do with a malformed row"}
    )
    max_train_examples: int | None = field(default=None, metadata={"help": "cap on train rows (quick trials)"})
    max_eval_examples: int | None = field(default=None, metadata={"help": "cap on eval rows"})
    num_proc: int | None = field(
        default=None, metadata={"help": "processes that read and tokenize the data (default: the cores available)"}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "where prepared data is cached (default: ~/.cache/phitune/data)"}
    )
    prompt_template: str | None = field(
        default=None, metadata={"help": "grpo: the user prompt built from a row's columns, e.g. '{question}' "
                                        "(default: the row's prompt or messages)"}
    )
    max_audio_seconds: float = field(
        default=40.0, metadata={"help": "method vision: the longest audio clip, in seconds (Phi-4-multimodal was "
                                        "trained on up to 40 s for transcription and translation)"}
    )
    long_audio: Literal["error", "cut"] = field(
        default="error", metadata={"help": "error | cut: a clip over max_audio_seconds is a bad row (file:line; "
                                           "on_bad_row: skip skips it) or is cut to that length"}
    )
    streaming: bool = field(
        default=False, metadata={"help": "read, check and tokenize rows as training consumes them, in bounded "
                                         "memory, no cache on disk (sft chats and raw text; needs max_steps)"}
    )

    @property
    def is_mixture(self) -> bool:
        """data.train (or data.eval) is a list of sources."""
        return isinstance(self.train, list) or isinstance(self.eval, list)

    def train_sources(self) -> list[Source]:
        """data.train as sources: the list's, or one made of train, split, subset, data_dir, data_files."""
        if isinstance(self.train, list):
            return parse_sources(self.train, "data.train", [], mixing=True)
        return [self._single(self.train, self.split)]

    def eval_sources(self) -> list[Source]:
        """data.eval as sources (none when eval_split holds rows out of each training source instead)."""
        if isinstance(self.eval, list):
            return parse_sources(self.eval, "data.eval", [], mixing=False)
        return [self._single(self.eval, self.eval_hub_split or self.split)] if self.eval else []

    def _single(self, path: str, split: str) -> Source:
        return Source(path=path, name=default_name(path, self.subset), subset=self.subset, data_dir=self.data_dir,
                      data_files=self.data_files, split=split)

    def for_source(self, source: Source, eval_split: float) -> DataConfig:
        """The settings of one source read on its own (as a one-source config): its path, split, hub options, format
        and prompt; `eval_split` of it held out; no caps (they apply to the mixture)."""
        return replace(self, train=source.path, eval=None, split=source.split, subset=source.subset,
                       data_dir=source.data_dir, data_files=source.data_files, eval_split=eval_split,
                       format=source.format or self.format, max_train_examples=None, max_eval_examples=None,
                       prompt_template=source.prompt_template or self.prompt_template)

    def whole_file_as_eval(self) -> "DataConfig":
        """`phitune eval RUN --data FILE`: every row of `train` (FILE) is read as the train split, nothing held out,
        capped by max_eval_examples; each method's evaluation takes that split as its eval set."""
        return replace(self, eval=None, eval_split=0.0, max_train_examples=self.max_eval_examples)


@dataclass
class SpeedConfig:
    """Speed switches. Each changes speed, never the loss; each can be turned off."""

    padding_free: Literal["auto", "true", "false"] = field(
        default="auto", metadata={"help": "auto (on with CUDA) | true | false: concatenate rows, no padding computed"}
    )
    liger: Literal["auto", "true", "false"] = field(
        default="auto", metadata={"help": "auto (on with CUDA + liger-kernel) | true | false"}
    )
    activation: Literal["auto", "full", "selective", "offload", "fused-lora", "none"] = field(
        default="auto",
        metadata={
            "help": "auto (selective on CUDA, none on CPU) | full (recompute each layer) | selective (recompute all "
            "but attention) | offload (full, inputs kept in host memory; CUDA) | fused-lora (full, but down_proj not "
            "recomputed; PEFT LoRA, dropout 0) | none: activation memory strategy"
        },
    )
    vllm: Literal["auto", "true", "false"] = field(
        default="auto", metadata={"help": "grpo: generate with vLLM, colocated (auto: on CUDA when vllm is installed; "
                                          "training_config.use_vllm wins)"}
    )


# Choices that no dataclass annotation carries: `backend` is phitune's own key inside peft_config. The sections'
# choices are Literal annotations on their fields, checked with every other type.
PEFT_BACKENDS = ("peft", "loralib")


@dataclass
class RunConfig:
    """A whole run: the four sections of the YAML file plus speed switches."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training_config: dict[str, Any] = field(default_factory=dict)
    peft_config: dict[str, Any] | None = None
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    method: str = "sft"
    source: str | None = None  # the YAML file it was read from, and the --set overrides applied to it
    overrides: list[str] = field(default_factory=list)
    rewards: list[dict] | None = None  # method grpo: the reward functions (config_methods.check_rewards)
    teacher: ModelConfig | None = None  # method distill: the frozen model the student learns from

    @property
    def output_dir(self) -> Path:
        return Path(self.training_config.get("output_dir") or "outputs/phitune-run")

    @property
    def backend(self) -> str:
        """`peft` (default), `loralib` (phitune.lora layers) or `full` (no peft_config: all weights train)."""
        if self.peft_config is None:
            return "full"
        return self.peft_config.get("backend", "peft")

    def to_dict(self) -> dict[str, Any]:
        out = {
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "training_config": dict(self.training_config),
            "peft_config": None if self.peft_config is None else dict(self.peft_config),
            "speed": dataclasses.asdict(self.speed),
            "method": self.method,
        }
        if self.rewards is not None:
            out["rewards"] = [dict(entry) for entry in self.rewards]
        if self.teacher is not None:
            out["teacher"] = dataclasses.asdict(self.teacher)
        return _strip_secrets(out)


SECRET_KEYS = {"hub_token", "token", "push_to_hub_token", "use_auth_token"}


def _strip_secrets(value: Any) -> Any:
    """Drop tokens before a config is saved or printed: secrets come from the environment, never from files."""
    if isinstance(value, dict):
        return {k: _strip_secrets(v) for k, v in value.items() if k not in SECRET_KEYS}
    return value


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply `section.key=value` overrides, validate everything, and return a RunConfig."""
    path = Path(path)
    if path.is_dir():
        raise PhituneError(f"{path} is a directory, not a config file; name the YAML file itself")
    if not path.is_file():
        raise PhituneError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PhituneError(f"{path}: not valid YAML ({first_line(exc)})") from None
    if raw is None:  # else the one problem named would be `data.train is required`, of a file that holds nothing
        raise PhituneError(f"{path}: the file is empty; it needs the sections {', '.join(SECTIONS[:4])}")
    if not isinstance(raw, dict):
        raise PhituneError(f"{path}: the top level must be a mapping with sections {', '.join(SECTIONS[:4])}")
    apply_overrides(raw, overrides or [])
    cfg = config_from_dict(raw)
    cfg.source, cfg.overrides = str(path), list(overrides or [])
    return cfg


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def coerce_numbers(value: Any) -> Any:
    """YAML 1.1 reads `2e-4` (no dot) as a string; every recipe writes learning rates that way, so read a number."""
    if isinstance(value, dict):
        return {k: coerce_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [coerce_numbers(v) for v in value]
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> None:
    """Apply `--set training_config.learning_rate=1e-4` style overrides (and `--set method=kto`); values are parsed
    as YAML scalars."""
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if parts[0] == "rewards":  # a list of entries: no section.key names one
            raise PhituneError(f"--set {item!r}: rewards cannot be set with --set; edit the YAML's rewards: section")
        if sep and parts == ["method"]:  # the one top-level key that is not a section
            raw["method"] = value.strip()
            continue
        if not sep or len(parts) < 2 or not all(parts):
            raise PhituneError(f"--set {item!r}: expected section.key=value (or method=NAME), e.g. "
                               "training_config.max_steps=10")
        node = raw
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise PhituneError(f"--set {item!r}: {part} is not a section")
            node = node[part]
        try:
            node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            raise PhituneError(f"--set {item!r}: the value is not valid YAML ({first_line(exc)}); quote it, e.g. "
                               f"{key.strip()}='\"...\"'") from None


def config_from_dict(raw: dict) -> RunConfig:
    """Build and validate a RunConfig from a plain dictionary; every problem is reported in one error."""
    problems: list[str] = []
    raw = coerce_numbers(raw)
    _check_keys(raw, (*SECTIONS, "method"), "", problems)
    method = raw.get("method") or "sft"
    if method not in METHODS:  # every later rule depends on the method: checked against a guess, they only mislead
        raise PhituneError(f"invalid config: method must be one of {', '.join(METHODS)}, got {method!r}"
                           f"{did_you_mean(method, METHODS, case_blind=True)}")
    model = _build_section(ModelConfig, raw.get("model"), "model", problems)
    data = _build_section(DataConfig, raw.get("data"), "data", problems)
    speed = _build_section(SpeedConfig, raw.get("speed"), "speed", problems)
    training = _validate_training(raw.get("training_config"), problems, method)
    peft_cfg = _validate_peft(raw, problems)
    _check_values(data, problems)
    _check_streaming(data, training, method, problems)
    if method != "sft" or model.adapter:
        check_preference_config(method, model, data, peft_cfg, problems)
    check_method_training(method, training, problems)
    prompts = [data.prompt_template] + [s.get("prompt_template") for s in _listed(data) if isinstance(s, dict)]
    if any(prompt is not None for prompt in prompts) and method != "grpo":
        problems.append(f"data.prompt_template applies to method: grpo, not {method}")
    if method in ("dpo", "orpo", "simpo", "kto", "reward", "grpo") and any(
            isinstance(s, dict) and s.get("format") not in (None, "auto") for s in _listed(data)):
        problems.append(f"method {method} detects its rows itself; leave each source's format at auto")
    rewards = check_rewards(method, raw.get("rewards"), problems)
    teacher = _teacher_section(raw.get("teacher"), problems)
    check_distill_config(method, teacher, training, problems)
    if problems:
        raise PhituneError("invalid config: " + "; ".join(problems))
    return RunConfig(model=model, data=data, training_config=training, peft_config=peft_cfg, speed=speed,
                     method=method, rewards=rewards, teacher=teacher)


def _teacher_section(values, problems: list[str]) -> ModelConfig | None:
    """`teacher:` (method distill) has the keys of `model:`; its name_or_path (a model, or a phitune run directory
    whose adapter it then applies) has no default."""
    if values is None:
        return None
    if isinstance(values, dict) and not values.get("name_or_path"):
        problems.append("teacher.name_or_path is required (the teacher model, or a phitune run directory)")
    return _build_section(ModelConfig, values, "teacher", problems)



def _check_keys(section: dict, valid, where: str, problems: list[str]) -> None:
    for key in section:
        if key not in valid:
            # a misspelled section is a top-level key, not `config.dta`: no section is named config
            name = f"key {where}.{key}" if where else f"top-level key {key}"
            problems.append(f"unknown {name}{did_you_mean(key, valid)}")


def _build_section(cls, values, where: str, problems: list[str]):
    """Instantiate a section dataclass, type-checking each value against its field's resolved type."""
    if values is None:
        return cls()
    if not isinstance(values, dict):
        problems.append(f"{where} must be a mapping, got {type(values).__name__}")
        return cls()
    types = field_types(cls)
    _check_keys(values, types, where, problems)
    kwargs = {}
    for key, value in values.items():
        if key not in types:
            continue
        value = yaml_value(value, types[key])  # `speed.liger: false` is the choice "false"
        problem = check_value(where, key, value, types[key])
        if problem:
            problems.append(problem)
            continue
        kwargs[key] = value
    return cls(**kwargs)


def _validate_training(values, problems: list[str], method: str = "sft") -> dict:
    """training_config holds the method's TRL config keys (SFTConfig, DPOConfig, ORPOConfig: all TrainingArguments),
    checked by name and by the resolved type of each field (phitune.config.types)."""
    if values is None:
        return {}
    config_class = training_config_class(method)
    if not isinstance(values, dict):
        problems.append(f"training_config must be a mapping of {config_class.__name__} keys")
        return {}
    valid = field_types(config_class)
    values = dict(values)
    for old, new in RENAMED_TRAINING_KEYS.items():
        if old in values and old not in valid:
            if new in values:
                problems.append(f"training_config sets both {old} and {new}; keep {new}")
            values[new] = values.pop(old)
    for key in values:
        if key in MANAGED_TRAINING_KEYS:
            problems.append(f"training_config.{key} is set through {MANAGED_TRAINING_KEYS[key]}")
        elif key not in valid:
            problems.append(f"unknown key training_config.{key}{did_you_mean(key, valid)}")
        else:
            values[key] = yaml_value(values[key], valid[key])  # `save_strategy: no` is the choice "no"
            problem = check_value("training_config", key, values[key], valid[key])
            if problem:  # SFTConfig itself accepts `max_steps: ten`
                problems.append(problem)
    _check_training_ranges(values, problems)
    return dict(values)


# Counts that must be at least 1: transformers fails on a batch size of 0 only once the model has loaded.
POSITIVE_TRAINING_INTS = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
# Intervals in steps (a float below 1 is a fraction of the run), checked where their strategy uses them.
STEP_INTERVALS = {"save_steps": "save_strategy", "eval_steps": "eval_strategy", "logging_steps": "logging_strategy"}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_training_ranges(values: dict, problems: list[str]) -> None:
    """Ranges TrainingArguments accepts but that make no sense: a negative epoch count trains 0 steps and exits 0,
    leaving an untrained adapter marked complete; a batch size of 0 fails only after the model has loaded."""
    def bad(key, test) -> bool:
        return _number(values.get(key)) and test(values[key])

    for key in POSITIVE_TRAINING_INTS:
        if bad(key, lambda v: v < 1):
            problems.append(f"training_config.{key} must be at least 1, got {values[key]!r}")
    if bad("num_train_epochs", lambda v: v < 0):
        problems.append(f"training_config.num_train_epochs must be positive, got {values['num_train_epochs']!r}")
    if bad("max_steps", lambda v: v == 0 or v < -1):  # transformers 5 trains max_steps 0 as zero steps
        problems.append(f"training_config.max_steps must be a positive number of steps, or -1 to train "
                        f"num_train_epochs; got {values['max_steps']!r}")
    elif values.get("num_train_epochs") == 0 and not bad("max_steps", lambda v: v > 0):
        problems.append("training_config.num_train_epochs is 0 and max_steps is not set: the run would train "
                        "nothing; set max_steps or num_train_epochs above 0")
    if bad("learning_rate", lambda v: v <= 0):
        problems.append(f"training_config.learning_rate must be positive, got {values['learning_rate']!r}")
    if bad("warmup_steps", lambda v: v < 0):
        problems.append(f"training_config.warmup_steps must be 0 or more, got {values['warmup_steps']!r}")
    for key, strategy in STEP_INTERVALS.items():
        if values.get(strategy, "steps") == "steps" and bad(key, lambda v: v <= 0):
            problems.append(f"training_config.{key} must be positive (steps, or a fraction of the run below 1), "
                            f"got {values[key]!r}")


def _validate_peft(raw: dict, problems: list[str]) -> dict | None:
    """peft_config holds peft.LoraConfig keys plus `backend`; null or absent means full fine-tuning."""
    values = raw.get("peft_config")
    if values is None:
        return None
    if not isinstance(values, dict):
        problems.append("peft_config must be a mapping of LoraConfig keys, or null for full fine-tuning")
        return None
    from peft import LoraConfig

    types = field_types(LoraConfig)
    values = {key: yaml_value(value, types[key]) if key in types else value for key, value in values.items()}
    _check_keys(values, {*types, "backend"}, "peft_config", problems)
    for key, value in values.items():
        if key in types and key not in ("r", "lora_alpha", "lora_dropout"):  # these three: range checks below
            problem = check_value("peft_config", key, value, types[key])
            if problem:
                problems.append(problem)
    backend = values.get("backend", "peft")
    if backend not in PEFT_BACKENDS:
        problems.append(f"peft_config.backend must be one of {', '.join(PEFT_BACKENDS)}, got {backend!r}"
                        f"{did_you_mean(backend, PEFT_BACKENDS)}")
    for key in ("r", "lora_alpha"):
        if key in values and (not isinstance(values[key], int) or isinstance(values[key], bool) or values[key] <= 0):
            problems.append(f"peft_config.{key} must be a positive integer, got {values[key]!r}")
    dropout = values.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        problems.append(f"peft_config.lora_dropout must be a number in [0, 1), got {dropout!r}")
    return dict(values)


def _listed(data: DataConfig) -> list:
    return [*(data.train if isinstance(data.train, list) else []), *(data.eval if isinstance(data.eval, list) else [])]


def _check_values(data: DataConfig, problems: list[str]) -> None:
    if data.train is None:
        problems.append("data.train is required (a local file or a hub dataset name)")
    for key, mixing in (("train", True), ("eval", False)):
        if isinstance(getattr(data, key), list):
            parse_sources(getattr(data, key), f"data.{key}", problems, mixing=mixing)
    if isinstance(data.train, list) and (data.subset or data.data_dir or data.data_files):
        problems.append("data.subset, data_dir and data_files apply to a single data.train; with a list, give each "
                        "source its own")
    if not 0 <= data.eval_split < 1:
        problems.append(f"data.eval_split must be in [0, 1), got {data.eval_split}")
    if isinstance(data.max_audio_seconds, (int, float)) and not data.max_audio_seconds > 0:
        problems.append(f"data.max_audio_seconds must be above 0, got {data.max_audio_seconds}")
    if isinstance(data.max_seq_length, int) and data.max_seq_length < 8:
        problems.append(f"data.max_seq_length must be at least 8, got {data.max_seq_length}")
    for key in ("max_train_examples", "max_eval_examples", "num_proc"):
        value = getattr(data, key)
        if isinstance(value, int) and value < 1:  # a cap of -1 would silently drop the last row (a slice)
            problems.append(f"data.{key} must be at least 1 (or null for no limit), got {value}")


def _check_streaming(data: DataConfig, training: dict, method: str, problems: list[str]) -> None:
    """data.streaming: a stream has no length, so the run's length is max_steps; only SFT (chats and raw text)
    reads its rows through phitune's own encoding, a batch at a time (DPO, ORPO, GRPO and vision hand whole sets to
    TRL's trainers, which prepare them whole)."""
    if not data.streaming:
        return
    if method != "sft":
        problems.append(f"data.streaming applies to method: sft (chats and raw text), not {method}: its rows are "
                        "prepared whole by TRL; leave streaming off")
    steps = training.get("max_steps")
    if not (_number(steps) and steps > 0):
        problems.append("data.streaming needs training_config.max_steps (a stream has no length, so no epoch "
                        "count can say when to stop)")
    for path in source_paths(data.train):
        if str(path).lower().endswith(".json"):
            problems.append(f"data.streaming reads .jsonl, .csv, .parquet, .txt or a hub dataset; {path} is one JSON "
                            "value, read whole (write it as one JSON object per line to stream it)")
    if isinstance(data.eval, list):
        problems.append("data.streaming reads data.eval as one source (a path or hub dataset), not a list")
    for index, entry in enumerate(data.train if isinstance(data.train, list) else []):
        if isinstance(entry, dict) and entry.get("rows") is not None:
            problems.append(f"data.train[{index}]: a streamed source takes a weight, not rows (a count needs the "
                            "whole source's length; give every source a weight, or leave streaming off)")


def source_paths(train) -> list:
    """The paths data.train names: itself, or each source of a list."""
    if not isinstance(train, list):
        return [train] if train else []
    return [entry.get("path") if isinstance(entry, dict) else entry for entry in train]


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config (secrets removed, local paths absolute) next to the adapter, so every later command
    can rebuild the run from any working directory."""
    path.write_text(yaml.safe_dump(absolute_paths(cfg).to_dict(), sort_keys=False), encoding="utf-8")


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """A copy of `cfg` whose local paths (data files, cache, a local base model or starting adapter, output_dir) are
    absolute; hub names are kept as written. Relative paths mean relative to the current directory, as when typed."""
    def absolute(value: str | None, must_exist: bool = True) -> str | None:
        if value is None or (must_exist and not Path(value).exists()):
            return value
        return os.path.abspath(value)  # not resolve(): a path through a symlink stays the path the user chose

    def absolute_sources(value):
        if not isinstance(value, list):
            return absolute(value)
        return [dict(item, path=absolute(item.get("path"))) if isinstance(item, dict) else absolute(item)
                for item in value]

    data = dataclasses.replace(cfg.data, train=absolute_sources(cfg.data.train), eval=absolute_sources(cfg.data.eval),
                               cache_dir=absolute(cfg.data.cache_dir, must_exist=False))
    model = dataclasses.replace(cfg.model, name_or_path=absolute(cfg.model.name_or_path),
                                adapter=absolute(cfg.model.adapter))
    training = dict(cfg.training_config, output_dir=os.path.abspath(cfg.output_dir))
    rewards = [_absolute_reward_file(entry) for entry in cfg.rewards] if cfg.rewards is not None else None
    teacher = cfg.teacher and dataclasses.replace(cfg.teacher, name_or_path=absolute(cfg.teacher.name_or_path),
                                                  adapter=absolute(cfg.teacher.adapter))
    return dataclasses.replace(cfg, data=data, model=model, training_config=training, rewards=rewards,
                               teacher=teacher)


def _absolute_reward_file(entry: dict) -> dict:
    """A reward `function: path/to/file.py:name` with the file's path made absolute (a module name is kept)."""
    path, sep, name = str(entry.get("function", "")).rpartition(":")
    if not sep or not path.endswith(".py") or not Path(path).is_file():
        return dict(entry)
    return dict(entry, function=f"{os.path.abspath(path)}:{name}")


def load_run_config(output_dir: str | Path) -> RunConfig:
    """Read `phitune_config.yaml` from a finished run's output directory."""
    path = Path(output_dir) / "phitune_config.yaml"
    if not path.is_file():
        raise PhituneError(f"{output_dir} is not a phitune run directory (no phitune_config.yaml)")
    return load_config(path)
