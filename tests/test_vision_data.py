"""Multimodal rows and the vision method's one-line errors: what runs without torchvision (the main test venv).

The training proof is tests/test_vision.py (marked vision: transformers' image processor needs torchvision).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _resume import assert_same_trained_adapter
from phitune.config.schema import DataConfig
from phitune.data.multimodal import IMAGE_PLACEHOLDER, parse_row, read_media_rows
from phitune.errors import PhituneError
from phitune.tiny.vision import build_tiny_multimodal_model, shape_picture


def run_cli(args: list[str], cwd: Path, stdin: str | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "phitune.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, input=stdin)


def user_turn(*parts) -> dict:
    return {"messages": [{"role": "user", "content": list(parts)}, {"role": "assistant", "content": "red"}]}


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


needs_soundfile = pytest.mark.skipif(importlib.util.find_spec("soundfile") is None,
                                     reason="audio is read with soundfile: pip install soundfile (the test extra)")


@pytest.fixture(scope="module")
def tiny_multimodal(tmp_path_factory) -> Path:
    return build_tiny_multimodal_model(tmp_path_factory.mktemp("tiny-mm"), ["What colour is it? red green"])


def test_parts_resolve_relative_paths_data_urls_and_openai_image_url(tmp_path):
    (tmp_path / "img").mkdir()
    picture = shape_picture(tmp_path / "img" / "a.png", "red")
    inline = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
    row = user_turn({"type": "image", "path": "img/a.png"}, {"type": "text", "text": "Which?"},
                    {"type": "image_url", "image_url": {"url": inline}},
                    {"type": "image", "url": f"file://{picture}"})
    parsed = parse_row(row, tmp_path, "train.jsonl:1")
    assert parsed.messages[0]["content"] == f"{IMAGE_PLACEHOLDER}Which?{IMAGE_PLACEHOLDER}{IMAGE_PLACEHOLDER}"
    assert [m.name for m in parsed.media] == ["a.png", "inline image", "a.png"]
    assert parsed.media[0].path == str(tmp_path / "img" / "a.png") and parsed.media[1].size == (28, 28)
    assert parsed.media[1].open().getpixel((14, 14)) == (220, 30, 30)


def test_a_missing_or_unreadable_image_is_one_line_with_file_and_line(tmp_path):
    shape_picture(tmp_path / "good.png", "red")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    data = write_rows(tmp_path / "train.jsonl", [user_turn({"type": "image", "path": "good.png"}),
                                                 user_turn({"type": "image", "path": "missing.png"}),
                                                 user_turn({"type": "image", "path": "broken.png"}),
                                                 user_turn({"type": "image", "url": "https://example.com/a.png"})])
    with pytest.raises(PhituneError) as missing:
        read_media_rows(str(data), "train", DataConfig(train=str(data)))
    assert str(missing.value).startswith(f"{data}:2: image not found: {tmp_path / 'missing.png'}")
    assert "\n" not in str(missing.value)
    rows, _, skipped = read_media_rows(str(data), "train", DataConfig(train=str(data), on_bad_row="skip"))
    assert len(rows) == 1 and rows[0].where == f"{data}:1"
    assert skipped[0].startswith(f"{data}:2: image not found")
    assert skipped[1].startswith(f"{data}:3: image broken.png: cannot read it")
    assert skipped[2] == f"{data}:4: image https://example.com/a.png: phitune reads local files and data: URLs; " \
                         "download it first"


def test_phitune_train_names_the_bad_image_in_one_line_and_leaves_nothing(tiny_multimodal, tmp_path):
    data = write_rows(tmp_path / "train.jsonl", [user_turn({"type": "image", "path": "nowhere.png"})])
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"method": "vision", "model": {"name_or_path": str(tiny_multimodal)},
                                  "data": {"train": str(data), "eval_split": 0, "max_seq_length": 128},
                                  "training_config": {"output_dir": str(tmp_path / "run"), "max_steps": 1},
                                  "peft_config": {"r": 4}}), encoding="utf-8")
    result = run_cli(["train", str(config)], cwd=tmp_path)
    assert result.returncode == 2
    assert f"{data}:1: image not found" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("error") <= 1 and not (tmp_path / "run").exists()


def test_lora_targets_the_language_model_never_the_encoders_whose_names_repeat_it(tiny_multimodal):
    import re

    from transformers import AutoModelForCausalLM

    from phitune.recipes.vision import language_model_targets

    names = [name for name, _ in AutoModelForCausalLM.from_pretrained(tiny_multimodal).named_modules()]
    assert any(n.endswith("audio_embed.encoder.encoders.0.feed_forward_in.gate_up_proj") for n in names)
    chosen = [n for n in names if re.fullmatch(language_model_targets("all-linear"), n)]
    assert len(chosen) == 8 and all(n.startswith("model.layers.") for n in chosen)  # 2 layers x 4 projections
    extra = language_model_targets(["qkv_proj", "image_embed.img_projection_up"])
    chosen = [n for n in names if re.fullmatch(extra, n)]
    assert chosen == ["model.layers.0.self_attn.qkv_proj", "model.layers.1.self_attn.qkv_proj",
                      "model.embed_tokens_extend.image_embed.img_projection_up"]


@pytest.mark.parametrize("torchvision", ["absent", "made for another torch"])
def test_a_vision_run_checks_torchvision_first_and_names_the_pip_line_for_this_torch(tiny_multimodal, tmp_path,
                                                                                  torchvision):
    """The main venv has no torchvision. The other case is a stand-in package that fails as a torchvision made for
    another torch does (RuntimeError at import), which breaks transformers' own imports. Either way: one line with
    the pip line for this torch, exit 2, before the model loads."""
    import torch

    from phitune.data.multimodal_batch import torchvision_install_line

    shape_picture(tmp_path / "a.png", "red")
    data = write_rows(tmp_path / "train.jsonl", [user_turn({"type": "image", "path": "a.png"})])
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"method": "vision", "model": {"name_or_path": str(tiny_multimodal)},
                                  "data": {"train": str(data), "eval_split": 0, "max_seq_length": 128},
                                  "training_config": {"output_dir": str(tmp_path / "run"), "max_steps": 1},
                                  "peft_config": {"r": 4}}), encoding="utf-8")
    env, version = {}, torch.__version__
    if torchvision == "absent":
        said = f"pictures need torchvision, which is not installed; the one made for torch {version}"
    else:
        (tmp_path / "fake" / "torchvision").mkdir(parents=True)
        (tmp_path / "fake" / "torchvision" / "__init__.py").write_text(
            "raise RuntimeError('operator torchvision::nms does not exist')\n", encoding="utf-8")
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")])
        said = f"torchvision does not import beside torch {version} (operator torchvision::nms does not exist); " \
               "install the one made for it"
    result = run_cli(["train", str(config)], cwd=tmp_path, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {said}: {torchvision_install_line(version)}"
    assert result.stderr.count("error") == 1 and not (tmp_path / "run").exists()  # no model loaded, nothing written


def test_the_torchvision_line_matches_the_torch_release_and_its_index():
    from phitune.data.multimodal_batch import torchvision_install_line

    cpu = "https://download.pytorch.org/whl/cpu"
    assert torchvision_install_line("2.13.0+cpu") == f"pip install torchvision==0.28.0 --index-url {cpu}"
    assert torchvision_install_line("2.14.1+cu130") == ("pip install torchvision==0.29.1 --index-url "
                                                        "https://download.pytorch.org/whl/cu130")
    assert torchvision_install_line("2.6.0") == "pip install torchvision==0.21.0"  # PyPI's torch: PyPI's torchvision


def test_gguf_export_refuses_a_vision_model_in_one_line(tiny_multimodal, tmp_path):
    result = run_cli(["export", "--model", str(tiny_multimodal), "--output", str(tmp_path / "m.gguf")], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is a vision model (phi4_multimodal)" in result.stderr and "phitune merge" in result.stderr
    assert not list(tmp_path.iterdir())


def test_phi35_vision_needs_the_explicit_remote_code_opt_in(tmp_path):
    from phitune.config.schema import ModelConfig
    from phitune.models.loading import load_model_config

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi3_v", "architectures": ["Phi3VForCausalLM"]}))
    with pytest.raises(PhituneError, match="Phi-3.5-vision, which exists only as remote code .* set "
                                           "model.trust_remote_code: true"):
        load_model_config(ModelConfig(name_or_path=str(tmp_path)))


def test_pictures_for_a_text_model_are_refused_in_one_line(tiny_model_dir, tmp_path):
    picture = shape_picture(tmp_path / "a.png", "red")
    result = run_cli(["chat", "--model", str(tiny_model_dir), "--image", str(picture)], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "pictures and audio need Phi-4-multimodal (model_type phi4_multimodal); this model is phi3" in result.stderr


def write_tone(path: Path, hz: float, seconds: float = 0.5, rate: int = 16000) -> Path:
    import wave

    import numpy as np

    pcm = (0.5 * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return path


@needs_soundfile
def test_audio_rows_train_end_to_end_with_their_tokens_masked(tiny_multimodal, tmp_path):
    """Audio parts need no torchvision: read by soundfile, features from transformers' Phi4MultimodalFeatureExtractor,
    one placeholder expanded to the clip's audio_embed_sizes, masked; a short run trains. (That the tiny model
    learns from the sound: tests/test_speech.py.)"""
    from phitune.api import train
    from phitune.config.schema import ModelConfig
    from phitune.data import training_chat_template
    from phitune.data.multimodal_batch import MediaProcessor, encode_media_row
    from phitune.models.loading import load_model_config, load_tokenizer

    rows = [{"messages": [{"role": "user", "content": [{"type": "audio", "path": write_tone(tmp_path / f"{i}.wav",
                                                                                             220 + 660 * (i % 2)).name},
                                                       {"type": "text", "text": "Which tone?"}]},
                          {"role": "assistant", "content": "high" if i % 2 else "low"}]} for i in range(8)]
    data = write_rows(tmp_path / "train.jsonl", rows)
    model_cfg = ModelConfig(name_or_path=str(tiny_multimodal))
    tokenizer, config = load_tokenizer(model_cfg), load_model_config(model_cfg)
    processor = MediaProcessor(str(tiny_multimodal), config, tokenizer)
    row = read_media_rows(str(data), "train", DataConfig(train=str(data)))[0][0]
    assert row.media[0].size == (8000, 16000)
    write_tone(tmp_path / "cd.wav", 220, rate=44100)  # resampled to 16 kHz as it is read
    assert parse_row(user_turn({"type": "audio", "path": "cd.wav"}), tmp_path, "train.jsonl:9").media[0].size == (
        8000, 16000)
    example, _ = encode_media_row(row, tokenizer, processor, training_chat_template(tokenizer), "all", 256)
    audio = [i for i, token in enumerate(example["input_ids"]) if token == config.audio_config.audio_token_id]
    assert len(audio) == example["media_tokens"][0] > 1 and all(example["labels"][i] == -100 for i in audio)
    result = train({"method": "vision", "model": {"name_or_path": str(tiny_multimodal), "torch_dtype": "float32"},
                    "data": {"train": str(data), "eval_split": 0, "max_seq_length": 256},
                    "training_config": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "learning_rate": 1e-3,
                                        "per_device_train_batch_size": 4, "save_steps": 100, "disable_tqdm": True},
                    "peft_config": {"r": 4, "lora_alpha": 8, "target_modules": ["qkv_proj",
                                                                               "audio_embed.up_proj_for_speech"]}})
    assert result.metrics["train_audio"] == 8 and result.metrics["global_step"] == 2
    from safetensors.torch import load_file

    trained = {k: t for k, t in load_file(tmp_path / "run" / "adapter_model.safetensors").items() if "lora_B" in k}
    # the language model's qkv_proj in each layer, and the speech projector named by its path: both trained
    assert sorted(k.split(".lora_B")[0].removeprefix("base_model.model.") for k in trained) == [
        "model.embed_tokens_extend.audio_embed.up_proj_for_speech", "model.layers.0.self_attn.qkv_proj",
        "model.layers.1.self_attn.qkv_proj"]
    assert all(t.abs().sum() > 0 for t in trained.values())


@needs_soundfile
def test_a_vision_run_resumes_from_its_checkpoint_to_the_same_adapter(tiny_multimodal, tmp_path, monkeypatch):
    """The lifecycle is SFT's: 3 steps (checkpoint-3), then --resume to 6, ends at the uninterrupted run's adapter
    (audio rows: the same recipe, collator and checkpoints as pictures, without torchvision)."""
    from phitune.api import train

    rows = [{"messages": [{"role": "user", "content": [{"type": "audio", "path": write_tone(tmp_path / f"{i}.wav",
                                                                                             220 * (1 + i % 3)).name},
                                                       {"type": "text", "text": "Which tone?"}]},
                          {"role": "assistant", "content": ["low", "mid", "high"][i % 3]}]} for i in range(12)]
    data = write_rows(tmp_path / "train.jsonl", rows)

    def run(name: str, steps: int, resume: bool = False):
        return train({"method": "vision", "model": {"name_or_path": str(tiny_multimodal), "torch_dtype": "float32"},
                      "data": {"train": str(data), "eval_split": 0, "max_seq_length": 256},
                      "training_config": {"output_dir": str(tmp_path / name), "max_steps": steps, "save_steps": 3,
                                          "learning_rate": 1e-2, "lr_scheduler_type": "constant",
                                          "per_device_train_batch_size": 4, "seed": 0,
                                          "disable_tqdm": True},
                      "peft_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}}, resume=resume)

    from transformers import Trainer

    straight = run("straight", 6)
    run("resumed", 3)
    steps, step = [], Trainer.training_step
    monkeypatch.setattr(Trainer, "training_step", lambda self, *a, **k: steps.append(1) or step(self, *a, **k))
    resumed = run("resumed", 6, resume=True)
    assert len(steps) == 3 and resumed.metrics["global_step"] == 6  # steps 4..6 only: a restart would train 6
    assert_same_trained_adapter(straight.output_dir, resumed.output_dir, rtol=1e-5, atol=1e-7)


@needs_soundfile
def test_qlora_trains_on_a_4bit_multimodal_base(tiny_multimodal, tmp_path):
    """QLoRA on the CPU (bitsandbytes): every linear layer of the base in NF4, encoders included, the built-in
    speech-lora added to the audio rows by its own unquantised terms, the LoRA trained in fp32."""
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    from phitune.api import train

    rows = [{"messages": [{"role": "user", "content": [{"type": "audio", "path": write_tone(tmp_path / f"{i}.wav",
                                                                                             330).name}]},
                          {"role": "assistant", "content": "a tone"}]} for i in range(4)]
    data = write_rows(tmp_path / "train.jsonl", rows)
    result = train({"method": "vision",
                    "model": {"name_or_path": str(tiny_multimodal), "torch_dtype": "float32",
                              "quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                               "bnb_4bit_compute_dtype": "float32"}},
                    "data": {"train": str(data), "eval_split": 0, "max_seq_length": 256},
                    "training_config": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "learning_rate": 1e-2,
                                        "per_device_train_batch_size": 4, "save_steps": 100, "disable_tqdm": True},
                    "peft_config": {"r": 4, "lora_alpha": 8}})
    quantized = [n for n, m in result.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert any("layers.0.self_attn.qkv_proj" in n for n in quantized) and any("img_processor" in n for n in quantized)
    lora_b = [t for k, t in load_file(tmp_path / "run" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert len(lora_b) == 8 and all(t.abs().sum() > 0 for t in lora_b)


def test_text_sft_on_rows_with_images_points_to_method_vision(tmp_path):
    from phitune.data import load_conversations

    shape_picture(tmp_path / "a.png", "red")
    data = write_rows(tmp_path / "train.jsonl", [user_turn({"type": "image", "path": "a.png"})])
    with pytest.raises(PhituneError, match=r"train.jsonl:1: turn 1 \(user\) is a list of content parts \(images, "
                                           r"audio\): train Phi-4-multimodal on it with method: vision"):
        load_conversations(DataConfig(train=str(data), eval_split=0))


@needs_soundfile
def test_chat_takes_an_audio_clip_with_image(tiny_multimodal, tmp_path):
    """`phitune chat --image clip.wav`: the clip goes with the first turn through the audio encoder, no torchvision
    needed; the random tiny model's answer is not checked, only that one comes back and the chat goes on."""
    clip = write_tone(tmp_path / "clip.wav", 440)
    result = run_cli(["chat", "--model", str(tiny_multimodal), "--image", str(clip), "--max-new-tokens", "2"],
                     cwd=tmp_path, stdin="Which tone?\nAnd now?\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant> ") == 2
