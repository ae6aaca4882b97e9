"""The tiny GRPO example (examples/tiny-phi3-grpo.yaml), shortened: from an SFT demo adapter on the bundled tiny Phi-3,
GRPO on the bundled prompts raises the held-out pass rate, and the run starts from that adapter (its scores before
are the SFT adapter's own) and keeps its LoRA shape. docs/grpo.md has the full example's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

EXAMPLE = Path(__file__).parents[1] / "examples" / "tiny-phi3-grpo.yaml"
SFT_EPOCHS = 2  # the demo's 6, shortened: a weaker start that GRPO still lifts
GRPO_STEPS = 40  # the example's 120, shortened


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory) -> Path:
    """The SFT demo run (bundled tiny base and chat data), SFT_EPOCHS epochs."""
    from phitune.config.schema import load_config
    from phitune.demo import DEMO_CONFIG, demo_overrides
    from phitune.train import run_training

    out = tmp_path_factory.mktemp("sft") / "demo"
    cfg = load_config(DEMO_CONFIG, demo_overrides(out) + [f"training_config.num_train_epochs={SFT_EPOCHS}",
                                                          "training_config.eval_strategy=no"])
    return run_training(cfg).output_dir


def example_config(sft_dir: Path, output_dir: Path, *overrides: str):
    from phitune.config.schema import load_config
    from phitune.tiny.phi3 import ASSETS, tiny_base_path

    return load_config(EXAMPLE, [f"model.name_or_path={tiny_base_path()}", f"model.adapter={sft_dir}",
                                 f"data.train={ASSETS / 'demo_grpo' / 'train.jsonl'}",
                                 f"data.eval={ASSETS / 'demo_grpo' / 'eval.jsonl'}",
                                 f"training_config.output_dir={output_dir}", *overrides])


def test_grpo_from_the_sft_demo_adapter_raises_the_held_out_pass_rate(sft_adapter, tmp_path):
    from peft import PeftModel

    from phitune.after.rewards import build_rewards, score_completions
    from phitune.data.prompts import load_prompt_data
    from phitune.models.loading import load_base_model, load_tokenizer
    from phitune.train import run_training

    cfg = example_config(sft_adapter, tmp_path / "grpo", f"training_config.max_steps={GRPO_STEPS}",
                         f"training_config.save_steps={GRPO_STEPS}")
    result = run_training(cfg)
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    # measured 0.211 -> 0.278 (19 -> 25 of the 90 held-out prompts) in two sessions; asked: at least 3 more, half
    # the smallest gain of the full example's seeds and thread counts (benchmarks/RESULTS.md, issue 35)
    assert metrics["pass_rate_after"] >= metrics["pass_rate_before"] + 3 / 90 - 1e-9
    assert metrics["reward_answer_after"] == metrics["pass_rate_after"]  # answer is 0 or 1: its mean is the rate

    # The start is the SFT adapter: its own greedy completions score what the run measured before training.
    tokenizer = load_tokenizer(cfg.model)
    rows = load_prompt_data(cfg.data).eval
    sft = PeftModel.from_pretrained(load_base_model(cfg.model, training=False), str(sft_adapter))
    scores, _ = score_completions(sft, tokenizer, rows, build_rewards(cfg.rewards), max_new_tokens=16)
    assert scores["pass_rate"] == metrics["pass_rate_before"]
    trained, started = (load_file(str(d / "adapter_model.safetensors")) for d in (result.output_dir, sft_adapter))
    assert trained.keys() == started.keys()
    assert all(trained[k].shape == started[k].shape for k in trained)
