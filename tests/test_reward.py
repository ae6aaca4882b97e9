"""Reward models (method reward: phitune.recipes.reward, phitune.after.reward_model) on the bundled tiny Phi-3: a reward
model trained on the bundled preference pairs reaches held-out pairwise accuracy >= 0.9 from the untrained head's coin
flip; its adapter is a standard SEQ_CLS PEFT adapter (head in modules_to_save) that plain transformers + PEFT reload to
the same scores; `phitune eval` and the API agree with the CLI; a GRPO run driven by it (`rewards: [{model: RUN}]`)
raises its score, and `phitune eval` on that GRPO run reports it; SIGTERM, resume, the NaN guard and QLoRA hold;
configs, bad rows and misuse stop with one line; `phitune data` shows the pairs.

The bundled pairs (src/phitune/assets/demo_preference) suffice: the rejected answer is a curt non-answer or another
question's answer, which the pretrained tiny base tells apart after one epoch (90 steps of 8 pairs, about 5 s).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from phitune.config.schema import config_from_dict
from phitune.errors import PhituneError
from phitune.tiny.phi3 import ASSETS, tiny_base_path

PAIRS = ASSETS / "demo_preference"
PROMPTS = ASSETS / "demo_grpo"
RM_STEPS = 90  # one epoch of the 720 pairs at 8 a step: held-out accuracy 0.94 (0.52 untrained)


def reward_config(output_dir, **sections):
    raw = {
        "method": "reward",
        "model": {"name_or_path": str(tiny_base_path()), "torch_dtype": "float32"},
        "data": {"train": str(PAIRS / "train.jsonl"), "eval": str(PAIRS / "eval.jsonl"), "max_seq_length": 128},
        "training_config": {"output_dir": str(output_dir), "max_steps": RM_STEPS, "learning_rate": 5e-3,
                            "per_device_train_batch_size": 8, "logging_steps": 10, "save_steps": RM_STEPS,
                            "seed": 0, "disable_tqdm": True, "eval_strategy": "no"},
        "peft_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
    }
    for name, values in sections.items():
        raw[name] = values if values is None or not isinstance(raw.get(name), dict) else {**raw[name], **values}
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    from phitune.train import run_training

    cfg = reward_config(tmp_path_factory.mktemp("reward") / "rm")
    return cfg, run_training(cfg)


def plain_scores(run_dir, base, conversations: list[list[dict]]) -> list[float]:
    """Scores from transformers + PEFT alone, one conversation at a time (no padding), as a user would compute them."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(run_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(run_dir)).eval()
    scores = []
    with torch.no_grad():
        for messages in conversations:
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
            scores.append(model(input_ids=ids["input_ids"]).logits[0, 0].item())
    return scores


def test_a_reward_model_reaches_090_held_out_pairwise_accuracy_and_reloads_in_plain_peft(reward_run):
    from phitune.after.reward_model import load_reward_model
    from phitune.data.preference import load_preference_data

    cfg, result = reward_run
    out = result.output_dir
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "reward" and metrics["train_examples"] == 720 and metrics["eval_examples"] == 100
    assert metrics["pairwise_accuracy_after"] >= 0.9  # measured 0.94
    assert metrics["pairwise_accuracy_before"] < 0.7  # the untrained head: measured 0.52
    assert metrics["score_margin_after"] > metrics["score_margin_before"] + 1
    assert "eval_accuracy" in metrics and "eval_loss" in metrics  # TRL's own held-out metrics at the last step

    # A standard PEFT adapter: SEQ_CLS, LoRA on the layers and the trained head saved whole.
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and "score" in adapter_config["modules_to_save"]
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert [k for k in weights if k.endswith("score.weight")] and any("lora_B" in k for k in weights)

    # Plain transformers + PEFT give phitune's scores; phitune's batches (right-padded) give the unpadded ones.
    pairs = load_preference_data(cfg.data).eval[:12]
    conversations = [p.prompt + [{"role": "assistant", "content": text}] for p in pairs for text in (p.chosen,
                                                                                                      p.rejected)]
    plain = plain_scores(out, cfg.model.name_or_path, conversations)
    scorer = load_reward_model(out)
    prompts = [c[:-1] for c in conversations]
    answers = [c[-1]["content"] for c in conversations]
    assert scorer.score(prompts, answers, batch_size=8) == pytest.approx(plain, abs=1e-4)
    assert scorer.score(prompts, answers, batch_size=1) == pytest.approx(plain, abs=1e-4)


def test_phitune_eval_on_a_reward_run_scores_the_untrained_head_and_the_trained_model(reward_run, tmp_path):
    from typer.testing import CliRunner

    from phitune import api
    from phitune.cli import app

    _, result = reward_run
    report = api.evaluate(result.output_dir, output=tmp_path / "api")
    assert list(report.metrics) == ["untrained head", "fine-tuned"]
    for key in ("pairwise_accuracy", "score_margin"):  # the run's own before (seeded head) and after
        assert report.metrics["untrained head"][key] == pytest.approx(result.metrics[f"{key}_before"], abs=1e-4)
        assert report.metrics["fine-tuned"][key] == pytest.approx(result.metrics[f"{key}_after"], abs=1e-4)
    shown = CliRunner().invoke(app, ["eval", str(result.output_dir), "--output", str(tmp_path / "cli")])
    assert shown.exit_code == 0, shown.output
    assert "pairwise_accuracy" in shown.output and "100 held-out preference pairs" in shown.output
    by_cli = json.loads((tmp_path / "cli" / "eval.json").read_text())["metrics"]
    for model in by_cli:
        assert by_cli[model] == pytest.approx(report.metrics[model], abs=1e-6)


def test_grpo_driven_by_the_reward_model_raises_its_score_and_phitune_eval_reports_it(reward_run, tmp_path):
    """GRPO from a fresh adapter on the bundled prompts, its only reward the reward model. The tiny reward model is
    easy to please: within 20 steps the policy finds text it scores high ("5 5 5 ..."), which is reward hacking, not
    better answers; what this proves is that the reward model drives GRPO (docs/reward.md)."""
    from phitune.api import evaluate
    from phitune.train import run_training

    _, rm = reward_run
    cfg = config_from_dict({
        "method": "grpo",
        "model": {"name_or_path": str(tiny_base_path()), "torch_dtype": "float32"},
        "data": {"train": str(PROMPTS / "train.jsonl"), "eval": str(PROMPTS / "eval.jsonl"),
                 "max_eval_examples": 16, "max_seq_length": 128},
        "rewards": [{"model": str(rm.output_dir), "batch_size": 16}],
        "training_config": {"output_dir": str(tmp_path / "grpo"), "learning_rate": 1e-2,
                            "lr_scheduler_type": "constant", "max_steps": 20, "per_device_train_batch_size": 16,
                            "num_generations": 4, "max_completion_length": 16, "temperature": 1.0,
                            "logging_steps": 5, "save_steps": 20, "seed": 0, "disable_tqdm": True},
        "peft_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
    })
    result = run_training(cfg)
    metrics = result.metrics
    # measured -2.14 -> 3.92 (seed 0; 16 held-out prompts); asked: a rise of at least 1, a sixth of it
    assert metrics["reward_model_after"] > metrics["reward_model_before"] + 1
    logged = json.loads((result.output_dir / "checkpoint-20" / "trainer_state.json").read_text())["log_history"]
    assert any("rewards/model/mean" in entry for entry in logged)

    report = evaluate(result.output_dir, num_generate=16, max_new_tokens=16, output=tmp_path / "eval")
    assert report.metrics["base"]["reward_model"] == pytest.approx(metrics["reward_model_before"], abs=1e-4)
    assert report.metrics["fine-tuned"]["reward_model"] == pytest.approx(metrics["reward_model_after"], abs=1e-4)


def test_the_api_and_the_cli_train_a_reward_model_alike(tmp_path):
    from typer.testing import CliRunner

    from phitune import api
    from phitune.cli import app
    from phitune.config.schema import save_config

    cfg = reward_config(tmp_path / "api", data={"max_train_examples": 32, "max_eval_examples": 16},
                        training_config={"max_steps": 4, "save_steps": 4})
    save_config(cfg, tmp_path / "rm.yaml")
    by_api = api.train(cfg)
    shown = CliRunner().invoke(app, ["train", str(tmp_path / "rm.yaml"),
                                     "--set", f"training_config.output_dir={tmp_path / 'cli'}"])
    assert shown.exit_code == 0, shown.output
    by_cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    timings = {"train_runtime_s", "tokens_per_second"}
    assert {k: v for k, v in by_cli.items() if k not in timings} == pytest.approx(
        {k: v for k, v in by_api.metrics.items() if k not in timings}, abs=1e-5)
    assert by_api.metrics["score_margin_after"] != by_api.metrics["score_margin_before"]


def test_qlora_reward_trains_a_lora_adapter_and_its_head_over_a_4_bit_base(tmp_path):
    """The same quantization lines as SFT's QLoRA: the base loads in 4 bits (the head stays a plain layer), the
    adapter and the head train and are saved."""
    from phitune.train import run_training

    quant = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}
    cfg = reward_config(tmp_path / "qlora", model={"quantization": quant},
                        data={"eval": None, "eval_split": 0, "max_train_examples": 16},
                        training_config={"max_steps": 2, "save_steps": 2})
    result = run_training(cfg)
    inner = result.model.base_model.model
    assert type(inner.model.layers[0].self_attn.qkv_proj.base_layer).__name__ == "Linear4bit"
    adapter = load_file(str(result.output_dir / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at 0: it moved
    assert [k for k in adapter if k.endswith("score.weight")]


def test_a_nan_loss_stops_a_reward_run_and_keeps_the_last_good_checkpoint(tmp_path):
    from phitune.run.checkpoints import latest_complete_checkpoint
    from phitune.train import run_training

    cfg = reward_config(tmp_path / "nan", data={"eval": None, "eval_split": 0, "max_train_examples": 32},
                        training_config={"max_steps": 4, "save_steps": 1, "learning_rate": 1e30})
    with pytest.raises(PhituneError, match=r"^the loss became NaN or infinite at step \d; training stopped and the "
                                           r"last good checkpoint is"):
        run_training(cfg)
    good = latest_complete_checkpoint(tmp_path / "nan")
    assert good is not None
    assert all(torch.isfinite(t).all() for t in load_file(str(good / "adapter_model.safetensors")).values())


@pytest.mark.processes
def test_a_reward_run_killed_with_sigkill_resumes_to_the_uninterrupted_adapter(tmp_path):
    """A real `phitune train` held after step 2 and killed with SIGKILL, then `--resume`: 2 more logged steps, ending
    at the adapter (and head) of an uninterrupted run (test_reliability's launcher)."""
    from _resume import killed_and_resumed

    def config(name):
        return reward_config(tmp_path / name / "out", data={"eval": None, "eval_split": 0, "max_train_examples": 32},
                             training_config={"max_steps": 4, "save_steps": 2, "logging_steps": 1,
                                              "lr_scheduler_type": "constant", "save_total_limit": 10})

    resumed, uninterrupted = killed_and_resumed(config, tmp_path)
    assert any(k.endswith("score.weight") for k in uninterrupted)
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-7)


@pytest.mark.processes
def test_sigterm_stops_a_reward_run_with_a_checkpoint_and_exit_130(tmp_path):
    from _resume import assert_sigterm_stops_with_a_checkpoint

    cfg = reward_config(tmp_path / "out", data={"eval": None, "eval_split": 0},
                        training_config={"max_steps": 500, "save_steps": 1000, "logging_steps": 1})
    assert_sigterm_stops_with_a_checkpoint(cfg, tmp_path)


def test_reward_configs_are_checked_before_anything_loads(reward_run, tmp_path):
    base = {"method": "reward", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "peft_config": {"r": 8}}
    cfg = config_from_dict({**base, "training_config": {"center_rewards_coefficient": 0.01}})
    assert cfg.training_config["center_rewards_coefficient"] == 0.01
    with pytest.raises(PhituneError) as err:
        config_from_dict({**base, "model": {"name_or_path": "m", "adapter": "sft"},
                          "peft_config": {"task_type": "CAUSAL_LM"}, "data": {"train": "t.jsonl", "format": "messages"},
                          "training_config": {"center_reward_coefficient": 0.01}})
    message = str(err.value)
    assert "method reward trains a new reward head and adapter on the base; model.adapter" in message
    assert "peft_config.task_type must be SEQ_CLS (or left out), got 'CAUSAL_LM'" in message
    assert "method reward reads prompt/chosen/rejected rows; leave data.format at auto" in message
    assert "unknown key training_config.center_reward_coefficient (did you mean 'center_rewards_coefficient'?)" \
        in message

    # GRPO's {model: RUN}: a finished reward run, checked when the config loads
    _, rm = reward_run
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "phitune_config.yaml").write_text("method: sft\n")
    stopped = tmp_path / "stopped"  # a reward run before its first adapter: config saved, nothing trained yet
    stopped.mkdir()
    (stopped / "phitune_config.yaml").write_text((rm.output_dir / "phitune_config.yaml").read_text())
    grpo = {"method": "grpo", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "peft_config": {"r": 8}}
    assert config_from_dict({**grpo, "rewards": [{"model": str(rm.output_dir), "weight": 0.5}]}).rewards
    cases = {
        str(tmp_path / "nowhere"): f"rewards[0].model: {tmp_path / 'nowhere'} does not exist (train the reward model "
                                   "first",
        str(tmp_path): f"rewards[0].model: {tmp_path} is not a phitune run (no phitune_config.yaml)",
        str(sft): f"rewards[0].model: {sft} is a method sft run, not a reward model (method: reward)",
        str(stopped): f"rewards[0].model: {stopped} holds no adapter (adapter_config.json is missing): its training "
                      "has not finished",
    }
    for path, expected in cases.items():
        with pytest.raises(PhituneError, match="^invalid config: " + re.escape(expected)):
            config_from_dict({**grpo, "rewards": [{"model": path}]})
    with pytest.raises(PhituneError) as err:
        config_from_dict({**grpo, "rewards": [{"model": str(rm.output_dir), "batch_size": 0, "name": "answer",
                                               "bach_size": 2}]})
    assert "rewards[0] needs one of name" in str(err.value)
    with pytest.raises(PhituneError) as err:
        config_from_dict({**grpo, "rewards": [{"model": str(rm.output_dir), "batch_size": 0, "bach_size": 2}]})
    assert "rewards[0].batch_size must be a positive number of completions, got 0" in str(err.value)
    assert "unknown key rewards[0].bach_size (did you mean 'batch_size'?)" in str(err.value)


def test_long_pairs_stop_a_reward_run_with_one_line_or_are_skipped(tmp_path):
    from phitune.config.schema import save_config
    from phitune.train import run_training
    from test_errors import run_cli

    rows = [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "No."}] * 8
    rows.insert(3, {"prompt": "Hi?", "chosen": "Hello. " * 40, "rejected": "No."})  # past 48 tokens
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = reward_config(tmp_path / "out", data={"train": str(path), "eval": None, "eval_split": 0,
                                                "max_seq_length": 48},
                        training_config={"max_steps": 1, "save_steps": 1, "per_device_train_batch_size": 2})
    save_config(cfg, tmp_path / "rm.yaml")
    shown = run_cli(["train", str(tmp_path / "rm.yaml")], tmp_path)
    assert shown.returncode == 2 and not (tmp_path / "out").exists()
    lines = [line for line in shown.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and re.fullmatch(
        rf"error: {re.escape(str(path))}:4: the pair is \d+ tokens, longer than data.max_seq_length 48; raise "
        r"data.max_seq_length or set data.on_bad_row: skip", lines[0]), lines
    skipped = reward_config(tmp_path / "skip", data={"train": str(path), "eval": None, "eval_split": 0,
                                                     "max_seq_length": 48, "on_bad_row": "skip"},
                            training_config={"max_steps": 1, "save_steps": 1, "per_device_train_batch_size": 2})
    assert run_training(skipped).metrics["skipped_rows"] == 1


def test_phitune_data_shows_the_pairs_a_reward_model_reads_and_warns_of_long_ones(tmp_path):
    from phitune import api

    rows = [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "No."}] * 4 + [
        {"prompt": "Hi?", "chosen": "Hello. " * 40, "rejected": "No."},
        {"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."}]
    cfg = reward_config(tmp_path / "out", data={"train": str(write_jsonl(tmp_path / "p.jsonl", rows)), "eval": None,
                                                "eval_split": 0, "max_seq_length": 48})
    report = api.inspect_data(cfg, output=tmp_path)
    summary = report.summary()
    assert summary["train pairs"] == 6 and summary["pairs too long (train)"] == 1
    warnings = " | ".join(report.warnings)
    assert "train: 1 pairs are longer than max_seq_length 48; a reward model reads them whole" in warnings
    assert "1 pairs have chosen == rejected" in warnings
    text = "".join(piece for piece, _ in report.example)
    assert "[chosen]" in text and "[rejected]" in text


def test_commands_that_need_text_refuse_a_reward_model_with_one_line(reward_run, tmp_path):
    from phitune import api

    _, rm = reward_run
    expected = rf"^{re.escape(str(rm.output_dir))} is a reward model \(method reward\): it scores conversations and " \
               r"writes no text; use it as a GRPO reward"
    with pytest.raises(PhituneError, match=expected):
        api.merge(rm.output_dir, tmp_path / "merged")
    with pytest.raises(PhituneError, match=expected):
        api.generate(["Hi?"], rm.output_dir)
    assert not (tmp_path / "merged").exists()


def test_a_reward_model_reads_each_padded_row_at_its_own_last_token_whatever_the_config_names(tmp_path):
    """Real Phi-3 configs name `<|endoftext|>` as pad_token_id while phitune pads with `<unk>`; the score head finds
    each row's last token by config.pad_token_id. load_score_model sets it to the tokenizer's, so a right-padded
    batch scores each row as it scores alone; with the config's own id it would not (checked too, so this test can
    tell)."""
    import shutil

    from phitune.after.reward_model import score_sequences
    from phitune.config.schema import ModelConfig
    from phitune.data.preference import conversation_ids
    from phitune.models.loading import load_score_model, load_tokenizer

    base = tmp_path / "base"
    shutil.copytree(tiny_base_path(), base)
    config = json.loads((base / "config.json").read_text())
    cfg = ModelConfig(name_or_path=str(base), torch_dtype="float32")
    tokenizer = load_tokenizer(cfg)
    config["pad_token_id"] = tokenizer.eos_token_id  # as Phi-3-mini's config.json: 32000, <|endoftext|>
    (base / "config.json").write_text(json.dumps(config))
    model = load_score_model(cfg, tokenizer, seed=0)
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    sequences = [conversation_ids(tokenizer, [{"role": "user", "content": "Hi?"}], answer)
                 for answer in ("Hello there, how are you today?", "No.", "Yes, I am.")]
    alone = score_sequences(model, sequences, tokenizer.pad_token_id, batch_size=1)
    assert score_sequences(model, sequences, tokenizer.pad_token_id, batch_size=3) == pytest.approx(alone, abs=1e-5)
    model.config.pad_token_id = tokenizer.eos_token_id  # the config's own id: padded rows read at the wrong token
    assert score_sequences(model, sequences, tokenizer.pad_token_id, batch_size=3) != pytest.approx(alone, abs=1e-5)
