"""Raw text for continued pre-training (`data.format: text`): documents packed into blocks, loss on every token.

    documents --tokenize (special-token text stays text)--> [bos] doc [eos] [bos] doc [eos] ... --cut--> blocks
    (block = max_seq_length tokens; the last one may be shorter; labels = input ids)

A document is a `.txt` file (its paragraphs and blank lines kept: one file is one text, so no eos is put between
paragraphs of the same text and the model never learns to stop after each one), each `.txt` file of a folder (sorted
by name), or the `text` field of each row of a .jsonl/.json/.csv/.parquet file or hub dataset. The tokenizer's bos
starts each document (when it has one other than its eos) and its eos ends it, so a block that spans two documents
shows where one ends. A `<|end|>` written in a document is the text "<|end|>", not Phi-3's end-of-turn token
(`split_special_tokens`). Without data.eval, data.eval_split holds out that fraction of the blocks (seeded): a single
long document still gets an eval set, and no held-out token is trained on.

phitune.data.prepare caches the blocks as it caches conversations (same columns, same fingerprinted entry), so a text
run goes through the same lifecycle: cache, checkpoints, resume, `phitune data`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from phitune.data.readers import SKIP_HINT as LINE_SKIP_HINT
from phitune.data.readers import (BadRow, _read_text, hub_options, read_row_batches, read_rows, relative_to_cwd,
                                  row_location)
from phitune.errors import PhituneError

TEXT_SUFFIX = ".txt"
DOCS_PER_BATCH = 256  # documents tokenized per call: batch encoding without holding a corpus as token lists


def text_files(source: str) -> list[Path] | None:
    """The .txt files `source` names (a .txt file, or a folder's .txt files sorted by name), or None for rows."""
    path = Path(source)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() == TEXT_SUFFIX and f.is_file())
        if not files:
            raise PhituneError(f"{source}: the folder holds no .txt files; data.format: text reads .txt files or "
                               "rows with a `text` column")
        return files
    if path.suffix.lower() == TEXT_SUFFIX:
        if not path.is_file():
            raise PhituneError(f"data file not found: {path}{relative_to_cwd(path)}")
        return [path]
    return None


TEXT_ROWS = "rows with a `text` field (or use .txt documents)"


def read_documents(source: str, split: str, on_bad_row: str,
                   hub: dict | None = None) -> Iterator[tuple[list[str], list[str], str | None]]:
    """(documents, problems, stop) a batch at a time: an empty .txt file, a malformed line or a row without text is a
    problem; `stop` is what on_bad_row: error stops with for the batch's first one (raised here with error)."""
    files = text_files(source)
    batches = _file_batches(files) if files is not None else _row_batches(source, split, on_bad_row, hub)
    for documents, problems, why in batches:
        stop = problems[0] + why if problems else None
        if stop and on_bad_row == "error":
            raise PhituneError(stop)
        yield documents, problems, stop


SKIP_HINT = " (set data.on_bad_row: skip to skip such documents)"


def _file_batches(files: list[Path]):
    for start in range(0, len(files), DOCS_PER_BATCH):
        texts = [(f, _read_text(f)) for f in files[start:start + DOCS_PER_BATCH]]
        yield ([t for _, t in texts if t.strip()],
               [f"{f}: the file is empty (no text); it needs the document's text" for f, t in texts if not t.strip()],
               SKIP_HINT)


def _row_batches(source: str, split: str, on_bad_row: str, hub: dict | None = None):
    if Path(source).suffix.lower() in (".jsonl", ".json"):  # malformed lines: an error, or listed here to skip
        rows, bad = read_rows(source, split=split, on_bad_row=on_bad_row, needs=TEXT_ROWS, hub=hub)
        yield [], [str(problem) for problem in bad], LINE_SKIP_HINT  # said as read_rows raises it with on_bad_row: error
        batches = [rows[i:i + DOCS_PER_BATCH] for i in range(0, len(rows), DOCS_PER_BATCH)]
    else:
        batches = read_row_batches(source, split, DOCS_PER_BATCH, needs=TEXT_ROWS, hub=hub)
    first = True
    for rows in batches:
        if first and rows and "text" not in rows[0][1]:
            columns = ", ".join(sorted(rows[0][1])) or "none"
            raise PhituneError(f"{source}: no `text` column (columns: {columns}); data.format: text reads a `text` "
                               "column or .txt files")
        first = False
        good = [r["text"] for _, r in rows if not text_problem(r)]
        problems = [str(BadRow(row_location(source, n), text_problem(r))) for n, r in rows if text_problem(r)]
        yield good, problems, SKIP_HINT


def text_problem(row: dict) -> str | None:
    """What is wrong with a row's `text` (None when it is a document to train on)."""
    document = row.get("text")
    if document is None:
        return "no `text`"
    if not isinstance(document, str):
        return f"`text` is {type(document).__name__}, not a string"
    return None if document.strip() else "empty `text`"


def separators(tokenizer) -> tuple[list[int], list[int]]:
    """(ids before a document, ids after it): [bos] when the tokenizer has one other than its eos, and [eos]."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise PhituneError("data.format: text needs a tokenizer with an eos token to separate documents")
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None and bos != eos else []), [eos]


def pack_blocks(token_lists: Iterator[list[list[int]]], before: list[int], after: list[int],
                block: int) -> Iterator[np.ndarray]:
    """Every document's ids between `before` and `after`, concatenated and cut into `block`-token pieces; the last
    piece is kept when it has at least two tokens (one predicts nothing)."""
    buffer = np.zeros(0, dtype=np.int32)
    for documents in token_lists:
        pieces = [np.asarray(before + ids + after, dtype=np.int32) for ids in documents]
        buffer = np.concatenate([buffer, *pieces])
        full = len(buffer) // block
        for index in range(full):
            yield buffer[index * block:(index + 1) * block]
        buffer = buffer[full * block:]
    if len(buffer) >= 2:
        yield buffer


def make_text_entry(cfg, tokenizer, work: Path) -> dict:
    """Pack cfg's train (and eval) documents into Arrow files under `work`; the meta.json content phitune.data.prepare
    writes: file names relative to `work`, documents per split, the skipped documents, and `error`: what on_bad_row:
    error stops with (an entry made with skip, by `phitune data`, is shared by both settings and applied on load)."""
    found = {"skipped": [], "error": None}
    try:
        docs, files = _make_sets(cfg, tokenizer, work, found)
    except PhituneError as exc:  # too little left once bad rows are skipped: the first bad row is the cause
        if found["error"] is None:
            raise
        raise PhituneError(f"{found['error']}; without the bad rows: {exc}") from None
    return {"format": "text", "skipped": found["skipped"], "error": found["error"], "files": files, "samples": [],
            "stats": {"documents": docs}}


def _make_sets(cfg, tokenizer, work: Path, found: dict) -> tuple[dict, dict]:
    """(documents per split, Arrow file names per split) of the blocks written under `work`."""
    import datasets

    from phitune.data import split_eval

    docs = {"train": _write_blocks(cfg.train, cfg.split, cfg, tokenizer, work / "train-blocks.arrow", found)}
    blocks = datasets.Dataset.from_file(str(work / "train-blocks.arrow"))
    if cfg.eval:
        docs["eval"] = _write_blocks(cfg.eval, cfg.eval_hub_split or cfg.split, cfg, tokenizer,
                                     work / "eval-blocks.arrow", found)
        eval_blocks = datasets.Dataset.from_file(str(work / "eval-blocks.arrow"))
        train_indices, eval_indices = list(range(len(blocks))), list(range(len(eval_blocks)))
    else:
        eval_blocks = blocks
        train_indices, eval_indices = split_eval(list(range(len(blocks))), cfg.eval_split, cfg.seed)
    chosen = {"train": (blocks, train_indices[: cfg.max_train_examples or None]),
              "eval": (eval_blocks, eval_indices[: cfg.max_eval_examples or None])}
    files = {}
    for name, (rows, indices) in chosen.items():
        if indices:
            rows.select(indices).flatten_indices(cache_file_name=str(work / f"{name}.arrow"))
            files[name] = [f"{name}.arrow"]
    for name in ("train-blocks.arrow", "eval-blocks.arrow"):
        (work / name).unlink(missing_ok=True)
    return docs, files


def _write_blocks(source: str, split: str, cfg, tokenizer, target: Path, found: dict) -> int:
    """Read, tokenize and pack `source` into the Arrow file `target`, BATCH blocks at a time; the number of
    documents. Documents skipped (with on_bad_row: skip) go to found["skipped"], the first one's error to
    found["error"]."""
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    count = 0

    def tokenized():
        nonlocal count
        for documents, bad, stop in read_documents(source, split, cfg.on_bad_row, hub_options(cfg)):
            found["skipped"].extend(bad)
            found["error"] = found["error"] or stop
            count += len(documents)
            if documents:
                yield tokenizer(documents, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    before, after = separators(tokenizer)
    schema = block_schema()
    writer, pending = ArrowWriter(path=str(target), schema=schema), []
    try:
        for ids in pack_blocks(tokenized(), before, after, cfg.max_seq_length):
            pending.append(ids)
            if len(pending) == DOCS_PER_BATCH:
                writer.write_table(pa.table(_block_columns(pending, after[0]), schema=schema))
                pending = []
        if pending:
            writer.write_table(pa.table(_block_columns(pending, after[0]), schema=schema))
        writer.finalize()
    finally:
        writer.close()
    if not count:
        raise PhituneError(f"{source}: no documents (every one is empty); it needs text")
    return count


def block_schema():
    """The columns of prepared chat data (phitune.data.prepare.tokenize_batch), so both load and train alike."""
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    return pa.schema({"input_ids": ids, "labels": ids, "length": pa.int32(), "truncated": pa.bool_(),
                      "masked": pa.bool_(), "stop": pa.bool_(), "key": pa.uint64(), "notes": pa.uint8()})


def _block_columns(blocks: list[np.ndarray], eos: int) -> dict:
    """Blocks as rows of prepared chat data: labels are the ids (every token trained), never truncated or masked,
    `stop` when a block holds an eos, `key` a hash of its ids (the duplicate and leak checks of `phitune data`), no
    `notes` (a block has no conversation to note)."""
    keys = [int.from_bytes(hashlib.blake2b(ids.tobytes(), digest_size=8).digest(), "little") for ids in blocks]
    return {"input_ids": blocks, "labels": blocks, "length": [len(ids) for ids in blocks],
            "truncated": [False] * len(blocks), "masked": [False] * len(blocks),
            "stop": [bool((ids == eos).any()) for ids in blocks], "key": keys, "notes": [0] * len(blocks)}
