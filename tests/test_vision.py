"""Vision fine-tuning of Phi-4-multimodal on a CPU (method vision): a tiny random Phi4MultimodalForCausalLM learns to
name the colour of a square in a picture, which only the picture tells.

Marked `vision`: transformers' Phi-4-multimodal image processor needs torchvision, which the main test venv lacks
(PyPI's torchvision fails to import beside the pinned CPU torch 2.13.0); .ci/run runs these in a venv with
torch 2.14.1 + torchvision 0.29.1 (`python -m pytest -m vision tests/test_vision.py`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from phitune.cli import app
from phitune.tiny.vision import COLOURS, build_tiny_multimodal_model, shape_picture

pytestmark = pytest.mark.vision

QUESTION = "What colour is the square?"
CHANCE = 1 / len(COLOURS)


def colour_rows(root: Path, name: str, colours: list[str], blank: bool = False) -> Path:
    """A .jsonl of one-picture questions (pictures beside it, named by relative path) whose answer is the colour."""
    (root / "img").mkdir(exist_ok=True)
    rows = []
    for i, colour in enumerate(colours):
        picture = shape_picture(root / "img" / f"{name}{i}.png", None if blank else colour)
        user = [{"type": "image", "path": f"img/{picture.name}"}, {"type": "text", "text": QUESTION}]
        rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": colour}]})
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    """`phitune train` on 64 pictures (LoRA on the language model, 60 steps), held-out rows balanced over colours."""
    root = tmp_path_factory.mktemp("vision")
    model = build_tiny_multimodal_model(root / "model", [QUESTION] + list(COLOURS) * 20)
    rnd = random.Random(0)
    train = colour_rows(root, "train", [rnd.choice(list(COLOURS)) for _ in range(64)])
    held_out = list(COLOURS) * 5  # 20 rows, each colour 5 times: a constant answer scores exactly chance
    evals = colour_rows(root, "eval", held_out)
    config = {
        "method": "vision",
        "model": {"name_or_path": str(model), "torch_dtype": "float32"},
        "data": {"train": str(train), "eval": str(evals), "max_seq_length": 64},
        "training_config": {"output_dir": str(root / "run"), "max_steps": 60, "learning_rate": 5e-3,
                            "per_device_train_batch_size": 8, "logging_steps": 10, "save_steps": 30, "seed": 0,
                            "disable_tqdm": True},
        "peft_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    result = CliRunner().invoke(app, ["train", str(root / "run.yaml")])
    assert result.exit_code == 0, result.output
    return root, model, held_out


def accuracy(model, tokenizer, processor, data: Path) -> float:
    """Share of held-out pictures whose generated answer is the right colour."""
    from phitune.after.generate import SamplingSettings
    from phitune.after.vision_eval import answer_media_row, media_rows, prompt_and_reference
    from phitune.config.schema import DataConfig

    rows = media_rows(DataConfig(train=str(data)), use_eval_split=False)
    right = 0
    for row in rows:
        prompt, reference = prompt_and_reference(row)
        right += answer_media_row(model, tokenizer, processor, prompt, SamplingSettings(max_new_tokens=3)) == reference
    return right / len(rows)


def test_labels_train_only_the_answer_and_mask_every_image_token(vision_run):
    from phitune.config.schema import DataConfig, ModelConfig
    from phitune.data import training_chat_template
    from phitune.data.multimodal import read_media_rows
    from phitune.data.multimodal_batch import MediaProcessor, encode_media_rows
    from phitune.models.loading import load_model_config, load_tokenizer

    root, model, _ = vision_run
    model_cfg = ModelConfig(name_or_path=str(model))
    tokenizer, config = load_tokenizer(model_cfg), load_model_config(model_cfg)
    processor = MediaProcessor(str(model), config, tokenizer)
    rows = read_media_rows(str(root / "eval.jsonl"), "train", DataConfig(on_bad_row="error"))[0]
    encoded = encode_media_rows(rows[:4], tokenizer, processor, training_chat_template(tokenizer), train_on="all",
                                max_seq_length=64, on_bad_row="error")
    image_id = config.vision_config.image_token_id
    for row, example in zip(rows, encoded.examples):
        ids, labels = torch.tensor(example["input_ids"]), torch.tensor(example["labels"])
        # one 28-pixel crop: 1x1 pooled grid + its separator, a separator, the global view 1x1 + separator = 5
        assert (ids == image_id).sum() == 5 == example["media_tokens"][0]
        assert (labels[ids == image_id] == -100).all()  # even with train_on: all
        encoded_assistant = encode_media_rows([row], tokenizer, processor, training_chat_template(tokenizer),
                                              train_on="assistant", max_seq_length=64, on_bad_row="error")
        trained = [i for i in encoded_assistant.examples[0]["labels"] if i != -100]
        assert tokenizer.decode(trained) == row.messages[-1]["content"] + "<|end|>"
        assert -1 not in example["input_ids"]  # real placeholder ids, never -1 (trl#1802)


def test_accuracy_rises_from_chance_to_090_and_falls_back_with_blank_pictures(vision_run, tmp_path):
    from phitune.after.generate import load_for_inference
    from phitune.after.vision_eval import media_processor
    from phitune.config.schema import ModelConfig

    root, model_dir, held_out = vision_run
    base, tokenizer = load_for_inference(ModelConfig(name_or_path=str(model_dir), torch_dtype="float32"))
    processor = media_processor(base, tokenizer, str(model_dir))
    before = accuracy(base, tokenizer, processor, root / "eval.jsonl")
    tuned, tokenizer = load_for_inference(ModelConfig(name_or_path=str(model_dir), torch_dtype="float32"),
                                          adapter=root / "run")
    after = accuracy(tuned, tokenizer, processor, root / "eval.jsonl")
    blank = accuracy(tuned, tokenizer, processor, colour_rows(tmp_path, "blank", held_out, blank=True))
    assert before <= CHANCE
    assert after >= 0.9, after
    assert blank <= CHANCE + 0.05, blank  # the same questions without the square: the picture is what is used
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] and metrics["train_images"] == 64


def test_the_adapter_reloads_in_plain_peft_on_the_language_model_only(vision_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from phitune.after.generate import load_for_inference
    from phitune.after.vision_eval import media_processor
    from phitune.config.schema import ModelConfig
    from phitune.data.multimodal import parse_row
    from phitune.data.multimodal_batch import MediaCollator

    root, model_dir, _ = vision_run
    config = json.loads((root / "run" / "adapter_config.json").read_text())
    assert config["target_modules"].startswith("(?:model\\.layers")  # never the vision tower or audio encoder
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base = PeftModel.from_pretrained(base, model_dir / "vision-lora").merge_and_unload()  # the built-in adapter
    plain = PeftModel.from_pretrained(base, root / "run").eval()
    ours, tokenizer = load_for_inference(ModelConfig(name_or_path=str(model_dir), torch_dtype="float32"),
                                         adapter=root / "run")
    lora = [n for n, _ in plain.named_parameters() if "lora_A" in n]
    assert lora and all(".layers." in n and "embed_tokens_extend" not in n for n in lora)
    processor = media_processor(ours, tokenizer, str(model_dir))
    row = json.loads((root / "eval.jsonl").read_text().splitlines()[0])
    from phitune.data import training_chat_template
    from phitune.data.multimodal_batch import encode_media_row

    example, _ = encode_media_row(parse_row(row, root, "eval.jsonl:1"), tokenizer, processor,
                                  training_chat_template(tokenizer), "assistant", 64)
    batch = MediaCollator(processor, tokenizer.pad_token_id)([example])
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, ours(**batch).logits)


def colour_pictures(root: Path, colours: list[str]) -> list[Path]:
    (root / "pics").mkdir(exist_ok=True)
    return [shape_picture(root / "pics" / f"{colour}.png", colour) for colour in colours]


def test_chat_answers_about_the_picture_given_with_image(vision_run, tmp_path):
    root, _, _ = vision_run
    for picture in colour_pictures(tmp_path, ["green", "yellow"]):
        result = CliRunner().invoke(app, ["chat", str(root / "run"), "--image", str(picture), "--max-new-tokens", "3"],
                                    input=f"{QUESTION}\n/exit\n")
        assert result.exit_code == 0, result.output
        assert f"assistant> {picture.stem}\n" in result.output


def test_generate_answers_rows_with_image_parts_relative_to_the_input_file(vision_run, tmp_path):
    root, _, _ = vision_run
    pictures = colour_pictures(tmp_path, ["red", "blue", "yellow"])
    rows = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"pics/{p.name}"}},
                                                        {"type": "text", "text": QUESTION}]}]} for p in pictures]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = CliRunner().invoke(app, ["generate", str(root / "run"), "--input", str(prompts), "--output",
                                      str(tmp_path / "answers.jsonl"), "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    answers = [json.loads(line)["answer"] for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert answers == ["red", "blue", "yellow"]


def test_eval_scores_base_and_tuned_on_multimodal_rows(vision_run, tmp_path):
    root, _, _ = vision_run
    result = CliRunner().invoke(app, ["eval", str(root / "run"), "--num-generate", "8", "--max-new-tokens", "3",
                                      "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    base, tuned = metrics["base"], metrics["fine-tuned"]
    assert tuned["loss"] < base["loss"] and tuned["token_accuracy"] == 1.0
    assert tuned["exact_match"] >= 0.9 > base["exact_match"] and tuned["rougeL_f1"] > base["rougeL_f1"]


def test_merge_writes_a_standalone_model_that_answers_the_same(vision_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from phitune.after.generate import load_for_inference
    from phitune.after.vision_eval import media_processor
    from phitune.config.schema import ModelConfig
    from phitune.data import training_chat_template
    from phitune.data.multimodal import parse_row
    from phitune.data.multimodal_batch import MediaCollator, encode_media_row

    root, model_dir, _ = vision_run
    result = CliRunner().invoke(app, ["merge", str(root / "run"), "--output", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = tmp_path / "merged"
    assert (merged / "preprocessor_config.json").is_file()
    assert (merged / "vision-lora" / "adapter_config.json").is_file()
    from peft import PeftModel

    standalone = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)  # plain transformers and PEFT,
    standalone = PeftModel.from_pretrained(standalone, merged / "vision-lora").eval()  # as the model card loads it
    tuned, tokenizer = load_for_inference(ModelConfig(name_or_path=str(model_dir), torch_dtype="float32"),
                                          adapter=root / "run")
    processor = media_processor(tuned, tokenizer, str(model_dir))
    rows = [json.loads(line) for line in (root / "eval.jsonl").read_text().splitlines()[:4]]
    examples = [encode_media_row(parse_row(r, root, "eval"), tokenizer, processor, training_chat_template(tokenizer),
                                 "assistant", 64)[0] for r in rows]
    batch = MediaCollator(processor, tokenizer.pad_token_id)(examples)
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(standalone(**batch).logits, tuned(**batch).logits, atol=1e-4, rtol=1e-4)
    result = CliRunner().invoke(app, ["chat", "--model", str(merged), "--image",
                                      str(colour_pictures(tmp_path, ["blue"])[0]), "--max-new-tokens", "3"],
                                input=f"{QUESTION}\n/exit\n")
    assert "assistant> blue\n" in result.output, result.output


def test_the_built_in_vision_lora_is_active_on_rows_with_pictures(vision_run):
    from transformers import AutoModelForCausalLM

    from phitune.config.schema import ModelConfig
    from phitune.models.loading import load_base_model

    _, model_dir, _ = vision_run
    image = AutoModelForCausalLM.from_pretrained(model_dir).config.vision_config.image_token_id
    ids = torch.tensor([[5, 6, image, 8, 9]])  # a picture's token: the row takes vision-lora
    with torch.no_grad():
        ours = load_base_model(ModelConfig(name_or_path=str(model_dir), torch_dtype="float32"), training=False)
        from peft import PeftModel

        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                              model_dir / "vision-lora").eval()
        bare = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        torch.testing.assert_close(ours.eval()(input_ids=ids).logits, reference(input_ids=ids).logits)
        assert (ours(input_ids=ids).logits - bare(input_ids=ids).logits).abs().max() > 0.05


def test_phitune_data_names_and_sizes_the_pictures_and_counts_their_tokens(vision_run, tmp_path):
    root, _, _ = vision_run
    result = CliRunner().invoke(app, ["data", str(root / "run.yaml"), "--set", f"data.cache_dir={tmp_path}"])
    assert result.exit_code == 0, result.output
    assert "[image train0.png 28x28: 5 tokens]" in result.output
    assert len(list(tmp_path.glob("vision-*/data_lengths.png"))) == 1  # the data cache, never the run's folder
