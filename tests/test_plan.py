"""phitune.run.plan: a run resolves the model's config.json and the speed switches once (SFT and DPO alike), and the
RunPlan it builds is what the model and the trainer actually got."""

from __future__ import annotations

import json

import pytest

import phitune.models.loading
import phitune.recipes.sft
import phitune.run.plan
import phitune.speed
import phitune.train
from phitune.config.schema import config_from_dict
from phitune.errors import PhituneError
from phitune.speed import CHECKPOINTED
from conftest import write_jsonl


@pytest.fixture
def counted(monkeypatch):
    """Count phitune's reads of config.json, speed resolutions and plans built; keep the plan and the trainer."""
    seen = {"load_model_config": 0, "resolve_speed": 0, "plans": [], "trainers": []}

    def counting(name, module):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            seen[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counting("load_model_config", phitune.models.loading)
    counting("resolve_speed", phitune.speed)
    real_plan, real_trainer = phitune.run.plan.plan_run, phitune.recipes.sft.build_trainer

    def plan_run(cfg):
        seen["plans"].append(real_plan(cfg))
        return seen["plans"][-1]

    def build_trainer(*args, **kwargs):
        seen["trainers"].append(real_trainer(*args, **kwargs))
        return seen["trainers"][-1]

    monkeypatch.setattr(phitune.run.plan, "plan_run", plan_run)
    monkeypatch.setattr(phitune.train, "plan_run", plan_run)
    monkeypatch.setattr(phitune.recipes.sft, "build_trainer", build_trainer)
    return seen


def test_sft_run_reads_the_model_config_and_resolves_speed_once(make_config, counted):
    cfg = make_config(data={"eval": None, "eval_split": 0.0, "max_train_examples": 16},
                      training_config={"max_steps": 1, "save_steps": 1},
                      peft_config={"target_modules": ["qkv_proj", "o_proj"]},  # checked against the layers
                      speed={"padding_free": "true"})  # off by default on a CPU: the plan must carry the override
    result = phitune.train.run_training(cfg)

    assert counted["load_model_config"] == 1
    assert counted["resolve_speed"] == 1
    [plan], [trainer] = counted["plans"], counted["trainers"]
    base = result.model.get_base_model()
    assert base.config._attn_implementation == plan.attn_implementation == "sdpa"
    assert next(base.parameters()).dtype == plan.dtype
    assert trainer.args.padding_free is plan.padding_free is True
    assert trainer.args.use_liger_kernel == plan.speed.liger
    assert trainer.args.activation_checkpointing == (plan.speed.activation in CHECKPOINTED)
    assert result.model.peft_config["default"].target_modules == set(plan.target_modules)
    assert plan.context == base.config.max_position_embeddings
    assert json.loads((result.output_dir / "metrics.json").read_text())["global_step"] == 1


def test_dpo_run_reads_the_model_config_and_resolves_speed_once(tiny_model_dir, tmp_path, counted):
    pairs = [{"prompt": f"Question {i}?", "chosen": "yes", "rejected": "no"} for i in range(8)]
    cfg = config_from_dict({
        "method": "dpo",
        "model": {"name_or_path": str(tiny_model_dir), "torch_dtype": "float32"},
        "data": {"train": str(write_jsonl(tmp_path / "pairs.jsonl", pairs)), "eval_split": 0.0,
                 "max_seq_length": 32},
        "training_config": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "per_device_train_batch_size": 4,
                            "save_steps": 1, "disable_tqdm": True, "eval_strategy": "no"},
        "peft_config": {"r": 4, "lora_alpha": 8, "target_modules": ["qkv_proj"]},
    })
    result = phitune.train.run_training(cfg)

    assert counted["load_model_config"] == 1
    assert counted["resolve_speed"] == 1
    [plan] = counted["plans"]
    base = result.model.get_base_model()
    assert base.config._attn_implementation == plan.attn_implementation
    assert next(base.parameters()).dtype == plan.dtype
    assert result.model.peft_config["default"].target_modules == set(plan.target_modules)


def test_plan_refuses_a_target_that_matches_nothing_before_any_weight_is_read(make_config, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(phitune.models.loading, "load_base_model", no_weights)
    with pytest.raises(PhituneError, match="'q_proj' matches nothing"):
        phitune.run.plan.plan_run(make_config(peft_config={"target_modules": ["q_proj"]}))


def test_on_cuda_auto_attention_is_flex_only_for_padding_free_sft(make_config, monkeypatch, tmp_path):
    """`attn_implementation: auto` on a CUDA machine without flash-attn: flex_attention for SFT's padding-free
    batches, sdpa for DPO, ORPO and distill (TRL pads their rows), with or without a starting adapter. The choice is made in
    plan_run before any weight is read, so the CUDA check can be stood in for on a CPU."""
    import importlib.util

    import torch

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else
                        real_find_spec(name, *a))
    speed = {"padding_free": "true", "liger": "false", "activation": "full"}
    sft = make_config(model={"attn_implementation": "auto"}, speed=speed)
    assert phitune.run.plan.plan_run(sft).attn_implementation == "flex_attention"
    for method in ("dpo", "orpo", "simpo", "kto"):
        fresh = dict(model={"attn_implementation": "auto"})
        from_sft = dict(model={"attn_implementation": "auto", "adapter": str(tmp_path)}, peft_config=None)
        for model in (fresh, from_sft):
            preference = make_config(method=method, speed=speed, **model,
                                     data={"eval": None, "max_train_examples": None, "max_eval_examples": None})
            assert phitune.run.plan.plan_run(preference).attn_implementation == "sdpa", (method, model)
    reward = make_config(method="reward", speed=speed, model={"attn_implementation": "auto"},
                         data={"eval": None, "max_train_examples": None, "max_eval_examples": None})
    assert phitune.run.plan.plan_run(reward).attn_implementation == "sdpa"  # padded chosen / rejected batches
    distill = make_config(method="distill", model={"attn_implementation": "auto"}, speed=speed,
                          teacher={"name_or_path": str(tmp_path)})
    assert phitune.run.plan.plan_run(distill).attn_implementation == "sdpa"  # GKD pads the rows as TRL collates them


@pytest.mark.parametrize(("shared", "warned"), [("True", True), ("False", False)])
def test_the_plan_warns_when_torchrun_restarts_would_reuse_the_first_attempts_store(make_config, monkeypatch, caplog,
                                                                                  shared, warned):
    """torchrun --max-restarts sets these for its workers. With the agent's store shared across attempts (the default
    of c10d rendezvous, always so with static rendezvous), both restarts of tests/test_distributed_resume.py's elastic
    run failed on the first attempt's addresses; TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (shared: False) made it pass."""
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", shared)
    phitune.run.plan.plan_run(make_config())
    said = "start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and --rdzv-backend c10d"
    assert (said in caplog.text) is warned
