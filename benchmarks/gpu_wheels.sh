#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh installs on the lent GPU machine, which reaches no package registry.
#
#     bash benchmarks/gpu_wheels.sh                  # here, with PyPI: fills .whl/ (git-ignored) for Python 3.12
#     bash benchmarks/gpu_wheels.sh --python-version 3.11 --dest /tmp/whl311   # the same set for a 3.11 rehearsal
#
# That machine (python3 3.12, x86-64) already has torch 2.11, transformers 5.17, peft 0.21.0, accelerate 1.15,
# pyarrow, pandas, xxhash, fsspec, huggingface_hub 1.33, pytest, typer, rich, matplotlib (device KINDS.md list).
# It lacks trl and datasets, two of datasets' pure-Python needs (dill, multiprocess), bitsandbytes (QLoRA),
# liger-kernel (phitune's CUDA default when installed) and loralib (imported by two test modules). Its transformers
# 5.17 predates the `activation_checkpointing` names of TrainingArguments that phitune passes (SFTConfig refuses
# them: checked with transformers 5.17 on CPU), so transformers 5.24 travels too. pyarrow (~45 MB) is NOT carried: the machine has one, and
# datasets checks no pyarrow version on import. flash-attn is not carried: its wheels are hundreds of MB, so phitune
# uses flex_attention there. Versions are those of requirements/ci-constraints.txt where it pins them.
# The whole set must fit the device tool's 64 MiB `carry` budget together with the working tree (~6 MB).
set -euo pipefail
cd "$(dirname "$0")/.."

python_version=3.12
dest=.whl
while [ $# -gt 0 ]; do
    case "$1" in
        --python-version) python_version="$2"; shift 2 ;;
        --dest) dest="$2"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

WHEELS=(
    trl==1.16.0          # SFTTrainer
    datasets==5.2.0      # trl's and phitune's datasets; its pyarrow comes from the machine
    dill==0.4.1          # datasets (pure Python)
    multiprocess==0.70.19  # datasets (pure Python, one wheel per Python version)
    bitsandbytes==0.50.2 # QLoRA's 4-bit base (~43 MB: most of the budget)
    liger-kernel==0.8.5  # RMSNorm, RoPE, SwiGLU Triton kernels (pure Python)
    transformers==5.24.0 # the version phitune is tested with (5.17 lacks activation_checkpointing*)
    loralib==0.1.2       # tests/test_lora_*.py import it at collection
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)

rm -rf "$dest" && mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" -d "$dest" "${WHEELS[@]%%#*}" 2>&1 | grep -v "is ignored: it is neither" || true
ls "$dest"/*.whl >/dev/null  # pip's errors went through the filter above; fail here if nothing came
test "$(ls "$dest"/*.whl | wc -l)" -eq "${#WHEELS[@]}" || { echo "expected ${#WHEELS[@]} wheels in $dest" >&2; exit 1; }
# bitsandbytes ships a library per CUDA and ROCm version (43 MB); the device's torch is built for CUDA 13: keep
# the CPU and CUDA 13 libraries only (pip installs a wheel without checking its RECORD against the archive).
python3 - "$dest"/bitsandbytes-*.whl <<'PY'
import re, shutil, sys, zipfile
path = sys.argv[1]
with zipfile.ZipFile(path) as src, zipfile.ZipFile(path + ".new", "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if not re.search(r"libbitsandbytes_(cuda1[12]|rocm|xpu)", item.filename):
            dst.writestr(item, src.read(item))
shutil.move(path + ".new", path)
PY
du -b "$dest"/*.whl | awk '{printf "%7.1f MB  %s\n", $1 / 1e6, $2; total += $1}
                           END {printf "%7.1f MB  total (%.1f MiB; the carry budget is 64 MiB with the tree)\n",
                                total / 1e6, total / 2^20}'
