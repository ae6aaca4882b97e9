"""Config loading: sections, overrides, validation that names the key and its closest valid spelling."""

from pathlib import Path

import pytest
import yaml

from phitune.config.schema import config_from_dict, load_config
from phitune.errors import PhituneError

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))
DEMO = Path(__file__).parents[1] / "src" / "phitune" / "assets" / "demo.yaml"


def minimal(**sections):
    raw = {"data": {"train": "train.jsonl"}}
    raw.update(sections)
    return raw


@pytest.mark.parametrize("path", EXAMPLES + [DEMO], ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.data.train


def test_shipped_lora_example_is_the_reference_recipe():
    cfg = load_config(Path(__file__).parents[1] / "examples" / "phi3-mini-4k-lora.yaml")
    assert cfg.model.name_or_path == "microsoft/Phi-3-mini-4k-instruct"
    assert cfg.peft_config == {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "bias": "none",
                               "task_type": "CAUSAL_LM", "target_modules": "all-linear"}
    t = cfg.training_config
    assert (t["lr_scheduler_type"], t["warmup_steps"], t["gradient_checkpointing"], t["bf16"]) == ("cosine", 0.2, True, True)
    assert t["learning_rate"] > 5e-6 and cfg.data.max_seq_length == 2048


def test_examples_open_with_the_command_that_runs_them():
    for path in EXAMPLES:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# phitune train ") or first.startswith("# accelerate launch"), path


def test_qlora_example_differs_from_lora_only_by_quantization():
    examples = Path(__file__).parents[1] / "examples"
    lora = yaml.safe_load((examples / "phi3-mini-4k-lora.yaml").read_text())
    qlora = yaml.safe_load((examples / "phi3-mini-4k-qlora.yaml").read_text())
    assert qlora["model"].pop("quantization")["load_in_4bit"] is True
    qlora["training_config"].pop("output_dir"), lora["training_config"].pop("output_dir")
    assert qlora == lora


def test_unknown_keys_are_named_with_a_suggestion():
    raw = minimal(training_config={"learning_rte": 1e-4}, peft_config={"lora_alpah": 16})
    with pytest.raises(PhituneError) as err:
        config_from_dict(raw)
    message = str(err.value)
    assert "training_config.learning_rte (did you mean 'learning_rate'?)" in message
    assert "peft_config.lora_alpah (did you mean 'lora_alpha'?)" in message


def test_every_problem_is_reported_at_once():
    raw = {"modle": {}, "data": {"max_seq_length": "long"}, "peft_config": {"r": 0}}
    with pytest.raises(PhituneError) as err:
        config_from_dict(raw)
    message = str(err.value)
    for part in ("unknown top-level key modle (did you mean 'model'?)", "data.max_seq_length must be int",
                 "peft_config.r",
                 "data.train is required"):
        assert part in message


def test_wrong_types_and_enum_values():
    raw = minimal(model={"trust_remote_code": "yes", "attn_implementation": "flash"}, data={"train": "x.jsonl",
                                                                                            "train_on": "assistants"})
    with pytest.raises(PhituneError) as err:
        config_from_dict(raw)
    message = str(err.value)
    assert "model.trust_remote_code must be bool" in message
    assert "data.train_on must be one of assistant, answer, all, got 'assistants' (did you mean 'assistant'?)" in message


def test_keys_phitune_owns_are_redirected():
    with pytest.raises(PhituneError, match="training_config.max_length is set through data.max_seq_length"):
        config_from_dict(minimal(training_config={"max_length": 512}))


def test_overrides_apply_after_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal(training_config={"learning_rate": 1e-4})))
    cfg = load_config(path, ["training_config.learning_rate=3e-4", "peft_config.r=4", "data.train_on=all"])
    assert cfg.training_config["learning_rate"] == 3e-4
    assert cfg.peft_config == {"r": 4} and cfg.data.train_on == "all"
    with pytest.raises(PhituneError, match="expected section.key=value"):
        load_config(path, ["learning_rate=1"])
    assert load_config(path, ["method=orpo", "peft_config.r=8"]).method == "orpo"  # the one top-level key


@pytest.mark.parametrize("override", ["rewards=[{name: answer}]", "rewards.0.weight=2"])
def test_rewards_cannot_be_overridden_and_the_line_says_to_edit_the_yaml(override):
    example = Path(__file__).parents[1] / "examples" / "tiny-phi3-grpo.yaml"
    with pytest.raises(PhituneError) as err:
        load_config(example, [override])
    assert str(err.value) == f"--set {override!r}: rewards cannot be set with --set; edit the YAML's rewards: section"


def test_an_override_that_is_not_yaml_is_one_line_naming_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    with pytest.raises(PhituneError) as err:
        load_config(path, ["data.max_seq_length=[1"])
    message = str(err.value)
    assert message.startswith("--set 'data.max_seq_length=[1': the value is not valid YAML") and "\n" not in message


@pytest.mark.parametrize("settings, expected", [
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be at least 1, got 0"),
    ({"per_device_eval_batch_size": -2}, "per_device_eval_batch_size must be at least 1"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be at least 1"),
    ({"num_train_epochs": -1}, "num_train_epochs must be positive, got -1"),
    ({"num_train_epochs": 0}, "the run would train nothing"),
    ({"num_train_epochs": 0, "max_steps": 0}, "max_steps must be a positive number of steps, or -1"),
    ({"max_steps": 0}, "max_steps must be a positive number of steps"),
    ({"learning_rate": -1e-4}, "learning_rate must be positive"),
    ({"warmup_steps": -5}, "warmup_steps must be 0 or more"),
    ({"save_steps": 0}, "save_steps must be positive"),
    ({"eval_steps": -1}, "eval_steps must be positive"),
    ({"logging_steps": 0}, "logging_steps must be positive"),
])
def test_ranges_that_train_nothing_or_fail_late_are_rejected(settings, expected):
    with pytest.raises(PhituneError, match="invalid config: .*" + expected):
        config_from_dict(minimal(training_config=settings))


def test_ranges_are_checked_where_they_are_used_and_reported_at_once():
    config_from_dict(minimal(training_config={"save_strategy": "no", "save_steps": 0, "num_train_epochs": 0,
                                              "max_steps": 5, "warmup_steps": 0.1, "logging_steps": 0.5}))
    with pytest.raises(PhituneError) as err:
        config_from_dict(minimal(training_config={"per_device_train_batch_size": 0, "num_train_epochs": -1},
                                 data={"train": "t.jsonl", "max_train_examples": -1}, method="dpo"))
    message = str(err.value)
    for part in ("per_device_train_batch_size must be at least 1", "num_train_epochs must be positive",
                 "data.max_train_examples must be at least 1"):
        assert part in message


def test_no_peft_config_means_full_fine_tuning():
    assert config_from_dict(minimal()).backend == "full"
    assert config_from_dict(minimal(peft_config={"r": 8})).backend == "peft"
    assert config_from_dict(minimal(peft_config={"backend": "loralib"})).backend == "loralib"


def test_warmup_ratio_maps_to_transformers_5_warmup_steps():
    cfg = config_from_dict(minimal(training_config={"warmup_ratio": 0.2}))
    assert cfg.training_config == {"warmup_steps": 0.2}


def test_secrets_never_reach_the_saved_config():
    cfg = config_from_dict(minimal(training_config={"hub_token": "hf_secret", "seed": 1}))
    assert "hub_token" not in cfg.to_dict()["training_config"]
    assert "hf_secret" not in yaml.safe_dump(cfg.to_dict())


def _checked_config_classes():
    from peft import LoraConfig

    from phitune.config.schema import DataConfig, ModelConfig, SpeedConfig, training_config_class

    trl_classes = [training_config_class(method)
                   for method in ("sft", "dpo", "orpo", "simpo", "kto", "reward", "distill")]
    return [ModelConfig, DataConfig, SpeedConfig, LoraConfig, *trl_classes]


def test_every_field_type_of_every_checked_config_is_understood():
    """A TRL, PEFT or transformers release that changes an annotation into a kind the checker does not know fails
    here, loudly, instead of silently switching that field's check off."""
    import dataclasses
    import typing

    from phitune.config.types import understood

    unknown = []
    for cls in _checked_config_classes():
        hints = typing.get_type_hints(cls)  # must resolve: the checker reads real types, never annotation text
        fields = dataclasses.fields(cls)
        assert fields and all(f.name in hints for f in fields), cls
        unknown += [f"{cls.__name__}.{f.name}: {hints[f.name]}" for f in fields if not understood(hints[f.name])]
    assert not unknown, "annotations config_types.check_value cannot check:\n" + "\n".join(unknown)


def test_check_value_follows_the_resolved_type():
    import enum
    from typing import Any, Literal, Optional, Union

    from phitune.config.types import check_value, understood, yaml_value

    class Strategy(enum.Enum):
        NO = "no"
        STEPS = "steps"

    ok = [(int, 3), (float, 3), (float, 0.5), (bool, False), (str, "x"), (Optional[int], None), (int | None, 2),
          (dict, {}), (dict[str, Any], {"a": object()}), (list[str], ["a"]), (list[str], "a"), (Strategy, "steps"),
          (Union[Strategy, str], "steps"), (Union[Strategy, str], Strategy.NO), (Union[str, Literal["a"]], "any"),
          (Literal["a", "b"], "b"), (Union[bool, Literal["pissa"]], True),
          (Union[str, None, Literal[False]], False), (Optional[list[tuple[int, int]]], [[1, 2]]), (Any, object())]
    for type_, value in ok:
        assert check_value("s", "k", value, type_) is None, (type_, value)
    bad = [(int, True, "s.k must be int, got True"), (int, 1.5, "must be int"), (float, "fast", "must be a number"),
           (bool, "yes", "must be bool"), (str, 1, "must be str"), (int, None, "must be int, got None"),
           (dict | None, [1], "must be a mapping"), (list[str], [1], "must be a list of str"),
           (Literal[False], 0, "must be one of False"),
           (Strategy, "step", "s.k must be one of no, steps, got 'step' (did you mean 'steps'?)"),
           (Union[Strategy, str, None], "step", "s.k must be one of no, steps, got 'step' (did you mean 'steps'?)"),
           (Literal["assistant", "all"], "assistants", "must be one of assistant, all, got 'assistants' (did you "
                                                       "mean 'assistant'?)")]
    for type_, value, words in bad:
        assert words in (check_value("s", "k", value, type_) or ""), (type_, value)
    assert yaml_value(False, Union[Strategy, str]) == "no" and yaml_value(False, Literal["auto", "false"]) == "false"
    assert yaml_value(False, Union[bool, str]) is False
    assert not understood(set[int]) and not understood(Optional[typing_callable()])


def typing_callable():
    from collections.abc import Callable

    return Callable[[int], int]


def test_a_string_for_an_enum_field_is_one_of_its_values_as_the_library_itself_requires():
    """`lr_scheduler_type: SchedulerType | str`: a typo is caught when the YAML is read (with a suggestion), not by
    SFTConfig after the data has been prepared. That is only right while the library rejects the same strings, so every
    such field of every config class phitune checks is built here with a string that is not a member."""
    from phitune.config.types import _string_names_enum, field_types

    checked = []
    for cls in _checked_config_classes():
        if cls.__module__.startswith("phitune"):  # phitune's own sections use Literal choices only
            continue
        types = field_types(cls)
        kwargs = {"output_dir": "unused"} if "output_dir" in types else {}
        for name, type_ in types.items():
            if not _string_names_enum(type_) or name == "peft_type":  # LoraConfig overwrites peft_type with LORA
                continue
            with pytest.raises(ValueError):
                cls(**kwargs, **{name: "not-a-member"})
            checked.append(f"{cls.__name__}.{name}")
    assert {"SFTConfig.lr_scheduler_type", "SFTConfig.optim", "DPOConfig.save_strategy",
            "LoraConfig.task_type"} <= set(checked)

    with pytest.raises(PhituneError) as err:
        config_from_dict(minimal(training_config={"lr_scheduler_type": "cosin", "optim": "adamw_torh",
                                                  "eval_strategy": "step"}, peft_config={"task_type": "CASUAL_LM"}))
    message = str(err.value)
    for part in ("training_config.lr_scheduler_type must be one of linear, cosine,", "got 'cosin' (did you mean "
                 "'cosine'?)", "got 'adamw_torh' (did you mean 'adamw_torch'?)", "got 'step' (did you mean 'steps'?)",
                 "peft_config.task_type must be one of", "got 'CASUAL_LM' (did you mean 'CAUSAL_LM'?)"):
        assert part in message
    cfg = config_from_dict(minimal(training_config={"lr_scheduler_type": "cosine", "optim": "adamw_torch"},
                                   peft_config={"task_type": "CAUSAL_LM"}))
    assert cfg.training_config["lr_scheduler_type"] == "cosine" and cfg.peft_config["task_type"] == "CAUSAL_LM"


def test_yaml_no_and_false_become_the_choice_they_spell():
    cfg = config_from_dict(minimal(training_config={"save_strategy": False, "eval_strategy": False},
                                   speed={"liger": False, "padding_free": True}))
    assert cfg.training_config == {"save_strategy": "no", "eval_strategy": "no"}
    assert (cfg.speed.liger, cfg.speed.padding_free) == ("false", "true")


def test_every_training_and_peft_value_is_type_checked():
    raw = minimal(training_config={"report_to": 5, "gradient_checkpointing": "on", "max_steps": 1.5,
                                   "save_strategy": "no", "logging_steps": 10},
                  peft_config={"bias": "nonee", "target_modules": 5, "use_rslora": "yes", "r": 0,
                               "lora_dropout": 1.5, "backend": "loralb"})
    with pytest.raises(PhituneError) as err:
        config_from_dict(raw)
    message = str(err.value)
    for part in ("training_config.report_to must be", "training_config.gradient_checkpointing must be bool",
                 "training_config.max_steps must be int, got 1.5",
                 "peft_config.bias must be one of none, all, lora_only, got 'nonee' (did you mean 'none'?)",
                 "peft_config.target_modules must be", "peft_config.use_rslora must be bool",
                 "peft_config.r must be a positive integer, got 0",
                 "peft_config.lora_dropout must be a number in [0, 1), got 1.5",
                 "peft_config.backend must be one of peft, loralib, got 'loralb' (did you mean 'loralib'?)"):
        assert part in message
    assert "save_strategy" not in message and "logging_steps" not in message
    assert message.count("peft_config.r ") == 1  # r, lora_alpha, lora_dropout keep their own range messages only
