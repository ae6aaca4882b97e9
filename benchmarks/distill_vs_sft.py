"""Distillation against SFT on the same rows: examples/tiny-phi3-distill.yaml, and the same run as `method: sft` (the
same rows, steps, seed, learning rate and LoRA; no teacher), each scored by its held-out KL to the teacher and its
held-out loss, for each seed.

    phitune demo --output-dir outputs/demo                       # the teacher: the demo's SFT run
    python benchmarks/distill_vs_sft.py --seeds 0 1 2            # from the repository root

The SFT run is scored as the distill run scores itself (phitune.after.evaluate.distillation_metrics against the same
teacher, phitune.models.teacher.load_teacher). One line per seed; docs/distill.md and README quote them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
EXAMPLE = ROOT / "examples" / "tiny-phi3-distill.yaml"


def sft_twin(distill_cfg, output_dir: Path):
    """The distill config as method sft: no teacher, no GKD key, its own output directory."""
    from phitune.config.schema import config_from_dict

    raw = distill_cfg.to_dict()
    raw.pop("teacher")
    raw["method"] = "sft"
    raw["training_config"].pop("beta", None)
    raw["training_config"]["output_dir"] = str(output_dir)
    return config_from_dict(raw)


def held_out_scores(cfg, adapter: Path, teacher) -> dict:
    from phitune.after.evaluate import distillation_metrics, eval_conversations, tokenize_eval_set
    from phitune.after.generate import load_for_inference

    model, tokenizer = load_for_inference(cfg.model, adapter)
    held_out = tokenize_eval_set(eval_conversations(cfg.data, True), tokenizer, cfg.data)
    return distillation_metrics(model, teacher, held_out, tokenizer.pad_token_id)


def main() -> None:
    from phitune.config.schema import load_config
    from phitune.models.teacher import load_teacher
    from phitune.train import run_training

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", type=Path, default=Path("outputs/distill-vs-sft"))
    args = parser.parse_args()
    for seed in args.seeds:
        cfg = load_config(EXAMPLE, [f"training_config.seed={seed}",
                                    f"training_config.output_dir={args.workdir / f'distill-{seed}'}"])
        started = time.perf_counter()
        distilled = run_training(cfg, overwrite=True).metrics
        distill_s = time.perf_counter() - started
        sft_cfg = sft_twin(cfg, args.workdir / f"sft-{seed}")
        started = time.perf_counter()
        run_training(sft_cfg, overwrite=True)
        sft_s = time.perf_counter() - started
        sft = held_out_scores(sft_cfg, sft_cfg.output_dir, load_teacher(cfg.teacher))
        print(f"seed {seed}: held-out KL to the teacher {distilled['kl_to_teacher_before']:.4f} -> distill "
              f"{distilled['kl_to_teacher_after']:.4f}, SFT {sft['kl_to_teacher']:.4f}; held-out loss "
              f"{distilled['eval_loss_before']:.3f} -> distill {distilled['eval_loss_after']:.3f}, SFT "
              f"{sft['loss']:.3f} (teacher {distilled['teacher_eval_loss']:.3f}); runs {distill_s:.0f} s, "
              f"{sft_s:.0f} s", flush=True)


if __name__ == "__main__":
    main()
