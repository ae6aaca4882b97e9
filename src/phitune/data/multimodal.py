"""Multimodal chat rows (Phi-4-multimodal): messages whose content is a list of text, image and audio parts.

A part is `{"type": "text", "text": ...}`, `{"type": "image", "path" | "url" | "image": ...}` (OpenAI's
`{"type": "image_url", "image_url": {"url": ...}}` too) or `{"type": "audio", "path": ...}` (WAV, FLAC, MP3 or OGG,
read by soundfile, mixed to mono and resampled to 16 kHz with scipy's polyphase filter; a clip over
data.max_audio_seconds is a bad row or is cut, as data.long_audio says). Relative paths are
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
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")  # what `phitune chat --image` takes as a clip, not a picture


@dataclass
class Media:
    """One image or audio part: where it comes from (a path, or the bytes of an inline one) and what it is."""

    kind: str  # "image" | "audio"
    path: str | None = None
    data: bytes | None = None
    size: tuple[int, int] | None = None  # image (width, height) in pixels; audio: (samples, sampling rate) as used
    cut_to: int | None = None  # audio: samples at 16 kHz kept of a clip cut to data.max_audio_seconds

    @property
    def name(self) -> str:
        return Path(self.path).name if self.path else f"inline {self.kind}"

    def open(self):
        """The picture as an RGB PIL image, or the audio as (float32 samples, sampling rate)."""
        source = self.path if self.path else io.BytesIO(self.data)
        if self.kind == "audio":
            samples, rate = read_audio(source)
            return samples[: self.cut_to] if self.cut_to else samples, rate
        from PIL import Image

        with Image.open(source) as image:
            return image.convert("RGB")


@dataclass(frozen=True)
class AudioLimit:
    """data.max_audio_seconds and data.long_audio: how long a clip may be, and what happens to a longer one."""

    seconds: float = 40.0
    long_audio: str = "error"  # "error": a bad row | "cut": its first `seconds` kept

    @classmethod
    def of(cls, cfg) -> AudioLimit:
        return cls(cfg.max_audio_seconds, cfg.long_audio)


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
            parsed.append(parse_row(row, base, where, audio=AudioLimit.of(cfg)))
        except BadRow as problem:
            if cfg.on_bad_row == "error":
                raise PhituneError(f"{problem} (set data.on_bad_row: skip to skip such rows)") from None
            bad.append(problem)
    if not parsed:
        raise PhituneError(f"{source}: every row is bad ({len(bad)} skipped); the first: {bad[0]}" if bad
                           else f"{source}: no rows")
    return parsed, "messages", [str(b) for b in bad]


def parse_row(row: dict, base: Path, where: str, ends_with: str = "assistant",
              audio: AudioLimit = AudioLimit()) -> MediaRow:
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
            content = "".join(_part_text(part, base, where, out.media, audio) for part in content)
        elif not isinstance(content, str):
            raise BadRow(where, "a message's content is a string or a list of parts")
        out.messages.append({"role": message["role"], "content": content})
    if out.messages[-1]["role"] != ends_with:
        raise BadRow(where, "the conversation must end with an assistant turn (the answer to learn)"
                     if ends_with == "assistant" else "the last message must be a user turn (the one to answer)")
    return out


def _part_text(part, base: Path, where: str, media: list[Media], audio: AudioLimit) -> str:
    """The text a part renders as (a placeholder for media, which is appended to `media`)."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        return str(part.get("text", ""))
    if kind in ("image", "image_url"):
        media.append(load_image(part, base, where))
        return IMAGE_PLACEHOLDER
    if kind in ("audio", "input_audio"):
        media.append(load_audio(part, base, where, audio))
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


def load_audio(part: dict, base: Path, where: str, limit: AudioLimit = AudioLimit()) -> Media:
    """Resolve and read an audio part once, keeping its length at 16 kHz; a clip over `limit.seconds` is a bad row
    or is cut (limit.long_audio)."""
    ref = part.get("path") or part.get("url") or part.get("audio")
    if not isinstance(ref, str) or not ref:
        raise BadRow(where, "an audio part needs a path (a .wav, .flac, .mp3 or .ogg file) or a data: URL")
    media = _locate(ref, base, where, "audio")
    try:
        samples, rate = media.open()
    except (RuntimeError, OSError, EOFError, ValueError) as exc:  # soundfile's LibsndfileError is a RuntimeError
        raise BadRow(where, f"audio {media.name}: cannot read it ({first_line(exc)})") from None
    longest = int(limit.seconds * AUDIO_RATE)
    if len(samples) > longest:
        if limit.long_audio != "cut":
            raise BadRow(where, f"audio {media.name}: {len(samples) / AUDIO_RATE:.1f} s, over data.max_audio_seconds "
                                f"{limit.seconds:g} (data.long_audio: cut keeps its start)")
        media.cut_to, samples = longest, samples[:longest]
    if not len(samples):
        raise BadRow(where, f"audio {media.name}: the clip is empty")
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


def read_audio(source) -> tuple:
    """(float32 mono samples, 16000) of an audio file or file-like object: read by soundfile (libsndfile: WAV,
    FLAC, MP3, OGG), channels averaged, resampled to 16 kHz by scipy's polyphase filter when it was not."""
    from math import gcd

    import numpy as np

    soundfile = require_soundfile()
    samples, rate = soundfile.read(source, dtype="float32", always_2d=True)  # (frames, channels)
    samples = samples.mean(axis=1)
    if rate != AUDIO_RATE:
        from scipy.signal import resample_poly

        common = gcd(rate, AUDIO_RATE)
        samples = resample_poly(samples, AUDIO_RATE // common, rate // common).astype(np.float32)
    return samples, AUDIO_RATE


def require_soundfile():
    """The soundfile module, or one line saying how to get it: phitune reads audio with it (its wheels carry
    libsndfile)."""
    try:
        import soundfile
    except (ImportError, OSError) as exc:  # OSError: the module is there, libsndfile is not
        raise PhituneError(f"audio needs soundfile ({first_line(exc)}): pip install soundfile") from None
    return soundfile
