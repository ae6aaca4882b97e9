"""Training end to end on the tiny Phi-3: loss falls, files appear, adapters reload, resume and accumulation are exact."""

import json
import shutil
from pathlib import Path

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from phitune.errors import PhituneError
from phitune.models.loading import load_base_model, load_tokenizer
from phitune.run.checkpoints import finished_run
from phitune.train import run_training

from _equivalence import gradient_mismatches, without_signal
from _resume import assert_resumed, watch_training


def logits_of(model, tokenizer):
    batch = tokenizer(["<|user|>\nWhat is the capital of France?<|end|>\n<|assistant|>\n"], return_tensors="pt",
                      add_special_tokens=False)
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def lora_b_weights(path):
    return {k: v for k, v in load_file(str(path / "adapter_model.safetensors")).items() if "lora_B" in k}


def test_lora_run_writes_a_standard_adapter_and_loss_falls(make_config):
    from phitune.tiny.phi3 import tiny_base_path

    cfg = make_config(model={"name_or_path": str(tiny_base_path())},
                      training_config={"max_steps": 12, "eval_steps": 6, "save_steps": 6, "learning_rate": 3e-3})
    result = run_training(cfg)
    out = result.output_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "phitune_config.yaml",
                 "metrics.json", "loss.png", "checkpoint-12/phitune_complete"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_loss_after"] < 0.9 * metrics["eval_loss_before"]
    assert 0 < metrics["trainable_parameters"] < metrics["total_parameters"]
    assert metrics["train_loss"] < metrics["eval_loss_before"]
    assert metrics["tokens_per_second"] > 0 and metrics["train_examples"] == 64
    threads = torch.get_num_threads()
    assert metrics["machine"] == (f"torch {torch.__version__}, {threads} thread{'' if threads == 1 else 's'}, "
                                  f"{torch.backends.cpu.get_cpu_capability()} CPU kernels")  # what the numbers hold on

    # The adapter loads with plain PEFT and reproduces the trained model's logits.
    from peft import PeftModel

    tokenizer = load_tokenizer(cfg.model)
    reloaded = PeftModel.from_pretrained(load_base_model(cfg.model, training=False), str(out))
    torch.testing.assert_close(logits_of(reloaded, tokenizer), logits_of(result.model, tokenizer))
    targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert {t.rsplit(".", 1)[-1] for t in targets} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_base_weights_stay_frozen_and_lora_weights_move(make_config, tiny_model_dir):
    result = run_training(make_config(training_config={"max_steps": 3, "eval_strategy": "no"}))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    for name, param in result.model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad
        else:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            torch.testing.assert_close(param.detach(), base[key], rtol=0, atol=0)
    assert any(v.abs().sum() > 0 for v in lora_b_weights(result.output_dir).values())


def test_phi3_target_that_matches_nothing_is_an_error(make_config):
    cfg = make_config(peft_config={"target_modules": ["q_proj", "v_proj", "o_proj"]})
    with pytest.raises(PhituneError) as err:
        run_training(cfg)
    assert str(err.value).startswith("target_modules: 'q_proj', 'v_proj' match nothing; this model's linear layers "
                                     "are qkv_proj, o_proj, gate_up_proj, down_proj")


def test_a_finished_run_is_not_overwritten(make_config):
    cfg = make_config(training_config={"max_steps": 2, "eval_strategy": "no"})
    run_training(cfg)
    with pytest.raises(PhituneError, match="already holds a finished run; pass --overwrite"):
        run_training(cfg)
    # --resume on it: the run is complete (its last checkpoint has no step left), so nothing is trained or rewritten
    written = {path: path.stat().st_mtime_ns for path in cfg.output_dir.rglob("*")}
    with pytest.raises(PhituneError, match="^--resume: the run in .* is already complete, nothing to resume"):
        run_training(cfg, resume=True)
    assert {path: path.stat().st_mtime_ns for path in cfg.output_dir.rglob("*")} == written
    # asked for more steps, --resume continues the finished run from its last checkpoint (steps 3-4 only)
    longer = replace(cfg, training_config={**cfg.training_config, "max_steps": 4})
    assert run_training(longer, resume=True).metrics["global_step"] == 4
    run_training(cfg, overwrite=True)


def test_overwrite_replaces_the_whole_old_run_and_only_once_the_new_inputs_are_checked(make_config, tmp_path):
    """--overwrite leaves nothing of the old run (a later --resume would restore its checkpoint-4), deletes nothing
    when the new run stops at bad data, and never deletes a file a phitune run did not write."""
    from phitune.after.evaluate import EVAL_JSON, REPORT_MD
    from phitune.run.checkpoints import finished_run, latest_complete_checkpoint

    settings = {"eval_strategy": "no", "save_steps": 2}
    old = run_training(make_config(training_config={**settings, "max_steps": 4})).output_dir
    for name in (EVAL_JSON, REPORT_MD):  # what `phitune eval RUN` adds to a run
        (old / name).write_text("{}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(PhituneError, match="bad.jsonl:1: malformed JSON"):
        run_training(make_config(data={"train": str(bad)}, training_config={**settings, "max_steps": 2}),
                     overwrite=True)
    assert finished_run(old) and (old / "checkpoint-4").is_dir() and (old / EVAL_JSON).is_file()
    new = run_training(make_config(training_config={**settings, "max_steps": 2}), overwrite=True).output_dir
    assert sorted(p.name for p in new.glob("checkpoint-*")) == ["checkpoint-2"]
    assert latest_complete_checkpoint(new).name == "checkpoint-2"
    assert not (new / EVAL_JSON).exists() and not (new / REPORT_MD).exists()
    (new / "notes.txt").write_text("mine")
    with pytest.raises(PhituneError, match="--overwrite deletes only what a phitune run writes.*notes.txt"):
        run_training(make_config(training_config={**settings, "max_steps": 2}), overwrite=True)
    assert (new / "notes.txt").read_text() == "mine" and finished_run(new)


def test_an_interrupted_run_refuses_a_fresh_start(make_config):
    """Without --resume, a fresh start would train from step 0 and its checkpoint rotation delete the interrupted
    run's checkpoints: refused with both ways on, as for a finished run."""
    from phitune.run.checkpoints import CHECKPOINT_COMPLETE

    cfg = make_config(training_config={"max_steps": 2, "save_steps": 2, "eval_strategy": "no"})
    out = run_training(cfg).output_dir
    (out / CHECKPOINT_COMPLETE).unlink()  # as a run killed after its checkpoint, before its end, leaves it
    with pytest.raises(PhituneError) as err:
        run_training(cfg)
    message = str(err.value)
    assert "holds an interrupted run (checkpoint-2); pass --overwrite to replace it, --resume to continue it" in message
    assert (out / "checkpoint-2" / CHECKPOINT_COMPLETE).is_file()


def test_a_foreign_directory_is_refused_and_early_errors_leave_no_directory(make_config, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(PhituneError, match="is not empty and holds no phitune run"):
            run_training(make_config(training_config={"output_dir": str(foreign)}), overwrite=overwrite)
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]
    fresh = tmp_path / "new" / "run"
    with pytest.raises(PhituneError, match="data file not found"):
        run_training(make_config(data={"train": str(tmp_path / "missing.jsonl")},
                                 training_config={"output_dir": str(fresh)}))
    assert not (tmp_path / "new").exists()


def test_the_saved_config_holds_absolute_paths_so_a_run_works_from_any_directory(make_config, tmp_path,
                                                                                 monkeypatch):
    import shutil

    import yaml

    from phitune import api
    from conftest import DEMO_DATA

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "data").mkdir(parents=True), elsewhere.mkdir()
    for name in ("train.jsonl", "eval.jsonl"):
        shutil.copy(DEMO_DATA / name, project / "data" / name)
    monkeypatch.chdir(project)
    cfg = make_config(data={"train": "data/train.jsonl", "eval": "data/eval.jsonl", "cache_dir": "cache"},
                      training_config={"output_dir": "run", "max_steps": 2, "eval_strategy": "no"})
    run_training(cfg)
    saved = yaml.safe_load((project / "run" / "phitune_config.yaml").read_text())
    assert saved["data"]["train"] == str(project / "data" / "train.jsonl")
    assert saved["data"]["cache_dir"] == str(project / "cache")
    assert saved["training_config"]["output_dir"] == str(project / "run")
    monkeypatch.chdir(elsewhere)
    report = api.evaluate(project / "run", num_generate=1, max_new_tokens=4)
    assert report.metrics["fine-tuned"]["loss"] > 0 and (project / "run" / "eval.json").is_file()
    assert api.generate(["Hi"], project / "run", max_new_tokens=2)


RESUME_SETTINGS = {"lr_scheduler_type": "constant", "eval_strategy": "no", "save_steps": 3}


def interrupted_and_resumed(make_config, directory: Path):
    """3 steps (checkpoint-3), then --resume to 6 steps in the same directory; the resumed run's result."""
    run_training(make_config(training_config={**RESUME_SETTINGS, "max_steps": 3, "output_dir": str(directory)}))
    return run_training(make_config(training_config={**RESUME_SETTINGS, "max_steps": 6, "output_dir": str(directory)}),
                        resume=True)


def test_resume_continues_to_the_same_adapter(make_config, tmp_path, monkeypatch):
    """The resumed run trains steps 4..6 only, from checkpoint-3's optimizer state, and ends at the uninterrupted
    run's adapter (the next test shows a run that starts over fails this)."""
    straight = run_training(make_config(training_config={**RESUME_SETTINGS, "max_steps": 6,
                                                         "output_dir": str(tmp_path / "straight")}))
    runs = watch_training(monkeypatch)
    resumed = interrupted_and_resumed(make_config, tmp_path / "resumed")
    assert_resumed(runs[-1], resumed.output_dir / "checkpoint-3", max_steps=6)
    assert resumed.metrics["global_step"] == 6
    a, b = lora_b_weights(straight.output_dir), lora_b_weights(resumed.output_dir)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_resume_check_fails_on_a_run_that_starts_over(make_config, tmp_path, monkeypatch):
    """Deliberate break: Trainer.train ignores the checkpoint it is given. global_step is 6 all the same (and the
    adapter would equal the uninterrupted run's: training is deterministic); assert_resumed sees the restart."""
    from transformers import Trainer

    runs = watch_training(monkeypatch)
    train = Trainer.train
    monkeypatch.setattr(Trainer, "train", lambda self, resume_from_checkpoint=None, **kwargs: train(self, **kwargs))
    resumed = interrupted_and_resumed(make_config, tmp_path / "restarted")
    assert resumed.metrics["global_step"] == 6
    with pytest.raises(AssertionError, match="trained steps \\[1, 2, 3\\].*not 4..6"):
        assert_resumed(runs[-1], resumed.output_dir / "checkpoint-3", max_steps=6)


def test_a_run_killed_after_its_last_checkpoint_resumes_without_training(make_config, tmp_path, monkeypatch):
    """A 2-step run killed after checkpoint-2, before it wrote its adapter and marker: --resume trains no step
    (transformers checks max_steps only after a step, so it trained a step 3 and wrote checkpoint-3) and finishes
    with the uninterrupted run's adapter."""
    cfg = make_config(training_config={**RESUME_SETTINGS, "max_steps": 2, "save_steps": 1,
                                       "output_dir": str(tmp_path / "run")})
    out = run_training(cfg).output_dir
    straight = load_file(str(out / "adapter_model.safetensors"))
    for path in out.iterdir():  # what a kill right after checkpoint-2 leaves: the checkpoints only
        if not path.name.startswith("checkpoint-"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    runs = watch_training(monkeypatch)
    resumed = run_training(cfg, resume=True)
    assert_resumed(runs[-1], out / "checkpoint-2", max_steps=2)
    assert resumed.metrics["global_step"] == 2 and not (out / "checkpoint-3").exists()
    assert resumed.metrics["train_loss"] is None  # no step, no loss (transformers says 0.0)
    assert finished_run(out)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter.keys() == straight.keys() and all(torch.equal(adapter[k], straight[k]) for k in straight)


ACCUMULATION = {"max_steps": 1, "optim": "sgd", "learning_rate": 1.0, "max_grad_norm": 0.0, "eval_strategy": "no",
                "lr_scheduler_type": "constant", "warmup_steps": 0}


def one_sgd_step(make_config, directory: Path, **batch) -> tuple[dict, float]:
    """(LoRA B, train loss) after one plain SGD step (lr 1, no clipping) from B = 0: B is minus its gradient."""
    result = run_training(make_config(training_config={**ACCUMULATION, **batch, "output_dir": str(directory)}))
    return lora_b_weights(result.output_dir), result.metrics["train_loss"]


def test_gradient_accumulation_equals_the_larger_batch(make_config, tmp_path):
    """The 2024 accumulation bug: averaging per micro-batch over-weights short sequences. Rows here differ in length.

    One SGD step without clipping from B = 0: B is minus the gradient, so the gradients themselves are compared
    (test_accumulation_check_sees_per_micro_batch_averaging keeps the bug, and this comparison fails on it).
    """
    big, big_loss = one_sgd_step(make_config, tmp_path / "big", per_device_train_batch_size=8)
    accumulated, accumulated_loss = one_sgd_step(make_config, tmp_path / "acc", per_device_train_batch_size=2,
                                                 gradient_accumulation_steps=4)
    assert without_signal(big) == [] and gradient_mismatches(accumulated, big) == []
    assert big_loss == pytest.approx(accumulated_loss, rel=1e-4)


def test_accumulation_check_sees_per_micro_batch_averaging(make_config, tmp_path, monkeypatch):
    """Deliberate break: the whole batch's token count is not passed down, so each micro-batch's loss is its own
    mean, divided by the accumulation steps (transformers before the 2024 fix). Every B's gradient is reported."""
    from phitune.run.trainer import PhituneTrainer

    training_step = PhituneTrainer.training_step
    monkeypatch.setattr(PhituneTrainer, "training_step",
                        lambda self, model, inputs, num_items_in_batch=None: training_step(self, model, inputs, None))
    big, _ = one_sgd_step(make_config, tmp_path / "big", per_device_train_batch_size=8)
    accumulated, _ = one_sgd_step(make_config, tmp_path / "acc", per_device_train_batch_size=2,
                                  gradient_accumulation_steps=4)
    assert len(gradient_mismatches(accumulated, big)) == len(big) == 2 * 4


def test_full_fine_tuning_without_peft_config(make_config):
    result = run_training(make_config(peft_config=None, training_config={"max_steps": 2, "eval_strategy": "no"}))
    assert (result.output_dir / "model.safetensors").exists()
    assert not (result.output_dir / "adapter_config.json").exists()
    assert result.metrics["trainable_parameters"] == result.metrics["total_parameters"]


def test_loralib_backend_on_q_and_v_slices_exports_an_identical_peft_adapter(make_config):
    from peft import PeftModel

    cfg = make_config(peft_config={"backend": "loralib", "target_modules": ["q_proj", "v_proj"], "r": 4},
                      training_config={"max_steps": 6, "save_steps": 3})
    result = run_training(cfg)
    out = result.output_dir
    assert (out / "lora_state_dict.safetensors").exists() and (out / "checkpoint-6/lora_state_dict.safetensors").exists()
    assert result.metrics["eval_loss_after"] < result.metrics["eval_loss_before"]
    tokenizer = load_tokenizer(cfg.model)
    reloaded = PeftModel.from_pretrained(load_base_model(cfg.model, training=False), str(out))
    torch.testing.assert_close(logits_of(reloaded, tokenizer), logits_of(result.model, tokenizer),
                               rtol=1e-5, atol=1e-5)
    # Only q and v rows of qkv_proj are adapted: the exported B has zero rows for k.
    b = lora_b_weights(out)["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"]
    hidden = b.shape[0] // 3
    assert b[:hidden].abs().sum() > 0 and b[hidden : 2 * hidden].abs().sum() == 0


def test_loralib_backend_resumes_from_its_own_checkpoint(make_config, tmp_path, monkeypatch):
    settings = {"lr_scheduler_type": "constant", "eval_strategy": "no", "save_steps": 2}
    peft_cfg = {"backend": "loralib", "target_modules": ["q_proj", "v_proj"], "r": 4}
    straight = run_training(make_config(peft_config=peft_cfg, training_config={
        **settings, "max_steps": 4, "output_dir": str(tmp_path / "a")}))
    runs = watch_training(monkeypatch)
    run_training(make_config(peft_config=peft_cfg, training_config={**settings, "max_steps": 2,
                                                                    "output_dir": str(tmp_path / "b")}))
    resumed = run_training(make_config(peft_config=peft_cfg, training_config={
        **settings, "max_steps": 4, "output_dir": str(tmp_path / "b")}), resume=True)
    assert_resumed(runs[-1], resumed.output_dir / "checkpoint-2", max_steps=4)
    a = load_file(str(straight.output_dir / "lora_state_dict.safetensors"))
    b = load_file(str(resumed.output_dir / "lora_state_dict.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_old_checkpoints_are_deleted_only_after_the_new_one_is_complete(make_config, monkeypatch):
    """With save_total_limit 1 (the reference recipe's), the Trainer's own rotation deleted the last complete
    checkpoint before the new one was marked complete: a kill in between left nothing to resume from."""
    from phitune.run.checkpoints import CHECKPOINT_COMPLETE, CompleteCheckpoints

    seen = []
    on_save = CompleteCheckpoints.on_save

    def checking_on_save(self, args, state, control, **kwargs):
        out = Path(args.output_dir)
        if seen:  # the previous complete checkpoint survives until the new one is marked
            assert (out / f"checkpoint-{seen[-1]}" / CHECKPOINT_COMPLETE).is_file()
        assert not (out / f"checkpoint-{state.global_step}" / CHECKPOINT_COMPLETE).exists()
        seen.append(state.global_step)
        return on_save(self, args, state, control, **kwargs)

    monkeypatch.setattr(CompleteCheckpoints, "on_save", checking_on_save)
    cfg = make_config(training_config={"max_steps": 6, "save_steps": 2, "save_total_limit": 1, "eval_strategy": "no"})
    out = run_training(cfg).output_dir
    assert seen == [2, 4, 6]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]
    assert json.loads((out / "checkpoint-6" / CHECKPOINT_COMPLETE).read_text())["global_batch"] == 8


def test_private_trainer_hooks_are_checked_against_the_installed_transformers():
    """The loralib backend overrides Trainer._save and _load_from_checkpoint; a transformers release that renames or
    reshapes them must stop a run with one line, not save checkpoints that cannot be resumed."""
    from transformers import Trainer

    from phitune.run.hooks import check_private_hooks

    check_private_hooks()  # the installed transformers fits

    class Reshaped(Trainer):
        def _load_from_checkpoint(self, checkpoint_dir, model=None, strict=True):
            pass

    with pytest.raises(PhituneError, match=r"^peft_config.backend loralib needs Trainer._load_from_checkpoint"):
        check_private_hooks(Reshaped)


def test_ddp_looks_for_unused_parameters_only_where_a_forward_may_skip_some(tiny_model_dir):
    """Every trainable parameter of a LoRA on a dense model takes part in every forward: DDP is told so (no search
    after each forward, no warning from every rank). An MoE (unrouted experts) and a multimodal model (image and audio
    parts idle on text) keep the search. Real configs; the model's config is all the decision reads."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, PhimoeConfig

    from phitune.run.guard import may_leave_parameters_unused
    from phitune.tiny.vision import tiny_multimodal_config

    dense = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear"))
    assert may_leave_parameters_unused(dense) is False
    assert may_leave_parameters_unused(SimpleNamespace(config=PhimoeConfig(num_local_experts=4))) is True
    multimodal = tiny_multimodal_config(vocab_size=512, image_token_id=3, audio_token_id=4)
    assert may_leave_parameters_unused(SimpleNamespace(config=multimodal)) is True
