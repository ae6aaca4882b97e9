"""Config loading: sections, overrides, validation that names the key and its closest valid spelling."""

from pathlib import Path

import pytest
import yaml

from phitune.config import config_from_dict, load_config
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
    for part in ("config.modle (did you mean 'model'?)", "data.max_seq_length must be int", "peft_config.r",
                 "data.train is required"):
        assert part in message


def test_wrong_types_and_enum_values():
    raw = minimal(model={"trust_remote_code": "yes", "attn_implementation": "flash"}, data={"train": "x.jsonl",
                                                                                            "train_on": "assistants"})
    with pytest.raises(PhituneError) as err:
        config_from_dict(raw)
    message = str(err.value)
    assert "model.trust_remote_code must be bool" in message
    assert "data.train_on must be one of assistant, all, got 'assistants' (did you mean 'assistant'?)" in message


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
