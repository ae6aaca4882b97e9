"""GRPO (phitune.recipes.grpo, phitune.data.prompts) on the tiny Phi-3: a run through the shared lifecycle with
built-in and custom rewards, per-reward logs, held-out scores before and after, completions.jsonl, an adapter that
reloads in plain PEFT with the same scores, `phitune eval` and `phitune data` on prompt data, resume after a kill."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from phitune.config.schema import config_from_dict
from phitune.errors import PhituneError
from _resume import assert_resumed, assert_same_trained_adapter, watch_training
from conftest import write_jsonl

WORDS = ["red", "blue", "green", "black", "white", "brown"]
GRPO_LINE = re.compile(r"^step +\d+/\d+  reward ", re.M)  # a GRPO run's line per logging step leads with the reward
# A reward a user writes in their own file: the share of vowels among the completion's letters. Unlike the others on
# a random model (never the answer, always too long) it differs between the completions of a group, so the advantages,
# and the gradient, are not zero.
REWARD_FILE = '''
def vowel_share(prompts, completions, **columns):
    letters = [[ch for ch in c[-1]["content"].lower() if ch.isalpha()] for c in completions]
    return [sum(ch in "aeiou" for ch in chars) / max(len(chars), 1) for chars in letters]
'''


def make_prompts(n: int, offset: int = 0) -> list[dict]:
    return [{"prompt": f"Name colour number {i + offset}.", "answer": WORDS[(i + offset) % len(WORDS)],
             "topic": "colours"} for i in range(n)]


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    (folder / "my_rewards.py").write_text(REWARD_FILE, encoding="utf-8")
    return (write_jsonl(folder / "train.jsonl", make_prompts(16)), write_jsonl(folder / "eval.jsonl",
                                                                               make_prompts(6, 100)), folder)


def grpo_config(model_dir, prompt_files, output_dir, **sections):
    train, evals, folder = prompt_files
    raw = {
        "method": "grpo",
        "model": {"name_or_path": str(model_dir), "torch_dtype": "float32"},
        "data": {"train": str(train), "eval": str(evals), "max_seq_length": 64},
        "rewards": [{"name": "answer", "extract": "text"}, {"name": "length", "max_tokens": 4, "weight": 0.5},
                    {"function": f"{folder / 'my_rewards.py'}:vowel_share", "weight": 0.25}],
        "training_config": {"output_dir": str(output_dir), "max_steps": 4, "learning_rate": 1e-2,
                            "per_device_train_batch_size": 4, "num_generations": 4, "max_completion_length": 8,
                            "logging_steps": 1, "save_steps": 2, "seed": 0, "disable_tqdm": True},
        "peft_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"},
    }
    for name, values in sections.items():
        raw[name] = values if values is None or not isinstance(raw.get(name), dict) else {**raw[name], **values}
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def grpo_run(tiny_model_dir, prompt_files, tmp_path_factory):
    from phitune.train import run_training

    cfg = grpo_config(tiny_model_dir, prompt_files, tmp_path_factory.mktemp("grpo") / "run")
    return cfg, run_training(cfg)


def test_a_grpo_run_logs_each_reward_scores_held_out_prompts_and_reloads_in_plain_peft(grpo_run):
    from peft import PeftModel

    from phitune.after.rewards import build_rewards, score_completions
    from phitune.data.prompts import load_prompt_data
    from phitune.models.loading import load_base_model, load_tokenizer

    cfg, result = grpo_run
    out = result.output_dir
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "grpo" and metrics["global_step"] == 4 and metrics["data_format"] == "prompt (string)"
    for when in ("before", "after"):
        for key in ("reward_answer", "reward_length", "reward_vowel_share", "reward", "pass_rate"):
            assert 0 <= abs(metrics[f"{key}_{when}"]) <= 1 + 0.5 + 0.25, key
    logged = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert all(f"rewards/{name}/mean" in logged[0] for name in ("answer", "length", "vowel_share"))
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at 0: it trained
    assert (out / "phitune_config.yaml").is_file()

    completions = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(completions) == 6 and set(completions[0]) == {"prompt", "answer", "topic", "before", "after"}

    # Plain PEFT on the base gives the trained model's greedy completions, hence its scores.
    tokenizer = load_tokenizer(cfg.model)
    reloaded = PeftModel.from_pretrained(load_base_model(cfg.model, training=False), str(out))
    rows = load_prompt_data(cfg.data).eval
    scores, texts = score_completions(reloaded, tokenizer, rows, build_rewards(cfg.rewards), max_new_tokens=8)
    assert texts == [c["after"] for c in completions]
    assert scores["reward"] == pytest.approx(metrics["reward_after"], abs=1e-6)


def test_grpo_completions_end_at_the_end_of_turn_token(grpo_run, tiny_model_dir, prompt_files, tmp_path):
    """The trainer stops a completion at Phi-3's <|end|> as well as at eos: with <|end|> the only way to stop
    early, a model that says it first ends there instead of running to max_completion_length."""
    from phitune.models.loading import load_tokenizer
    from phitune.recipes import grpo
    from phitune.run.plan import plan_run

    cfg = grpo_config(tiny_model_dir, prompt_files, tmp_path / "run")
    tokenizer = load_tokenizer(cfg.model, padding_side="right")
    plan = plan_run(cfg)
    data = grpo.load_data(cfg, tokenizer, plan)
    model, peft_config = grpo.load_model(cfg, plan)
    trainer = grpo.make_trainer(cfg, model, tokenizer, data, peft_config, grpo.build_config(cfg, data, plan))
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end in trainer.eos_token_ids and tokenizer.eos_token_id in trainer.eos_token_ids
    assert end in trainer.generation_config.eos_token_id


def test_phitune_eval_on_a_grpo_run_scores_base_and_adapter(grpo_run, tmp_path):
    from typer.testing import CliRunner

    from phitune.cli import app

    _, result = grpo_run
    shown = CliRunner().invoke(app, ["eval", str(result.output_dir), "--output", str(tmp_path),
                                     "--max-new-tokens", "8"])
    assert shown.exit_code == 0, shown.output
    assert "6 held-out prompts (greedy)" in shown.output and "pass_rate" in shown.output
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report["metrics"]) == {"base", "fine-tuned"} and report["info"]["eval_examples"] == 6
    assert report["metrics"]["fine-tuned"]["reward"] == pytest.approx(result.metrics["reward_after"], abs=1e-6)
    assert report["metrics"]["base"]["reward_vowel_share"] == pytest.approx(
        result.metrics["reward_vowel_share_before"], abs=1e-6)


def test_resume_on_a_finished_grpo_run_says_it_is_complete_and_rewrites_nothing(grpo_run):
    """A finished run has checkpoints too: --resume must not restore the last one, re-score the held-out prompts and
    rewrite the adapter, metrics.json and completions.jsonl (it did, without a word)."""
    from phitune.train import run_training

    cfg, result = grpo_run
    before = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in result.output_dir.iterdir()
              if path.is_file()}
    assert {"metrics.json", "completions.jsonl", "adapter_model.safetensors"} <= before.keys()
    with pytest.raises(PhituneError, match=r"^--resume: the run in .* is already complete, nothing to resume; pass "
                                           r"--overwrite"):
        run_training(cfg, resume=True)
    assert {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in result.output_dir.iterdir()
            if path.is_file()} == before


def test_grpo_resume_after_a_kill_trains_only_the_remaining_steps(tiny_model_dir, prompt_files, tmp_path,
                                                                  monkeypatch):
    """Steps 3..4 only, from checkpoint-2's optimizer state, ending at the uninterrupted run's adapter (GRPO samples,
    and the sampling seed is restored from the checkpoint's RNG state)."""
    from phitune.train import run_training

    def run(name, steps, resume=False):
        cfg = grpo_config(tiny_model_dir, prompt_files, tmp_path / name, data={"eval": None, "eval_split": 0},
                          training_config={"max_steps": steps, "lr_scheduler_type": "constant"})
        return run_training(cfg, resume=resume).output_dir

    straight = run("straight", 4)
    runs = watch_training(monkeypatch)
    run("resumed", 2)
    resumed = run("resumed", 4, resume=True)
    assert_resumed(runs[-1], resumed / "checkpoint-2", max_steps=4)
    assert_same_trained_adapter(straight, resumed, rtol=1e-4, atol=1e-6)


@pytest.mark.processes
def test_a_grpo_run_killed_with_sigkill_resumes_with_only_the_remaining_steps(tiny_model_dir, prompt_files, tmp_path):
    """A real `phitune train` held after step 2 and killed with SIGKILL, then `--resume`: 2 more logged steps (not
    4), ending at the adapter of an uninterrupted run (test_reliability's launcher, GRPO config)."""
    from _resume import killed_and_resumed

    resumed, uninterrupted = killed_and_resumed(
        lambda name: grpo_config(tiny_model_dir, prompt_files, tmp_path / name / "out", data={"eval": None,
                                 "eval_split": 0}, training_config={"lr_scheduler_type": "constant",
                                                                    "save_total_limit": 10}), tmp_path, GRPO_LINE)
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-4, atol=1e-6)


@pytest.mark.processes
def test_sigterm_stops_a_grpo_run_with_a_checkpoint_and_exit_130(tiny_model_dir, prompt_files, tmp_path):
    from _resume import assert_sigterm_stops_with_a_checkpoint

    cfg = grpo_config(tiny_model_dir, prompt_files, tmp_path / "out", data={"eval": None, "eval_split": 0},
                      training_config={"max_steps": 500, "save_steps": 1000})
    assert_sigterm_stops_with_a_checkpoint(cfg, tmp_path, GRPO_LINE)


def test_qlora_grpo_trains_a_lora_adapter_over_a_4_bit_base(tiny_model_dir, prompt_files, tmp_path):
    """The same quantization lines as SFT's QLoRA: the base loads in 4 bits, the adapter trains and is saved."""
    from phitune.train import run_training

    quant = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}
    cfg = grpo_config(tiny_model_dir, prompt_files, tmp_path / "qlora", model={"quantization": quant},
                      data={"eval": None, "eval_split": 0}, training_config={"max_steps": 2, "save_steps": 2})
    result = run_training(cfg)
    assert type(result.model.base_model.model.model.layers[0].self_attn.qkv_proj.base_layer).__name__ == "Linear4bit"
    adapter = load_file(str(result.output_dir / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at 0: it moved


def test_a_nan_stops_grpo_and_keeps_the_last_good_checkpoint(tiny_model_dir, prompt_files, tmp_path):
    """learning_rate 1e30 blows the adapter up after one step; the next generation samples from non-finite
    probabilities or the loss is NaN: either way the run stops with one line and keeps checkpoint-1."""
    from phitune.run.checkpoints import latest_complete_checkpoint
    from phitune.train import run_training

    cfg = grpo_config(tiny_model_dir, prompt_files, tmp_path / "nan", data={"eval": None, "eval_split": 0},
                      training_config={"max_steps": 4, "save_steps": 1, "learning_rate": 1e30})
    with pytest.raises(PhituneError, match=r"^the loss became NaN or infinite at step \d(: sampling met non-finite "
                                           r"next-token probabilities)?; training stopped and the last good checkpoint "
                                           r"is"):
        run_training(cfg)
    good = latest_complete_checkpoint(tmp_path / "nan")
    assert good is not None
    assert all(torch.isfinite(t).all() for t in load_file(str(good / "adapter_model.safetensors")).values())


def test_bad_prompt_rows_and_a_failing_reward_stop_with_one_line(tiny_model_dir, prompt_files, tmp_path):
    from phitune.data.prompts import load_prompt_data
    from phitune.train import run_training

    rows = [{"prompt": "Hi?", "answer": "1"}, {"messages": [{"role": "user", "content": "A"},
                                                            {"role": "assistant", "content": "B"}]},
            {"prompt": " ", "answer": "2"}, {"prompt": [{"role": "user", "content": "Ok?"}], "answer": "3"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = config_from_dict({"method": "grpo", "model": {"name_or_path": "m"}, "peft_config": {"r": 4},
                            "data": {"train": str(path), "eval_split": 0}, "rewards": [{"name": "answer"}]}).data
    with pytest.raises(PhituneError, match=rf"^{path}:2: messages: the last message must be a user turn"):
        load_prompt_data(cfg)
    from dataclasses import replace

    data = load_prompt_data(replace(cfg, on_bad_row="skip"))
    assert [row.columns for row in data.train] == [{"answer": "1"}, {"answer": "3"}]
    assert [s.split(": ", 1)[0] for s in data.skipped] == [f"{path}:2", f"{path}:3"]

    gsm8k = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "2 + 2?", "answer": "4 #### 4"}, {"q": "x"}])
    templated = replace(cfg, train=str(gsm8k), prompt_template="{question}\nEnd with: The answer is N.",
                        on_bad_row="skip")
    data = load_prompt_data(templated)
    assert data.format == "prompt_template" and len(data.train) == 1
    assert data.train[0].prompt == [{"role": "user", "content": "2 + 2?\nEnd with: The answer is N."}]
    assert data.train[0].columns == {"question": "2 + 2?", "answer": "4 #### 4"}
    assert "names the column 'question', which this row lacks (it has q)" in data.skipped[0]
    with pytest.raises(PhituneError, match="data.prompt_template applies to method: grpo, not sft"):
        config_from_dict({"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl", "prompt_template": "{q}"}})

    broken = tmp_path / "broken.py"
    broken.write_text("def r(prompts, completions, **kw):\n    return [1 / 0 for _ in completions]\n")
    bad = grpo_config(tiny_model_dir, prompt_files, tmp_path / "bad", rewards=[{"function": f"{broken}:r"}],
                      data={"eval": None, "eval_split": 0})
    with pytest.raises(PhituneError, match=r"^reward r raised ZeroDivisionError: division by zero$"):
        run_training(bad)
    # one value whatever the count: the startup check passes it two completions, so this fails before the model loads
    (tmp_path / "short.py").write_text("def short(prompts, completions, **kw):\n    return [1.0]\n")
    short = grpo_config(tiny_model_dir, prompt_files, tmp_path / "short",
                        rewards=[{"function": f"{tmp_path / 'short.py'}:short"}], data={"eval": None, "eval_split": 0})
    with pytest.raises(PhituneError, match=r"^reward short returned 1 value for 2 completions; it must return one"):
        run_training(short)
    long_prompt = grpo_config(tiny_model_dir, prompt_files, tmp_path / "long", data={"max_seq_length": 12})
    with pytest.raises(PhituneError, match=r"train: .*train.jsonl:1: the prompt has \d+ tokens, over the budget of 4"):
        run_training(long_prompt)
    for name in ("bad", "short", "long"):  # all fail before training
        assert not (tmp_path / name).exists(), name


def test_phitune_data_shows_a_prompt_its_columns_and_warnings(tiny_model_dir, prompt_files, tmp_path):
    from phitune import api

    rows = make_prompts(5) + [{"prompt": "word " * 40}, {"prompt": ""}]
    cfg = grpo_config(tiny_model_dir, prompt_files, tmp_path / "out",
                      data={"train": str(write_jsonl(tmp_path / "p.jsonl", rows)), "eval": None, "eval_split": 0,
                            "max_seq_length": 40})
    report = api.inspect_data(cfg, output=tmp_path)
    summary = report.summary()
    assert summary["format"] == "prompt (string)" and summary["train prompts"] == 6
    assert summary["skipped rows"] == 1 and summary["columns for the rewards"] == "answer, topic"
    assert "prompt tokens min / median / max" in summary and report.histogram.is_file()
    assert summary["prompt budget (max_seq_length - max_completion_length)"] == 32
    text = "".join(piece for piece, _ in report.example)
    assert "<|user|>" in text and "Name colour number 0." in text and '"answer": "red"' in text
    warnings = " | ".join(report.warnings)
    assert "train: 1 prompts are longer than the prompt budget of 32 tokens" in warnings
    assert f"{tmp_path / 'p.jsonl'}:6" in warnings
    assert "1 rows lack the column 'answer' that a reward compares with" in warnings
    assert "1 malformed rows" in warnings and f"{tmp_path / 'p.jsonl'}:7" in warnings
