"""Preference tuning (phitune.recipes.preference, phitune.data.preference) on the tiny Phi-3: DPO makes held-out pairs
preferred, the adapter loads in plain PEFT, resume is exact, DPO starts from an SFT (QLoRA) adapter, ORPO trains,
SimPO trains through CPO's simpo loss and resumes exactly.

The pairs follow one rule a tiny model learns in a few steps: the chosen answer is a word from POSITIVE, the rejected
one a word from NEGATIVE; prompts and pairings differ between train and eval, so held-out accuracy measures the rule.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from phitune.config.schema import config_from_dict
from phitune.errors import PhituneError
from _resume import assert_resumed, assert_same_trained_adapter, watch_training
from conftest import write_jsonl

POSITIVE = ["yes", "good", "happy", "right", "hot", "big"]
NEGATIVE = ["no", "bad", "sad", "wrong", "cold", "small"]
NAMES = ["Anna", "Ben", "Carl", "Dora", "Emil", "Fay", "Gus", "Hana", "Ivo", "Jill", "Kai", "Lena"]
THINGS = ["tea", "bread", "a map", "the news", "a song", "rain", "the sea", "a book"]


def make_pairs(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"{rng.choice(NAMES)} asks about {rng.choice(THINGS)}.", "chosen": rng.choice(POSITIVE),
             "rejected": rng.choice(NEGATIVE)} for _ in range(n)]


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    return write_jsonl(folder / "train.jsonl", make_pairs(0, 64)), write_jsonl(folder / "eval.jsonl", make_pairs(1, 16))


def preference_config(model_dir, pair_files, output_dir, method="dpo", **sections):
    train, evals = pair_files
    raw = {
        "method": method,
        "model": {"name_or_path": str(model_dir), "torch_dtype": "float32"},
        "data": {"train": str(train), "eval": str(evals), "max_seq_length": 64},
        "training_config": {"output_dir": str(output_dir), "max_steps": 24, "learning_rate": 1e-2,
                            "per_device_train_batch_size": 4, "logging_steps": 4, "save_steps": 12, "seed": 0,
                            "disable_tqdm": True, "eval_strategy": "no"},
        "peft_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
    }
    for name, values in sections.items():
        raw[name] = values if values is None or not isinstance(raw.get(name), dict) else {**raw[name], **values}
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir, pair_files, tmp_path_factory):
    from phitune.train import run_training

    cfg = preference_config(tiny_model_dir, pair_files, tmp_path_factory.mktemp("dpo") / "run",
                            training_config={"eval_strategy": "steps", "eval_steps": 24})
    return cfg, run_training(cfg)


def test_dpo_makes_held_out_pairs_preferred_and_the_adapter_loads_in_plain_peft(dpo_run):
    from peft import PeftModel

    from phitune.data.preference import load_preference_data
    from phitune.models.loading import load_base_model, load_tokenizer
    from phitune.recipes.preference import score_pairs

    cfg, result = dpo_run
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    assert metrics["method"] == "dpo" and metrics["data_format"] == "preference (strings)"
    assert metrics["preference_accuracy_after"] >= 0.9
    assert metrics["preference_accuracy_after"] > metrics["preference_accuracy_before"]
    assert metrics["reward_margin_after"] > metrics["reward_margin_before"] + 2
    assert not (result.output_dir / "ref").exists()

    # Plain PEFT on the base reproduces the held-out scores of the trained model.
    pairs = load_preference_data(cfg.data).eval
    tokenizer = load_tokenizer(cfg.model)
    reloaded = PeftModel.from_pretrained(load_base_model(cfg.model, training=False), str(result.output_dir))
    scores = score_pairs(reloaded, tokenizer, pairs, cfg.data.max_seq_length)
    assert scores["preference_accuracy"] == metrics["preference_accuracy_after"]
    assert scores["reward_margin"] == pytest.approx(metrics["reward_margin_after"], abs=1e-3)


def test_dpo_scores_are_the_log_probabilities_trl_trains_on(dpo_run):
    """After training, phitune's mean answer log-probabilities equal those TRL's own evaluation logs for the same
    pairs; before, they equal the bare base's (a fresh adapter starts, and DPO's reference sits, at the base)."""
    from phitune.data.preference import load_preference_data
    from phitune.models.loading import load_base_model, load_tokenizer
    from phitune.recipes.preference import score_pairs

    cfg, result = dpo_run
    metrics = result.metrics
    assert metrics["eval_logps_chosen"] == pytest.approx(metrics["chosen_logp_after"], abs=1e-3)
    assert metrics["eval_logps_rejected"] == pytest.approx(metrics["rejected_logp_after"], abs=1e-3)
    assert metrics["eval_rewards_accuracies"] >= 0.9
    base = load_base_model(cfg.model, training=False)
    scores = score_pairs(base, load_tokenizer(cfg.model), load_preference_data(cfg.data).eval, 64)
    assert scores["chosen_logp"] == pytest.approx(metrics["chosen_logp_before"], abs=1e-4)
    assert scores["rejected_logp"] == pytest.approx(metrics["rejected_logp_before"], abs=1e-4)


def test_phitune_eval_on_a_dpo_run_reports_preference_accuracy(dpo_run, tmp_path):
    from phitune.after.evaluate import evaluation_data
    from phitune.after.generate import resolve_model_source
    from phitune.recipes.preference import run_preference_evaluation

    _, result = dpo_run
    model_cfg, adapter = resolve_model_source(result.output_dir)
    data_cfg, _ = evaluation_data(result.output_dir, None)
    report = run_preference_evaluation(model_cfg, adapter, data_cfg, tmp_path)
    assert set(report.metrics) == {"base", "fine-tuned"}
    assert report.metrics["fine-tuned"]["preference_accuracy"] == result.metrics["preference_accuracy_after"]
    assert report.metrics["base"]["reward_margin"] == pytest.approx(result.metrics["reward_margin_before"], abs=1e-3)
    assert json.loads((tmp_path / "eval.json").read_text())["info"]["eval_examples"] == 16

    from typer.testing import CliRunner

    from phitune.cli import app

    shown = CliRunner().invoke(app, ["eval", str(result.output_dir), "--output", str(tmp_path / "cli")])
    assert shown.exit_code == 0, shown.output
    assert "preference_accuracy" in shown.output and "16 held-out preference pairs" in shown.output


def test_the_api_and_the_cli_train_and_evaluate_a_dpo_run_alike(tiny_model_dir, pair_files, tmp_path):
    """phitune.api promises the CLI's results: `api.train` and `phitune train` on one DPO config write the same
    metrics, and `api.evaluate` and `phitune eval` on the run the same preference scores (not SFT's)."""
    from typer.testing import CliRunner

    from phitune import api
    from phitune.cli import app
    from phitune.config.schema import save_config

    cfg = preference_config(tiny_model_dir, pair_files, tmp_path / "api", training_config={"max_steps": 4})
    save_config(cfg, tmp_path / "dpo.yaml")
    by_api = api.train(cfg)
    shown = CliRunner().invoke(app, ["train", str(tmp_path / "dpo.yaml"),
                                     "--set", f"training_config.output_dir={tmp_path / 'cli'}"])
    assert shown.exit_code == 0, shown.output
    by_cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    timings = {"train_runtime_s", "tokens_per_second"}
    assert {k: v for k, v in by_cli.items() if k not in timings} == pytest.approx(
        {k: v for k, v in by_api.metrics.items() if k not in timings}, abs=1e-5)

    evaluated = api.evaluate(by_api.output_dir, output=tmp_path / "api-eval")
    shown = CliRunner().invoke(app, ["eval", str(by_api.output_dir), "--output", str(tmp_path / "cli-eval")])
    assert shown.exit_code == 0, shown.output
    assert "preference_accuracy" in evaluated.metrics["fine-tuned"]
    by_cli = json.loads((tmp_path / "cli-eval" / "eval.json").read_text())["metrics"]
    assert by_cli.keys() == evaluated.metrics.keys() == {"base", "fine-tuned"}
    for model in by_cli:
        assert by_cli[model] == pytest.approx(evaluated.metrics[model], abs=1e-6)


def test_dpo_resume_ends_at_the_adapter_of_an_uninterrupted_run(tiny_model_dir, pair_files, tmp_path, monkeypatch):
    """Steps 3..4 only, from checkpoint-2's optimizer state (a run that starts over fails assert_resumed: see
    test_train's break test), and the uninterrupted run's adapter."""
    from phitune.train import run_training

    def run(name, steps, resume=False):
        cfg = preference_config(tiny_model_dir, pair_files, tmp_path / name, data={"eval": None, "eval_split": 0},
                                training_config={"max_steps": steps, "save_steps": 2, "lr_scheduler_type": "constant"})
        return run_training(cfg, resume=resume).output_dir

    straight = run("straight", 4)
    runs = watch_training(monkeypatch)
    run("resumed", 2)
    resumed = run("resumed", 4, resume=True)
    assert_resumed(runs[-1], resumed / "checkpoint-2", max_steps=4)
    assert_same_trained_adapter(straight, resumed, rtol=1e-5, atol=1e-7)


def test_qlora_dpo_starts_from_the_sft_adapter_and_keeps_it_as_reference(tiny_model_dir, pair_files, tmp_path):
    """SFT (QLoRA) on the chosen answers, then DPO with model.adapter: the start (and reference) is the SFT model,
    not the bare base, and the trained adapter keeps the SFT adapter's shape and loads in plain PEFT."""
    from peft import PeftModel

    from phitune.data.preference import load_preference_data
    from phitune.models.loading import load_base_model, load_tokenizer
    from phitune.recipes.preference import score_pairs
    from phitune.train import run_training

    quant = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}
    rows = [json.loads(line) for line in pair_files[0].read_text().splitlines()]
    sft_data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
    sft = config_from_dict({
        "model": {"name_or_path": str(tiny_model_dir), "torch_dtype": "float32", "quantization": quant},
        "data": {"train": str(sft_data), "eval_split": 0, "max_seq_length": 64},
        "training_config": {"output_dir": str(tmp_path / "sft"), "max_steps": 2, "learning_rate": 1e-2,
                            "per_device_train_batch_size": 4, "seed": 0, "disable_tqdm": True},
        "peft_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"},
    })
    sft_dir = run_training(sft).output_dir
    cfg = preference_config(tiny_model_dir, pair_files, tmp_path / "dpo", peft_config=None,
                            model={"adapter": str(sft_dir), "quantization": quant},
                            training_config={"max_steps": 2, "save_steps": 2})
    result = run_training(cfg)

    pairs = load_preference_data(cfg.data).eval
    tokenizer = load_tokenizer(cfg.model)
    start = PeftModel.from_pretrained(load_base_model(cfg.model, training=False), str(sft_dir))
    sft_scores = score_pairs(start, tokenizer, pairs, 64)
    assert result.metrics["reward_margin_before"] == pytest.approx(sft_scores["reward_margin"], abs=1e-2)
    trained, started = load_file(str(result.output_dir / "adapter_model.safetensors")), load_file(
        str(sft_dir / "adapter_model.safetensors"))
    assert trained.keys() == started.keys()
    assert any(not torch.equal(trained[k].float(), started[k].float()) for k in trained)
    assert not (result.output_dir / "ref").exists()
    reloaded = PeftModel.from_pretrained(load_base_model(cfg.model, training=False), str(result.output_dir))
    after = score_pairs(reloaded, tokenizer, pairs, 64)
    assert after["reward_margin"] == pytest.approx(result.metrics["reward_margin_after"], abs=1e-2)

    # phitune eval on the run: the base, the SFT adapter it started from, and the trained adapter.
    from phitune.after.evaluate import evaluation_data
    from phitune.after.generate import resolve_model_source
    from phitune.recipes.preference import run_preference_evaluation

    model_cfg, adapter = resolve_model_source(result.output_dir)
    report = run_preference_evaluation(model_cfg, adapter, evaluation_data(result.output_dir, None)[0], tmp_path)
    assert list(report.metrics) == ["base", "starting adapter", "fine-tuned"]
    assert report.metrics["starting adapter"]["reward_margin"] == pytest.approx(sft_scores["reward_margin"], abs=1e-2)
    assert report.metrics["fine-tuned"]["reward_margin"] == pytest.approx(after["reward_margin"], abs=1e-2)


def test_orpo_trains_an_adapter_that_prefers_the_chosen_answers(tiny_model_dir, pair_files, tmp_path):
    from phitune.train import run_training

    cfg = preference_config(tiny_model_dir, pair_files, tmp_path / "orpo", method="orpo",
                            training_config={"max_steps": 8, "save_steps": 8, "beta": 0.5})
    result = run_training(cfg)
    assert result.metrics["method"] == "orpo"
    assert result.metrics["reward_margin_after"] > result.metrics["reward_margin_before"]
    assert result.metrics["chosen_logp_after"] > result.metrics["chosen_logp_before"]  # ORPO's SFT term
    assert (result.output_dir / "adapter_model.safetensors").is_file()


def test_simpo_trains_through_cpo_with_the_reference_free_length_normalised_loss(tiny_model_dir, pair_files,
                                                                                tmp_path):
    """method: simpo is TRL's CPOTrainer with loss_type simpo and no NLL term (cpo_alpha 0), at the SimPO paper's beta
    and margin; it makes held-out pairs preferred, writes no reference copy, reloads in plain PEFT, and `phitune eval`
    scores it as DPO's runs."""
    from peft import PeftModel
    from typer.testing import CliRunner

    from phitune.cli import app
    from phitune.data.preference import load_preference_data
    from phitune.models.loading import load_base_model, load_tokenizer
    from phitune.recipes.preference import score_pairs
    from phitune.train import run_training

    cfg = preference_config(tiny_model_dir, pair_files, tmp_path / "simpo", method="simpo",
                            training_config={"max_steps": 8, "save_steps": 8})
    result = run_training(cfg)
    args = torch.load(result.output_dir / "training_args.bin", weights_only=False)
    assert type(args).__name__ == "CPOConfig"
    assert (args.loss_type, args.cpo_alpha, args.beta, args.simpo_gamma) == ("simpo", 0.0, 2.0, 1.0)
    metrics = result.metrics
    assert metrics["method"] == "simpo" and metrics["preference_accuracy_after"] >= 0.9
    assert metrics["reward_margin_after"] > metrics["reward_margin_before"] + 1  # 8 steps: -0.12 -> 1.37 measured
    assert not (result.output_dir / "ref").exists()
    reloaded = PeftModel.from_pretrained(load_base_model(cfg.model, training=False), str(result.output_dir))
    scores = score_pairs(reloaded, load_tokenizer(cfg.model), load_preference_data(cfg.data).eval, 64)
    assert scores["reward_margin"] == pytest.approx(metrics["reward_margin_after"], abs=1e-3)
    shown = CliRunner().invoke(app, ["eval", str(result.output_dir), "--output", str(tmp_path / "eval")])
    assert shown.exit_code == 0, shown.output
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())["metrics"]
    assert evaluated["fine-tuned"]["preference_accuracy"] == metrics["preference_accuracy_after"]


def test_simpo_resume_ends_at_the_adapter_of_an_uninterrupted_run(tiny_model_dir, pair_files, tmp_path, monkeypatch):
    from phitune.train import run_training

    def run(name, steps, resume=False):
        cfg = preference_config(tiny_model_dir, pair_files, tmp_path / name, method="simpo",
                                data={"eval": None, "eval_split": 0},
                                training_config={"max_steps": steps, "save_steps": 2, "lr_scheduler_type": "constant"})
        return run_training(cfg, resume=resume).output_dir

    straight = run("straight", 4)
    runs = watch_training(monkeypatch)
    run("resumed", 2)
    resumed = run("resumed", 4, resume=True)
    assert_resumed(runs[-1], resumed / "checkpoint-2", max_steps=4)
    assert_same_trained_adapter(straight, resumed, rtol=1e-5, atol=1e-7)


def test_qlora_simpo_trains_over_a_4_bit_base_and_its_adapter_merges(tiny_model_dir, pair_files, tmp_path):
    """SimPO with the same quantization lines as SFT's QLoRA: the base loads in 4 bits and the adapter trains; a
    float32 SimPO run merges (api.merge) into a model that plain transformers scores as the adapter scored."""
    from transformers import AutoModelForCausalLM

    from phitune import api
    from phitune.data.preference import load_preference_data
    from phitune.models.loading import load_tokenizer
    from phitune.recipes.preference import score_pairs
    from phitune.train import run_training

    quant = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}
    cfg = preference_config(tiny_model_dir, pair_files, tmp_path / "qlora", method="simpo",
                            model={"quantization": quant}, data={"eval": None, "eval_split": 0},
                            training_config={"max_steps": 2, "save_steps": 2})
    result = run_training(cfg)
    assert type(result.model.base_model.model.model.layers[0].self_attn.qkv_proj.base_layer).__name__ == "Linear4bit"
    adapter = load_file(str(result.output_dir / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at 0: it moved

    cfg = preference_config(tiny_model_dir, pair_files, tmp_path / "simpo", method="simpo",
                            training_config={"max_steps": 4, "save_steps": 4})
    result = run_training(cfg)
    merged = api.merge(result.output_dir, tmp_path / "merged").output_dir
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    scores = score_pairs(model, load_tokenizer(cfg.model), load_preference_data(cfg.data).eval, 64)
    assert scores["reward_margin"] == pytest.approx(result.metrics["reward_margin_after"], abs=1e-3)


@pytest.mark.processes
def test_sigterm_stops_a_simpo_run_with_a_checkpoint_and_exit_130(tiny_model_dir, pair_files, tmp_path):
    from _resume import assert_sigterm_stops_with_a_checkpoint

    cfg = preference_config(tiny_model_dir, pair_files, tmp_path / "out", method="simpo",
                            data={"eval": None, "eval_split": 0},
                            training_config={"max_steps": 500, "save_steps": 1000, "logging_steps": 1})
    assert_sigterm_stops_with_a_checkpoint(cfg, tmp_path)


def test_method_config_is_checked_against_the_methods_trl_config():
    base = {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "peft_config": {"r": 8}}
    config_from_dict({**base, "method": "dpo", "training_config": {"beta": 0.2, "loss_type": "ipo"}})
    config_from_dict({**base, "method": "orpo", "training_config": {"beta": 0.2}})
    config_from_dict({**base, "method": "simpo", "training_config": {"beta": 2.5, "simpo_gamma": 1.2}})
    with pytest.raises(PhituneError, match="method simpo trains CPO's simpo loss; training_config.loss_type 'hinge'"):
        config_from_dict({**base, "method": "simpo", "training_config": {"loss_type": "hinge"}})
    with pytest.raises(PhituneError) as err:
        config_from_dict({**base, "method": "dpo", "training_config": {"betta": 0.2, "max_length": 9,
                                                                       "learning_rate": "fast"}})
    message = str(err.value)
    assert "unknown key training_config.betta (did you mean 'beta'?)" in message
    assert "training_config.max_length is set through data.max_seq_length" in message
    assert "training_config.learning_rate must be a number" in message
    with pytest.raises(PhituneError, match=r"unknown key training_config.beta"):
        config_from_dict({**base, "training_config": {"beta": 0.2}})  # sft has no beta
    with pytest.raises(PhituneError, match=r"method must be one of sft, dpo, orpo, .*got 'dop' \(did you mean 'dpo'"):
        config_from_dict({**base, "method": "dop"})
    # a misspelt method is the only problem said: its keys checked against SFT's would each look wrong too
    with pytest.raises(PhituneError) as err:
        config_from_dict({**base, "method": "gpro", "training_config": {"num_generations": 4}})
    assert str(err.value).count(";") == 0 and "did you mean 'grpo'" in str(err.value)
    with pytest.raises(PhituneError) as err:
        config_from_dict({**base, "method": "dpo", "peft_config": None, "model": {"name_or_path": "m"}})
    assert "method dpo trains a LoRA adapter" in str(err.value)
    with pytest.raises(PhituneError, match="model.adapter .* needs method: dpo, orpo, simpo, kto or grpo"):
        config_from_dict({**base, "model": {"name_or_path": "m", "adapter": "runs/sft"}})
    with pytest.raises(PhituneError, match="model.adapter brings its own LoRA shape"):
        config_from_dict({**base, "method": "dpo", "model": {"name_or_path": "m", "adapter": "runs/sft"}})


def test_a_trl_without_the_experimental_trainer_is_one_line_at_config_time(monkeypatch):
    """ORPO and SimPO live in trl.experimental: a TRL that moved them fails when the config is read, with one line."""
    import sys

    base = {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "peft_config": {"r": 8},
            "training_config": {"beta": 2.0}}
    for method, module in (("simpo", "trl.experimental.cpo"), ("orpo", "trl.experimental.orpo")):
        monkeypatch.setitem(sys.modules, module, None)  # what `import` finds for a package that is gone
        with pytest.raises(PhituneError, match=rf"^method {method} needs {module}\.\w+Trainer, which TRL [\d.]+ does "
                                               r"not have .*; install trl 1.16"):
            config_from_dict({**base, "method": method})


def test_every_preference_shape_becomes_the_same_pair():
    from phitune.data.preference import to_pair

    user = [{"role": "user", "content": "Hi?"}]
    chosen, rejected = [{"role": "assistant", "content": "Hello."}], [{"role": "assistant", "content": "Go."}]
    rows = [
        {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."},  # strings
        {"prompt": user, "chosen": chosen, "rejected": rejected},  # conversational, explicit prompt
        {"chosen": user + chosen, "rejected": user + rejected},  # implicit prompt (HH-RLHF as TRL ships it)
        {"prompt": "Hi?", "chosen": user + chosen, "rejected": user + rejected},  # UltraFeedback-binarized
    ]
    pairs = [to_pair(row, f"f.jsonl:{i}") for i, row in enumerate(rows, 1)]
    assert all((p.prompt, p.chosen, p.rejected) == (user, "Hello.", "Go.") for p in pairs)


def test_bad_preference_rows_are_reported_with_file_and_line_or_skipped(tmp_path):
    from phitune.config.schema import DataConfig
    from phitune.data.preference import load_preference_data

    user = [{"role": "user", "content": "Hi?"}]
    rows = [
        {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."},
        {"prompt": "Hi?", "chosen": " ", "rejected": "Go."},
        {"chosen": user + [{"role": "assistant", "content": "A"}],
         "rejected": [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "B"}]},
        {"prompt": "Bye?", "chosen": "Hello.", "rejected": [{"role": "assistant", "content": "x"}]},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(PhituneError, match=rf"^{path}:2: the chosen answer is empty \(set data.on_bad_row: skip"):
        load_preference_data(DataConfig(train=str(path), eval_split=0))
    data = load_preference_data(DataConfig(train=str(path), eval_split=0, on_bad_row="skip"))
    assert len(data.train) == 1
    assert [s.split(": ", 1)[0] for s in data.skipped] == [f"{path}:{n}" for n in (2, 3, 4)]
    assert "differ before their last turn" in data.skipped[1] and "both be strings" in data.skipped[2]
    with pytest.raises(PhituneError, match="preference training needs chosen and rejected"):
        load_preference_data(DataConfig(train=str(write_jsonl(tmp_path / "sft.jsonl", [{"messages": user}]))))


def test_phitune_data_shows_a_pair_and_warns_about_useless_or_cut_pairs(tiny_model_dir, tmp_path):
    from phitune.data.preference import inspect_preference_data

    rows = make_pairs(2, 6) + [
        {"prompt": "Same?", "chosen": "yes", "rejected": "yes"},
        {"prompt": "Empty?", "chosen": "", "rejected": "no"},
        {"prompt": "Long?", "chosen": "yes " * 60, "rejected": "no"},  # past 48 tokens on any tokenizer
    ]
    cfg = config_from_dict({"method": "dpo", "model": {"name_or_path": str(tiny_model_dir)},
                            "data": {"train": str(write_jsonl(tmp_path / "p.jsonl", rows)), "eval_split": 0,
                                     "max_seq_length": 48},
                            "peft_config": {"r": 4}, "training_config": {"output_dir": str(tmp_path / "out")}})
    report = inspect_preference_data(cfg, tmp_path)
    summary = report.summary()
    assert summary["format"] == "preference (strings)" and summary["train pairs"] == 8
    assert summary["skipped rows"] == 1 and summary["answers truncated (train)"] == 1
    assert "chosen tokens min / median / max" in summary and report.histogram.is_file()
    text = "".join(piece for piece, _ in report.example)
    assert "[chosen]" in text and "[rejected]" in text and "<|assistant|>" in text
    assert any(trained for _, trained in report.example) and not report.example[0][1]
    warnings = " | ".join(report.warnings)
    assert "1 pairs have chosen == rejected" in warnings and f"{tmp_path / 'p.jsonl'}:7" in warnings
    assert "1 row has an empty answer" in warnings
    assert "train: 1 pairs have an answer cut by max_seq_length 48" in warnings

    from phitune import api

    assert api.inspect_data(cfg, output=tmp_path).summary() == summary  # the driver picks the pairs' inspection


@pytest.mark.parametrize("method", ["dpo", "simpo"])
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_model_dir, pair_files, tmp_path, method):
    """learning_rate 1e30 blows the adapter up after one step; phitune's guard stops DPO and SimPO (CPO's trainer)
    as it stops SFT."""
    from phitune.run.checkpoints import latest_complete_checkpoint
    from phitune.train import run_training

    cfg = preference_config(tiny_model_dir, pair_files, tmp_path / "nan", method=method,
                            data={"eval": None, "eval_split": 0},
                            training_config={"max_steps": 4, "save_steps": 1, "learning_rate": 1e30})
    with pytest.raises(PhituneError, match=r"^the loss became NaN or infinite at step \d; training stopped and the "
                                           r"last good checkpoint is"):
        run_training(cfg)
    good = latest_complete_checkpoint(tmp_path / "nan")
    assert good is not None
    assert all(torch.isfinite(t).all() for t in load_file(str(good / "adapter_model.safetensors")).values())
