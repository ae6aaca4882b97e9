"""Beyond one process: `phitune train` under torchrun with two CPU workers (gloo) equals one worker with the same
global batch, with the default held-out eval set; every rank stops together. (Kill -9 and resume under torchrun:
tests/test_distributed_resume.py; what both share: tests/_distributed.py.)

`accelerate launch --cpu --num_processes 2` starts a single process on a 2-core machine, so the tests use torchrun,
which starts both. 2 workers x batch 2 sees the same 4 rows per step as 1 worker x batch 4 (the sampler shards one
shuffled order), so the adapters differ only by the order of float reductions in the gradient all-reduce.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from _distributed import (
    DPO_TOLERANCE,
    EVAL_LINE,
    SUMMARY_END,
    TRAIN_LINE,
    assert_same_adapter,
    free_port,
    launch,
    launcher,
    relative_difference,
    torchrun_command,
    train_dpo_pair,
    wait,
    write_config,
)

from phitune.run.checkpoints import CHECKPOINT_COMPLETE

pytestmark = pytest.mark.processes  # torchrun jobs and runs killed and resumed: pyproject.toml's marker


def listing(out: Path) -> dict[str, list[str]]:
    """File names in the output directory and in each checkpoint."""
    return {str(p.relative_to(out)): sorted(c.name for c in p.iterdir()) for p in [out, *out.glob("checkpoint-*")]}



def eval_losses(out: Path) -> dict[int, float]:
    """Step -> eval loss, from the last checkpoint's log history and the run's final metrics."""
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
    history = json.loads((last / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["eval_loss"] for entry in history if "eval_loss" in entry}



def test_two_cpu_workers_equal_one_with_an_eval_set(one_and_two_workers):
    """Fails when evaluating before training leaves the workers without gradient sync (9.7% apart before the fix)."""
    single_out, multi_out = one_and_two_workers / "single" / "out", one_and_two_workers / "multi" / "out"
    assert_same_adapter(multi_out, single_out)

    # Evaluation is sharded (each worker scores half the eval batches) and token-weighted, so the losses at step 0,
    # 4, 8 and 12 are those of the single worker, and the final evaluation is the in-loop one at step 12, not a rerun.
    single_evals, multi_evals = eval_losses(single_out), eval_losses(multi_out)
    assert sorted(single_evals) == sorted(multi_evals) == [0, 4, 8, 12]
    for step, loss in single_evals.items():
        assert abs(multi_evals[step] - loss) <= 1e-5 * loss, (step, multi_evals[step], loss)
    single_metrics, multi_metrics = (json.loads((o / "metrics.json").read_text()) for o in (single_out, multi_out))
    assert multi_metrics["eval_loss_before"] == multi_evals[0] and multi_metrics["eval_loss_after"] == multi_evals[12]
    assert multi_metrics["eval_loss_after"] < multi_metrics["eval_loss_before"]
    assert multi_metrics["eval_examples"] == single_metrics["eval_examples"] > 0

    # One writer: the same files as the single-process run (each worker keeps its own RNG state, by design),
    # every checkpoint complete, logs printed once.
    expected_files = listing(single_out)
    for name, files in expected_files.items():
        if "rng_state.pth" in files:
            expected_files[name] = sorted({*files, "rng_state_0.pth", "rng_state_1.pth"} - {"rng_state.pth"})
    assert listing(multi_out) == expected_files
    for checkpoint in multi_out.glob("checkpoint-*"):
        marker = json.loads((checkpoint / CHECKPOINT_COMPLETE).read_text())
        layout = {key: marker[key] for key in ("processes", "per_device_train_batch_size",
                                               "gradient_accumulation_steps", "global_batch")}
        assert layout == {"processes": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                          "global_batch": 4}
        # marked after the barrier: every worker's files are recorded, rank 1's RNG state too
        written = [path for path in checkpoint.rglob("*") if path.is_file() and path.name != CHECKPOINT_COMPLETE]
        assert sorted(marker["files"]) == sorted(path.relative_to(checkpoint).as_posix() for path in written)
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(marker["files"])
        assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == int(checkpoint.name[11:])
    assert multi_metrics["global_step"] == 12
    assert multi_metrics["train_tokens"] == single_metrics["train_tokens"]  # both workers' tokens, counted once
    assert abs(multi_metrics["train_loss"] - single_metrics["train_loss"]) < 1e-5
    stdout, stderr = ((one_and_two_workers / "multi" / name).read_text() for name in ("stdout", "stderr"))
    assert len(TRAIN_LINE.findall(stdout)) == 12 and len(EVAL_LINE.findall(stdout)) == 4
    said = " ".join((stdout + stderr).split())  # rich wraps long lines
    assert len(re.findall(r"training [\d,]+ of [\d,]+ parameters", said)) == 1  # once, not once per worker
    assert said.count(SUMMARY_END) == 1  # the run summary too
    # DDP is told that every trainable parameter (the LoRA's) is used, so it neither searches nor warns per rank
    assert "find_unused_parameters=True" not in said
    assert yaml.safe_load((multi_out / "phitune_config.yaml").read_text())["training_config"]["output_dir"]


def test_two_torchrun_agents_as_two_nodes_equal_one_process(one_and_two_workers, tiny_model_dir, tmp_path):
    """Two nodes, as on a cluster: one torchrun agent per node rank (0 and 1, one worker each, both on 127.0.0.1),
    the output directory and the data cache shared, the one --auto-resume command on both. The job's one lock
    holder is global rank 0; the adapter and the eval losses are the one-process run's."""
    config = write_config(tmp_path, tiny_model_dir, batch_size=2, cache_dir=str(tmp_path / "cache"))
    port = str(free_port())
    agents = [launch([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                      "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port, "-m",
                      "phitune.cli", "train", str(config), "--auto-resume"], tmp_path, f".{rank}") for rank in (0, 1)]
    for rank, agent in enumerate(agents):
        wait(agent, tmp_path, f".{rank}")
    assert_same_adapter(tmp_path / "out", one_and_two_workers / "single" / "out")
    assert eval_losses(tmp_path / "out").keys() == eval_losses(one_and_two_workers / "single" / "out").keys()
    assert len(TRAIN_LINE.findall((tmp_path / "stdout.0").read_text())) == 12  # node 0's rank 0 speaks
    assert not TRAIN_LINE.search((tmp_path / "stdout.1").read_text())


def gradient_config(directory: Path, model_dir: Path, batch_size: int) -> Path:
    """2 steps, no eval set, no checkpoint, no clipping: each step's raw gradients are what is compared."""
    path = write_config(directory, model_dir, batch_size=batch_size, max_steps=2, eval_split=0)
    config = yaml.safe_load(path.read_text())
    config["training_config"].update({"max_grad_norm": 0.0, "save_strategy": "no", "eval_strategy": "no"})
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gradients_one_and_two_workers(tiny_model_dir, tmp_path_factory):
    """Each step's raw gradients: 1 worker x batch 4, 2 workers x batch 2, and 2 workers x batch 2 with the
    deliberate break (the gradient times the process count, the loss value unchanged); all three at once."""
    tmp_path = tmp_path_factory.mktemp("distributed_gradients")
    procs = {}
    for name, workers, scale in (("single", 1, False), ("multi", 2, False), ("scaled", 2, True)):
        directory = tmp_path / name
        config = gradient_config(directory, tiny_model_dir, batch_size=4 // workers)
        entry = [str(launcher(directory, gradients=True, scale_by_world=scale)), "train", str(config)]
        procs[name] = launch([*torchrun_command(), *entry] if workers == 2 else [sys.executable, *entry], directory)
    for name, proc in procs.items():
        wait(proc, tmp_path / name)
    return {name: torch.load(tmp_path / name / "gradients.pt") for name in procs}


def gradient_step_mismatches(got: list[dict], expected: list[dict]) -> list[str]:
    from _equivalence import gradient_mismatches, without_signal

    assert len(got) == len(expected) == 2 and without_signal(expected[1]) == []
    return [f"step {i + 1}: {line}" for i, (g, e) in enumerate(zip(got, expected)) for line in gradient_mismatches(g, e)]


def test_two_workers_compute_the_one_worker_gradients(gradients_one_and_two_workers):
    """The gradients themselves at both steps (step 1: B's, from B = 0; step 2: every LoRA weight's), raw: AdamW
    steps and clipping can hide a uniform scale, this cannot (the next test keeps such a scale)."""
    runs = gradients_one_and_two_workers
    assert gradient_step_mismatches(runs["multi"], runs["single"]) == []


def test_the_n_versus_1_check_sees_a_gradient_scaled_by_the_process_count(gradients_one_and_two_workers):
    """Deliberate break: under 2 processes each worker's loss has twice its gradient, its value unchanged (the loss
    normalised by the local instead of the global token count would do it). Every LoRA gradient is reported."""
    runs = gradients_one_and_two_workers
    mismatched = gradient_step_mismatches(runs["scaled"], runs["single"])
    assert len(mismatched) == 2 * 4 + 2 * 4 * 2, mismatched  # step 1: every B; step 2: every A and B


def test_shipped_accelerate_configs_load():
    """Each file in examples/accelerate parses with accelerate's own loader and opens with its launch command."""
    from accelerate.commands.config.config_args import load_config_from_file

    folder = Path(__file__).parents[1] / "examples" / "accelerate"
    kinds = {}
    for path in sorted(folder.glob("*.yaml")):
        config = load_config_from_file(str(path))
        kinds[path.stem] = str(config.distributed_type)
        launch_line = f"accelerate launch --config_file examples/accelerate/{path.name} -m phitune.cli train"
        assert launch_line in path.read_text()
    assert kinds == {"ddp": "DistributedType.MULTI_GPU", "deepspeed_zero3": "DistributedType.DEEPSPEED",
                     "fsdp": "DistributedType.FSDP"}


def test_sigterm_stops_every_worker_at_the_same_step(tiny_model_dir, tmp_path):
    """torchrun forwards SIGTERM to each worker; they agree on the step, so one complete checkpoint is saved. The
    hint says to run the same torchrun command again (one process alone would make another global batch)."""
    config = write_config(tmp_path, tiny_model_dir, batch_size=2, max_steps=500)
    proc = launch([*torchrun_command(), "-m", "phitune.cli", "train", str(config), "--auto-resume"], tmp_path)
    deadline = time.monotonic() + 180
    while not TRAIN_LINE.search((tmp_path / "stdout").read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr").read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)  # torchrun itself exits 1 after forwarding the signal; the workers' messages matter
    steps = re.findall(r"error: stopped by SIGTERM at step (\d+);", (tmp_path / "stderr").read_text())
    assert len(steps) == 1, steps  # said once, by rank 0; both ranks' RNG states below show both saved that step
    assert (f". Resume with the same torchrun command (2 processes) again: phitune train {config} --auto-resume"
            in (tmp_path / "stderr").read_text())
    checkpoint = tmp_path / "out" / f"checkpoint-{steps[0]}"
    assert (checkpoint / CHECKPOINT_COMPLETE).is_file()
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()


POISON_RANK_1 = """
import os, sys
from phitune.run.trainer import PhituneTrainer

original = PhituneTrainer.compute_loss


def poisoned(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    result = original(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
    if os.environ["RANK"] == "1" and self.state.global_step == 2:  # step 3, on one worker only
        result = (result[0] * float("nan"), *result[1:]) if return_outputs else result * float("nan")
    return result


PhituneTrainer.compute_loss = poisoned
sys.argv[0] = "phitune"
from phitune.cli import main

main()
"""


def test_nan_on_one_worker_stops_every_worker_with_one_message(tiny_model_dir, tmp_path):
    """Fault injection in the test's own launcher: worker 1's loss becomes NaN at step 3. Both workers must stop
    there with the same error (before the fix, worker 0 waited forever on the next all-reduce)."""
    config = write_config(tmp_path, tiny_model_dir, batch_size=2, max_steps=12, eval_split=0)
    (tmp_path / "poisoned_phitune.py").write_text(POISON_RANK_1, encoding="utf-8")
    proc = launch([*torchrun_command(), str(tmp_path / "poisoned_phitune.py"), "train", str(config)], tmp_path)
    proc.wait(timeout=120)  # a hang would time out here
    errors = re.findall(r"^error: .*$", (tmp_path / "stderr").read_text(), flags=re.M)
    assert errors == ["error: the loss became NaN or infinite at step 3 on process 1; training stopped and no "
                      "checkpoint had been written yet. Lower learning_rate or check the data"], errors
    workers = (tmp_path / "stderr").read_text().split("torch/distributed/elastic")[0]  # then torchrun reports
    assert "Traceback" not in workers and "NonFiniteLoss" not in workers
    assert proc.returncode != 0


FULL_DISK_ON_RANK_1 = """
import errno, os, sys
import torch

save = torch.save


def full_disk_on_rank_1(obj, f, *args, **kwargs):  # worker 1's part of checkpoint-8, its RNG state, finds no space
    if os.environ["RANK"] == "1" and str(f).endswith(os.path.join("checkpoint-8", "rng_state_1.pth")):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
    return save(obj, f, *args, **kwargs)


torch.save = full_disk_on_rank_1
sys.argv[0] = "phitune"
from phitune.cli import main

main()
"""


def test_a_save_that_fails_on_one_worker_stops_every_worker_with_its_one_line(tiny_model_dir, tmp_path):
    """Fault injection in the test's own launcher: a full disk on worker 1 only, while it writes its part of
    checkpoint-8. Every worker stops there, and worker 0 (the one that speaks) says what worker 1 met, as a full disk
    on one process is said. Before the fix, worker 0 waited at the marker's barrier for worker 1, which had left,
    until gloo broke the group: a traceback, and worker 1's line never printed (on NCCL: a wait until a timeout)."""
    from _distributed import kill_all

    from phitune.run.checkpoints import latest_intact_checkpoint

    config = write_config(tmp_path, tiny_model_dir, batch_size=2, max_steps=8, eval_split=0)
    (tmp_path / "full_disk_phitune.py").write_text(FULL_DISK_ON_RANK_1, encoding="utf-8")
    proc = launch([*torchrun_command(), str(tmp_path / "full_disk_phitune.py"), "train", str(config)], tmp_path)
    try:
        proc.wait(timeout=240)  # a hang would time out here
    finally:
        kill_all(proc)
    stderr, out = (tmp_path / "stderr").read_text(), tmp_path / "out"
    errors = re.findall(r"^error: .*$", stderr, flags=re.M)
    assert errors == [f"error: could not write {out}/checkpoint-8/rng_state_1.pth: No space left on device; "
                      f"checkpoint-8 is not marked complete and the last complete checkpoint is {out}/checkpoint-4; "
                      "free space, then run the same command with --auto-resume"], stderr[-3000:]
    workers = stderr.split("torch/distributed/elastic")[0]  # then torchrun reports
    assert "Traceback" not in workers
    assert proc.returncode != 0
    assert latest_intact_checkpoint(out) == out / "checkpoint-4"


FSDP_SETTINGS = {"fsdp": "full_shard auto_wrap",
                 "fsdp_config": {"transformer_layer_cls_to_wrap": ["Phi3DecoderLayer"],
                                 "state_dict_type": "FULL_STATE_DICT", "use_orig_params": False}}


def fsdp_config(directory: Path, model_dir: Path, batch_size: int) -> Path:
    """The settings of examples/accelerate/fsdp.yaml (full shard, one Phi3DecoderLayer per unit, full state dict
    at save time), given as training_config keys so that torchrun alone applies them."""
    path = write_config(directory, model_dir, batch_size=batch_size)
    config = yaml.safe_load(path.read_text())
    config["training_config"].update(FSDP_SETTINGS)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_fsdp_on_cpu_workers_says_it_runs_ddp_and_equals_one_worker(one_and_two_workers, tiny_model_dir, tmp_path):
    """accelerate 1.15 enables FSDP only for accelerator back-ends; on CPU (gloo) it keeps DDP. phitune says so once,
    and the run still equals one worker. (torch's own fully_shard does run on gloo: see docs/scale-out.md.)"""
    proc = launch([*torchrun_command(), "-m", "phitune.cli", "train",
                   str(fsdp_config(tmp_path, tiny_model_dir, batch_size=2))], tmp_path)
    wait(proc, tmp_path)
    said = " ".join(((tmp_path / "stdout").read_text() + (tmp_path / "stderr").read_text()).split())  # rich wraps
    assert said.count("FSDP was asked for, but accelerate runs FSDP only on GPUs") == 1
    assert_same_adapter(tmp_path / "out", one_and_two_workers / "single" / "out")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_fsdp_on_two_gpus_equals_one_gpu(tiny_model_dir, tmp_path):
    """Real FSDP (NCCL, sharded decoder layers) with an eval set against one GPU with the same global batch."""
    single = launch([sys.executable, "-m", "phitune.cli", "train",
                     str(write_config(tmp_path / "single", tiny_model_dir, batch_size=4))], tmp_path / "single")
    wait(single, tmp_path / "single")
    multi = launch([*torchrun_command(), "-m", "phitune.cli", "train",
                    str(fsdp_config(tmp_path / "fsdp", tiny_model_dir, batch_size=2))], tmp_path / "fsdp")
    wait(multi, tmp_path / "fsdp")
    assert "FSDP was asked for" not in (tmp_path / "fsdp" / "stdout").read_text()
    assert_same_adapter(tmp_path / "fsdp" / "out", tmp_path / "single" / "out", rtol=1e-3, atol=1e-4)
    single_evals, fsdp_evals = eval_losses(tmp_path / "single" / "out"), eval_losses(tmp_path / "fsdp" / "out")
    assert single_evals.keys() == fsdp_evals.keys()
    for step, loss in single_evals.items():
        assert abs(fsdp_evals[step] - loss) <= 1e-3 * loss


def test_qlora_under_fsdp_stores_the_4bit_weights_in_the_compute_dtype():
    """FSDP shards floating-point tensors of one dtype: the packed 4-bit weights must be stored in the compute dtype
    (bnb_4bit_quant_storage), not bitsandbytes' default uint8; a storage the user chose is kept."""
    pytest.importorskip("bitsandbytes")
    from phitune.config.schema import ModelConfig
    from phitune.models.loading import quantization_config

    quantization = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"}
    model = ModelConfig(name_or_path="unused", quantization=quantization)
    assert quantization_config(model).bnb_4bit_quant_storage == torch.uint8
    assert quantization_config(model, sharded=True).bnb_4bit_quant_storage == torch.bfloat16
    chosen = ModelConfig(name_or_path="unused", quantization={**quantization, "bnb_4bit_quant_storage": "float32"})
    assert quantization_config(chosen, sharded=True).bnb_4bit_quant_storage == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_qlora_under_fsdp_on_two_gpus_trains(tiny_model_dir, tmp_path):
    """QLoRA (NF4, bf16 storage) under FSDP on 2 GPUs runs to the end and lowers the eval loss."""
    path = fsdp_config(tmp_path, tiny_model_dir, batch_size=2)
    config = yaml.safe_load(path.read_text())
    config["model"]["quantization"] = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                       "bnb_4bit_compute_dtype": "bfloat16"}
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    proc = launch([*torchrun_command(), "-m", "phitune.cli", "train", str(path)], tmp_path)
    wait(proc, tmp_path)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]


# Preference tuning under torchrun: the same guarantees as SFT (issue: "2 processes equal 1", kill -9 and --resume).


def test_two_simpo_workers_equal_one_with_an_eval_set(tiny_model_dir, tmp_path):
    """SimPO (CPO's simpo loss: a mean over each device's pairs, no reference) under torchrun: 2 workers x 2 pairs end
    at the adapter of 1 worker x 4 pairs, with the same held-out scores."""
    train_dpo_pair(tiny_model_dir, tmp_path, method="simpo")
    single_out, multi_out = (tmp_path / name / "out" for name in ("single", "multi"))
    assert relative_difference(multi_out, single_out) < DPO_TOLERANCE
    single, multi = (json.loads((out / "metrics.json").read_text()) for out in (single_out, multi_out))
    assert multi["method"] == "simpo" and multi["preference_accuracy_after"] == single["preference_accuracy_after"]
    for key in ("reward_margin_after", "eval_loss", "train_loss"):
        assert abs(multi[key] - single[key]) <= DPO_TOLERANCE * abs(single[key]), (key, multi[key], single[key])


def test_two_dpo_workers_equal_one_with_an_eval_set(dpo_one_and_two_workers):
    single_out, multi_out = (dpo_one_and_two_workers / name / "out" for name in ("single", "multi"))
    assert relative_difference(multi_out, single_out) < DPO_TOLERANCE
    single, multi = (json.loads((out / "metrics.json").read_text()) for out in (single_out, multi_out))
    for key in ("preference_accuracy_before", "preference_accuracy_after", "eval_examples"):
        assert multi[key] == single[key], key
    for key in ("reward_margin_before", "reward_margin_after", "eval_loss", "train_loss"):
        assert abs(multi[key] - single[key]) <= DPO_TOLERANCE * abs(single[key]), (key, multi[key], single[key])
    assert multi["preference_accuracy_after"] > multi["preference_accuracy_before"] or \
        multi["reward_margin_after"] > multi["reward_margin_before"]
    stdout = (dpo_one_and_two_workers / "multi" / "stdout").read_text()
    said = " ".join((stdout + (dpo_one_and_two_workers / "multi" / "stderr").read_text()).split())
    assert len(TRAIN_LINE.findall(stdout)) == 8
    assert len(re.findall(r"training [\d,]+ of [\d,]+ parameters", said)) == 1
    assert "find_unused_parameters=True" not in said  # the policy's LoRA is all used; the reference is frozen
    for checkpoint in multi_out.glob("checkpoint-*"):
        assert json.loads((checkpoint / CHECKPOINT_COMPLETE).read_text())["global_batch"] == 4


def test_two_workers_on_a_streamed_set_equal_one(tiny_model_dir, tmp_path):
    """data.streaming under torchrun: each worker trains its part of each global batch of the stream (accelerate's
    dispatch from rank 0 by default; its per-worker shard of the same stream with dispatch_batches false, measured
    equal too), so 2 workers x 2 rows train the rows 1 worker x 4 trains, to the same adapter and eval losses. A
    stream also split by worker (datasets.distributed.split_dataset_by_node on top) trains other rows: caught."""
    configs = {name: write_config(tmp_path / name, tiny_model_dir, batch, max_steps=8, streaming=True,
                                  max_train_examples=None, max_eval_examples=8)
               for name, batch in (("single", 4), ("multi", 2))}
    single = launch([sys.executable, "-m", "phitune.cli", "train", str(configs["single"])], tmp_path / "single")
    multi = launch([*torchrun_command(), "-m", "phitune.cli", "train", str(configs["multi"])], tmp_path / "multi")
    wait(multi, tmp_path / "multi")
    wait(single, tmp_path / "single")
    single_out, multi_out = tmp_path / "single" / "out", tmp_path / "multi" / "out"
    assert_same_adapter(multi_out, single_out)
    single_eval, multi_eval = eval_losses(single_out), eval_losses(multi_out)
    assert single_eval.keys() == multi_eval.keys() == {0, 4, 8}
    for step, loss in single_eval.items():
        assert multi_eval[step] == pytest.approx(loss, rel=1e-4), step
    metrics = json.loads((multi_out / "metrics.json").read_text())
    assert metrics["train_examples"] == 32 and metrics["eval_examples"] == 8  # 8 steps x 2 workers x 2 rows


def test_two_reward_model_workers_equal_one_with_an_eval_set(tiny_model_dir, tmp_path):
    """method reward (TRL's RewardTrainer: a score head and a SEQ_CLS adapter) under torchrun: 2 workers x 2 pairs end
    at the adapter and score head of 1 worker x 4 pairs, with the same held-out pairwise accuracy."""
    train_dpo_pair(tiny_model_dir, tmp_path, method="reward")
    single_out, multi_out = (tmp_path / name / "out" for name in ("single", "multi"))
    assert relative_difference(multi_out, single_out) < DPO_TOLERANCE
    single, multi = (json.loads((out / "metrics.json").read_text()) for out in (single_out, multi_out))
    assert multi["method"] == "reward" and multi["pairwise_accuracy_after"] == single["pairwise_accuracy_after"]
    for key in ("score_margin_after", "train_loss"):
        assert abs(multi[key] - single[key]) <= DPO_TOLERANCE * abs(single[key]), (key, multi[key], single[key])


def test_two_distill_workers_equal_one_with_an_eval_set(tiny_model_dir, tmp_path):
    """method distill (TRL's GKDTrainer, the teacher's logits per batch) under torchrun: 2 workers x 2 rows end at the
    adapter and held-out KL to the teacher of 1 worker x 4 rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = tmp_path / "teacher"  # the student's model with its weights moved by seeded noise: another model, the
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)  # same tokenizer
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    model.save_pretrained(teacher)
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(teacher)

    def config(name: str, batch: int) -> Path:
        path = write_config(tmp_path / name, tiny_model_dir, batch, max_steps=8)
        raw = yaml.safe_load(path.read_text())
        raw["method"] = "distill"
        raw["teacher"] = {"name_or_path": str(teacher), "torch_dtype": "float32"}
        raw["training_config"]["per_device_eval_batch_size"] = batch
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        return path

    single = launch([sys.executable, "-m", "phitune.cli", "train", str(config("single", 4))], tmp_path / "single")
    multi = launch([*torchrun_command(), "-m", "phitune.cli", "train", str(config("multi", 2))], tmp_path / "multi")
    wait(multi, tmp_path / "multi")
    wait(single, tmp_path / "single")
    single_out, multi_out = tmp_path / "single" / "out", tmp_path / "multi" / "out"
    assert_same_adapter(multi_out, single_out)
    single, multi = (json.loads((out / "metrics.json").read_text()) for out in (single_out, multi_out))
    assert multi["method"] == "distill"
    for key in ("kl_to_teacher_before", "kl_to_teacher_after", "train_loss"):
        assert multi[key] == pytest.approx(single[key], rel=1e-4), (key, multi[key], single[key])


def test_a_torchrun_job_refused_by_the_lock_stops_every_worker_at_once(tiny_model_dir, tmp_path):
    """Another run holds the directory: rank 0 is refused, and every rank stops within seconds (worker 1 used to go
    on into training, blocked waiting for rank 0, and torchrun SIGKILLed it 30 s later)."""
    from phitune.runlock import RunLock

    config = write_config(tmp_path, tiny_model_dir, batch_size=2)
    with RunLock(tmp_path / "out"):
        proc = launch([*torchrun_command(), "-m", "phitune.cli", "train", str(config), "--auto-resume"], tmp_path)
        deadline = time.monotonic() + 180
        while "error:" not in (tmp_path / "stderr").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr").read_text()[-3000:]
            time.sleep(0.05)
        refused = time.monotonic()
        proc.wait(timeout=120)
        took = time.monotonic() - refused
    said = (tmp_path / "stderr").read_text()
    assert took < 10, said[-3000:]
    errors = re.findall(r"^error: .*$", said, flags=re.M)
    assert len(errors) == 1 and "is being trained by another run" in errors[0], errors
    assert "forcefully exiting via 9" not in said and "SIGKILL" not in said, said[-3000:]
    exits = dict(re.findall(r"rank +: (\d+) .*\n +exitcode +: (-?\d+)", said))  # torchrun's report per worker
    assert proc.returncode != 0 and exits == {"0": "2", "1": "2"}, said[-3000:]
