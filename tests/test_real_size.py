"""Phi-3-mini at its real size (3.8 B parameters, randomly initialised, stored in bf16): what tiny models cannot show.

Run with `python -m pytest -q -m slow tests/test_real_size.py` (CI runs it as its own step). Peak RSS 15.7 GB (half
of it mmapped checkpoint pages), 16 GB of disk (the base and its merge, 7.6 GB each; checked first); the time on 2 CPU cores is in the README's measured numbers. Checks:
2 LoRA steps lower the loss; on the QLoRA path the LoRA gradients are the same after phitune's evaluation as without
it (on an AVX512-BF16 CPU, bitsandbytes would otherwise train through its inference-only packed path) and 2 steps
lower the loss; a merge writes a model of the base's dtype and size; the module stays well inside 24 GiB.
The bf16 LoRA run and its merge need a CPU whose bf16 matmuls run at a usable speed (AVX-512); on others they skip
with the measured speed (CI prints the reason: -rs), and the QLoRA test (float32 compute there) still runs; on a CPU
with native bf16 (avx512_bf16, amx_bf16) a slow bf16 matmul fails instead of skipping. The peak RSS is checked after
every test.
"""

from __future__ import annotations

import gc
import json
import shutil
import threading

import pytest
import torch

from phitune.config.schema import config_from_dict
from phitune.tiny.phi3 import DEMO_DATA

pytestmark = pytest.mark.slow

PHI3_MINI_4K = dict(  # microsoft/Phi-3-mini-4k-instruct's config.json, the numbers that set sizes and compute
    vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=4096, original_max_position_embeddings=4096, rope_theta=10000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=32000, bos_token_id=1, eos_token_id=32000,
)
PARAMETERS = 3_821_079_552
N_LAYERS = PHI3_MINI_4K["num_hidden_layers"]
MEMORY_LIMIT_GIB = 20  # the CI machine has 24 GiB; leave room for the OS and the test runner
DISK_NEEDED_GB = 17  # the bf16 base (7.6 GB), its merge (7.6 GB), the runs' checkpoints and pytest's other folders


@pytest.fixture(scope="module", autouse=True)  # autouse: it starts before the module's other fixtures
def anonymous_memory_peak():
    """The module's peak anonymous memory (RssAnon: what cannot be paged out), sampled every 50 ms. ru_maxrss also
    counts the mmapped safetensors pages, which the kernel drops under pressure: it read 15.7 GiB on a busy machine
    and 24.4 GiB on an idle one for the same tests, so it says how free the machine was, not whether they fit."""
    peak, done = [0], threading.Event()

    def sample():
        while not done.wait(0.05):
            with open("/proc/self/status") as status:
                anon = next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))
            peak[0] = max(peak[0], anon)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    yield peak
    done.set()
    thread.join()


@pytest.fixture(autouse=True)
def peak_memory_within_the_limit(anonymous_memory_peak):
    """After each test, and the module fixtures it set up (the base, the LoRA run), the module's peak anonymous memory
    so far is under MEMORY_LIMIT_GIB: checked where the memory is used, whichever tests run and in whatever order."""
    yield
    peak_gib = anonymous_memory_peak[0] / 2**20  # RssAnon is in KiB
    assert peak_gib < MEMORY_LIMIT_GIB, f"peak anonymous memory {peak_gib:.1f} GiB"


@pytest.fixture(scope="module")
def real_base(tmp_path_factory):
    """Phi-3-mini-4k's exact architecture with N(0, 0.02) weights in bf16 (7.6 GB) and the bundled tokenizer.

    Built on the meta device and filled in place, so it never exists in float32 (15.3 GB) nor twice."""
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    from phitune.tiny.phi3 import tiny_base_path

    out = tmp_path_factory.mktemp("phi3-mini-random")
    free_gb = shutil.disk_usage(out).free / 1e9  # a full disk midway fails deep in a merge (CI once did), not here
    if free_gb < DISK_NEEDED_GB:
        pytest.fail(f"the real-size tests need {DISK_NEEDED_GB} GB free where pytest writes ({out.parent}); "
                    f"{free_gb:.1f} GB are", pytrace=False)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = Phi3ForCausalLM(Phi3Config(**PHI3_MINI_4K))
    finally:
        torch.set_default_dtype(torch.float32)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS
    model.save_pretrained(out)
    del model
    AutoTokenizer.from_pretrained(tiny_base_path()).save_pretrained(out)
    return out


def run_config(base, output_dir, *, quantized=False, **training) -> dict:
    """2 steps on the same 2 rows (<= 64 tokens) of the bundled chat data, the first of them also the eval row (a
    random model's loss on other rows says little after 2 steps); LoRA r=8 on every linear layer.

    LoRA trains in bf16, the base's dtype (float32 would need 15.3 GB of weights); QLoRA computes in `auto`'s dtype,
    bf16 on CPUs with native bf16 and float32 on the others, where emulated bf16 matmuls are ~4x slower."""
    quantization = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                    "bnb_4bit_compute_dtype": "auto"}
    return config_from_dict({
        "model": {"name_or_path": str(base), "torch_dtype": "auto" if quantized else "bfloat16",
                  "quantization": quantization if quantized else None},
        "data": {"train": str(DEMO_DATA / "train.jsonl"), "eval": str(DEMO_DATA / "train.jsonl"),
                 "eval_split": 0.0, "max_seq_length": 64, "max_train_examples": 2, "max_eval_examples": 1},
        "training_config": {"output_dir": str(output_dir), "max_steps": 2, "per_device_train_batch_size": 2,
                            "per_device_eval_batch_size": 1, "logging_steps": 1, "save_strategy": "no",
                            "report_to": "none", "seed": 0, "disable_tqdm": True, **training},
        "peft_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
    })


def _bf16_input_gradient_gflops() -> float:
    """GFLOP/s of the matmul a frozen bf16 Linear's backward does (grad_output @ weight), on this CPU.

    On the AVX-512 CPU this test was built on, the whole LoRA part (about 4e12 bf16 FLOPs) took 5 min 19 s, so above
    10 GFLOP/s; the threshold of 5 is below that. On an AVX2-only AMD EPYC (2026-11-29) this matmul ran at 0.3-0.5
    GFLOP/s against 82 in float32, and the 2 bf16 LoRA steps were still in their first backward pass after 45
    minutes, past CI's limit. Best of three timings, so a busy moment does not skip the test on a fast CPU."""
    import time

    grad_output = torch.randn(32, 2048, dtype=torch.bfloat16)
    weight = torch.randn(2048, 2048, dtype=torch.bfloat16)
    grad_output @ weight  # warm-up
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        grad_output @ weight
        seconds.append(time.perf_counter() - start)
    return 2 * 32 * 2048 * 2048 / min(seconds) / 1e9


@pytest.fixture(scope="module")
def lora_run(real_base, tmp_path_factory):
    """The bf16 LoRA run, on CPUs that run bf16 matmuls at a usable speed (float32 would need 15.3 GB of weights);
    the tests that need it (2 steps lower the loss, the merge) skip with the measured speed on the others. The
    QLoRA test computes in float32 on such CPUs (`auto`) and runs everywhere."""
    from phitune.train import run_training

    from phitune.models.loading import cpu_bf16_flags

    gflops = _bf16_input_gradient_gflops()
    if gflops < 5:
        message = (f"bf16 matmul backward runs at {gflops:.1f} GFLOP/s on this CPU: the 2 bf16 LoRA steps at "
                   "Phi-3-mini's size would take hours")
        if cpu_bf16_flags():  # native bf16: so slow a matmul is a fault here (a torch without its kernels), no skip
            pytest.fail(f"{message}, on a CPU with {', '.join(cpu_bf16_flags())}")
        pytest.skip(f"{message} (no avx512_bf16 / amx_bf16)")

    result = run_training(run_config(real_base, tmp_path_factory.mktemp("lora"), learning_rate=1e-3))
    result.model = None  # the 7.6 GB model is not needed after the run; the merge loads its own
    gc.collect()
    return result


def test_two_lora_steps_lower_the_loss(lora_run):
    assert lora_run.metrics["eval_loss_after"] < lora_run.metrics["eval_loss_before"]


def _lora_gradients(trainer, batch) -> dict:
    """d loss / d lora_B on `batch` in training mode (lora_B starts at zero, so lora_A's gradient is zero)."""
    model = trainer.model.train()
    model.zero_grad()
    trainer.compute_loss(model, batch).backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if "lora_B" in n}
    model.zero_grad()
    return grads


def test_qlora_evaluation_keeps_the_gradients_and_two_steps_lower_the_loss(real_base, tmp_path):
    """phitune's QLoRA path (4-bit load, SFTTrainer), one load: the LoRA gradients on a batch are the same after the
    evaluation phitune runs before training as without it (on an AVX512-BF16 CPU that evaluation used to repack
    every 4-bit layer into a format without backward); then 2 steps lower the loss."""
    from phitune.data import load_conversations
    from phitune.models.loading import load_tokenizer
    from phitune.recipes.sft import build_sft_config, build_trainer, tokenize_splits
    from phitune.run.lifecycle import load_model_for_training
    from phitune.run.plan import plan_run

    cfg = run_config(real_base, tmp_path, quantized=True, learning_rate=1e-3)
    tokenizer = load_tokenizer(cfg.model)
    plan = plan_run(cfg)
    train_set, eval_set = tokenize_splits(cfg, load_conversations(cfg.data), tokenizer, plan)
    model, peft_config = load_model_for_training(cfg, plan)
    args = build_sft_config(cfg, has_eval=eval_set is not None, plan=plan)
    trainer = build_trainer(cfg, model, tokenizer, train_set, eval_set, peft_config, args)
    batch = next(iter(trainer.get_train_dataloader()))
    without_eval = _lora_gradients(trainer, batch)
    loss_before = trainer.evaluate()["eval_loss"]
    with_eval = _lora_gradients(trainer, batch)
    assert with_eval.keys() == without_eval.keys() and len(without_eval) == N_LAYERS * 4
    for name, expected in without_eval.items():
        assert expected.norm() > 0, f"{name} has no gradient"
        error = ((with_eval[name] - expected).norm() / expected.norm()).item()
        assert error < 0.01, f"{name}: gradient {error:.1%} away from the one without evaluation"
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < loss_before


def test_merge_keeps_the_base_dtype_and_size(real_base, lora_run, tmp_path):
    from dataclasses import replace

    from phitune.after.generate import resolve_model_source
    from phitune.after.merge import merge_adapter

    model_cfg, adapter = resolve_model_source(lora_run.output_dir)  # a run in float32 still merges to the base's bf16
    result = merge_adapter(replace(model_cfg, torch_dtype="float32"), adapter, tmp_path / "merged")
    assert result.dtype == "bfloat16"
    written = sum(p.stat().st_size for p in result.output_dir.glob("*.safetensors"))
    base = sum(p.stat().st_size for p in real_base.glob("*.safetensors"))
    assert abs(written - base) < 0.01 * base, f"merged {written / 1e9:.2f} GB from a {base / 1e9:.2f} GB base"
    config = json.loads((result.output_dir / "config.json").read_text(encoding="utf-8"))
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


