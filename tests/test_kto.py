"""KTO (phitune.recipes.kto, phitune.data.unpaired) on the tiny Phi-3: from an SFT adapter, KTO widens the held-out
log-probability margin of desirable over undesirable completions; the adapter reloads in plain PEFT; `phitune eval`
and the API agree with the CLI; a run killed with SIGKILL resumes to the uninterrupted adapter; SIGTERM saves and stops;
it merges; QLoRA and the NaN guard hold; bad rows and configs stop with one line; `phitune data` shows labelled
completions.

The rows follow one rule a tiny model learns in a few steps: a desirable completion is a word from POSITIVE, an
undesirable one a word from NEGATIVE; each row has one completion and its label, never a pair.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from phitune.config.schema import config_from_dict
from phitune.errors import PhituneError

POSITIVE = ["yes", "good", "happy", "right", "hot", "big"]
NEGATIVE = ["no", "bad", "sad", "wrong", "cold", "small"]
NAMES = ["Anna", "Ben", "Carl", "Dora", "Emil", "Fay", "Gus", "Hana", "Ivo", "Jill", "Kai", "Lena"]
THINGS = ["tea", "bread", "a map", "the news", "a song", "rain", "the sea", "a book"]


def make_rows(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        desirable = rng.random() < 0.5
        rows.append({"prompt": f"{rng.choice(NAMES)} asks about {rng.choice(THINGS)}.",
                     "completion": rng.choice(POSITIVE if desirable else NEGATIVE), "label": desirable})
    return rows


@pytest.fixture(scope="module")
def kto_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kto-rows")
    return write_jsonl(folder / "train.jsonl", make_rows(0, 64)), write_jsonl(folder / "eval.jsonl", make_rows(1, 16))


def kto_config(model_dir, kto_files, output_dir, **sections):
    train, evals = kto_files
    raw = {
        "method": "kto",
        "model": {"name_or_path": str(model_dir), "torch_dtype": "float32"},
        "data": {"train": str(train), "eval": str(evals), "max_seq_length": 64},
        "training_config": {"output_dir": str(output_dir), "max_steps": 16, "learning_rate": 1e-2,
                            "per_device_train_batch_size": 4, "logging_steps": 4, "save_steps": 16, "seed": 0,
                            "disable_tqdm": True, "eval_strategy": "no"},
        "peft_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
    }
    for name, values in sections.items():
        raw[name] = values if values is None or not isinstance(raw.get(name), dict) else {**raw[name], **values}
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def kto_run(tiny_model_dir, kto_files, tmp_path_factory):
    """SFT for 4 steps on the desirable completions, then KTO from that adapter (model.adapter), with an eval set."""
    from phitune.train import run_training

    folder = tmp_path_factory.mktemp("kto")
    rows = [json.loads(line) for line in kto_files[0].read_text().splitlines()]
    sft_rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows if r["label"]]
    sft = config_from_dict({
        "model": {"name_or_path": str(tiny_model_dir), "torch_dtype": "float32"},
        "data": {"train": str(write_jsonl(folder / "sft.jsonl", sft_rows)), "eval_split": 0, "max_seq_length": 64},
        "training_config": {"output_dir": str(folder / "sft"), "max_steps": 4, "learning_rate": 1e-2,
                            "per_device_train_batch_size": 4, "seed": 0, "disable_tqdm": True},
        "peft_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"},
    })
    sft_dir = run_training(sft).output_dir
    cfg = kto_config(tiny_model_dir, kto_files, folder / "run", peft_config=None, model={"adapter": str(sft_dir)},
                     training_config={"eval_strategy": "steps", "eval_steps": 16})
    return cfg, run_training(cfg), sft_dir


def test_kto_from_an_sft_adapter_widens_the_held_out_margin_and_the_adapter_loads_in_plain_peft(kto_run):
    from peft import PeftModel

    from phitune.data.unpaired import load_unpaired_data
    from phitune.models.loading import load_base_model, load_tokenizer
    from phitune.recipes.kto import score_completions

    cfg, result, sft_dir = kto_run
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    assert metrics["method"] == "kto" and metrics["data_format"] == "unpaired preference (strings)"
    assert metrics["train_desirable"] + metrics["train_undesirable"] == metrics["train_examples"] == 64
    assert metrics["logp_margin_after"] > metrics["logp_margin_before"] + 2
    assert metrics["undesirable_logp_after"] < metrics["undesirable_logp_before"]
    assert "eval_loss" in metrics and "eval_kl" in metrics  # TRL's own held-out KTO metrics at the last step
    assert not (result.output_dir / "ref").exists()  # TRL's frozen reference copy of the SFT adapter is gone

    # The start (and KTO's reference) is the SFT model, not the bare base.
    examples = load_unpaired_data(cfg.data).eval
    tokenizer = load_tokenizer(cfg.model)
    start = PeftModel.from_pretrained(load_base_model(cfg.model, training=False), str(sft_dir))
    assert score_completions(start, tokenizer, examples, 64)["logp_margin"] == pytest.approx(
        metrics["logp_margin_before"], abs=1e-4)
    # The trained adapter has the SFT adapter's shape, moved, and plain PEFT on the base reproduces its scores.
    trained, started = (load_file(str(d / "adapter_model.safetensors")) for d in (result.output_dir, sft_dir))
    assert trained.keys() == started.keys() and any(not torch.equal(trained[k], started[k]) for k in trained)
    reloaded = PeftModel.from_pretrained(load_base_model(cfg.model, training=False), str(result.output_dir))
    scores = score_completions(reloaded, tokenizer, examples, 64)
    for key in ("desirable_logp", "undesirable_logp", "logp_margin"):
        assert scores[key] == pytest.approx(metrics[f"{key}_after"], abs=1e-4), key


def test_phitune_eval_on_a_kto_run_scores_base_start_and_tuned(kto_run, tmp_path):
    from typer.testing import CliRunner

    from phitune import api
    from phitune.cli import app

    _, result, _ = kto_run
    report = api.evaluate(result.output_dir, output=tmp_path / "api")
    assert list(report.metrics) == ["base", "starting adapter", "fine-tuned"]
    assert report.metrics["starting adapter"]["logp_margin"] == pytest.approx(result.metrics["logp_margin_before"],
                                                                              abs=1e-4)
    assert report.metrics["fine-tuned"]["logp_margin"] == pytest.approx(result.metrics["logp_margin_after"], abs=1e-4)
    shown = CliRunner().invoke(app, ["eval", str(result.output_dir), "--output", str(tmp_path / "cli")])
    assert shown.exit_code == 0, shown.output
    assert "logp_margin" in shown.output and "16 held-out labelled completions" in shown.output
    by_cli = json.loads((tmp_path / "cli" / "eval.json").read_text())["metrics"]
    for model in by_cli:
        assert by_cli[model] == pytest.approx(report.metrics[model], abs=1e-6)


def test_a_kto_adapter_merges_into_a_model_plain_transformers_scores_the_same(kto_run, tmp_path):
    """`phitune merge` (api.merge) on the KTO run: AutoModelForCausalLM alone gives the trained adapter's held-out
    scores (the adapter trained from the SFT adapter merges like any PEFT adapter)."""
    from transformers import AutoModelForCausalLM

    from phitune import api
    from phitune.data.unpaired import load_unpaired_data
    from phitune.models.loading import load_tokenizer
    from phitune.recipes.kto import score_completions

    cfg, result, _ = kto_run
    merged = api.merge(result.output_dir, tmp_path / "merged").output_dir
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    scores = score_completions(model, load_tokenizer(cfg.model), load_unpaired_data(cfg.data).eval, 64)
    assert scores["logp_margin"] == pytest.approx(result.metrics["logp_margin_after"], abs=1e-3)


def test_qlora_kto_trains_a_lora_adapter_over_a_4_bit_base(tiny_model_dir, kto_files, tmp_path):
    """The same quantization lines as SFT's QLoRA: the base loads in 4 bits, the adapter trains and is saved."""
    from phitune.train import run_training

    quant = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}
    cfg = kto_config(tiny_model_dir, kto_files, tmp_path / "qlora", model={"quantization": quant},
                     data={"eval": None, "eval_split": 0}, training_config={"max_steps": 2, "save_steps": 2})
    result = run_training(cfg)
    assert type(result.model.base_model.model.model.layers[0].self_attn.qkv_proj.base_layer).__name__ == "Linear4bit"
    adapter = load_file(str(result.output_dir / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at 0: it moved


def test_a_nan_loss_stops_kto_and_keeps_the_last_good_checkpoint(tiny_model_dir, kto_files, tmp_path):
    """learning_rate 1e30 blows the adapter up after one step; phitune's guard stops KTO as it stops SFT."""
    from phitune.run.checkpoints import latest_complete_checkpoint
    from phitune.train import run_training

    cfg = kto_config(tiny_model_dir, kto_files, tmp_path / "nan", data={"eval": None, "eval_split": 0},
                     training_config={"max_steps": 4, "save_steps": 1, "learning_rate": 1e30})
    with pytest.raises(PhituneError, match=r"^the loss became NaN or infinite at step \d; training stopped and the "
                                           r"last good checkpoint is"):
        run_training(cfg)
    good = latest_complete_checkpoint(tmp_path / "nan")
    assert good is not None
    assert all(torch.isfinite(t).all() for t in load_file(str(good / "adapter_model.safetensors")).values())


def test_the_api_and_the_cli_train_a_kto_run_alike(tiny_model_dir, kto_files, tmp_path):
    """A fresh adapter (KTO's reference is then the adapter disabled, the base): `api.train` and `phitune train` on
    one config write the same metrics."""
    from typer.testing import CliRunner

    from phitune import api
    from phitune.cli import app
    from phitune.config.schema import save_config

    cfg = kto_config(tiny_model_dir, kto_files, tmp_path / "api", training_config={"max_steps": 4, "save_steps": 4})
    save_config(cfg, tmp_path / "kto.yaml")
    by_api = api.train(cfg)
    shown = CliRunner().invoke(app, ["train", str(tmp_path / "kto.yaml"),
                                     "--set", f"training_config.output_dir={tmp_path / 'cli'}"])
    assert shown.exit_code == 0, shown.output
    by_cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    timings = {"train_runtime_s", "tokens_per_second"}
    assert {k: v for k, v in by_cli.items() if k not in timings} == pytest.approx(
        {k: v for k, v in by_api.metrics.items() if k not in timings}, abs=1e-5)
    assert by_api.metrics["logp_margin_after"] > by_api.metrics["logp_margin_before"]


@pytest.mark.processes
def test_a_kto_run_killed_with_sigkill_resumes_to_the_uninterrupted_adapter(tiny_model_dir, kto_files, tmp_path):
    """A real `phitune train` held after step 2 and killed with SIGKILL, then `--resume`: 2 more logged steps (not
    4), ending at the adapter of an uninterrupted run (test_reliability's launcher, KTO config)."""
    from _resume import killed_and_resumed

    def config(name):
        return kto_config(tiny_model_dir, kto_files, tmp_path / name / "out", data={"eval": None, "eval_split": 0},
                          training_config={"max_steps": 4, "save_steps": 2, "logging_steps": 1,
                                           "lr_scheduler_type": "constant", "save_total_limit": 10})

    resumed, uninterrupted = killed_and_resumed(config, tmp_path)
    assert any(t.abs().sum() > 0 for k, t in uninterrupted.items() if "lora_B" in k)
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-7)


@pytest.mark.processes
def test_sigterm_stops_a_kto_run_with_a_checkpoint_and_exit_130(tiny_model_dir, kto_files, tmp_path):
    from _resume import assert_sigterm_stops_with_a_checkpoint

    cfg = kto_config(tiny_model_dir, kto_files, tmp_path / "out", data={"eval": None, "eval_split": 0},
                     training_config={"max_steps": 500, "save_steps": 1000, "logging_steps": 1})
    assert_sigterm_stops_with_a_checkpoint(cfg, tmp_path)


def test_every_kto_shape_becomes_the_same_labelled_completion():
    from phitune.data.unpaired import to_labelled

    user = [{"role": "user", "content": "Hi?"}]
    answer = [{"role": "assistant", "content": "Hello."}]
    rows = [
        {"prompt": "Hi?", "completion": "Hello.", "label": True},  # strings
        {"prompt": user, "completion": answer, "label": "true"},  # conversational; a CSV's label
        {"completion": user + answer, "label": 1},  # implicit prompt
    ]
    examples = [to_labelled(row, f"f.jsonl:{i}") for i, row in enumerate(rows, 1)]
    assert all((e.prompt, e.completion, e.desirable) == (user, "Hello.", True) for e in examples)
    assert to_labelled({"prompt": "Hi?", "completion": "Go.", "label": "False"}, "x").desirable is False


def test_bad_kto_rows_stop_with_one_line_or_are_skipped(tiny_model_dir, tmp_path):
    from phitune.config.schema import DataConfig, save_config
    from phitune.data.unpaired import load_unpaired_data
    from test_errors import run_cli

    rows = [{"prompt": "Hi?", "completion": "Hello.", "label": True},
            {"prompt": "Hi?", "completion": "Go.", "label": "maybe"},
            {"prompt": "Hi?", "completion": " ", "label": False},
            {"prompt": "", "completion": "Go.", "label": False},
            {"prompt": "Hi?", "completion": [{"role": "user", "content": "x"}], "label": False}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(PhituneError, match=rf"^{path}:2: label must be true \(desirable\) or false \(undesirable\), "
                                           r"got 'maybe' \(set data.on_bad_row: skip"):
        load_unpaired_data(DataConfig(train=str(path), eval_split=0))
    data = load_unpaired_data(DataConfig(train=str(path), eval_split=0, on_bad_row="skip"))
    assert len(data.train) == 1
    assert [s.split(": ", 1)[0] for s in data.skipped] == [f"{path}:{n}" for n in (2, 3, 4, 5)]
    assert "completion is empty" in data.skipped[1] and "prompt is missing" in data.skipped[2]
    assert "must end with an assistant turn" in data.skipped[3]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Hi?", "chosen": "a", "rejected": "b"}])
    with pytest.raises(PhituneError, match=r"method kto needs a prompt, a completion and a label .*\(these are "
                                           r"preference pairs: train them with method dpo, simpo or orpo\)$"):
        load_unpaired_data(DataConfig(train=str(pairs)))

    # `phitune train` on the bad file: one line on stderr, exit code 2, before any weight is loaded
    cfg = kto_config(tiny_model_dir, (path, path), tmp_path / "out", data={"eval": None, "eval_split": 0})
    save_config(cfg, tmp_path / "kto.yaml")
    shown = run_cli(["train", str(tmp_path / "kto.yaml")], tmp_path)
    assert shown.returncode == 2 and not (tmp_path / "out").exists()
    assert [line for line in shown.stderr.splitlines() if line.strip()] == [
        f"error: {path}:2: label must be true (desirable) or false (undesirable), got 'maybe' (set "
        "data.on_bad_row: skip to skip such rows)"]


def test_kto_config_is_checked_before_anything_loads():
    base = {"method": "kto", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "peft_config": {"r": 8}}
    cfg = config_from_dict({**base, "training_config": {"beta": 0.2, "desirable_weight": 1.3}})
    assert cfg.training_config["desirable_weight"] == 1.3
    with pytest.raises(PhituneError) as err:
        config_from_dict({**base, "training_config": {"per_device_train_batch_size": 1, "betta": 0.1,
                                                      "train_sampling_strategy": "random"}})
    message = str(err.value)
    assert "unknown key training_config.betta (did you mean 'beta'?)" in message
    assert "method kto needs training_config.per_device_train_batch_size of at least 2" in message
    assert "method kto needs training_config.train_sampling_strategy: sequential" in message
    # apo_zero_unpaired has no KL term, so one row per batch is fine
    config_from_dict({**base, "training_config": {"loss_type": "apo_zero_unpaired", "per_device_train_batch_size": 1}})
    with pytest.raises(PhituneError, match="method kto reads prompt/completion/label rows; leave data.format at auto"):
        config_from_dict({**base, "data": {"train": "t.jsonl", "format": "messages"}})


def test_phitune_data_shows_a_labelled_completion_and_warns(tiny_model_dir, tmp_path):
    from phitune import api

    rows = [r for r in make_rows(2, 8) if r["label"]] + [
        {"prompt": "Same?", "completion": "yes", "label": True},
        {"prompt": "Same?", "completion": "yes", "label": False},
        {"prompt": "Empty?", "completion": "", "label": False},
        {"prompt": "Long?", "completion": "yes " * 60, "label": True},  # past 48 tokens on any tokenizer
    ]
    evals = [r for r in make_rows(3, 6) if r["label"]]
    cfg = config_from_dict({"method": "kto", "model": {"name_or_path": str(tiny_model_dir)},
                            "data": {"train": str(write_jsonl(tmp_path / "k.jsonl", rows)),
                                     "eval": str(write_jsonl(tmp_path / "e.jsonl", evals)), "max_seq_length": 48},
                            "peft_config": {"r": 4}, "training_config": {"output_dir": str(tmp_path / "out")}})
    report = api.inspect_data(cfg, output=tmp_path)
    summary = report.summary()
    assert summary["format"] == "unpaired preference (strings)" and summary["skipped rows"] == 1
    assert summary["train undesirable"] == 1 and summary["eval undesirable"] == 0
    assert summary["answers truncated (train)"] == 1 and report.histogram.is_file()
    text = "".join(piece for piece, _ in report.example)
    assert "[desirable]" in text and "<|assistant|>" in text and report.example[-1][1]
    warnings = " | ".join(report.warnings)
    assert "eval: no undesirable completions" in warnings
    assert f"labelled both desirable and undesirable for the same prompt; first: {tmp_path / 'k.jsonl'}" in warnings
    assert "1 row has an empty completion" in warnings
    assert "train: 1 completions are cut by max_seq_length 48" in warnings
