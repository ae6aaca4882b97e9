#!/usr/bin/env bash
# The one GPU check of phitune: install from carried wheels, the `gpu` tests, the throughput benchmark, and a 30-step
# `phitune train` of a random Phi-3-mini-shape model with the shipped LoRA and QLoRA configs; one JSON file out.
#
#     bash benchmarks/gpu_wheels.sh          # first, here (needs PyPI): the wheels into .whl/ (~46 MB)
#     bash benchmarks/gpu_check.sh --look    # on the GPU machine: what is installed, the install, an import check
#     bash benchmarks/gpu_check.sh           # on the GPU machine: everything, within GPU_CHECK_BUDGET_S (540 s)
#     bash benchmarks/gpu_check.sh --smoke   # on a CPU: the same steps with the tiny shape (2-4 minutes)
#
# The device-tool calls are in benchmarks/RESULTS.md ("How to run the GPU check"). Results go to $OUT (set there),
# else runs/gpu-check: gpu_check.json (every step's status and numbers) and gpu_check.log (every step's output).
# Environment: PYTHON (python3), WHEELS (.whl; installed with pip --no-index --no-deps into a private folder when it
# holds wheels; a smoke run installs only when WHEELS is set), GPU_CHECK_BUDGET_S (540: the whole run ends inside the device tool's 600 s limit per command).
# Exit status 0 when every step passed: steps ran; no `gpu` test failed and, in full mode, CUDA was visible, at least
# 2 `gpu` tests ran and none skipped but the 2-GPU ones (named as not applicable on one GPU); each phitune recipe
# computed the reference's logits and LoRA gradients on the first batch (throughput.py's check before timing); both
# trainings lowered the eval loss and both adapters reload in plain PEFT. The speed targets are reported, not judged.
set -uo pipefail
cd "$(dirname "$0")/.."

mode=full
case "${1:-}" in
    --smoke) mode=smoke ;;
    --look) mode=look ;;
    "") ;;
    *) sed -n '2,18p' "$0"; exit 2 ;;
esac
PY=${PYTHON:-python3}
wheels=${WHEELS-.whl}
[ "$mode" = smoke ] && wheels=${WHEELS-}  # a smoke run uses what is installed unless WHEELS names a folder
out=${OUT:-runs/gpu-check}
work=$(mktemp -d /tmp/phitune-gpu-check.XXXXXX)  # adapters and the 7.6 GB base stay out of $OUT (8 files come back)
deadline=$((SECONDS + ${GPU_CHECK_BUDGET_S:-540}))
mkdir -p "$out" && : > "$out/gpu_check.log"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONWARNINGS=ignore
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ "$mode" = smoke ]; then
    shape=tiny; bench_args="--shape tiny --data both --seq-len 512 --warmup 1 --steps 3 --also-activation fused-lora"
    # CPUs without native bf16 emulate it far slower than float32: the smoke run trains in float32, and on 4 rows
    # a step instead of 16 (2 shared cores; the steps and their checks are the same)
    train_extra="--set model.torch_dtype=float32 --set training_config.bf16=false"
    train_extra+=" --set training_config.gradient_accumulation_steps=1"
else
    shape=phi3-mini; bench_args="--shape phi3-mini --data both --also-activation fused-lora"; train_extra=""
fi
export PY wheels work shape bench_args train_extra

# run_step NAME CAP_S CMD...: run CMD under the smaller of CAP_S and the time left; output appended to the log,
# status to $work/NAME.step.json.
run_step() {
    local name=$1 cap=$2; shift 2
    local left=$((deadline - SECONDS)) start=$SECONDS rc
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 15 ]; then
        echo "{\"rc\": null, \"seconds\": 0, \"skipped\": \"time budget spent\"}" > "$work/$name.step.json"
        printf '%-12s skipped: time budget spent\n' "$name"; return
    fi
    echo "===== $name (limit ${limit}s): $*" >> "$out/gpu_check.log"
    timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" >> "$out/gpu_check.log" 2>&1; rc=$?
    echo "{\"rc\": $rc, \"seconds\": $((SECONDS - start)), \"limit_s\": $limit}" > "$work/$name.step.json"
    printf '%-12s rc %-3s %4ss%s\n' "$name" "$rc" "$((SECONDS - start))" "$([ "$rc" = 124 ] && echo '  (timed out)')"
}

versions() {  # what is importable, and the card: one JSON object to $work/$1.json
    "$PY" - "$work/$1.json" <<'PY'
import importlib.metadata as md, importlib.util, json, subprocess, sys
names = ["torch", "transformers", "peft", "accelerate", "trl", "datasets", "pyarrow", "dill", "multiprocess",
         "bitsandbytes", "liger_kernel", "flash_attn", "triton", "huggingface_hub", "tokenizers", "safetensors",
         "numpy", "pandas", "pytest"]
found = {}
for name in names:
    spec = importlib.util.find_spec(name)
    try:
        found[name] = md.version(name.replace("_", "-")) if spec else None
    except md.PackageNotFoundError:
        found[name] = "present (no metadata)"
    found[name] = found[name] and f"{found[name]} ({spec.origin.split('/site-packages/')[0].split('/src/')[0]})"
import torch
card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
smi = subprocess.run("nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader",
                     shell=True, capture_output=True, text=True).stdout.strip()
report = {"python": sys.version.split()[0], "card": card, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
          "nvidia_smi": smi or None,
          "packages": found}
json.dump(report, open(sys.argv[1], "w"), indent=1)
print(f"card {card}; python {report['python']}; torch cuda {torch.version.cuda}")
for name, version in found.items():
    print(f"  {name:16s} {version or 'MISSING'}")
PY
}

install_wheels() {  # the carried wheels, into a private folder that goes first on PYTHONPATH
    if [ -z "$wheels" ] || ! ls "$wheels"/*.whl >/dev/null 2>&1; then
        echo "no wheels in $wheels: using what is installed"; return 0
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" \
        "$wheels"/*.whl && "$PY" -m pip --version
}

import_check() {
    "$PY" -c "import trl, datasets, peft, transformers, phitune.train; print('imports ok: trl', trl.__version__,
'datasets', datasets.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
}

make_base() {  # a random model of $shape in bf16 with the bundled tokenizer, at $work/base
    "$PY" - "$shape" "$work/base" <<'PY'
import sys
import torch
from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM
from phitune.tiny.phi3 import tiny_base_path, tiny_config

shape, out = sys.argv[1:]
tokenizer = AutoTokenizer.from_pretrained(tiny_base_path())
if shape == "phi3-mini":  # microsoft/Phi-3-mini-4k-instruct's config.json: the numbers that set size and compute
    config = Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                        original_max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
else:
    config = tiny_config(len(tokenizer))
    config.max_position_embeddings = config.original_max_position_embeddings = 4096  # the configs' 2048 tokens fit
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)  # never materialised in float32 (15.3 GB at full size)
with torch.device(device):
    model = Phi3ForCausalLM(config)
model.save_pretrained(out)
tokenizer.save_pretrained(out)
print(f"{shape}: {sum(p.numel() for p in model.parameters()):,} parameters in bf16 at {out}")
PY
}

train() {  # train NAME YAML: 30 steps of the shipped config on the bundled chat data, evaluated before and after
    local data=src/phitune/assets/demo_chat extra=$train_extra
    [ -n "$extra" ] && [ "$1" = qlora ] && extra="$extra --set model.quantization.bnb_4bit_compute_dtype=float32"
    # shellcheck disable=SC2086  # extra is a list of words
    "$PY" -m phitune.cli train "$2" $extra --set model.name_or_path="$work/base" \
        --set data.train="$data/train.jsonl" --set data.eval="$data/eval.jsonl" --set data.max_eval_examples=32 \
        --set training_config.output_dir="$work/$1" --set training_config.max_steps=30 \
        --set training_config.eval_steps=30 --set training_config.save_strategy=no \
        --set training_config.logging_steps=5 --set training_config.report_to=none \
        --set training_config.disable_tqdm=true
}

reload_adapters() {  # each adapter on the plain bf16 base through peft.PeftModel: it must lower the loss
    "$PY" - "$work" <<'PY'
import json, sys
from pathlib import Path
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

work = Path(sys.argv[1])
device = "cuda" if torch.cuda.is_available() else "cpu"
tokenizer = AutoTokenizer.from_pretrained(work / "base")
rows = [json.loads(line) for line in open("src/phitune/assets/demo_chat/eval.jsonl")][:16]
texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=512).to(device)
labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
report = {}
for name in ("lora", "qlora"):
    if not (work / name / "adapter_model.safetensors").exists():
        report[name] = {"reloaded": False, "why": "no adapter written"}
        continue
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(work / "base", dtype=dtype).to(device)
    model = PeftModel.from_pretrained(base, work / name).eval()
    with torch.no_grad():
        with model.disable_adapter():
            loss_base = model(**batch, labels=labels).loss.item()
        loss_adapter = model(**batch, labels=labels).loss.item()
    report[name] = {"reloaded": True, "loss_base": loss_base, "loss_with_adapter": loss_adapter,
                    "lowers_loss": loss_adapter < loss_base}
    print(f"{name}: plain PEFT reload, eval loss {loss_base:.4f} without -> {loss_adapter:.4f} with the adapter")
    del model, base
json.dump(report, open(work / "reload.json", "w"), indent=1)
PY
}

throughput() {  # both recipes on both data kinds; the JSON report is the last line of stdout
    # shellcheck disable=SC2086  # bench_args is a list of words
    "$PY" benchmarks/throughput.py $bench_args --json > "$work/throughput.out"
}

summarise() {  # all step results into $out/gpu_check.json; a short summary; exit status as documented above
    "$PY" benchmarks/gpu_check_summary.py "$work" "$out/gpu_check.json" "$mode"
}

export -f versions install_wheels import_check throughput make_base train reload_adapters
echo "phitune GPU check ($mode); log: $out/gpu_check.log"
run_step installed 60 versions installed
run_step install 120 install_wheels
[ -d "$work/site" ] && export PYTHONPATH="$PYTHONPATH:$work/site"
run_step installed_after 60 versions installed_after
run_step imports 60 import_check
if [ "$mode" = look ]; then
    cat "$out/gpu_check.log"; grep -q '"rc": 0' "$work/imports.step.json"; exit
fi
# -o addopts="": pyproject's addopts asks pytest-xdist for two workers, which the GPU machine may not have
run_step pytest_gpu 150 "$PY" -m pytest -q -o addopts="" -m gpu -p no:cacheprovider --junitxml="$work/pytest.xml" tests
run_step throughput 270 throughput
run_step base 90 make_base
run_step train_lora 120 train lora examples/phi3-mini-4k-lora.yaml
run_step train_qlora 150 train qlora examples/phi3-mini-4k-qlora.yaml
run_step reload 90 reload_adapters
summarise
