"""benchmarks/gpu_check.sh's verdict (benchmarks/gpu_check_summary.py): a full GPU check cannot pass by skipping.

The failing case uses the JUnit report of the real `pytest -m gpu` on this CPU machine, where every `gpu` test
skips; the passing case a report as one GPU would write it (2 tests ran, the two 2-GPU tests not applicable).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
SUMMARY = ROOT / "benchmarks" / "gpu_check_summary.py"

ONE_GPU_JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="0"
 skipped="2" tests="4"><testcase classname="tests.test_speed_gpu" name="test_padding_free[flex_attention]"/>
<testcase classname="tests.test_speed_gpu" name="test_gpu_defaults"/>
<testcase classname="tests.test_distributed" name="test_fsdp_on_two_gpus_equals_one_gpu"><skipped
 type="pytest.skip" message="needs 2 CUDA GPUs"/></testcase>
<testcase classname="tests.test_distributed" name="test_qlora_under_fsdp_on_two_gpus_trains"><skipped
 type="pytest.skip" message="needs 2 CUDA GPUs"/></testcase></testsuite></testsuites>"""


def _work_dir(tmp_path: Path, card: str) -> Path:
    """What the other steps of a full run leave behind, all of them passing."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "installed_after.json").write_text(json.dumps({"card": card, "gpus": 1}))
    for step in ("installed", "imports", "pytest_gpu", "throughput"):
        (work / f"{step}.step.json").write_text(json.dumps({"rc": 0, "seconds": 1}))
    check = {"passed": True, "tolerance": 0.05, "logits_max_relative_difference": 0.01,
             "gradients_max_relative_difference": 0.02}
    runs = [{"data": data, "equivalence": {"phitune": check}, "ratio": 3.0} for data in ("fixed", "chat")]
    (work / "throughput.out").write_text(json.dumps({"runs": runs}) + "\n")
    return work


def _summarise(work: Path) -> tuple[int, dict, str]:
    done = subprocess.run([sys.executable, str(SUMMARY), str(work), str(work / "gpu_check.json"), "full"],
                          capture_output=True, text=True, timeout=60)
    return done.returncode, json.loads((work / "gpu_check.json").read_text()), done.stdout


def test_a_full_check_where_every_gpu_test_skipped_fails(tmp_path):
    assert not torch.cuda.is_available()  # this suite's machine; on a GPU machine `pytest -m gpu` runs them
    work = _work_dir(tmp_path, card="CPU")
    # As gpu_check.sh runs it: without the addopts (two xdist workers, each importing the suite)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-m", "gpu", "-p", "no:cacheprovider",
                    f"--junitxml={work / 'pytest.xml'}", "tests/test_speed_gpu.py", "tests/test_distributed.py"],
                   cwd=ROOT, capture_output=True, timeout=300)
    code, report, said = _summarise(work)
    assert code == 1 and not report["passed"]
    assert report["gpu_tests"]["ran"] == 0 and report["gpu_tests"]["failures"] == 0  # "zero failures" alone passed
    failed = {name for name, ok in report["checks"].items() if not ok}
    assert failed == {"at least 2 gpu tests ran", "no gpu test skipped but the 2-GPU ones", "CUDA visible to torch"}
    assert "FAILED: at least 2 gpu tests ran" in said


def test_a_full_check_on_one_gpu_names_the_two_gpu_tests_not_applicable(tmp_path):
    work = _work_dir(tmp_path, card="NVIDIA H200")
    (work / "pytest.xml").write_text(ONE_GPU_JUNIT)
    code, report, said = _summarise(work)
    assert code == 0 and report["passed"], said
    assert report["gpu_tests"]["ran"] == 2 and len(report["gpu_tests"]["not_applicable"]) == 2
    assert "not applicable on 1 GPU(s): tests.test_distributed::test_fsdp_on_two_gpus_equals_one_gpu" in said


def test_a_check_whose_recipes_differ_fails(tmp_path):
    work = _work_dir(tmp_path, card="NVIDIA H200")
    (work / "pytest.xml").write_text(ONE_GPU_JUNIT)
    bench = json.loads((work / "throughput.out").read_text())
    bench["runs"][1] = {"data": "chat", "equivalence": {"phitune": {**bench["runs"][1]["equivalence"]["phitune"],
                                                                    "passed": False}}}  # no ratio, as refused
    (work / "throughput.out").write_text(json.dumps(bench) + "\n")
    code, report, said = _summarise(work)
    assert code == 1 and not report["checks"]["chat: phitune computes the reference's logits and LoRA gradients"]
    assert "DIFFERENT MATH (no ratio)" in said
