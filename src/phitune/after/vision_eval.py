"""Inference on multimodal rows (Phi-4-multimodal): answering, `phitune eval` and `phitune data` for method vision.

The same encoding as training (phitune.data.multimodal_batch): teacher-forced metrics score exactly the tokens that
were trained (the assistant's text), and answers are generated from prompts whose pictures go through the same
image processor. Generation runs one conversation at a time (a batch of pictures with different crop counts would
need left-padded image tokens, which the model's image embedding does not take).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path

from phitune.after.generate import SamplingSettings, stop_token_ids
from phitune.config.schema import DataConfig, ModelConfig, RunConfig
from phitune.errors import PhituneError, replacing

log = logging.getLogger("phitune")


def media_processor(model, tokenizer, name_or_path: str):
    """The MediaProcessor of a loaded model (its config names the placeholder tokens and the crop geometry)."""
    from phitune.data.multimodal_batch import MediaProcessor

    config = model.config if not hasattr(model, "get_base_model") else model.get_base_model().config
    return MediaProcessor(name_or_path, config, tokenizer)


def answer_media_row(model, tokenizer, processor, row, settings: SamplingSettings | None = None) -> str:
    """The model's reply to a MediaRow whose messages end with a user turn."""
    import torch

    from phitune.data.multimodal_batch import prompt_inputs

    settings = settings or SamplingSettings()
    torch.manual_seed(settings.seed)
    inputs = {k: v.to(model.device) for k, v in prompt_inputs(row, tokenizer, processor).items()}
    with torch.no_grad():
        output = model.generate(**inputs, eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                **settings.generate_kwargs())
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def prompt_and_reference(row):
    """(the row up to its last assistant turn, that turn's text)."""
    last = max(i for i, m in enumerate(row.messages) if m["role"] == "assistant")
    return replace(row, messages=row.messages[:last]), row.messages[last]["content"]


def media_rows(data_cfg: DataConfig, use_eval_split: bool) -> list:
    """The held-out multimodal rows of a run, or every row of --data."""
    from phitune.data import load_splits
    from phitune.data.multimodal import read_media_rows

    if not use_eval_split:
        data_cfg = data_cfg.whole_file_as_eval()
        return load_splits(data_cfg, read_media_rows)[0]
    rows = load_splits(data_cfg, read_media_rows)[1]
    if not rows:
        raise PhituneError("the run has no eval set (data.eval_split is 0 and no data.eval); pass --data FILE")
    return rows


def teacher_forced_media_metrics(model, tokenizer, processor, encoded, batch_size: int) -> dict:
    """Token-weighted loss, perplexity and token accuracy over the trained tokens (phitune.after.metrics)."""
    import torch

    from phitune.after.metrics import sequence_token_stats, summarize
    from phitune.data.multimodal_batch import MediaCollator

    collate = MediaCollator(processor, tokenizer.pad_token_id)
    totals = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(encoded), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(encoded.examples[start:start + batch_size]).items()}
        labels = batch.pop("labels")
        with torch.no_grad():
            logits = model(**batch).logits
        totals += sequence_token_stats(logits, labels).sum(0).cpu()
    metrics = summarize(totals)
    if not metrics:
        raise PhituneError("the eval set has no trained tokens to score")
    metrics.pop("tokens")
    return metrics


def run_media_evaluation(model_cfg: ModelConfig, adapter: Path | None, data_cfg: DataConfig, output_dir: Path, *,
                         num_generate: int, settings: SamplingSettings, batch_size: int, use_eval_split: bool):
    """The base model, then base + adapter: teacher-forced metrics on every eval row, exact match and ROUGE-L of
    the answers to the first `num_generate`; eval.json in `output_dir`."""
    from phitune.after.evaluate import EvalResult, generation_metrics, save_eval_json
    from phitune.after.generate import attach_adapter, load_for_inference
    from phitune.data import training_chat_template
    from phitune.data.multimodal_batch import encode_media_rows

    rows = media_rows(data_cfg, use_eval_split)
    model, tokenizer = load_for_inference(model_cfg)
    processor = media_processor(model, tokenizer, model_cfg.name_or_path)
    encoded = encode_media_rows(rows, tokenizer, processor, training_chat_template(tokenizer, data_cfg.train_on),
                                train_on=data_cfg.train_on, max_seq_length=data_cfg.max_seq_length, on_bad_row="skip")
    pairs = [prompt_and_reference(row) for row in rows[:num_generate]]
    names = ("base", "fine-tuned") if adapter is not None else ("model",)
    metrics, answers = {}, {}
    for name in names:
        if name == "fine-tuned":
            model = attach_adapter(model, adapter).eval()
        metrics[name] = teacher_forced_media_metrics(model, tokenizer, processor, encoded, batch_size)
        answers[name] = [answer_media_row(model, tokenizer, processor, prompt, settings) for prompt, _ in pairs]
        metrics[name].update(generation_metrics(answers[name], [ref for _, ref in pairs]))
        heard = [(answer, ref) for answer, (prompt, ref) in zip(answers[name], pairs)
                 if any(m.kind == "audio" for m in prompt.media)]
        metrics[name].update(speech_metrics(*zip(*heard)) if heard else {})
    samples = [dict(prompt=p.messages[-1]["content"], media=[m.name for m in p.media], reference=r,
                    **{n: answers[n][i] for n in names}) for i, (p, r) in enumerate(pairs)]
    info = dict(model=model_cfg.name_or_path, adapter=str(adapter) if adapter else None, eval_examples=len(encoded),
                generated=len(pairs), max_new_tokens=settings.max_new_tokens)
    result = EvalResult(metrics=metrics, samples=samples, info=info, output_dir=Path(output_dir))
    save_eval_json(result)
    return result


def speech_metrics(answers: list[str], references: list[str]) -> dict:
    """Word error rate (jiwer; lower case, punctuation removed: the transcription figure) and corpus BLEU
    (sacrebleu, 0 to 100, its default 13a tokenizer: the speech-translation figure) of the answers to rows with
    audio. Both are given for every such row: which one fits is the task's (a dataset of both is scored per task
    with --data)."""
    try:
        import jiwer
        import sacrebleu
    except ImportError as exc:
        raise PhituneError(f"scoring answers to audio needs jiwer and sacrebleu ({exc}): pip install jiwer "
                           "sacrebleu (the vision extra has them)") from None
    words = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(), jiwer.Strip(),
                           jiwer.ReduceToListOfListOfWords()])
    pairs = [(ref, ans) for ans, ref in zip(answers, references) if ref.strip()]  # WER is undefined on no words
    wer = jiwer.wer([r for r, _ in pairs], [a for _, a in pairs], reference_transform=words,
                    hypothesis_transform=words) if pairs else None
    bleu = sacrebleu.corpus_bleu(list(answers), [list(references)]).score
    return {"wer": wer, "bleu": bleu} if wer is not None else {"bleu": bleu}


def inspect_media_data(cfg: RunConfig, output: Path | None, example_index: int = 0):
    """`phitune data` for method vision: counts, token lengths with the image tokens, an example whose pictures
    are named and sized, and the length histogram (in `output`, else in the data cache, as for text data: never in
    the run's directory)."""
    import numpy as np

    from phitune.data import load_splits_and_shares, training_chat_template
    from phitune.data.inspect import DataReport, plot_lengths, report_dir
    from phitune.data.mixture import source_label, with_sources
    from phitune.data.multimodal import read_media_rows
    from phitune.data.multimodal_batch import MediaProcessor, encode_media_rows
    from phitune.models.loading import load_model_config, load_tokenizer

    model_config = load_model_config(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    processor = MediaProcessor(cfg.model.name_or_path, model_config, tokenizer, cfg.model.trust_remote_code)
    train, evals, _, skipped, shares = load_splits_and_shares(cfg.data, read_media_rows)
    limit = 1 << 30  # lengths before truncation: the histogram shows what max_seq_length would cut
    encoded = encode_media_rows(train, tokenizer, processor, training_chat_template(tokenizer, cfg.data.train_on),
                                train_on=cfg.data.train_on, max_seq_length=limit, on_bad_row="skip")
    if not len(encoded):
        raise PhituneError(f"{source_label(cfg.data)}: no usable rows")
    lengths = np.asarray([len(e["input_ids"]) for e in encoded.examples])
    example = encoded.examples[min(example_index, len(encoded) - 1)]
    entry = "vision-" + hashlib.sha256(f"{cfg.model.name_or_path}|{cfg.data.train}".encode()).hexdigest()[:16]
    histogram = plot_lengths(lengths, cfg.data.max_seq_length, report_dir(cfg, output, entry) / "data_lengths.png")
    images = sum(len(e["media"]) for e in encoded.examples)
    counts = {"train examples": len(encoded), "eval examples": len(evals), "images and audio": images}
    report = DataReport(source=cfg.data.train, format="messages (multimodal)", counts=counts,
                        lengths=lengths, max_seq_length=cfg.data.max_seq_length,
                        truncated={"train": int((lengths > cfg.data.max_seq_length).sum())},
                        example=example_media_runs(tokenizer, processor, example), histogram=histogram,
                        warnings=[f"skipped {len(skipped) + len(encoded.skipped)} bad rows"]
                        if skipped or encoded.skipped else [])
    return with_sources(report, cfg, shares)  # a mixture: its per-source table


def example_media_runs(tokenizer, processor, example: dict) -> list[tuple[str, bool]]:
    """An encoded example as (text, trained?) runs; each picture's run of image tokens shown as one line naming the
    picture, its size and its token count."""
    media_ids = set(processor.token_ids.values())
    media = iter(zip(example["media"], example["media_tokens"]))
    runs, i, ids, labels = [], 0, example["input_ids"], example["labels"]
    while i < len(ids):
        if ids[i] in media_ids:
            item, count = next(media)
            size = f"{item.size[0]}x{item.size[1]}" if item.kind == "image" else f"{item.size[0] / item.size[1]:.1f} s"
            runs.append((f"[{item.kind} {item.name} {size}: {count} tokens]", False))
            i += count
            continue
        j = i
        while j < len(ids) and ids[j] not in media_ids and (labels[j] != -100) == (labels[i] != -100):
            j += 1
        runs.append((tokenizer.decode(ids[i:j]), labels[i] != -100))
        i = j
    return runs


def generate_media_file(model, tokenizer, name_or_path: str, rows: list[dict], source: Path, output: Path,
                        settings: SamplingSettings) -> int:
    """`phitune generate` on rows with image / audio parts (paths relative to the input file): each row with an
    added "answer" written to `output`; every row is checked before the first is answered."""
    from phitune.data.multimodal import parse_row
    from phitune.data.readers import BadRow

    processor = media_processor(model, tokenizer, name_or_path)
    try:
        prompts = [parse_row(row, source.parent, f"{source}:{n}", ends_with="user") for n, row in enumerate(rows, 1)]
    except BadRow as problem:
        raise PhituneError(str(problem)) from None
    answers = [answer_media_row(model, tokenizer, processor, row, settings) for row in prompts]
    output.parent.mkdir(parents=True, exist_ok=True)
    with replacing(output) as partial, partial.open("w", encoding="utf-8") as out:  # hours of answers: never half
        for row, answer in zip(rows, answers):  # a file, and a full disk is one line
            out.write(json.dumps({**row, "answer": answer}, ensure_ascii=False) + "\n")
    return len(answers)


def load_chat_media(pictures: list[Path], clips: list[Path] = ()) -> tuple[list, str]:
    """(the pictures and clips, the placeholders that go before the first user turn) of `phitune chat --image /
    --audio`, read before any weight loads, so a missing or unreadable file is an error at once. A `--image` whose
    suffix is an audio file's is taken as a clip."""
    from phitune.data.multimodal import AUDIO_PLACEHOLDER, AUDIO_SUFFIXES, IMAGE_PLACEHOLDER, load_audio, load_image
    from phitune.data.readers import BadRow

    media, prefix = [], ""
    for path, given_as_audio in [*((p, False) for p in pictures), *((p, True) for p in clips)]:
        audio = given_as_audio or Path(path).suffix.lower() in AUDIO_SUFFIXES
        load = load_audio if audio else load_image
        try:
            media.append(load({"path": str(Path(path).resolve())}, Path.cwd(), str(path)))
        except BadRow as problem:
            raise PhituneError(str(problem)) from None
        prefix += AUDIO_PLACEHOLDER if audio else IMAGE_PLACEHOLDER
    return media, prefix


class MediaChatSession:
    """`phitune chat --image PATH` / `--audio PATH`: ChatSession's interface (reset, stream_reply) with pictures or
    clips given on the command line attached to the first user turn. Replies come whole (one piece): the model
    generates in one call, as evaluation does. `media`: load_chat_media's answer."""

    def __init__(self, model, tokenizer, name_or_path: str, settings: SamplingSettings | None = None,
                 system: str | None = None, media: tuple[list, str] = ([], "")):
        self.model, self.tokenizer, self.settings, self.system = model, tokenizer, settings, system
        self.processor = media_processor(model, tokenizer, name_or_path)
        self.media, self.prefix = media
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt and the pictures stay; they go with the next first turn)."""
        self.history: list[dict] = [{"role": "system", "content": self.system}] if self.system else []

    def stream_reply(self, user_text: str):
        """Yield the reply to `user_text`; both turns join the history."""
        from phitune.data.multimodal import MediaRow

        first = not any(m["role"] == "user" for m in self.history)
        self.history.append({"role": "user", "content": (self.prefix if first else "") + user_text})
        reply = answer_media_row(self.model, self.tokenizer, self.processor,
                                 MediaRow(messages=self.history, media=self.media), self.settings)
        self.history.append({"role": "assistant", "content": reply})
        yield reply
