"""Distillation (phitune.recipes.distill, phitune.models.teacher) on the tiny Phi-3: the student's held-out KL to the
teacher falls further under distillation than under SFT on the same rows, with the same steps and seed; the teacher
runs once per batch and never trains; the adapter reloads in plain PEFT and merges; `phitune eval` and the API agree
with the CLI; a run killed with SIGKILL resumes to the uninterrupted adapter; SIGTERM saves and stops; a QLoRA
student with a 4-bit teacher, a teacher that is a run directory with an adapter, and the NaN guard hold; a teacher
with another tokenizer, and bad configs, stop with one line; `phitune data` shows the rows.

The teacher is the tiny Phi-3 after a full fine-tune (16 steps) on the demo chats: the same tokenizer as the student,
sharper distributions (held-out loss about 5.6 against the student's 10.4), reached by weights a LoRA adapter on the
student cannot copy.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import DEMO_DATA
from phitune.config.schema import config_from_dict
from phitune.errors import PhituneError

LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}


def run_config(model_dir, output_dir, method="sft", teacher=None, **sections):
    raw = {
        "method": method,
        "model": {"name_or_path": str(model_dir), "torch_dtype": "float32"},
        "data": {"train": str(DEMO_DATA / "train.jsonl"), "eval": str(DEMO_DATA / "eval.jsonl"), "max_seq_length": 128,
                 "max_train_examples": 64, "max_eval_examples": 16},
        "training_config": {"output_dir": str(output_dir), "max_steps": 8, "learning_rate": 2e-2,
                            "per_device_train_batch_size": 8, "logging_steps": 2, "save_steps": 8, "seed": 0,
                            "disable_tqdm": True, "eval_strategy": "no"},
        "peft_config": dict(LORA),
    }
    if teacher is not None:
        raw["teacher"] = {"name_or_path": str(teacher), "torch_dtype": "float32"}
    for name, values in sections.items():
        raw[name] = values if values is None or not isinstance(raw.get(name), dict) else {**raw[name], **values}
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir, tmp_path_factory):
    """A full fine-tune of the tiny Phi-3 on the demo chats: a phitune run directory that is itself the model."""
    from phitune.train import run_training

    out = tmp_path_factory.mktemp("teacher") / "run"
    run_training(run_config(tiny_model_dir, out, peft_config=None,
                            training_config={"max_steps": 16, "learning_rate": 1e-2, "max_grad_norm": 1.0}))
    return out


def teacher_forward_counter():
    """A global forward hook counting the calls of a whole causal LM without LoRA layers: the teacher (the student
    is the same architecture, with its adapter's layers inside)."""
    calls = []

    def hook(module, args, output):
        if type(module).__name__ == "Phi3ForCausalLM" and not any("lora_" in name for name, _ in
                                                                   module.named_parameters()):
            calls.append(module)

    return calls, torch.nn.modules.module.register_module_forward_hook(hook)


@pytest.fixture(scope="module")
def distill_run(tiny_model_dir, teacher_dir, tmp_path_factory):
    """8 steps of distillation (with TRL's held-out evaluation at the last step), and 8 steps of SFT on the same rows
    with the same seed; the teacher's forward passes counted during the distillation."""
    from phitune.train import run_training

    folder = tmp_path_factory.mktemp("distill")
    cfg = run_config(tiny_model_dir, folder / "distill", method="distill", teacher=teacher_dir,
                     training_config={"eval_strategy": "steps", "eval_steps": 8})
    calls, handle = teacher_forward_counter()
    try:
        result = run_training(cfg)
    finally:
        handle.remove()
    sft = run_training(run_config(tiny_model_dir, folder / "sft"))
    return cfg, result, sft, calls


def held_out_scores(cfg, adapter_dir) -> dict:
    """kl_to_teacher / loss of base + adapter against the run's teacher, loaded as plain PEFT and phitune's teacher."""
    from phitune.after.evaluate import distillation_metrics, eval_conversations, tokenize_eval_set
    from phitune.after.generate import load_for_inference
    from phitune.models.teacher import load_teacher

    model, tokenizer = load_for_inference(cfg.model, adapter_dir)
    held_out = tokenize_eval_set(eval_conversations(cfg.data, True), tokenizer, cfg.data)
    return distillation_metrics(model, load_teacher(cfg.teacher), held_out, tokenizer.pad_token_id)


def test_distillation_brings_the_held_out_kl_to_the_teacher_below_what_sft_on_the_same_rows_reaches(distill_run):
    cfg, result, sft, _ = distill_run
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    assert metrics["method"] == "distill" and metrics["teacher"] == cfg.teacher.name_or_path
    assert metrics["teacher_eval_loss"] < metrics["eval_loss_before"] - 3  # the teacher knows the data; the start not
    sft_kl = held_out_scores(cfg, sft.output_dir)["kl_to_teacher"]
    # measured over seeds 0, 1, 2: distill 2.068 / 2.068 / 2.067, SFT 2.082 / 2.083 / 2.084, from 2.190
    assert metrics["kl_to_teacher_after"] < metrics["kl_to_teacher_before"] - 0.08
    assert metrics["kl_to_teacher_after"] < sft_kl - 0.008
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]  # the data's own tokens: learned too
    # GKD's held-out loss at beta 0 is the same KL, averaged per batch rather than per token
    state = json.loads((result.output_dir / "checkpoint-8" / "trainer_state.json").read_text())
    trl_eval = [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry]
    assert trl_eval and trl_eval[-1] == pytest.approx(metrics["kl_to_teacher_after"], abs=0.01)


def test_the_teacher_runs_once_per_batch_and_never_trains(distill_run, teacher_dir):
    """8 training batches, TRL's evaluation at step 8 (16 held-out rows: 2 batches), and the held-out rows scored by
    the teacher before (its own loss, and the starting student's KL) and after: 8 + 2 + 2 x 3 forward passes of the
    teacher, no more; its files are as they were."""
    _, _, _, calls = distill_run
    assert len(calls) == 8 + 2 + 2 * 3
    assert len({id(teacher) for teacher in calls}) == 1
    assert all(not p.requires_grad for p in calls[0].parameters()) and not calls[0].training
    weights = load_file(str(teacher_dir / "model.safetensors"))
    assert all(torch.equal(weights[name], tensor) for name, tensor in calls[0].state_dict().items() if name in weights)


def test_the_distilled_adapter_is_a_plain_peft_adapter_that_reproduces_the_scores(distill_run):
    cfg, result, _, _ = distill_run
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert not (result.output_dir / "model.safetensors").exists()  # the teacher is never saved with the student
    scores = held_out_scores(cfg, result.output_dir)
    assert scores["kl_to_teacher"] == pytest.approx(result.metrics["kl_to_teacher_after"], abs=1e-4)
    assert scores["loss"] == pytest.approx(result.metrics["eval_loss_after"], abs=1e-4)


def test_a_distilled_adapter_merges_into_a_model_plain_transformers_scores_the_same(distill_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from phitune import api
    from phitune.after.evaluate import distillation_metrics, eval_conversations, tokenize_eval_set
    from phitune.models.loading import load_tokenizer
    from phitune.models.teacher import load_teacher

    cfg, result, _, _ = distill_run
    merged = api.merge(result.output_dir, tmp_path / "merged").output_dir
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    tokenizer = load_tokenizer(cfg.model)
    held_out = tokenize_eval_set(eval_conversations(cfg.data, True), tokenizer, cfg.data)
    scores = distillation_metrics(model, load_teacher(cfg.teacher), held_out, tokenizer.pad_token_id)
    assert scores["kl_to_teacher"] == pytest.approx(result.metrics["kl_to_teacher_after"], abs=1e-3)


def test_phitune_eval_on_a_distill_run_scores_base_tuned_and_teacher(distill_run, tmp_path):
    from typer.testing import CliRunner

    from phitune import api
    from phitune.cli import app

    _, result, _, _ = distill_run
    report = api.evaluate(result.output_dir, output=tmp_path / "api")
    assert list(report.metrics) == ["base", "fine-tuned", "teacher"]
    assert report.metrics["base"]["kl_to_teacher"] == pytest.approx(result.metrics["kl_to_teacher_before"], abs=1e-4)
    assert report.metrics["fine-tuned"]["kl_to_teacher"] == pytest.approx(result.metrics["kl_to_teacher_after"],
                                                                          abs=1e-4)
    assert report.metrics["teacher"]["kl_to_teacher"] == pytest.approx(0, abs=1e-6)
    assert report.metrics["teacher"]["eval_loss"] == pytest.approx(result.metrics["teacher_eval_loss"], abs=1e-4)
    shown = CliRunner().invoke(app, ["eval", str(result.output_dir), "--output", str(tmp_path / "cli")])
    assert shown.exit_code == 0, shown.output
    assert "kl_to_teacher" in shown.output and "16 held-out conversations" in shown.output
    by_cli = json.loads((tmp_path / "cli" / "eval.json").read_text())["metrics"]
    for model in by_cli:
        assert by_cli[model] == pytest.approx(report.metrics[model], abs=1e-6)


def test_the_api_and_the_cli_train_a_distill_run_alike(tiny_model_dir, teacher_dir, tmp_path):
    from typer.testing import CliRunner

    from phitune import api
    from phitune.cli import app
    from phitune.config.schema import save_config

    cfg = run_config(tiny_model_dir, tmp_path / "api", method="distill", teacher=teacher_dir,
                     training_config={"max_steps": 2, "save_steps": 2})
    save_config(cfg, tmp_path / "distill.yaml")
    by_api = api.train(cfg)
    shown = CliRunner().invoke(app, ["train", str(tmp_path / "distill.yaml"),
                                     "--set", f"training_config.output_dir={tmp_path / 'cli'}"])
    assert shown.exit_code == 0, shown.output
    by_cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    timings = {"train_runtime_s", "tokens_per_second"}
    assert {k: v for k, v in by_cli.items() if k not in timings} == pytest.approx(
        {k: v for k, v in by_api.metrics.items() if k not in timings}, abs=1e-5)
    assert "KL to the teacher (held out)" in shown.output


def test_a_teacher_run_with_an_adapter_and_a_4_bit_teacher_load_frozen(tiny_model_dir, tmp_path):
    """teacher.name_or_path a LoRA run directory: its base with its adapter merged, as plain PEFT computes it; with
    teacher.quantization the base is 4-bit and the adapter stays a PEFT layer over it."""
    from peft import PeftModel

    from phitune.config.schema import ModelConfig
    from phitune.models.loading import load_base_model
    from phitune.models.teacher import load_teacher
    from phitune.train import run_training

    lora_run = run_training(run_config(tiny_model_dir, tmp_path / "lora", data={"eval": None, "eval_split": 0},
                                       training_config={"max_steps": 2, "save_steps": 2})).output_dir
    teacher = load_teacher(ModelConfig(name_or_path=str(lora_run), torch_dtype="float32"))
    plain = PeftModel.from_pretrained(load_base_model(ModelConfig(name_or_path=str(tiny_model_dir),
                                                                  torch_dtype="float32"), training=False),
                                      str(lora_run)).eval()
    ids = torch.tensor([[1, 450, 3303, 338, 4996, 29889]])
    with torch.no_grad():
        torch.testing.assert_close(teacher(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    quant = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}
    four_bit = load_teacher(ModelConfig(name_or_path=str(lora_run), torch_dtype="float32", quantization=quant))
    layer = four_bit.base_model.model.model.layers[0].self_attn.qkv_proj
    assert type(layer.base_layer).__name__ == "Linear4bit"
    assert not any(p.requires_grad for p in four_bit.parameters())


def test_qlora_distillation_from_a_4_bit_teacher_trains(tiny_model_dir, teacher_dir, tmp_path):
    """The student's QLoRA lines (model.quantization) and the teacher's (teacher.quantization) are the same lines:
    both bases load in 4 bits, the student's adapter trains and its KL to the teacher falls."""
    from phitune.train import run_training

    quant = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}
    cfg = run_config(tiny_model_dir, tmp_path / "q", method="distill", teacher=teacher_dir,
                     model={"quantization": quant}, training_config={"max_steps": 2, "save_steps": 2})
    cfg.teacher.quantization = quant
    result = run_training(cfg)
    assert type(result.model.base_model.model.model.layers[0].self_attn.qkv_proj.base_layer).__name__ == "Linear4bit"
    assert result.metrics["kl_to_teacher_after"] < result.metrics["kl_to_teacher_before"]


def test_a_nan_loss_stops_distillation_and_keeps_the_last_good_checkpoint(tiny_model_dir, teacher_dir, tmp_path):
    from phitune.run.checkpoints import latest_complete_checkpoint
    from phitune.train import run_training

    cfg = run_config(tiny_model_dir, tmp_path / "nan", method="distill", teacher=teacher_dir,
                     data={"eval": None, "eval_split": 0},
                     training_config={"max_steps": 4, "save_steps": 1, "learning_rate": 1e30})
    with pytest.raises(PhituneError, match=r"^the loss became NaN or infinite at step \d; training stopped and the "
                                           r"last good checkpoint is"):
        run_training(cfg)
    good = latest_complete_checkpoint(tmp_path / "nan")
    assert good is not None
    assert all(torch.isfinite(t).all() for t in load_file(str(good / "adapter_model.safetensors")).values())


def test_a_teacher_with_another_tokenizer_stops_with_one_line_naming_both(tiny_model_dir, tmp_path):
    """The shipped tiny Phi-4-mini has its own tokenizer: refused before any weight loads or anything is written."""
    from phitune import api
    from phitune.config.schema import save_config
    from phitune.tiny.families import TINY_PHI4_MINI
    from test_errors import run_cli

    other = TINY_PHI4_MINI
    cfg = run_config(tiny_model_dir, tmp_path / "out", method="distill", teacher=other)
    save_config(cfg, tmp_path / "distill.yaml")
    shown = run_cli(["train", str(tmp_path / "distill.yaml")], tmp_path)
    assert shown.returncode == 2 and not (tmp_path / "out").exists()
    lines = [line for line in shown.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: method distill needs a teacher that shares the "
                                                   "student's tokenizer"), shown.stderr
    assert str(tiny_model_dir) in lines[0] and str(other) in lines[0]
    with pytest.raises(PhituneError, match="^method distill needs a teacher that shares the student's tokenizer"):
        api.inspect_data(cfg)  # `phitune data` says so too, before anyone trains


def test_distill_config_is_checked_before_anything_loads():
    base = {"method": "distill", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "peft_config": {"r": 8},
            "teacher": {"name_or_path": "big"}}
    cfg = config_from_dict({**base, "training_config": {"beta": 0.5}})
    assert cfg.teacher.name_or_path == "big" and cfg.to_dict()["teacher"]["name_or_path"] == "big"
    with pytest.raises(PhituneError) as err:
        config_from_dict({**base, "teacher": None, "training_config": {"lmbda": 0.5, "temperature": 0.9, "beta": 2,
                                                                       "betta": 1}})
    message = str(err.value)
    assert "method distill needs a teacher: {name_or_path:" in message
    assert "training_config.lmbda: method distill learns from the teacher's distributions on the data's own" in message
    assert "training_config.temperature: method distill" in message
    assert "training_config.beta must be in [0, 1]" in message
    assert "unknown key training_config.betta (did you mean 'beta'?)" in message
    with pytest.raises(PhituneError, match="teacher applies to method: distill, not sft"):
        config_from_dict({**base, "method": "sft"})
    with pytest.raises(PhituneError, match="teacher.name_or_path is required"):
        config_from_dict({**base, "teacher": {"torch_dtype": "float32"}})
    with pytest.raises(PhituneError, match="method distill trains a LoRA adapter on the student: add a peft_config"):
        config_from_dict({**base, "peft_config": None})
    config_from_dict({**base, "training_config": {"lmbda": 0, "seq_kd": False}})  # the off-policy values are fine


def test_a_teacher_that_is_not_there_is_named_as_the_teacher(tiny_model_dir, tmp_path):
    from phitune.config.schema import ModelConfig
    from phitune.models.loading import load_tokenizer
    from phitune.models.teacher import check_shared_vocabulary

    student = ModelConfig(name_or_path=str(tiny_model_dir))
    with pytest.raises(PhituneError, match=rf"^teacher: model path does not exist: {tmp_path / 'nope'}$"):
        check_shared_vocabulary(student, load_tokenizer(student), ModelConfig(name_or_path=str(tmp_path / "nope")))


def test_phitune_data_shows_the_chat_rows_a_student_distills_on(tiny_model_dir, teacher_dir, tmp_path):
    from phitune import api

    cfg = run_config(tiny_model_dir, tmp_path / "out", method="distill", teacher=teacher_dir)
    report = api.inspect_data(cfg, output=tmp_path)
    summary = report.summary()
    assert summary["format"] == "messages" and summary["train examples"] == 64
    text = "".join(piece for piece, _ in report.example)
    assert "<|assistant|>" in text and any(trained for _, trained in report.example)


@pytest.mark.processes
def test_a_distill_run_killed_with_sigkill_resumes_to_the_uninterrupted_adapter(tiny_model_dir, teacher_dir, tmp_path):
    """A real `phitune train` held after step 2 and killed with SIGKILL, then `--resume`: 2 more logged steps (not 4),
    ending at the adapter of an uninterrupted run (test_reliability's launcher, distill config)."""
    from _resume import killed_and_resumed

    def config(name):
        return run_config(tiny_model_dir, tmp_path / name / "out", method="distill", teacher=teacher_dir,
                          data={"eval": None, "eval_split": 0},
                          training_config={"max_steps": 4, "save_steps": 2, "logging_steps": 1,
                                           "lr_scheduler_type": "constant", "save_total_limit": 10})

    resumed, uninterrupted = killed_and_resumed(config, tmp_path)
    assert any(t.abs().sum() > 0 for k, t in uninterrupted.items() if "lora_B" in k)
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-7)


@pytest.mark.processes
def test_sigterm_stops_a_distill_run_with_a_checkpoint_and_exit_130(tiny_model_dir, teacher_dir, tmp_path):
    from _resume import assert_sigterm_stops_with_a_checkpoint

    cfg = run_config(tiny_model_dir, tmp_path / "out", method="distill", teacher=teacher_dir,
                     data={"eval": None, "eval_split": 0},
                     training_config={"max_steps": 500, "save_steps": 1000, "logging_steps": 1})
    assert_sigterm_stops_with_a_checkpoint(cfg, tmp_path)
