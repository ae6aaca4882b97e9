"""A tiny random Phi-4-multimodal: a real `Phi4MultimodalForCausalLM` (language model, SigLIP-style vision tower,
projector and Conformer audio encoder) at toy size, with a small tokenizer that has Phi-4-multimodal's special
tokens and chat format, and a Phi-4-multimodal image processor config for its 28-pixel crops.

It lets the tests run the same loading, data, training, chat, evaluation and merge code as
microsoft/Phi-4-multimodal-instruct (converted to the native transformers class), offline and on a CPU. Phi-4-multimodal
facts kept: the image and audio placeholder tokens (`<|image|>`, `<|audio|>`; ids in config.vision_config /
config.audio_config), `<|user|>...<|end|><|assistant|>...<|end|>` turns, crops of `crop_size` pixels cut into
`patch_size` patches, 2x2-pooled into image tokens. Its audio encoder is calibrated as a trained one is
(calibrate_audio_encoder), so a LoRA can learn from sound, and it has random built-in `vision-lora/` and `speech-lora/`
adapters laid out as the real checkpoint's.
"""

from __future__ import annotations

import json
from pathlib import Path

from phitune.data.templates import PHI4_MINI_CHAT_TEMPLATE
from phitune.tiny.phi3 import SPECIAL_TOKENS

IMAGE_TOKEN, AUDIO_TOKEN = "<|image|>", "<|audio|>"
CROP = 28  # pixels per crop (Phi-4-multimodal: 448); two 14-pixel patches a side, pooled to 1 image token a side
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 210, 20)}


def tiny_multimodal_config(vocab_size: int, image_token_id: int, audio_token_id: int, hidden: int = 64,
                           layers: int = 2):
    """A Phi4MultimodalConfig with the real structure at toy size (Phi-4-multimodal's sizes in the comments)."""
    from transformers import Phi4MultimodalConfig

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,  # 1152, 27
                  image_size=CROP, crop_size=CROP, patch_size=14, image_token_id=image_token_id, feature_layer=-1)
    audio = dict(hidden_size=32, intermediate_size=64, num_blocks=1, num_attention_heads=2,  # 1024, 24 blocks
                 ext_pw_out_channel=32, depthwise_separable_out_channel=32, nemo_conv_channels=32,
                 audio_token_id=audio_token_id)
    return Phi4MultimodalConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,  # 3072, 8192
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,  # 32 layers, 24 heads, 8 kv
        max_position_embeddings=1024, original_max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, vision_config=vision, audio_config=audio,
    )


def build_tiny_multimodal_tokenizer(texts: list[str], vocab_size: int = 512):
    """A small byte-level BPE with Phi-3's special tokens plus `<|image|>` and `<|audio|>`, and Phi-4-multimodal's
    chat template (the Phi-4-mini format: `<|user|>text<|end|><|assistant|>`)."""
    from phitune.tiny.phi3 import build_tokenizer

    tokenizer = build_tokenizer(texts, vocab_size=vocab_size)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[3:] + [IMAGE_TOKEN, AUDIO_TOKEN]})
    tokenizer.chat_template = PHI4_MINI_CHAT_TEMPLATE
    return tokenizer


def build_tiny_multimodal_model(output_dir: str | Path, texts: list[str], seed: int = 0,
                                built_in_loras: bool = True, **shape) -> Path:
    """Write a randomly initialised tiny Phi4MultimodalForCausalLM, its tokenizer and its image processor config
    (preprocessor_config.json, read by phitune.data.multimodal_batch) to `output_dir`; return the directory.

    built_in_loras: also random built-in `vision-lora/` and `speech-lora/` adapters of the language model, laid out
    as in a converted Phi-4-multimodal checkpoint. The audio encoder is calibrated (calibrate_audio_encoder) so that
    the sound reaches the language model, as in a trained one."""
    import torch
    from transformers import Phi4MultimodalForCausalLM

    output_dir = Path(output_dir)
    tokenizer = build_tiny_multimodal_tokenizer(texts)
    tokenizer.save_pretrained(output_dir)
    ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, AUDIO_TOKEN])
    torch.manual_seed(seed)
    config = tiny_multimodal_config(len(tokenizer), *ids, **shape)
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model = Phi4MultimodalForCausalLM(config)
    calibrate_audio_encoder(model)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output_dir)
    processor = {"image_processor_type": "Phi4MultimodalImageProcessor", "size": {"height": CROP, "width": CROP},
                 "patch_size": 14, "dynamic_hd": 4, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    (output_dir / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n", encoding="utf-8")
    if built_in_loras:
        write_built_in_lora(model, output_dir / "vision-lora")
        write_built_in_lora(model, output_dir / "speech-lora")
    return output_dir


def calibrate_audio_encoder(model) -> None:
    """Give the random audio encoder what a trained one has, so that sound reaches the language model.

    With transformers' init (every weight N(0, 0.02)) each of the Conformer's subsampling convolutions shrinks its
    input about tenfold: the encoder's input is 1e-5 of the features and its output is the same for every clip,
    so no LoRA can learn from sound (the 60-step two-tone run at chance). A trained checkpoint keeps the signal,
    and its input layer holds the log-mel statistics of its training audio (Phi4MultimodalAudioMeanVarianceNormLayer).
    Here: PyTorch's own scale-keeping init for the encoder's convolutions and linear layers, and the mean and
    inverse deviation of each mel bin over tones of 110 Hz to 3.5 kHz and white noise."""
    import numpy as np
    import torch
    from transformers import Phi4MultimodalFeatureExtractor

    encoder = model.model.embed_tokens_extend.audio_embed.encoder
    with torch.random.fork_rng():  # the weights drawn after it (the built-in LoRAs) stay as they were
        torch.manual_seed(0)
        for module in encoder.modules():
            if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
                module.reset_parameters()
    rate, time = 16000, np.arange(16000) / 16000
    clips = [0.5 * np.sin(2 * np.pi * hz * time) for hz in (110, 220, 440, 880, 1760, 3520)]
    clips.append(0.1 * np.random.default_rng(0).standard_normal(rate))
    features = Phi4MultimodalFeatureExtractor()([c.astype(np.float32) for c in clips], sampling_rate=rate,
                                                return_tensors="pt")["audio_input_features"]
    features = features.reshape(-1, features.shape[-1])  # (clips x frames, 80 mel bins)
    norm = encoder.encoder_embedding
    with torch.no_grad():
        norm.global_mean.copy_(features.mean(0))
        norm.global_invstd.copy_(1 / features.std(0).clamp_min(1e-3))


def write_built_in_lora(model, folder: Path) -> None:
    """A random PEFT LoRA on the language model's four projections, laid out as a converted Phi-4-multimodal
    checkpoint's `vision-lora/` (r 256, alpha 512) and `speech-lora/` (r 320, alpha 640) are; its B matrices
    non-zero, so whether it is applied shows in the logits."""
    import torch
    from peft import LoraConfig, get_peft_model

    targets = r"model\.layers\.\d+\.(?:self_attn|mlp)\.(?:qkv_proj|o_proj|gate_up_proj|down_proj)"
    adapted = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    for name, param in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    adapted.save_pretrained(folder)
    adapted.unload()  # the layers unwrapped: the next adapter starts from the bare model


def shape_picture(path: Path, colour: str | None, size: int = CROP) -> Path:
    """Write a PNG of a filled square of `colour` on a grey ground (None: a blank grey picture); return the path."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (128, 128, 128))
    if colour is not None:
        ImageDraw.Draw(image).rectangle([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=COLOURS[colour])
    image.save(path)
    return path
