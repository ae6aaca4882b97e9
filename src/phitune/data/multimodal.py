"""Multimodal chat rows (Phi-4-multimodal): messages whose content is a list of text, image and audio parts.

A part is `{"type": "text", "text": ...}`, `{"type": "image", "path" | "url" | "image": ...}` (OpenAI's
`{"type": "image_url", "image_url": {"url": ...}}` too) or `{"type": "audio", "path": ...}`. Relative paths are
resolved against the data file's folder; a url may be `file://...` or a `data:image/...;base64,` URL (phitune
never fetches from the network while it trains). Every picture is opened and decoded once when the rows are read, so
a missing or unreadable one is a `file:line` error (or a skipped row with `on_bad_row: skip`) before any weight
loads; the pixels are not kept, the batch collator (phitune.data.multimodal_batch) reads them again.

In the rendered text each image or audio part is one placeholder token (the model's `<|image|>` / `<|audio|>`, whose
ids config.json names), which the encoder expands to as many tokens as the model's encoder gives for that picture.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path

from phitune.data.readers import BadRow, hub_options, read_rows, row_location
from phitune.errors import PhituneError, first_line

IMAGE_PLACEHOLDER, AUDIO_PLACEHOLDER = "<|image|>", "<|audio|>"  # in rendered text; swapped for the model's tokens
ROLES = ("system", "user", "assistant")
AUDIO_RATE = 16000  # samples per second Phi-4-multimodal's audio feature extractor takes


@dataclass
class Media:
    """One image or audio part: where it comes from (a path, or the bytes of an inline one) and what it is."""

    kind: str  # "image" | "audio"
    path: str | None = None
    data: bytes | None = None
    size: tuple[int, int] | None = None  # image (width, height) in pixels; audio: (samples, sampling rate)

    @property
    def name(self) -> str:
        return Path(self.path).name if self.path else f"inline {self.kind}"

    def open(self):
        """The picture as an RGB PIL image, or the audio as (float32 samples, sampling rate)."""
        source = self.path if self.path else io.BytesIO(self.data)
        if self.kind == "audio":
            return read_wav(source)
        from PIL import Image

        with Image.open(source) as image:
            return image.convert("RGB")


@dataclass
class MediaRow:
    """A conversation with text content (each part a placeholder) and its media in order of appearance."""

    messages: list[dict]
    media: list[Media] = field(default_factory=list)
    where: str = ""

    @property
    def images(self) -> list[Media]:
        return [m for m in self.media if m.kind == "image"]


def is_multimodal_row(row: dict) -> bool:
    """Whether a data row has a message whose content is a list of parts."""
    return any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in row.get("messages") or [])


def read_media_rows(source: str, split: str, cfg) -> tuple[list[MediaRow], str, list[str]]:
    """(rows, "messages", skipped rows) of one data file, for data.load_splits: every image checked now."""
    rows, bad = read_rows(source, split=split, on_bad_row=cfg.on_bad_row, hub=hub_options(cfg))
    if not rows:
        raise PhituneError(f"{source}: no rows")
    base = Path(source).parent
    parsed = []
    for number, row in rows:
        where = row_location(source, number)
        try:
            parsed.append(parse_row(row, base, where))
        except BadRow as problem:
            if cfg.on_bad_row == "error":
                raise PhituneError(f"{problem} (set data.on_bad_row: skip to skip such rows)") from None
            bad.append(problem)
    if not parsed:
        raise PhituneError(f"{source}: the dataset is empty after skipping {len(bad)} bad rows")
    return parsed, "messages", [str(b) for b in bad]


def parse_row(row: dict, base: Path, where: str, ends_with: str = "assistant") -> MediaRow:
    """A MediaRow from one `{"messages": [...]}` row (or a prompt row, `{"prompt": ...}`, ending with a user turn);
    raise BadRow naming what is wrong. `ends_with`: assistant for training rows, user for prompts to answer."""
    messages = row.get("messages")
    if messages is None and isinstance(row.get("prompt"), (str, list)):
        messages = [{"role": "user", "content": row["prompt"]}]
    if not isinstance(messages, list) or not messages:
        raise BadRow(where, 'expected {"messages": [{"role": ..., "content": ...}, ...]}')
    out = MediaRow(messages=[], where=where)
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadRow(where, f"each message needs a role of {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(_part_text(part, base, where, out.media) for part in content)
        elif not isinstance(content, str):
            raise BadRow(where, "a message's content is a string or a list of parts")
        out.messages.append({"role": message["role"], "content": content})
    if out.messages[-1]["role"] != ends_with:
        raise BadRow(where, "the conversation must end with an assistant turn (the answer to learn)"
                     if ends_with == "assistant" else "the last message must be a user turn (the one to answer)")
    return out


def _part_text(part, base: Path, where: str, media: list[Media]) -> str:
    """The text a part renders as (a placeholder for media, which is appended to `media`)."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        return str(part.get("text", ""))
    if kind in ("image", "image_url"):
        media.append(load_image(part, base, where))
        return IMAGE_PLACEHOLDER
    if kind in ("audio", "input_audio"):
        media.append(load_audio(part, base, where))
        return AUDIO_PLACEHOLDER
    raise BadRow(where, f"unknown content part {part!r:.80}; parts are text, image (path, url or image) and audio")


def load_image(part: dict, base: Path, where: str) -> Media:
    """Resolve and decode an image part once (width and height kept, pixels dropped)."""
    ref = part.get("path") or part.get("url") or part.get("image") or part.get("image_url")
    if isinstance(ref, dict):  # OpenAI: {"image_url": {"url": ...}}
        ref = ref.get("url")
    if not isinstance(ref, str) or not ref:
        raise BadRow(where, "an image part needs a path, url or image (a path or a data: URL)")
    media = _locate(ref, base, where, "image")
    try:
        from PIL import Image

        with Image.open(media.path or io.BytesIO(media.data)) as image:
            image.load()  # a truncated file fails here, not in the middle of training
            media.size = image.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BadRow(where, f"image {media.name}: cannot read it ({first_line(exc)})") from None
    return media


def load_audio(part: dict, base: Path, where: str) -> Media:
    """Resolve and read an audio part (a WAV file) once, keeping its length and sampling rate."""
    ref = part.get("path") or part.get("url") or part.get("audio")
    if not isinstance(ref, str) or not ref:
        raise BadRow(where, "an audio part needs a path (a .wav file) or a data: URL")
    media = _locate(ref, base, where, "audio")
    try:
        samples, rate = media.open()
    except (OSError, EOFError, ValueError) as exc:
        raise BadRow(where, f"audio {media.name}: cannot read it as WAV ({first_line(exc)})") from None
    if rate != AUDIO_RATE:  # transformers' feature extractor raises mid-training on any other rate
        raise BadRow(where, f"audio {media.name}: {rate} Hz; Phi-4-multimodal takes {AUDIO_RATE} Hz, resample it")
    media.size = (len(samples), rate)
    return media


def _locate(ref: str, base: Path, where: str, kind: str) -> Media:
    """A Media for a path, a file:// URL or a data: URL; http(s) is refused (no downloads mid-training)."""
    if ref.startswith("data:"):
        try:
            return Media(kind, data=base64.b64decode(ref.split(",", 1)[1], validate=True))
        except (IndexError, ValueError):
            raise BadRow(where, f"{kind}: a data: URL that is not base64") from None
    if ref.startswith(("http://", "https://")):
        raise BadRow(where, f"{kind} {ref:.80}: phitune reads local files and data: URLs; download it first")
    path = Path(ref.removeprefix("file://")).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise BadRow(where, f"{kind} not found: {path}")
    return Media(kind, path=str(path))


def read_wav(source) -> tuple:
    """(float32 mono samples in [-1, 1], sampling rate) of a PCM WAV file (the standard library reads it)."""
    import wave

    import numpy as np

    with wave.open(source, "rb") as wav:
        width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
        frames = wav.readframes(wav.getnframes())
    if width not in (1, 2, 4):
        raise ValueError(f"{8 * width}-bit samples; save it as 16-bit PCM")
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
    samples = np.frombuffer(frames, dtype=dtype).astype(np.float32)
    samples = (samples - 128) / 128 if width == 1 else samples / float(2 ** (8 * width - 1))
    return samples.reshape(-1, channels).mean(axis=1), rate
