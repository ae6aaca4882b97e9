"""Speech fine-tuning of Phi-4-multimodal on a CPU (method vision, audio rows): a tiny random Phi4MultimodalForCausalLM
learns to say whether a tone is low or high, which only the sound tells; and the built-in adapters each row gets.

No torchvision: audio goes through transformers' Phi4MultimodalFeatureExtractor only. Audio files are read with
soundfile (the test extra has it); without it these tests skip.
"""

from __future__ import annotations

import json
import logging
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from phitune.cli import app
from phitune.config.schema import DataConfig, ModelConfig
from phitune.tiny.vision import build_tiny_multimodal_model

soundfile = pytest.importorskip("soundfile", reason="audio is read with soundfile: pip install soundfile")

QUESTION = "Is the tone low or high?"
BANDS = {"low": (200, 400), "high": (1200, 2400)}  # Hz; each clip's pitch drawn inside its band
CHANCE = 1 / len(BANDS)
FORMATS = [("wav", 16000), ("flac", 44100), ("wav", 22050), ("mp3", 16000)]  # (file type, sampling rate) in turn


def write_clip(path: Path, hz: float, seconds: float, amplitude: float, rate: int = 16000) -> Path:
    """A sine tone (hz 0: silence) in the file type its suffix names."""
    time = np.arange(int(seconds * rate)) / rate
    soundfile.write(path, (amplitude * np.sin(2 * np.pi * hz * time)).astype(np.float32), rate)
    return path


def tone_rows(root: Path, name: str, labels: list[str], seed: int, silent: bool = False) -> Path:
    """A .jsonl of one-clip questions (clips beside it, WAV / FLAC / MP3 at 16, 22.05 and 44.1 kHz in turn, pitch,
    length and loudness drawn per clip) whose answer is the tone's band."""
    rnd = random.Random(seed)
    (root / "clips").mkdir(exist_ok=True)
    rows = []
    for i, label in enumerate(labels):
        suffix, rate = FORMATS[i % len(FORMATS)]
        hz = 0 if silent else rnd.uniform(*BANDS[label])
        clip = write_clip(root / "clips" / f"{name}{i}.{suffix}", hz, rnd.uniform(0.4, 0.8), rnd.uniform(0.2, 0.6),
                          rate)
        user = [{"type": "audio", "path": f"clips/{clip.name}"}, {"type": "text", "text": QUESTION}]
        rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": label}]})
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def speech_run(tmp_path_factory):
    """`phitune train` on 64 clips (LoRA on the language model, 60 steps), held-out clips balanced over bands."""
    root = tmp_path_factory.mktemp("speech")
    model = build_tiny_multimodal_model(root / "model", [QUESTION] + list(BANDS) * 20)
    rnd = random.Random(0)
    train = tone_rows(root, "train", [rnd.choice(list(BANDS)) for _ in range(64)], seed=1)
    held_out = list(BANDS) * 10  # 20 rows, each band 10 times: a constant answer scores exactly chance
    evals = tone_rows(root, "eval", held_out, seed=2)
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
    """Share of held-out clips whose generated answer is the right band."""
    from phitune.after.generate import SamplingSettings
    from phitune.after.vision_eval import answer_media_row, media_rows, prompt_and_reference

    rows = media_rows(DataConfig(train=str(data)), use_eval_split=False)
    right = 0
    for row in rows:
        prompt, reference = prompt_and_reference(row)
        right += answer_media_row(model, tokenizer, processor, prompt, SamplingSettings(max_new_tokens=3)) == reference
    return right / len(rows)


def audio_batch(root: Path, model_dir: Path, tokenizer, processor, lines: int = 4) -> dict:
    """The model inputs of the first held-out rows, as the trainer batches them (labels dropped)."""
    from phitune.data import training_chat_template
    from phitune.data.multimodal import parse_row
    from phitune.data.multimodal_batch import MediaCollator, encode_media_row

    rows = [json.loads(line) for line in (root / "eval.jsonl").read_text().splitlines()[:lines]]
    examples = [encode_media_row(parse_row(r, root, "eval"), tokenizer, processor, training_chat_template(tokenizer),
                                 "assistant", 64)[0] for r in rows]
    batch = MediaCollator(processor, tokenizer.pad_token_id)(examples)
    batch.pop("labels")
    return batch


def test_accuracy_rises_to_090_and_falls_to_chance_with_silent_clips(speech_run, tmp_path):
    from phitune.after.generate import load_for_inference
    from phitune.after.vision_eval import media_processor

    root, model_dir, held_out = speech_run
    base, tokenizer = load_for_inference(ModelConfig(name_or_path=str(model_dir), torch_dtype="float32"))
    processor = media_processor(base, tokenizer, str(model_dir))
    before = accuracy(base, tokenizer, processor, root / "eval.jsonl")
    tuned, tokenizer = load_for_inference(ModelConfig(name_or_path=str(model_dir), torch_dtype="float32"),
                                          adapter=root / "run")
    after = accuracy(tuned, tokenizer, processor, root / "eval.jsonl")
    silent = accuracy(tuned, tokenizer, processor, tone_rows(tmp_path, "silent", held_out, seed=2, silent=True))
    assert before <= CHANCE
    assert after >= 0.9, after
    assert silent <= CHANCE + 0.05, silent  # the same questions over silence: the sound is what is used
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] and metrics["train_audio"] == 64


def test_the_adapter_reloads_in_plain_peft_over_the_speech_lora_with_the_same_logits(speech_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from phitune.after.generate import load_for_inference
    from phitune.after.vision_eval import media_processor

    root, model_dir, _ = speech_run
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base = PeftModel.from_pretrained(base, model_dir / "speech-lora").merge_and_unload()  # audio rows' built-in one
    plain = PeftModel.from_pretrained(base, root / "run").eval()
    ours, tokenizer = load_for_inference(ModelConfig(name_or_path=str(model_dir), torch_dtype="float32"),
                                         adapter=root / "run")
    batch = audio_batch(root, model_dir, tokenizer, media_processor(ours, tokenizer, str(model_dir)))
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, ours(**batch).logits)


def test_each_row_gets_the_built_in_adapter_the_original_model_gives_it(speech_run, tmp_path, caplog):
    """One batch: a row with a picture token (vision-lora), one with an audio token (speech-lora), one of text
    (neither), one with both (vision-lora, as the original's vision-speech mode); each row's logits equal plain
    PEFT with that adapter merged. A checkpoint without the folders loads with a warning and runs bare."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from phitune.models.loading import load_base_model

    _, model_dir, _ = speech_run
    ours = load_base_model(ModelConfig(name_or_path=str(model_dir), torch_dtype="float32"), training=False).eval()
    image, audio = ours.config.vision_config.image_token_id, ours.config.audio_config.audio_token_id
    ids = torch.tensor([[5, 6, image, 8, 9], [5, audio, 7, 8, 9], [5, 6, 7, 8, 9], [5, image, audio, 8, 9]])

    def reference(folder: str | None):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        return (PeftModel.from_pretrained(model, model_dir / folder).merge_and_unload() if folder else model).eval()

    with torch.no_grad():
        logits = ours(input_ids=ids).logits
        for row, folder in enumerate(["vision-lora", "speech-lora", None, "vision-lora"]):
            torch.testing.assert_close(logits[row], reference(folder)(input_ids=ids[row:row + 1]).logits[0])
        assert (reference("vision-lora")(input_ids=ids[:1]).logits - reference(None)(input_ids=ids[:1]).logits
                ).abs().max() > 0.05  # the adapters do change the logits: the equalities above say something
        # generation: each one-token step keeps the adapter its prompt chose (the audio row's speech-lora)
        settings = {"max_new_tokens": 6, "do_sample": False, "output_logits": True, "return_dict_in_generate": True,
                    "eos_token_id": None, "pad_token_id": 0}
        ours.config.use_cache = True
        mine, theirs = ours.generate(ids[1:2], **settings), reference("speech-lora").generate(ids[1:2], **settings)
        assert mine.sequences.tolist() == theirs.sequences.tolist()
        torch.testing.assert_close(torch.stack(mine.logits), torch.stack(theirs.logits))
    bare_dir = build_tiny_multimodal_model(tmp_path / "bare", [QUESTION], built_in_loras=False)
    with caplog.at_level(logging.WARNING, logger="phitune"):
        bare = load_base_model(ModelConfig(name_or_path=str(bare_dir), torch_dtype="float32"), training=False)
    assert "has no vision-lora folder" in caplog.text and "has no speech-lora folder" in caplog.text
    assert not any(name.startswith("built_in_") for name, _ in bare.named_buffers())


def test_a_run_mixing_pictures_with_audio_only_rows_warns_about_the_shared_audio_projector(caplog):
    from phitune.config.schema import RunConfig
    from phitune.data.multimodal import Media, MediaRow
    from phitune.recipes.vision import warn_mixed_batches

    picture, clip = MediaRow([], [Media("image")]), MediaRow([], [Media("audio")])
    both = MediaRow([], [Media("image"), Media("audio")])
    with caplog.at_level(logging.WARNING, logger="phitune"):
        warn_mixed_batches([picture, both], RunConfig())  # every clip comes with a picture: as the original
        warn_mixed_batches([picture, clip], RunConfig(training_config={"per_device_train_batch_size": 1}))
        assert not caplog.records
        warn_mixed_batches([picture, clip], RunConfig())
    assert "projects every row's audio with the vision-speech projector" in caplog.text


def test_audio_files_are_read_mixed_to_mono_resampled_and_held_to_max_audio_seconds(tmp_path, monkeypatch):
    from phitune.data.multimodal import AudioLimit, parse_row, read_media_rows
    from phitune.data.readers import BadRow
    from phitune.errors import PhituneError

    time = np.arange(44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 1000 * time), np.sin(2 * np.pi * 1000 * time)], axis=1) * 0.3
    soundfile.write(tmp_path / "stereo.flac", stereo.astype(np.float32), 44100)  # 1 s at 44.1 kHz, two channels
    write_clip(tmp_path / "song.mp3", 500, 3.0, 0.3, rate=22050)

    def row(name: str) -> dict:
        return {"messages": [{"role": "user", "content": [{"type": "audio", "path": name}]},
                             {"role": "assistant", "content": "ok"}]}

    flac = parse_row(row("stereo.flac"), tmp_path, "a.jsonl:1").media[0]
    samples, rate = flac.open()
    assert rate == 16000 and flac.size == (16000, 16000) and samples.ndim == 1
    assert abs(np.argmax(np.abs(np.fft.rfft(samples))) - 1000) <= 2  # still 1 kHz after resampling (1 Hz bins)
    with pytest.raises(BadRow, match=r"a.jsonl:2: audio song.mp3: 3.0 s, over data.max_audio_seconds 2 "
                                     r"\(data.long_audio: cut keeps its start\)"):
        parse_row(row("song.mp3"), tmp_path, "a.jsonl:2", audio=AudioLimit(2.0))
    cut = parse_row(row("song.mp3"), tmp_path, "a.jsonl:2", audio=AudioLimit(2.0, "cut")).media[0]
    assert cut.size == (32000, 16000) and len(cut.open()[0]) == 32000
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(row("song.mp3")) + "\n" + json.dumps(row("stereo.flac")) + "\n", encoding="utf-8")
    rows, _, skipped = read_media_rows(str(data), "train", DataConfig(train=str(data), max_audio_seconds=2,
                                                                      on_bad_row="skip"))
    assert len(rows) == 1 and skipped[0].startswith(f"{data}:1: audio song.mp3: 3.0 s, over")
    monkeypatch.setitem(sys.modules, "soundfile", None)  # as if it were not installed
    with pytest.raises(PhituneError, match=r"^audio needs soundfile \(.*\): pip install soundfile$"):
        read_media_rows(str(data), "train", DataConfig(train=str(data), on_bad_row="skip"))


def test_phitune_data_shows_each_clips_length_and_token_count(speech_run, tmp_path):
    root, _, _ = speech_run
    result = CliRunner().invoke(app, ["data", str(root / "run.yaml"), "--set", f"data.cache_dir={tmp_path}"])
    assert result.exit_code == 0, result.output
    first = json.loads((root / "train.jsonl").read_text().splitlines()[0])["messages"][0]["content"][0]["path"]
    seconds = soundfile.info(root / first).duration
    assert f"[audio {Path(first).name} {seconds:.1f} s: " in result.output and " tokens]" in result.output


def test_chat_and_generate_answer_from_the_sound(speech_run, tmp_path):
    root, _, _ = speech_run
    low, high = write_clip(tmp_path / "low.wav", 300, 0.6, 0.4), write_clip(tmp_path / "high.flac", 1800, 0.6, 0.4)
    for clip, answer in ((low, "low"), (high, "high")):
        result = CliRunner().invoke(app, ["chat", str(root / "run"), "--audio", str(clip), "--max-new-tokens", "3"],
                                    input=f"{QUESTION}\n/exit\n")
        assert result.exit_code == 0, result.output
        assert f"assistant> {answer}\n" in result.output
    rows = [{"messages": [{"role": "user", "content": [{"type": "audio", "path": clip.name},
                                                        {"type": "text", "text": QUESTION}]}]} for clip in (high, low)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = CliRunner().invoke(app, ["generate", str(root / "run"), "--input", str(prompts), "--output",
                                      str(tmp_path / "answers.jsonl"), "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    answers = [json.loads(line)["answer"] for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert answers == ["high", "low"]


def test_merge_keeps_the_built_in_adapters_beside_the_merged_weights(speech_run, tmp_path):
    """The user's LoRA folded into the weights, vision-lora/ and speech-lora/ copied: phitune loads the merged
    model with the same logits as base + adapter, and so does plain transformers + PEFT with the speech-lora."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from phitune.after.generate import load_for_inference
    from phitune.after.vision_eval import media_processor

    root, model_dir, _ = speech_run
    result = CliRunner().invoke(app, ["merge", str(root / "run"), "--output", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = tmp_path / "merged"
    assert (merged / "vision-lora" / "adapter_config.json").is_file()
    assert (merged / "speech-lora" / "adapter_model.safetensors").is_file()
    tuned, tokenizer = load_for_inference(ModelConfig(name_or_path=str(model_dir), torch_dtype="float32"),
                                          adapter=root / "run")
    batch = audio_batch(root, model_dir, tokenizer, media_processor(tuned, tokenizer, str(model_dir)))
    ours, _ = load_for_inference(ModelConfig(name_or_path=str(merged), torch_dtype="float32"))
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    plain = PeftModel.from_pretrained(plain, merged / "speech-lora").eval()  # as the model card loads it
    with torch.no_grad():
        expected = tuned(**batch).logits
        torch.testing.assert_close(ours(**batch).logits, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(plain(**batch).logits, expected, atol=1e-4, rtol=1e-4)


def test_speech_metrics_are_jiwers_word_error_rate_and_sacrebleus_bleu():
    from phitune.after.vision_eval import speech_metrics

    same = speech_metrics(["The cat sat on the mat."], ["the cat sat on the mat"])
    assert same["wer"] == 0.0 and same["bleu"] > 40  # case and punctuation ignored by WER, not by BLEU
    half = speech_metrics(["the dog", "a cat sat"], ["the cat", "a cat sat"])
    assert half["wer"] == pytest.approx(1 / 5)  # one substitution in five reference words (jiwer's corpus WER)
    sentence = "le chat est assis sur le tapis"
    assert speech_metrics([sentence], [sentence])["bleu"] == pytest.approx(100)


def test_eval_scores_word_error_rate_and_bleu_base_vs_tuned(speech_run, tmp_path):
    root, _, _ = speech_run
    result = CliRunner().invoke(app, ["eval", str(root / "run"), "--num-generate", "8", "--max-new-tokens", "3",
                                      "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "word error rate (generated, audio rows)" in result.output
    assert "BLEU (generated, audio rows)" in result.output
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    base, tuned = metrics["base"], metrics["fine-tuned"]
    assert tuned["wer"] <= 0.1 < base["wer"]
    assert "bleu" in tuned and "bleu" in base  # 0 for one-word answers: BLEU counts up to 4-grams
    assert tuned["exact_match"] >= 0.9 > base["exact_match"]
