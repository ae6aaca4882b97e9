"""`phitune demo`: the whole pipeline on the bundled tiny Phi-3 and chat data, offline, on a CPU.

It runs the same code as a real run (`load_config` -> `run_training` -> PEFT adapter on disk), then answers one
held-out question with the base model and with the adapter, so the effect of fine-tuning is visible.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from phitune.config.schema import load_config
from phitune.errors import PhituneError
from phitune.run.checkpoints import checkpoint_dirs
from phitune.run.output_dir import foreign_files, run_state
from phitune.tiny.phi3 import ASSETS, DEMO_DATA, tiny_base_path

log = logging.getLogger("phitune")
DEMO_CONFIG = ASSETS / "demo.yaml"


def demo_overrides(output_dir: Path) -> list[str]:
    """Fill the bundled demo config with this installation's asset paths and the chosen output directory."""
    return [
        f"model.name_or_path={tiny_base_path()}",
        f"data.train={DEMO_DATA / 'train.jsonl'}",
        f"data.eval={DEMO_DATA / 'eval.jsonl'}",
        f"training_config.output_dir={output_dir}",
    ]


def is_demo_run(output_dir: Path) -> bool:
    """True when `output_dir` holds an earlier demo run, which the demo may replace: the base model its saved config
    names, or (an interrupted run has no saved config: only run.finish writes it) the base its newest checkpoint's
    adapter names, is the bundled tiny one."""
    path = output_dir / "phitune_config.yaml"
    if path.is_file():
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return saved.get("model", {}).get("name_or_path") == str(tiny_base_path())
    return checkpoint_base_model(output_dir) == str(tiny_base_path())


def checkpoint_base_model(output_dir: Path) -> str | None:
    """`base_model_name_or_path` of the newest checkpoint's adapter (a kill while the newest was being written can
    leave it without adapter_config.json: the one before answers); None when no checkpoint holds an adapter."""
    for checkpoint in checkpoint_dirs(output_dir):
        try:
            adapter = json.loads((checkpoint / "adapter_config.json").read_text(encoding="utf-8"))
            return adapter["base_model_name_or_path"]
        except (OSError, ValueError, KeyError, TypeError):  # absent or half-written: look at the one before
            continue
    return None


def replaces_earlier_demo(output_dir: Path) -> bool:
    """True when `output_dir` holds a finished or interrupted demo run: the demo starts again from scratch there (it
    has no --resume; its minute of training is not worth one). A run that is not a demo's is refused."""
    state = run_state(output_dir)
    if state == "empty":
        return False
    if state == "foreign":
        raise PhituneError(f"{output_dir} is not empty and holds no phitune run; choose another --output-dir (phitune "
                           "never deletes files it did not write)")
    if not is_demo_run(output_dir):
        raise PhituneError(f"{output_dir} holds a run that is not a demo run; choose another --output-dir")
    from phitune.after.evaluate import CHART_PNG, EVAL_JSON, REPORT_MD

    # what `phitune eval` (and its benchmarks) wrote is a person's work, minutes or hours of it: never deleted; all
    # that is in the way is named in the one refusal, not one kind per try
    evaluated = [name for name in (EVAL_JSON, REPORT_MD, CHART_PNG) if (output_dir / name).exists()]
    others = foreign_files(output_dir)
    if evaluated or others:
        held = ([f"is evaluated ({', '.join(evaluated)}, which a new demo would delete)"] if evaluated else []) + (
            [f"has beside it {', '.join(others)}, which the demo would not delete"] if others else [])
        raise PhituneError(f"{output_dir} holds an earlier demo run that {' and '.join(held)}; move those out, or "
                           "choose another --output-dir")
    # said for a finished run too: its adapter goes with it (on a loaded CPU, many minutes' work)
    log.warning("%s holds %s demo run; the demo starts again from scratch and replaces it (--output-dir DIR keeps "
                "it)", output_dir, "an interrupted" if state == "interrupted" else "a finished")
    return True


def run_demo(output_dir: Path, overrides: list[str]):
    """Train the demo, then print eval loss and one answer before and after."""
    from phitune.after.report import print_demo_summary
    from phitune.train import run_training

    cfg = load_config(DEMO_CONFIG, demo_overrides(output_dir) + list(overrides))
    result = run_training(cfg, overwrite=replaces_earlier_demo(output_dir))
    before, after, question, reference = answer_before_after(cfg, output_dir)
    print_demo_summary(result, question, reference, before, after)
    return result


def answer_before_after(cfg, output_dir: Path, index: int = 0):
    """One held-out question answered by the base model and by base + adapter (greedy)."""
    from phitune.after.generate import SamplingSettings, attach_adapter, generate_replies, load_for_inference

    line = (DEMO_DATA / "eval.jsonl").read_text(encoding="utf-8").splitlines()[index]
    messages = json.loads(line)["messages"]
    prompt, reference = messages[:-1], messages[-1]["content"]
    settings = SamplingSettings(max_new_tokens=32)
    model, tokenizer = load_for_inference(cfg.model)
    before = generate_replies(model, tokenizer, [prompt], settings)[0]
    tuned = attach_adapter(model, output_dir)
    after = generate_replies(tuned, tokenizer, [prompt], settings)[0]
    return before, after, prompt[-1]["content"], reference
