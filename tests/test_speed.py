"""phitune.speed: padding-free batches and every speed switch leave the loss and the gradients unchanged.

All on CPU with the tiny Phi-3 in float32, where "unchanged" means within TOL for losses and within
_equivalence.RELATIVE_TOLERANCE for each gradient tensor (float summation order differs between a padded and a
concatenated batch, nothing else). Gradients are compared themselves, raw (max_grad_norm 0), never through adapters
after AdamW steps, which hide a uniform scale; each family keeps a deliberate break that the comparison catches.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phitune.config.schema import SpeedConfig
from phitune.errors import PhituneError
from phitune.speed import SpeedPlan, auto_attention, resolve_activation, resolve_speed

from _equivalence import GradientRecorder, gradient_mismatches, without_signal

TOL = dict(rtol=1e-4, atol=1e-5)  # float32; observed differences are ~1e-6
ROOT = Path(__file__).parents[1]


def _lora_model(model_dir, attn="sdpa"):
    """The tiny Phi-3 with LoRA on all linear layers, B randomised so that every LoRA weight gets a gradient."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config)


def _examples(lengths, vocab=512, seed=0):
    """Rows of unequal length; the first third of each is a prompt whose labels are masked."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    return rows


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _padded_and_packed(examples):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return (DataCollatorForLanguageModeling(pad_token_id=0)(examples),
            DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_free_loss_and_grads_equal_padded(tiny_model_dir, attn):
    """Fails when attention leaks across the concatenated rows (test_padding_free_check_sees_attention_leak)."""
    model = _lora_model(tiny_model_dir, attn)
    padded, packed = _padded_and_packed(_examples([5, 23, 11, 40]))
    assert packed["input_ids"].shape == (1, 79) and "attention_mask" not in packed
    loss_padded, grads_padded = _loss_and_grads(model, padded)
    loss_packed, grads_packed = _loss_and_grads(model, packed)
    torch.testing.assert_close(loss_packed, loss_padded, **TOL)
    assert len(grads_packed) == 2 * 4 * 2  # 2 layers x (qkv, o, gate_up, down) x (lora_A, lora_B)
    assert without_signal(grads_padded) == []
    assert gradient_mismatches(grads_packed, grads_padded) == []


def test_padding_free_check_sees_attention_leak(tiny_model_dir, monkeypatch):
    """Deliberate break: transformers no longer finds the row boundaries in the position ids, so each token of the
    concatenated row attends to the rows before it (positions still restart). The loss moves 0.2% (LoRA B
    non-zero); the gradient comparison reports all 16 LoRA weights (their gradients differ by 88-172%)."""
    import transformers.masking_utils as masking_utils

    model = _lora_model(tiny_model_dir)
    padded, packed = _padded_and_packed(_examples([5, 23, 11, 40]))
    _, grads_padded = _loss_and_grads(model, padded)
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    _, grads_leaking = _loss_and_grads(model, packed)
    mismatched = gradient_mismatches(grads_leaking, grads_padded)
    assert len(mismatched) == len(grads_padded) == 2 * 4 * 2, mismatched


def test_padding_free_does_not_attend_across_examples(tiny_model_dir):
    """Changing one example must not change the loss terms of another in the same concatenated row."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    model = _lora_model(tiny_model_dir)
    first, second = _examples([17, 9], seed=1), _examples([17, 9], seed=2)
    second[0] = first[0]
    with torch.no_grad():
        logits_a = model(**collate(first), use_cache=False).logits[0, :17]
        logits_b = model(**collate(second), use_cache=False).logits[0, :17]
    torch.testing.assert_close(logits_a, logits_b, **TOL)


def _train(make_config, speed: dict, training: dict | None = None, model: dict | None = None):
    """Two optimizer steps through phitune's own path (data, model, SFTConfig, PhituneTrainer); the trainer, with
    each step's raw gradients (no clipping) in `trainer.gradients`."""
    from phitune.data import load_conversations
    from phitune.models.loading import load_tokenizer
    from phitune.recipes.sft import build_sft_config, build_trainer, tokenize_splits
    from phitune.run.lifecycle import load_model_for_training
    from phitune.run.plan import plan_run

    cfg = make_config(
        data={"eval": None, "eval_split": 0.0, "max_train_examples": 16, "max_seq_length": 96},
        training_config={"max_steps": 2, "logging_steps": 1, "save_strategy": "no", "learning_rate": 1e-2,
                         "lr_scheduler_type": "constant", "max_grad_norm": 0.0, **(training or {})},
        speed=speed,
        **({"model": model} if model else {}),  # None would replace the section
    )
    tokenizer = load_tokenizer(cfg.model)
    plan = plan_run(cfg)
    train_set, _ = tokenize_splits(cfg, load_conversations(cfg.data), tokenizer, plan)
    model, peft_config = load_model_for_training(cfg, plan)
    torch.manual_seed(0)  # the LoRA A initialisation
    args = build_sft_config(cfg, has_eval=False, plan=plan)
    trainer = build_trainer(cfg, model, tokenizer, train_set, None, peft_config, args)
    recorder = GradientRecorder()
    trainer.add_callback(recorder)
    trainer.train()
    trainer.gradients = recorder.steps
    return trainer


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _step_mismatches(trainer, reference, dtype=torch.float32) -> list[str]:
    """gradient_mismatches at each of the two steps: step 1 checks LoRA B's gradient at the shared start (B = 0,
    so A has none yet); step 2, after one update, every LoRA weight's."""
    assert len(trainer.gradients) == len(reference.gradients) == 2
    assert without_signal(reference.gradients[1]) == []
    return [f"step {i + 1}: {line}" for i, (got, want) in enumerate(zip(trainer.gradients, reference.gradients))
            for line in gradient_mismatches(got, want, dtype)]


def _checkpoint_func(trainer):
    """The checkpoint function transformers installed on the first decoder layer (None when not checkpointing)."""
    layer = trainer.model.get_base_model().model.layers[0]
    return getattr(layer, "_gradient_checkpointing_func", None) if layer.gradient_checkpointing else None


SWITCHES = [  # each switch flipped at least once against the reference (padding-free, no checkpointing)
    {"padding_free": "false", "activation": "full"},
    {"padding_free": "true", "activation": "selective"},
]


REFERENCE = {"padding_free": "true", "activation": "none"}


def test_every_speed_switch_gives_the_same_gradients(make_config):
    """The raw gradients of both steps equal the reference's (test_speed_switch_check_sees_gradient_scale shows a
    switch that doubles them, loss unchanged, fails here)."""
    reference = _train(make_config, REFERENCE)
    for speed in SWITCHES:
        assert _step_mismatches(_train(make_config, speed), reference) == [], speed


def test_speed_switch_check_sees_gradient_scale(make_config, monkeypatch):
    """Deliberate break: padded batches (padding-free off) get twice the gradient with the same loss value, as a
    wrong token count in the loss normalisation of one path would give. The first losses still agree (the check
    this test suite used to rest on); the gradient comparison fails on every LoRA weight."""
    from phitune.run.trainer import PhituneTrainer

    reference = _train(make_config, REFERENCE)
    compute_loss = PhituneTrainer.compute_loss

    def doubled_on_padded_batches(self, model, inputs, *args, **kwargs):
        loss = compute_loss(self, model, inputs, *args, **kwargs)
        if "attention_mask" in inputs and not isinstance(loss, tuple):
            loss = 2 * loss - loss.detach()  # the same value, twice the gradient
        return loss

    monkeypatch.setattr(PhituneTrainer, "compute_loss", doubled_on_padded_batches)
    broken = _train(make_config, SWITCHES[0])
    assert _losses(broken)[0] == pytest.approx(_losses(reference)[0], rel=1e-4)
    mismatched = _step_mismatches(broken, reference)
    assert len([line for line in mismatched if line.startswith("step 1")]) == 2 * 4  # every lora_B
    assert len([line for line in mismatched if line.startswith("step 2")]) == 2 * 4 * 2  # every LoRA weight


def test_selective_checkpointing_takes_effect_with_peft(make_config):
    """TRL's selective policy must reach the decoder layers; with PEFT it is silently dropped unless phitune installs
    it on the transformers model (apply_activation_strategy)."""
    func = _checkpoint_func(_train(make_config, {"activation": "selective"}))
    assert func is not None and "context_fn" in func.keywords and "selective" not in func.keywords
    full = _checkpoint_func(_train(make_config, {"activation": "full"}))
    assert full is not None and "context_fn" not in full.keywords


def test_offload_gives_the_same_gradients(make_config, monkeypatch):
    """`offload` on CPU gives the same gradients: pinned memory needs CUDA, so save_on_cpu runs unpinned here; the plumbing and math are real."""
    import functools

    import transformers.modeling_utils as modeling_utils
    from torch.autograd.graph import save_on_cpu

    calls = []

    def unpinned_save_on_cpu(pin_memory=False, device_type="cuda"):
        calls.append(device_type)
        return save_on_cpu(pin_memory=False, device_type=device_type)

    monkeypatch.setattr(modeling_utils, "save_on_cpu", unpinned_save_on_cpu)
    monkeypatch.setattr("phitune.speed.resolve_activation", functools.partial(_allow_offload_on_cpu))
    reference = _train(make_config, {"activation": "none"})
    offloaded = _train(make_config, {"activation": "offload"})
    assert calls, "save_on_cpu was never entered: offload did not reach transformers"
    assert _step_mismatches(offloaded, reference) == []


def _allow_offload_on_cpu(choice, training_config, cuda):
    return resolve_activation(choice, training_config, cuda=True) if choice == "offload" else resolve_activation(
        choice, training_config, cuda)


def test_sft_kwargs_per_activation():
    key = "activation_checkpointing_kwargs"
    assert SpeedPlan(True, False, "selective").sft_kwargs()[key] == {"use_reentrant": False, "selective": True}
    assert SpeedPlan(True, False, "full").sft_kwargs()[key] == {"use_reentrant": False}
    assert SpeedPlan(True, False, "offload").sft_kwargs()[key] == {"use_reentrant": False, "offload": True}
    none = SpeedPlan(True, False, "none").sft_kwargs()
    assert none["activation_checkpointing"] is False and key not in none
    kept = SpeedPlan(True, False, "full", checkpoint_kwargs={"every_n_layers": 2}).sft_kwargs()[key]
    assert kept == {"use_reentrant": False, "every_n_layers": 2}


@pytest.mark.parametrize(
    "choice,training,cuda,expected",
    [
        ("auto", {}, False, "none"),
        ("auto", {}, True, "selective"),
        ("auto", {"gradient_checkpointing": True}, False, "selective"),
        ("auto", {"gradient_checkpointing": False}, True, "none"),
        ("auto", {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}}, True,
         "full"),
        ("auto", {"activation_checkpointing": False}, True, "none"),
        ("full", {"gradient_checkpointing": True}, False, "full"),
        ("none", {}, True, "none"),
    ],
)
def test_resolve_activation(choice, training, cuda, expected):
    assert resolve_activation(choice, training, cuda) == expected


@pytest.mark.parametrize(
    "choice,training,cuda,words",
    [
        ("none", {"gradient_checkpointing": True}, True, "contradicts"),
        ("offload", {"activation_checkpointing": False}, True, "contradicts"),
        ("offload", {}, False, "needs a CUDA GPU"),
        ("selective", {"gradient_checkpointing_kwargs": {"use_reentrant": True}}, True, "use_reentrant"),
    ],
)
def test_resolve_activation_refuses_contradictions(choice, training, cuda, words):
    with pytest.raises(PhituneError, match=words):
        resolve_activation(choice, training, cuda)


def test_auto_follows_the_hardware():
    """On a CPU: padded batches (sdpa would make padding-free one dense block), no Liger, no recomputation."""
    plan = resolve_speed(SpeedConfig())
    cuda = torch.cuda.is_available()
    assert plan.padding_free == cuda and plan.activation == ("selective" if cuda else "none")
    if not cuda:
        assert not plan.liger and auto_attention(padding_free=True) == "sdpa"
    assert resolve_speed(SpeedConfig(padding_free="true")).padding_free


def test_speed_section_is_validated():
    from phitune.config.schema import config_from_dict

    with pytest.raises(PhituneError, match="speed.activation must be one of"):
        config_from_dict({"data": {"train": "x.jsonl"}, "speed": {"activation": "sometimes"}})


def _throughput(*args: str) -> tuple[int, dict, str]:
    """benchmarks/throughput.py on the tiny shape's chat rows: (exit status, the JSON report, stderr)."""
    command = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--shape", "tiny", "--data", "chat",
               "--seq-len", "512", "--json", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)  # 45 s on 2 busy cores
    lines = done.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("{"), done.stderr[-2000:]
    return done.returncode, json.loads(lines[-1]), done.stderr


def test_throughput_benchmark_checks_the_math_then_times_both_recipes():
    """Before timing, both recipes' logits and LoRA gradients on the first batch (LoRA B non-zero) agree; both
    sides hold float32 weights on a CPU, and the report names each side's dtype, attention and batch layout."""
    code, report, stderr = _throughput("--warmup", "1", "--steps", "1")
    assert code == 0, stderr[-2000:]
    (run,) = report["runs"]
    check = run["equivalence"]["phitune"]
    assert check["passed"] and check["gradients_compared"] == 2 * 4 * 2 and check["gradients_differing"] == 0
    assert check["gradients_max_relative_difference"] <= check["tolerance"] == 1e-4
    assert run["ratio"] > 0
    for side in ("reference", "phitune"):
        assert run[side]["weights"] == "float32, LoRA float32", side
        assert run[side]["attention"] == "sdpa" and run[side]["batch_layout"].startswith("padded"), side


@pytest.mark.parametrize("injected", ["scale", "unmask"])
def test_throughput_benchmark_refuses_a_ratio_when_a_switch_changes_the_math(injected):
    """Deliberate breaks of phitune's side (twice the gradient with the same loss; the prompt counted in the loss):
    the check reports every LoRA gradient as different, and no ratio is printed (exit status 1), before timing."""
    code, report, _ = _throughput("--warmup", "0", "--steps", "1", "--inject-break", injected)
    (run,) = report["runs"]
    check = run["equivalence"]["phitune"]
    assert code == 1 and not check["passed"] and check["injected_break"] == injected
    assert check["gradients_differing"] == check["gradients_compared"] == 2 * 4 * 2
    assert not any(key.startswith("ratio") for key in run) and "reference" not in run


@pytest.mark.parametrize("load, env, expected", [
    (4.3, None, 1),   # one core busy elsewhere, and more: 1 of 2 (5.9x faster than 2 in the tiny SimPO example)
    (1.4, None, 1),   # one other busy process
    (0.3, None, 2),   # idle but for this process's own start
    (4.3, "2", 2),    # OMP_NUM_THREADS is the user's (or torchrun's) choice
])
def test_a_cpu_run_takes_the_cores_other_work_leaves_free(load, env, expected):
    """In a fresh interpreter (the choice is made once per process), with the 1-minute load average the OS reports
    given: torch's thread count after the first model loads. A real load of the tiny model through the loader every
    command uses."""
    code = f"""
import os, torch
os.getloadavg = lambda: ({load}, {load}, {load})
torch.set_num_threads(2)  # a 2-core machine
from phitune.config.schema import ModelConfig
from phitune.models.loading import load_base_model
from phitune.tiny.phi3 import tiny_base_path
load_base_model(ModelConfig(name_or_path=str(tiny_base_path()), torch_dtype="float32"), training=False)
load_base_model(ModelConfig(name_or_path=str(tiny_base_path()), torch_dtype="float32"), training=False)
print(torch.get_num_threads())
"""
    environment = {k: v for k, v in __import__("os").environ.items() if k != "OMP_NUM_THREADS"}
    if env:
        environment["OMP_NUM_THREADS"] = env
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=environment)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == str(expected)
