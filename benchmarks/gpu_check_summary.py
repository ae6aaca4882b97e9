"""gpu_check.sh's last step: every step's result into one JSON file, a short summary, and the exit status.

    python benchmarks/gpu_check_summary.py WORK_DIR OUT_JSON MODE     # MODE: full or smoke

WORK_DIR holds what the steps wrote (NAME.step.json, installed*.json, pytest.xml, throughput.out, the runs'
metrics.json, reload.json). Exit status 0 only when every check passed (gpu_check.sh's header lists them).
"""

from __future__ import annotations

import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

# gpu tests that run on one GPU: the attention test (flex_attention; + flash_attention_2 when installed) and the
# CUDA-defaults test of tests/test_speed_gpu.py. The 2-GPU tests of tests/test_distributed.py skip there, named.
MIN_GPU_TESTS_RUN = 2
TWO_GPU_SKIP = "needs 2 CUDA GPUs"


def load(path: Path):
    return json.loads(path.read_text()) if path.exists() and path.stat().st_size else None


def gpu_tests(junit: Path) -> dict:
    """Counts of the `gpu` tests from pytest's JUnit XML: ran, failed, and the skipped ones by name and reason."""
    suite = ET.parse(junit).getroot().find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    cases = {f"{c.get('classname')}::{c.get('name')}": c for c in suite.iter("testcase")}
    counts["failed_tests"] = [n for n, c in cases.items() if c.find("failure") is not None or c.find("error") is not None]
    skipped = {n: c.find("skipped").get("message", "") for n, c in cases.items() if c.find("skipped") is not None}
    counts["not_applicable"] = [n for n, why in skipped.items() if TWO_GPU_SKIP in why]  # fewer than 2 GPUs
    counts["skipped_tests"] = {n: why for n, why in skipped.items() if TWO_GPU_SKIP not in why}
    counts["ran"] = counts["tests"] - counts["skipped"]
    return counts


def gpu_test_checks(report: dict, mode: str) -> dict:
    """In full mode a run where the `gpu` tests skipped (CUDA not visible, a missing package) must not pass."""
    checks = {}
    if "gpu_tests" in report:
        counts = report["gpu_tests"]
        checks["no gpu test failed"] = counts["failures"] + counts["errors"] == 0
        if mode == "full":
            checks[f"at least {MIN_GPU_TESTS_RUN} gpu tests ran"] = counts["ran"] >= MIN_GPU_TESTS_RUN
            checks["no gpu test skipped but the 2-GPU ones"] = not counts["skipped_tests"]
    if mode == "full":
        checks["CUDA visible to torch"] = (report["installed"] or {}).get("card", "CPU") != "CPU"
    return checks


def throughput_checks(bench: dict) -> dict:
    """throughput.py's own check before timing: each phitune recipe computed the reference's logits and LoRA
    gradients on the first batch; memory ratios added to each run."""
    checks = {}
    for run in bench["runs"]:
        for side, check in run["equivalence"].items():
            checks[f"{run['data']}: {side} computes the reference's logits and LoRA gradients"] = check["passed"]
        ref = run.get("reference")
        for side in ("phitune", "phitune_fused-lora"):
            if ref and side in run:
                peak = ref["peak_memory_gib"]
                run["memory_ratio" + side[len("phitune"):]] = run[side]["peak_memory_gib"] / peak if peak else None
    return checks


def training_checks(work: Path, report: dict) -> dict:
    checks = {}
    for name in ("lora", "qlora"):
        metrics = load(work / name / "metrics.json")
        if metrics:
            report[f"train_{name}"] = metrics
            checks[f"{name}: eval loss falls"] = metrics.get("eval_loss_after", 1e9) < metrics.get("eval_loss_before", 0)
    report["reload"] = load(work / "reload.json") or {}
    for name, result in report["reload"].items():
        checks[f"{name}: plain PEFT reload lowers the loss"] = bool(result.get("lowers_loss"))
    return checks


def build_report(work: Path, mode: str) -> dict:
    report = {"mode": mode, "date": time.strftime("%Y-%m-%d %H:%M %Z"), "installed_before": load(work / "installed.json"),
              "installed": load(work / "installed_after.json"), "steps": {}, "checks": {}}
    for path in sorted(work.glob("*.step.json")):
        report["steps"][path.name.removesuffix(".step.json")] = load(path)
    checks = report["checks"]
    checks.update({f"step {name} ran": step.get("rc") == 0 for name, step in report["steps"].items()})
    if (work / "pytest.xml").exists():
        report["gpu_tests"] = gpu_tests(work / "pytest.xml")
    checks.update(gpu_test_checks(report, mode))
    lines = (work / "throughput.out").read_text().strip().splitlines() if (work / "throughput.out").exists() else []
    if lines:
        bench = report["throughput"] = json.loads(lines[-1])
        checks.update(throughput_checks(bench))
        report["targets"] = {f"{r['data']} ratio >= {goal}": r.get("ratio", 0) >= goal
                             for r, goal in zip(bench["runs"], (2.0, 6.0))}
    checks.update(training_checks(work, report))
    report["passed"] = bool(checks) and all(checks.values()) and "gpu_tests" in report and "throughput" in report
    return report


def print_throughput(run: dict) -> None:
    for side, check in run["equivalence"].items():
        print(f"throughput {run['data']:5s}: {side} vs reference on batch 1: "
              f"{'same math' if check['passed'] else 'DIFFERENT MATH (no ratio)'}; logits "
              f"{check['logits_max_relative_difference']:.2g}, LoRA gradients "
              f"{check['gradients_max_relative_difference']:.2g} (tolerance {check['tolerance']:g})")
    ref, fast, fused = run.get("reference"), run.get("phitune"), run.get("phitune_fused-lora")
    if not (ref and fast):
        return
    memory = f", memory {run['memory_ratio']:.2f}x" if run["memory_ratio"] else ""
    print(f"throughput {run['data']:5s}: {fast['tokens_per_s']:,.0f} vs {ref['tokens_per_s']:,.0f} tok/s = "
          f"{run['ratio']:.2f}x{memory}; weights {fast['weights']} vs {ref['weights']}; {fast['attention']}, "
          f"{fast['batch_layout']} vs {ref['attention']}, {ref['batch_layout']}")
    if fused:
        memory = f", memory {run['memory_ratio_fused-lora']:.2f}x" if run["memory_ratio_fused-lora"] else ""
        print(f"  with fused-lora: {fused['tokens_per_s']:,.0f} tok/s = {run['ratio_fused-lora']:.2f}x{memory}; "
              f"last loss {fused['last_loss']:.4f} vs {fast['last_loss']:.4f}")


def print_summary(report: dict, target: Path) -> None:
    installed = report["installed"] or {}
    print(f"\n== phitune GPU check ({report['mode']}) on {installed.get('card')}: "
          f"{'PASSED' if report['passed'] else 'FAILED'}; {target}")
    if "gpu_tests" in report:
        t = report["gpu_tests"]
        print(f"gpu tests: {t['ran']} ran, {t['failures'] + t['errors']} failed, {t['skipped']} skipped "
              f"{t['failed_tests'] or ''}")
        for test in t["not_applicable"]:
            print(f"  not applicable on {installed.get('gpus')} GPU(s): {test}")
        for test, why in t["skipped_tests"].items():
            print(f"  skipped: {test} ({why})")
    for run in report.get("throughput", {}).get("runs", []):
        print_throughput(run)
    for name in ("lora", "qlora"):
        m = report.get(f"train_{name}")
        if m:
            print(f"train {name:5s}: eval loss {m.get('eval_loss_before', float('nan')):.4f} -> "
                  f"{m.get('eval_loss_after', float('nan')):.4f} in {m['global_step']} steps, "
                  f"{m['tokens_per_second']} tok/s")
    for name, ok in report["checks"].items():
        if not ok:
            print(f"FAILED: {name}")


def main(argv: list[str]) -> int:
    work, target, mode = Path(argv[0]), Path(argv[1]), argv[2]
    report = build_report(work, mode)
    target.write_text(json.dumps(report, indent=1) + "\n")
    print_summary(report, target)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
