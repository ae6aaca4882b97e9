"""Beyond one process: `phitune train` under torchrun with two CPU workers (gloo) equals one worker with the same
global batch, with the default held-out eval set, across a kill -9 and a resume; every rank stops together.

`accelerate launch --cpu --num_processes 2` starts a single process on a 2-core machine, so the tests use torchrun,
which starts both. 2 workers x batch 2 sees the same 4 rows per step as 1 worker x batch 4 (the sampler shards one
shuffled order), so the adapters differ only by the order of float reductions in the gradient all-reduce.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from phitune.train_support import CHECKPOINT_COMPLETE, latest_complete_checkpoint

TRAIN_LINE = re.compile(r"^step +\d+/\d+  loss ", re.M)  # phitune.console's line per logging step
EVAL_LINE = re.compile(r"^step +\d+/\d+  eval loss ", re.M)
SUMMARY_END = "adapter, tokenizer, metrics.json and loss.png are in"  # phitune.report's run summary, last line

DEMO_DATA = Path(__file__).parents[1] / "src" / "phitune" / "assets" / "demo_chat"
TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # measured: max |difference| 1.1e-7 on weights of size ~0.13


def write_config(directory: Path, model_dir: Path, batch_size: int, max_steps: int = 12, **data) -> Path:
    """The demo data with the default held-out eval set (data.eval_split 0.05), evaluated every 4 steps."""
    config = {
        "model": {"name_or_path": str(model_dir), "torch_dtype": "float32"},
        "data": {"train": str(DEMO_DATA / "train.jsonl"), "max_seq_length": 128, "max_train_examples": 64, **data},
        "training_config": {"output_dir": str(directory / "out"), "max_steps": max_steps, "learning_rate": 5e-3,
                            "per_device_train_batch_size": batch_size, "save_steps": 4, "save_total_limit": 10,
                            "eval_steps": 4, "logging_steps": 1, "seed": 0, "disable_tqdm": True},
        "peft_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"},
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return directory / "run.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(command: list[str], directory: Path, log: str = "") -> subprocess.Popen:
    """Start `command` in its own process group (so a test can kill torchrun and its workers together)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(directory / f"stdout{log}", "w") as out, open(directory / f"stderr{log}", "w") as err:
        return subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=directory, start_new_session=True)


def listing(out: Path) -> dict[str, list[str]]:
    """File names in the output directory and in each checkpoint."""
    return {str(p.relative_to(out)): sorted(c.name for c in p.iterdir()) for p in [out, *out.glob("checkpoint-*")]}


def torchrun_command() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def wait(proc: subprocess.Popen, directory: Path, log: str = "", code: int = 0, timeout: int = 300) -> None:
    assert proc.wait(timeout=timeout) == code, (directory / f"stderr{log}").read_text()[-3000:]


def assert_same_adapter(got_dir: Path, expected_dir: Path, **tolerance) -> None:
    expected = load_file(expected_dir / "adapter_model.safetensors")
    got = load_file(got_dir / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, **(tolerance or TOLERANCE), msg=name)


def eval_losses(out: Path) -> dict[int, float]:
    """Step -> eval loss, from the last checkpoint's log history and the run's final metrics."""
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
    history = json.loads((last / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["eval_loss"] for entry in history if "eval_loss" in entry}


LAUNCHER = """
import os, sys
sys.path.insert(0, {tests!r})
import pytest, torch
from phitune.train_support import PhituneTrainer

rank, world = os.environ.get("RANK", "0"), int(os.environ.get("WORLD_SIZE", "1"))
patch = pytest.MonkeyPatch()
if {gradients!r}:  # each optimizer step's raw gradients (after the all-reduce), saved by rank 0
    from _equivalence import GradientRecorder

    recorder, init = GradientRecorder(), PhituneTrainer.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(recorder)

    patch.setattr(PhituneTrainer, "__init__", recording_init)
if {scale_by_world!r}:  # the deliberate break: the loss's gradient times the process count, its value unchanged
    compute_loss = PhituneTrainer.compute_loss

    def scaled(self, *args, **kwargs):
        loss = compute_loss(self, *args, **kwargs)
        return world * loss - (world - 1) * loss.detach()

    patch.setattr(PhituneTrainer, "compute_loss", scaled)
if {hold_at!r}:  # the run stops moving once this step is reached, so a kill -9 finds checkpoint-{hold_at} the last
    import time

    from transformers import Trainer

    training_step = Trainer.training_step  # every method's trainer (SFT, DPO) runs it

    def held(self, *args, **kwargs):
        if self.state.global_step >= {hold_at!r}:
            time.sleep(3600)
        return training_step(self, *args, **kwargs)

    patch.setattr(Trainer, "training_step", held)
if {watch!r}:  # the steps this run trains and the optimizer state it starts from (tests/_resume.py)
    from _resume import watch_training

    runs = watch_training(patch)
sys.argv[0] = "phitune"
from phitune.cli import main

try:
    main()
finally:
    if {gradients!r} and rank == "0":
        torch.save(recorder.steps, "gradients.pt")
    if {watch!r}:
        torch.save(runs[-1] if runs else None, f"resume_watch_rank{{rank}}.pt")
"""


def launcher(directory: Path, gradients: bool = False, scale_by_world: bool = False, watch: bool = False,
             hold_at: int = 0) -> Path:
    """A `phitune` entry point for the test's own processes, instrumented as asked (the breaks live here, in the
    test, never in phitune). `hold_at`: the run waits before training that step, so that a kill -9 lands after
    checkpoint-`hold_at` and before the next one however busy the machine (the tiny run's 12 steps take about a
    second: a polling test on a loaded machine saw checkpoint-12, not 4)."""
    path = directory / f"phitune_launcher{'_held' if hold_at else ''}.py"
    path.write_text(LAUNCHER.format(tests=str(Path(__file__).parent), gradients=gradients,
                                    scale_by_world=scale_by_world, watch=watch, hold_at=hold_at), encoding="utf-8")
    return path


def assert_resumed_under(directory: Path, checkpoint: Path, max_steps: int) -> None:
    """Every worker of the resumed run (launched with watch=True) trained only the steps after `checkpoint`, from
    the optimizer state it saved."""
    from _resume import assert_resumed

    watched = sorted(directory.glob("resume_watch_rank*.pt"))
    assert watched, "the resumed run left no record"
    for path in watched:
        assert_resumed(torch.load(path, weights_only=False), checkpoint, max_steps)


@pytest.fixture(scope="module")
def one_and_two_workers(tiny_model_dir, tmp_path_factory):
    """The same 12 steps with the default eval set, once as 1 worker x batch 4 and once as 2 workers x batch 2."""
    tmp_path = tmp_path_factory.mktemp("distributed")
    single_config = write_config(tmp_path / "single", tiny_model_dir, batch_size=4)
    multi_config = write_config(tmp_path / "multi", tiny_model_dir, batch_size=2)
    single = launch([sys.executable, "-m", "phitune.cli", "train", str(single_config)], tmp_path / "single")
    multi = launch([*torchrun_command(), "-m", "phitune.cli", "train", str(multi_config)], tmp_path / "multi")
    wait(multi, tmp_path / "multi")
    wait(single, tmp_path / "single")
    return tmp_path


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
        assert marker == {"processes": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                          "global_batch": 4}
        assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == int(checkpoint.name[11:])
    assert multi_metrics["global_step"] == 12
    assert multi_metrics["train_tokens"] == single_metrics["train_tokens"]  # both workers' tokens, counted once
    assert abs(multi_metrics["train_loss"] - single_metrics["train_loss"]) < 1e-5
    stdout, stderr = ((one_and_two_workers / "multi" / name).read_text() for name in ("stdout", "stderr"))
    assert len(TRAIN_LINE.findall(stdout)) == 12 and len(EVAL_LINE.findall(stdout)) == 4
    said = " ".join((stdout + stderr).split())  # rich wraps long lines
    assert len(re.findall(r"training [\d,]+ of [\d,]+ parameters", said)) == 1  # once, not once per worker
    assert said.count(SUMMARY_END) == 1  # the run summary too
    assert yaml.safe_load((multi_out / "phitune_config.yaml").read_text())["training_config"]["output_dir"]


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


def test_two_workers_killed_and_resumed_end_at_the_one_worker_adapter(one_and_two_workers, tiny_model_dir, tmp_path):
    """kill -9 of torchrun and both workers after the first complete checkpoint, then --resume under torchrun: the
    resumed workers train only the remaining steps, from the checkpoint's optimizer state (a restart, deterministic,
    would end at the same adapter: see test_train's break test), and end at the one-worker adapter."""
    config = write_config(tmp_path, tiny_model_dir, batch_size=2)
    first = launch([*torchrun_command(), str(launcher(tmp_path, hold_at=4)), "train", str(config)], tmp_path)
    marker = tmp_path / "out" / "checkpoint-4" / CHECKPOINT_COMPLETE
    deadline = time.monotonic() + 240
    while not marker.is_file():
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr").read_text()[-3000:]
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()  # it really died mid-run

    checkpoint = latest_complete_checkpoint(tmp_path / "out")
    assert checkpoint.name == "checkpoint-4"
    resumed = launch([*torchrun_command(), str(launcher(tmp_path, watch=True)), "train", str(config), "--resume"],
                     tmp_path, ".2")
    wait(resumed, tmp_path, ".2")
    assert len(TRAIN_LINE.findall((tmp_path / "stdout.2").read_text())) == 12 - 4  # logged once, by rank 0
    assert " ".join((tmp_path / "stdout.2").read_text().split()).count(SUMMARY_END) == 1  # summed up once too
    assert_resumed_under(tmp_path, checkpoint, max_steps=12)  # each worker: steps 5..12, from its optimizer state
    assert_same_adapter(tmp_path / "out", one_and_two_workers / "single" / "out")


def test_a_two_worker_checkpoint_resumes_in_one_process_with_the_same_global_batch(one_and_two_workers, tmp_path):
    """2 workers x batch 2 stopped at step 4, resumed by 1 process x batch 4: the same rows per step, so the same
    adapter as the uninterrupted run (LoRA dropout 0, so no random stream is involved)."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(one_and_two_workers / "multi" / "out" / "checkpoint-4", out / "checkpoint-4")
    config = yaml.safe_load((one_and_two_workers / "single" / "run.yaml").read_text())
    config["training_config"]["output_dir"] = str(out)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    proc = launch([sys.executable, str(launcher(tmp_path, watch=True)), "train", str(tmp_path / "run.yaml"),
                   "--resume"], tmp_path)
    wait(proc, tmp_path)
    said = " ".join((tmp_path / "stderr").read_text().split()) + " ".join((tmp_path / "stdout").read_text().split())
    assert "resuming a 2-process checkpoint with 1 processes" in said
    assert len(TRAIN_LINE.findall((tmp_path / "stdout").read_text())) == 12 - 4
    assert_resumed_under(tmp_path, out / "checkpoint-4", max_steps=12)
    assert_same_adapter(out, one_and_two_workers / "single" / "out")


def test_resuming_with_another_global_batch_is_refused(one_and_two_workers, tmp_path):
    """A 2 x 2 checkpoint resumed by 1 process with batch 2 would silently halve the batch: one line instead."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(one_and_two_workers / "multi" / "out" / "checkpoint-4", out / "checkpoint-4")
    config = yaml.safe_load((one_and_two_workers / "multi" / "run.yaml").read_text())
    config["training_config"]["output_dir"] = str(out)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    proc = launch([sys.executable, "-m", "phitune.cli", "train", str(tmp_path / "run.yaml"), "--resume"], tmp_path)
    wait(proc, tmp_path, code=2)
    message = (tmp_path / "stderr").read_text().strip().splitlines()[-1]
    assert message == ("error: checkpoint-4 was written with a global batch of 4 (2 processes x 2 per device x 1 "
                       "accumulation steps); this run's is 2 (1 processes x 2 per device x 1 accumulation steps). "
                       "Resume with the same global batch (processes x per_device_train_batch_size x "
                       "gradient_accumulation_steps)")


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
    """torchrun forwards SIGTERM to each worker; they agree on the step, so one complete checkpoint is saved."""
    config = write_config(tmp_path, tiny_model_dir, batch_size=2, max_steps=500)
    proc = launch([*torchrun_command(), "-m", "phitune.cli", "train", str(config)], tmp_path)
    deadline = time.monotonic() + 180
    while not TRAIN_LINE.search((tmp_path / "stdout").read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr").read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)  # torchrun itself exits 1 after forwarding the signal; the workers' messages matter
    steps = re.findall(r"error: stopped by SIGTERM at step (\d+);", (tmp_path / "stderr").read_text())
    assert len(steps) == 1, steps  # said once, by rank 0; both ranks' RNG states below show both saved that step
    checkpoint = tmp_path / "out" / f"checkpoint-{steps[0]}"
    assert (checkpoint / CHECKPOINT_COMPLETE).is_file()
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()


POISON_RANK_1 = """
import os, sys
from phitune.train_support import PhituneTrainer

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
    from phitune.config import ModelConfig
    from phitune.modeling import quantization_config

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


def write_dpo_config(directory: Path, model_dir: Path, batch_size: int) -> Path:
    """DPO with a held-out eval set evaluated every 4 steps (so the first evaluation comes before any training step),
    8 steps, a checkpoint every 4; the reference model is the policy with the adapter disabled."""
    from conftest import write_jsonl
    from test_preference import make_pairs

    directory.mkdir(parents=True, exist_ok=True)
    train = write_jsonl(directory / "train.jsonl", make_pairs(0, 64))
    evals = write_jsonl(directory / "eval.jsonl", make_pairs(1, 16))
    config = {
        "method": "dpo",
        "model": {"name_or_path": str(model_dir), "torch_dtype": "float32"},
        "data": {"train": str(train), "eval": str(evals), "max_seq_length": 64},
        "training_config": {"output_dir": str(directory / "out"), "max_steps": 8, "learning_rate": 1e-2,
                            "per_device_train_batch_size": batch_size, "per_device_eval_batch_size": batch_size,
                            "save_steps": 4, "eval_strategy": "steps", "eval_steps": 4, "logging_steps": 1, "seed": 0,
                            "disable_tqdm": True},
        "peft_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
    }
    (directory / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return directory / "run.yaml"


def relative_difference(got_dir: Path, expected_dir: Path) -> float:
    """Relative Frobenius norm of the difference of two adapters (all tensors together)."""
    expected = load_file(expected_dir / "adapter_model.safetensors")
    got = load_file(got_dir / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    difference = sum(float(((got[k] - expected[k]) ** 2).sum()) for k in expected) ** 0.5
    return difference / sum(float((expected[k] ** 2).sum()) for k in expected) ** 0.5


# Measured: 7.5e-6 between 2 workers x 2 and 1 worker x 4 (DPO's sigmoid of log-ratio differences at learning rate
# 1e-2 amplifies the reduction-order differences more than SFT does). With a `trainer.evaluate()` put back before
# training (the SFT bug), the workers trained without gradient sync and ended 39% apart.
DPO_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def dpo_one_and_two_workers(tiny_model_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("distributed_dpo")
    single = launch([sys.executable, "-m", "phitune.cli", "train",
                     str(write_dpo_config(tmp_path / "single", tiny_model_dir, batch_size=4))], tmp_path / "single")
    multi = launch([*torchrun_command(), "-m", "phitune.cli", "train",
                    str(write_dpo_config(tmp_path / "multi", tiny_model_dir, batch_size=2))], tmp_path / "multi")
    wait(multi, tmp_path / "multi")
    wait(single, tmp_path / "single")
    return tmp_path


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
    for checkpoint in multi_out.glob("checkpoint-*"):
        assert json.loads((checkpoint / CHECKPOINT_COMPLETE).read_text())["global_batch"] == 4


def test_two_dpo_workers_killed_and_resumed_end_at_the_one_worker_adapter(dpo_one_and_two_workers, tiny_model_dir,
                                                                          tmp_path):
    config = write_dpo_config(tmp_path, tiny_model_dir, batch_size=2)
    first = launch([*torchrun_command(), str(launcher(tmp_path, hold_at=4)), "train", str(config)], tmp_path)
    marker = tmp_path / "out" / "checkpoint-4" / CHECKPOINT_COMPLETE
    deadline = time.monotonic() + 240
    while not marker.is_file():
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr").read_text()[-3000:]
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()

    checkpoint = latest_complete_checkpoint(tmp_path / "out")
    assert checkpoint.name == "checkpoint-4"
    resumed = launch([*torchrun_command(), str(launcher(tmp_path, watch=True)), "train", str(config), "--resume"],
                     tmp_path, ".2")
    wait(resumed, tmp_path, ".2")
    assert len(TRAIN_LINE.findall((tmp_path / "stdout.2").read_text())) == 8 - 4
    assert_resumed_under(tmp_path, checkpoint, max_steps=8)
    assert relative_difference(tmp_path / "out", dpo_one_and_two_workers / "single" / "out") < DPO_TOLERANCE
