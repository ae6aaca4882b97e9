"""Multimodal rows to training tokens and batches: Phi-4-multimodal's own image processor and audio feature
extractor (transformers'), placeholder expansion, masked labels, and the batch collator.

The pictures go through transformers' `Phi4MultimodalImageProcessor`, the code that prepares them when the model
is served, so the model is fine-tuned on the pixels it later sees (it needs torchvision, as transformers' image
processors do: require_torchvision says which). How many tokens a picture takes is worked out here from the
processor's crop mask and the model's config, the way the model's image embedding counts them, so any crop size
works (transformers' processor counts for 448-pixel crops only).

Labels: the rendered conversation is masked as for text SFT (phitune.data.encode: the assistant's content and its
`<|end|>`), then every image and audio token is masked too, whatever data.train_on says: they are the encoder's
inputs, not words the model could predict.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from phitune.data.encode import IGNORE_INDEX, label_tokens, rendered_with_offsets
from phitune.data.multimodal import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, Media, MediaRow
from phitune.data.readers import BadRow
from phitune.errors import PhituneError, first_line


def check_multimodal_model(model_config, trust_remote_code: bool) -> None:
    """Refuse, in one line, a model phitune cannot give pictures or audio to (training, chat, generate, eval)."""
    model_type = getattr(model_config, "model_type", "")
    if model_type == "phi3_v":
        raise PhituneError("Phi-3.5-vision (phi3_v) runs only as its own remote code, whose processor and inputs "
                           "differ from Phi-4-multimodal's; phitune trains Phi-4-multimodal's native class only (see "
                           "docs/multimodal.md)" if trust_remote_code else
                           "Phi-3.5-vision is remote code only (phi3_v, never merged into transformers); set "
                           "model.trust_remote_code: true to run the model's own code")
    if model_type != "phi4_multimodal":
        raise PhituneError(f"pictures and audio need Phi-4-multimodal (model_type phi4_multimodal); this model is "
                           f"{model_type or 'unknown'}: train a text model with method: sft, chat without --image")


class MediaProcessor:
    """The model's image processor and audio feature extractor, and the ids of its placeholder tokens."""

    def __init__(self, model_path: str, model_config, tokenizer, trust_remote_code: bool = False):
        check_multimodal_model(model_config, trust_remote_code)
        vision, audio = model_config.vision_config, model_config.audio_config
        self.token_ids = {"image": vision.image_token_id, "audio": audio.audio_token_id}
        self.token_text = {kind: tokenizer.convert_ids_to_tokens(i) for kind, i in self.token_ids.items()}
        self.crop, self.pooled = vision.crop_size, -(-(vision.image_size // vision.patch_size) // 2)
        self.model_path, self._images, self.audio = model_path, None, audio_feature_extractor()

    @property
    def images(self):
        """transformers' image processor, made when the first picture comes (audio alone needs no torchvision)."""
        if self._images is None:
            self._images = image_processor(self.model_path)
        return self._images

    def render(self, text: str) -> str:
        """Message text with phitune's placeholders swapped for the model's own image / audio tokens."""
        return text.replace(IMAGE_PLACEHOLDER, self.token_text["image"]).replace(AUDIO_PLACEHOLDER,
                                                                                self.token_text["audio"])

    def image_inputs(self, pictures: list) -> tuple[dict, list[int]]:
        """(model inputs, tokens per picture) for PIL images, in order."""
        out = self.images(pictures, return_tensors="pt")
        inputs = {key: out[key] for key in ("image_pixel_values", "image_sizes", "image_attention_mask")}
        counts = [self._image_tokens(size, mask) for size, mask in zip(out["image_sizes"], out["image_attention_mask"])]
        return inputs, counts

    def _image_tokens(self, size, mask) -> int:
        """Tokens the model's image embedding writes for one picture: the HD crops' pooled grid (each row closed by
        a separator), one separator, the global view's grid (rows closed likewise). Phi-4-multimodal: 448-pixel
        crops, 16 x 16 pooled, 545 tokens for a one-crop picture."""
        rows, cols = int(size[0]) // self.crop, int(size[1]) // self.crop
        grid = mask[1: rows * cols + 1, 0::2, 0::2].reshape(rows, cols, self.pooled, self.pooled)
        grid = grid.transpose(1, 2).reshape(rows * self.pooled, cols * self.pooled)
        useful_h, useful_w = int(grid[:, 0].sum()), int(grid[0, :].sum())
        return useful_h * (useful_w + 1) + 1 + self.pooled * (self.pooled + 1)

    def audio_inputs(self, clips: list) -> tuple[dict, list[int]]:
        """(model inputs, tokens per clip) for (samples, sampling rate) pairs, in order (16 kHz: the rows' reader
        resampled them). Each clip goes through the feature extractor alone, as in the model's original unbatched
        code, and the log-mel frames are padded here: transformers 5.24's batched extraction fails on clips whose
        lengths differ by less than a frame or so (a RuntimeError of mismatched sizes in its padding mask)."""
        import torch

        outs = [self.audio(samples, sampling_rate=rate, return_tensors="pt") for samples, rate in clips]
        frames = [out["audio_input_features"][0] for out in outs]  # (frames, 80 mel bins) each
        features = torch.nn.utils.rnn.pad_sequence(frames, batch_first=True)
        inputs = {"audio_input_features": features,
                  "audio_embed_sizes": torch.cat([out["audio_embed_sizes"] for out in outs])}
        if len(frames) > 1:  # as the extractor does: a mask only for a batch
            lengths = torch.tensor([len(f) for f in frames])
            inputs["audio_attention_mask"] = torch.arange(features.shape[1])[None] < lengths[:, None]
        return inputs, [int(n) for n in inputs["audio_embed_sizes"]]

    def inputs(self, media: list) -> tuple[dict, list[int]]:
        """(model inputs, tokens per item) for Media items in order; images and audio each keep their order."""
        inputs, counts = {}, {}
        for kind, convert in (("image", self.image_inputs), ("audio", self.audio_inputs)):
            items = [m.open() for m in media if m.kind == kind]
            if items:
                found, counts[kind] = convert(items)
                inputs.update(found)
        order = {kind: iter(n) for kind, n in counts.items()}
        return inputs, [next(order[m.kind]) for m in media]


def require_torchvision(absent_ok: bool = False) -> None:
    """Fail in one line, naming the exact pip line, unless torchvision imports beside the installed torch (or, with
    `absent_ok`, is not installed at all: audio alone needs none).

    transformers' image processors are written on torchvision. phitune[vision] leaves it out because pip, asked for
    PyPI's torchvision beside a CPU torch, replaces that torch with the CUDA build it was made with (GBs). One made
    for another torch fails at import (RuntimeError, OSError), and transformers' own imports with it, in any
    command: the CLI asks this function why when a command crashes."""
    import importlib.util

    if absent_ok and importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # absent: ModuleNotFoundError; made for another torch: whatever its loader raises
        import torch

        line = torchvision_install_line(torch.__version__)
        if isinstance(exc, ModuleNotFoundError) and exc.name == "torchvision":
            raise PhituneError(f"pictures need torchvision, which is not installed; the one made for torch "
                               f"{torch.__version__}: {line}") from None
        raise PhituneError(f"torchvision does not import beside torch {torch.__version__} ({first_line(exc)[:120]}); "
                           f"install the one made for it: {line}") from None


def torchvision_install_line(torch_version: str) -> str:
    """The pip line for the torchvision made with `torch_version` (torch 2.N.p pairs with torchvision 0.(N+15).p),
    from the index that torch came from: PyTorch's for a `+cpu` / `+cuXXX` build, PyPI's for a plain one."""
    release, _, build = torch_version.partition("+")
    _, minor, patch = (release.split(".") + ["0", "0"])[:3]
    line = f"pip install torchvision==0.{int(minor) + 15}.{patch}"
    return f"{line} --index-url https://download.pytorch.org/whl/{build}" if build else line


def image_processor(model_path: str):
    """transformers' Phi4MultimodalImageProcessor, with the model's preprocessor_config.json when it has one."""
    require_torchvision()
    from transformers import Phi4MultimodalImageProcessor

    try:
        return Phi4MultimodalImageProcessor.from_pretrained(model_path)
    except OSError:  # no preprocessor_config.json: the processor's defaults are Phi-4-multimodal's
        return Phi4MultimodalImageProcessor()


def audio_feature_extractor():
    """transformers' Phi4MultimodalFeatureExtractor (log-mel features) with its defaults (16 kHz, 80 mel bins, 8x
    compression); a checkpoint's own audio settings are not read (not tried on real weights: docs/multimodal.md)."""
    from transformers import Phi4MultimodalFeatureExtractor

    return Phi4MultimodalFeatureExtractor()


@dataclass
class MediaSet:
    """Encoded rows of one split: ids, labels and media per example, with what happened on the way."""

    examples: list[dict]
    truncated: int = 0
    skipped: list[str] = field(default_factory=list)  # "file:line: why" of each row left out
    skipped_rows: int = 0  # every bad row of the run (reading and encoding), for metrics.json

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]

    def to_dataset(self):
        """A datasets.Dataset (what TRL's trainer takes): ids, labels, and each item's media as a plain dict."""
        from dataclasses import asdict

        from datasets import Dataset

        return Dataset.from_dict({key: [example[key] for example in self.examples] for key in ("input_ids", "labels")}
                                 | {"media": [[asdict(m) for m in example["media"]] for example in self.examples]})


def encode_media_rows(rows: list[MediaRow], tokenizer, processor: MediaProcessor, template: str, *, train_on: str,
                      max_seq_length: int, on_bad_row: str) -> MediaSet:
    """Encode every row (see encode_media_row); a bad row raises, or is skipped with on_bad_row: skip."""
    examples, skipped, truncated = [], [], 0
    for row in rows:
        try:
            example, cut = encode_media_row(row, tokenizer, processor, template, train_on, max_seq_length)
        except BadRow as problem:
            if on_bad_row == "error":
                raise PhituneError(f"{problem} (set data.on_bad_row: skip to skip such rows)") from None
            skipped.append(str(problem))
            continue
        examples.append(example)
        truncated += cut
    return MediaSet(examples=examples, truncated=truncated, skipped=skipped)


def encode_media_row(row: MediaRow, tokenizer, processor: MediaProcessor, template: str, train_on: str,
                     max_seq_length: int) -> tuple[dict, bool]:
    """({"input_ids", "labels", "media", "media_tokens"}, whether it was truncated): placeholders expanded to each
    item's tokens, labels only on the assistant's text."""
    messages = [{"role": m["role"], "content": processor.render(m["content"])} for m in row.messages]
    _, ids, _, mask = next(rendered_with_offsets(tokenizer, [messages], template, train_on))
    _, counts = processor.inputs(row.media) if row.media else ({}, [])
    ids, mask = expand_placeholders(ids, mask, row, processor.token_ids, counts)
    media_ids = list(processor.token_ids.values())
    ids, labels, length, fully_masked = label_tokens(ids, mask, train_on, max_seq_length)
    labels = np.where(np.isin(ids, media_ids), IGNORE_INDEX, labels)
    if length > max_seq_length and sum(counts) and np.isin(ids, media_ids).sum() < sum(counts):
        raise BadRow(row.where, f"{length} tokens with its images and audio (max_seq_length {max_seq_length}): "
                                "cutting it would cut a picture; raise data.max_seq_length")
    if fully_masked:
        raise BadRow(row.where, "no assistant token left to train on (check the roles, or max_seq_length)")
    example = {"input_ids": ids.tolist(), "labels": labels.tolist(), "media": row.media, "media_tokens": counts}
    return example, length > max_seq_length


def expand_placeholders(ids: np.ndarray, mask: np.ndarray, row: MediaRow, token_ids: dict, counts: list[int]):
    """Each image / audio placeholder token repeated as often as its item has tokens; never a label."""
    kinds = {i: kind for kind, i in token_ids.items()}
    positions = np.flatnonzero(np.isin(ids, list(kinds)))
    found = [kinds[int(ids[p])] for p in positions]
    if found != [m.kind for m in row.media]:
        raise BadRow(row.where, f"the text has {len(found)} image/audio tokens for {len(row.media)} image/audio "
                                "parts; do not write the model's <|image|> or <|audio|> tokens in the text")
    repeats = np.ones(len(ids), dtype=np.int64)
    repeats[positions] = counts
    mask = mask.copy()
    mask[positions] = False
    return np.repeat(ids, repeats), np.repeat(mask, repeats)


class MediaCollator:
    """Right-padded ids, labels and attention mask, plus the model inputs of every picture and clip of the batch
    (read again from disk here, so a large image set is never held in memory)."""

    def __init__(self, processor: MediaProcessor, pad_token_id: int):
        self.processor, self.pad_token_id = processor, pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(features), longest), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n], labels[row, :n], attention[row, :n] = torch.tensor(f["input_ids"]), torch.tensor(
                f["labels"]), 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": attention}
        media = [m if isinstance(m, Media) else Media(**m) for f in features for m in f["media"]]
        if media:
            batch.update(self.processor.inputs(media)[0])
        return batch


def prompt_inputs(row: MediaRow, tokenizer, processor: MediaProcessor) -> dict:
    """Model inputs (batch of one) for answering `row.messages` (which end before the answer): rendered with the
    tokenizer's chat template and the assistant's generation prompt, placeholders expanded, media processed."""
    import torch

    messages = [{"role": m["role"], "content": processor.render(m["content"])} for m in row.messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = np.asarray(tokenizer(text, add_special_tokens=False).input_ids)
    inputs, counts = processor.inputs(row.media) if row.media else ({}, [])
    ids, _ = expand_placeholders(ids, np.zeros(len(ids), dtype=bool), row, processor.token_ids, counts)
    ids = torch.tensor(ids, dtype=torch.long)[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **inputs}
