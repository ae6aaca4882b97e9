"""Streaming (`data.streaming: true`): rows read, checked and tokenized as training consumes them, in bounded memory.

    source --(where, JSON text of a row, one at a time)--> encode a batch (check, tokenize, label; raw text: pack)
           --> held out: the first K examples (or blocks), in memory --> train: the rest, repeated, for max_steps

Nothing is written to disk and no step reads the whole set: memory holds one batch of rows, the eval examples and
the model, whatever the size of the file. The checks and the encoding are the Arrow cache's (phitune.data.prepare's
`tokenize_batch`, phitune.data.text's packing), applied a batch at a time, so a streamed example is the cached one;
what differs: a bad row is met when training reaches it (an error stops the run there, with its `file:line`), the
number of rows is unknown (so `max_steps` is required), raw text is packed within each batch of documents (a short
block closes each batch), and the rows train in the source's order (no shuffle).

A resumed run continues at the right row because the stream is deterministic: the Trainer reads the batches the run
had trained again and drops them before training on (no model work, but every such row is read and tokenized again).

Several sources plug in at `mix`: each source is encoded on its own (its own format) and holds out its own eval
examples, then the rest are interleaved by weight (datasets.interleave_datasets with the probabilities and
data.seed).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from phitune.config.schema import DataConfig
from phitune.data.encode import END_OF_TURN
from phitune.data.formats import detect_format, to_messages
from phitune.data.mixture import mixed_format, source_label
from phitune.data.readers import SKIP_HINT, BadRow, hub_options, read_row_batches, row_location
from phitune.errors import PhituneError, first_line

BATCH = 256  # rows encoded per call: batch tokenization, and the most rows (or documents) held at once
HELD_OUT = 100  # examples (blocks) of data.train held out for eval when data.max_eval_examples is not set
PREVIEW_ROWS = 1_000  # rows `phitune data` reads of a streamed source when data.max_train_examples is not set
log = logging.getLogger(__name__)


@dataclass
class StreamCounts:
    """What the training process met in the rows it read (read-ahead included): for the log and metrics.json."""

    rows: int = 0
    examples: int = 0
    truncated: int = 0
    skipped: list[str] = field(default_factory=list)  # the first `keep` of them, as `file:line: why`
    keep: int = 3
    bad: set[str] = field(default_factory=set)  # where each bad row is: a row read again (a resume, the next pass
    #                                             over the source) is counted once

    @property
    def skipped_rows(self) -> int:
        return len(self.bad)

    def restart(self) -> None:
        """Count from zero: the rows read to find the format and the eval set are read again by training."""
        self.rows = self.examples = self.truncated = 0
        self.skipped.clear()
        self.bad.clear()


@dataclass
class StreamedSet:
    """The train stream for the Trainer (an IterableDataset of input_ids and labels, endless: max_steps stops it)
    and what the run read of it so far."""

    stream: object
    counts: StreamCounts
    format: str = ""
    skipped: list[str] = field(default_factory=list)
    skipped_rows: int = 0

    def to_dataset(self):
        return self.stream

    @property
    def truncated(self) -> int:
        return self.counts.truncated


def raw_rows(source: str, split: str, fmt: str, hub: dict | None = None):
    """An IterableDataset of {where, text}: `file:line` (or `source: row N`, or the .txt file) and the JSON text of
    the row (for a .txt document: {"text": its content}), read one at a time."""
    import datasets

    features = datasets.Features({"where": datasets.Value("string"), "text": datasets.Value("string")})
    return datasets.IterableDataset.from_generator(_rows, features=features,
                                                   gen_kwargs={"source": source, "split": split, "fmt": fmt,
                                                               "hub": hub or {}})


def _rows(source: str, split: str, fmt: str, hub: dict):
    if fmt == "text":
        from phitune.data.text import text_files

        files = text_files(source)
        if files is not None:
            for path in files:  # one document per file, read whole: the largest file bounds the memory
                yield {"where": str(path), "text": json.dumps({"text": _read_document(path)}, ensure_ascii=False)}
            return
    suffix = Path(source).suffix.lower()
    if suffix == ".json":
        raise PhituneError(f"{source}: a .json file is one JSON value, read whole; data.streaming reads .jsonl, "
                           ".csv, .parquet or a hub dataset (write one JSON object per line to stream it)")
    if suffix == ".jsonl":
        yield from _jsonl_rows(source)
    elif suffix in (".csv", ".parquet"):
        for rows in read_row_batches(source, split, BATCH):
            for number, row in rows:
                yield {"where": row_location(source, number), "text": json.dumps(row, ensure_ascii=False, default=str)}
    else:
        yield from _hub_rows(source, split, hub)


def _read_document(path: Path) -> str:
    from phitune.data.readers import _read_text

    return _read_text(path)


def _jsonl_rows(source: str):
    from phitune.data.readers import _is_local

    _is_local(Path(source))  # missing, a folder, or 0 bytes: one line, as the cached path says it
    with open(source, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PhituneError(f"{source}:{number}: not UTF-8 text (byte {exc.start} of the line); re-save the "
                                   "file as UTF-8") from None
            yield {"where": f"{source}:{number}", "text": text}


def _hub_rows(source: str, split: str, hub: dict):
    import datasets

    try:
        rows = datasets.load_dataset(source, split=split, streaming=True, **hub)  # subset, data_dir, data_files
        for number, row in enumerate(rows, start=1):
            yield {"where": row_location(source, number), "text": json.dumps(row, ensure_ascii=False, default=str)}
    except PhituneError:
        raise
    except Exception as exc:  # noqa: BLE001 (network, missing dataset, missing split: all end in one message)
        raise PhituneError(f"cannot stream dataset {source!r} (split {split!r}) from the hub: {first_line(exc)}") \
            from None


class Encoder:
    """A batch of {where, text} rows -> prepared examples (the Arrow cache's columns), bad rows raised or counted.

    Chat rows are checked and tokenized by phitune.data.prepare's code; raw text documents are tokenized and packed
    into blocks of max_seq_length within the batch (the last block of a batch may be shorter)."""

    def __init__(self, cfg: DataConfig, tokenizer, fmt: str, counts: StreamCounts | None = None):
        self.cfg, self.tokenizer, self.fmt = cfg, tokenizer, fmt
        self.counts = counts if counts is not None else StreamCounts()
        if fmt != "text":
            from phitune.data.encode import training_chat_template

            stops = {tokenizer.convert_tokens_to_ids(END_OF_TURN), tokenizer.eos_token_id} - {None,
                                                                                             tokenizer.unk_token_id}
            self.settings = {"fmt": fmt, "tokenizer": tokenizer, "max_seq_length": cfg.max_seq_length,
                             "template": training_chat_template(tokenizer, cfg.train_on), "train_on": cfg.train_on,
                             "stops": sorted(stops)}

    def __deepcopy__(self, memo):
        """The encoder itself: datasets.interleave_datasets deep-copies each source's pipeline, and a copy would count
        the rows training reads into a StreamCounts nobody reads (and copy the tokenizer). Nothing here changes but
        the counts, which are the run's."""
        return self

    def __call__(self, batch: dict) -> dict:
        table, wheres, problems = self.encode(batch["where"], batch["text"])
        masked = np.flatnonzero(table.column("masked").to_numpy(zero_copy_only=False))
        cut = ": every label is masked (assistant turn cut off by max_seq_length?); raise data.max_seq_length or set " \
              "data.on_bad_row: skip"
        problems += [(wheres[i], wheres[i] + cut) for i in masked]
        if problems and self.cfg.on_bad_row == "error":
            message = problems[0][1]
            raise PhituneError(message if message.endswith("on_bad_row: skip") else message + SKIP_HINT)
        if masked.size:
            table = table.filter(~table.column("masked").to_numpy(zero_copy_only=False))
        self._count(len(batch["where"]), table, problems)
        return table.to_pydict()

    def _count(self, rows: int, table, problems: list[tuple[str, str]]) -> None:
        counts = self.counts
        counts.rows += rows
        counts.examples += len(table)
        counts.truncated += int(table.column("truncated").to_numpy(zero_copy_only=False).sum())
        for where, problem in problems:
            if where not in counts.bad:
                if not counts.bad:
                    log.warning("skipping bad rows as training reads them (data.on_bad_row: skip); first: %s", problem)
                counts.bad.add(where)
                if len(counts.skipped) < counts.keep:
                    counts.skipped.append(problem)

    def encode(self, wheres: list[str], texts: list[str]):
        """(Arrow table of prepared examples, the `where` of each, (where, problem) of each bad row)."""
        if self.fmt == "text":
            return self._blocks(wheres, texts)
        from phitune.data.prepare import tokenize_batch

        good, good_where, problems = [], [], []
        for where, text in zip(wheres, texts):
            if not text.strip():
                continue  # a blank line, as the cached path skips it
            problem = check_chat_row(where, text, self.fmt)
            if problem:
                problems.append((where, problem))
            else:
                good.append(text)
                good_where.append(where)
        if not good:  # a batch of bad or blank rows only: nothing to tokenize
            from phitune.data.text import block_schema

            return block_schema().empty_table(), good_where, problems
        return tokenize_batch({"text": good}, **self.settings), good_where, problems

    def _blocks(self, wheres: list[str], texts: list[str]):
        import pyarrow as pa

        from phitune.data import text as packing

        documents, problems = [], []
        for where, text in zip(wheres, texts):
            if not text.strip():
                continue  # a blank line of a row file
            document, problem = _document(where, text)
            if problem:
                problems.append((where, problem))
            else:
                documents.append(document)
        ids = (self.tokenizer(documents, add_special_tokens=False, split_special_tokens=True)["input_ids"]
               if documents else [])
        before, after = packing.separators(self.tokenizer)
        blocks = list(packing.pack_blocks(iter([ids]), before, after, self.cfg.max_seq_length))
        table = pa.table(packing._block_columns(blocks, after[0]), schema=packing.block_schema())
        return table, [f"block of {wheres[0]}"] * len(blocks), problems


def parse_row(where: str, text: str) -> tuple[dict | None, str | None]:
    """(the row, None) or (None, `file:line: malformed JSON line (why)`, as phitune.data.prepare says it)."""
    try:
        row = json.loads(text)
    except ValueError as exc:
        return None, f"{where}: malformed JSON line ({first_line(exc)})"
    if not isinstance(row, dict):
        return None, f"{where}: malformed JSON line (expected a JSON object, got {type(row).__name__})"
    return row, None


def check_chat_row(where: str, text: str, fmt: str) -> str | None:
    """Why a chat row cannot be used (`file:line: why`), or None."""
    row, problem = parse_row(where, text)
    if problem:
        return problem
    try:
        to_messages(row, fmt, where)
    except BadRow as bad:
        return str(bad)
    return None


def _document(where: str, text: str) -> tuple[str | None, str | None]:
    if where.endswith(".txt"):
        content = json.loads(text)["text"]
        empty = f"{where}: the file is empty (no text); it needs the document's text"
        return (content, None) if content.strip() else (None, empty)
    from phitune.data.text import text_problem

    row, problem = parse_row(where, text)
    if problem:
        return None, problem
    problem = text_problem(row)
    return (None, str(BadRow(where, problem))) if problem else (row["text"], None)


def detect_stream_format(source: str, split: str, cfg: DataConfig) -> str:
    """The source's format: data.format, or detected from its first row that is a JSON object (read now, so a
    missing file or dataset, or rows of no known shape, stop the run before the model loads)."""
    first_bad = None
    for row in raw_rows(source, split, cfg.format, hub_options(cfg)):
        if cfg.format == "text":
            if not row["where"].endswith(".txt"):
                _check_text_column(source, row["text"])
            return "text"
        if not row["text"].strip():
            continue
        problem = check_chat_row(row["where"], row["text"], "messages")
        parsed = None if problem and "malformed JSON" in problem else json.loads(row["text"])
        if isinstance(parsed, dict):
            return cfg.format if cfg.format != "auto" else detect_format(parsed, row["where"])
        first_bad = first_bad or problem
    raise PhituneError(first_bad or f"{source}: no rows (blank lines only, or an empty dataset); it needs rows of "
                       "chat data")


def _check_text_column(source: str, text: str) -> None:
    try:
        row = json.loads(text)
    except ValueError:
        return  # a malformed first line: the encoder reports it with its place
    if isinstance(row, dict) and "text" not in row:
        columns = ", ".join(sorted(row)) or "none"
        raise PhituneError(f"{source}: no `text` column (columns: {columns}); data.format: text reads a `text` "
                           "column or .txt files")


def encoded(source: str, split: str, cfg: DataConfig, tokenizer, counts: StreamCounts | None = None,
            rows: int | None = None):
    """(IterableDataset of prepared examples of one source, its format): read, checked and encoded BATCH rows at a
    time as it is iterated; `rows`: only the source's first rows."""
    fmt = detect_stream_format(source, split, cfg)
    raw = raw_rows(source, split, fmt, hub_options(cfg))
    raw = raw.take(rows) if rows is not None else raw
    encoder = Encoder(cfg, tokenizer, fmt, counts)
    return raw.map(encoder, batched=True, batch_size=BATCH, remove_columns=["where", "text"],
                   features=prepared_features()), fmt


def prepared_features():
    """The prepared columns' types, given: inferred from a row, the 64-bit duplicate key would not fit an int64."""
    import datasets

    from phitune.data.text import block_schema

    return datasets.Features.from_arrow_schema(block_schema())


def train_stream(cfg: DataConfig, tokenizer, counts: StreamCounts, rows: int | None = None, once: bool = False):
    """(the examples of data.train, eval PreparedSet or None, format): one source's, or several sources' interleaved
    by weight (`mix`), each read and encoded in its own format, with the eval examples held out of each (`hold_out`)
    before they are mixed; `rows`: each source's first rows only; `once`: a mixture reads each row once (`phitune
    data`'s report), where training repeats a source that ends before the others."""
    sources = source_configs(cfg)
    streams, formats = zip(*(encoded(one.train, one.split, one, tokenizer, counts, rows) for one, _ in sources))
    weights = [weight for _, weight in sources]
    streams, evals = hold_out(cfg, tokenizer, list(streams), weights)
    return mix(streams, weights, cfg.seed, once), evals, mixed_format(list(formats))


def source_configs(cfg: DataConfig) -> list[tuple[DataConfig, float]]:
    """Each train source as a one-source config (its own path, split, hub options and format) and its weight."""
    return [(cfg.for_source(source, 0.0), weight)
            for source, (_, _, weight) in zip(cfg.train_sources(), train_sources(cfg))]


def train_sources(cfg: DataConfig) -> list[tuple[str, str, float]]:
    """(source, split, weight) of each stream to train on: data.train, or each source of its list (weight 1 when the
    source gives none); `mix` interleaves them."""
    return [(source.path, source.split, float(source.weight if source.weight is not None else 1.0))
            for source in cfg.train_sources()]


def mix(streams: list, weights: list[float], seed: int, once: bool = False):
    """One stream of several: each next example drawn from source i with probability weight_i / sum(weights)
    (seeded, so a resumed run draws the same sequence), until every source has been read to its end once (a source
    that ends first starts over meanwhile, unless `once`)."""
    if len(streams) == 1:
        return streams[0]
    import datasets

    total = float(sum(weights))
    return datasets.interleave_datasets(streams, probabilities=[w / total for w in weights], seed=seed,
                                        stopping_strategy="all_exhausted_without_replacement" if once
                                        else "all_exhausted")


def held_out_count(cfg: DataConfig) -> int:
    return cfg.max_eval_examples or HELD_OUT


def held_out_shares(count: int, weights: list[float]) -> list[int]:
    """How many of `count` held-out examples each source gives: its weight's share (largest remainders), at least one
    each while there are enough."""
    total = float(sum(weights))
    exact = [count * w / total for w in weights]
    shares = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: exact[i] - shares[i], reverse=True)[:count - sum(shares)]:
        shares[i] += 1
    for i, share in enumerate(shares):  # a light source still gets an example, taken from the heaviest
        heaviest = max(range(len(shares)), key=shares.__getitem__)
        if share == 0 and shares[heaviest] > 1:
            shares[i], shares[heaviest] = 1, shares[heaviest] - 1
    return shares


def hold_out(cfg: DataConfig, tokenizer, streams: list, weights: list[float]):
    """(train streams, eval PreparedSet or None): data.eval's first max_eval_examples examples, or without data.eval
    the first examples of each train source (max_eval_examples in all, shared by weight), held out: each source's
    stream then starts after its own, so no held-out example is trained on, even when a source that ends first
    starts over in the mixture. A mixture's eval set keeps each source's examples together (its `groups`, for the
    eval loss per source). None when eval_split is 0."""
    if cfg.eval:
        eval_stream, _ = encoded(cfg.eval, cfg.eval_hub_split or cfg.split, cfg, tokenizer)
        return streams, in_memory(eval_stream, held_out_count(cfg), cfg.max_seq_length)
    if cfg.eval_split <= 0:
        return streams, None
    parts = [in_memory(stream, count, cfg.max_seq_length)
             for stream, count in zip(streams, held_out_shares(held_out_count(cfg), weights))]
    streams = [stream.skip(len(part)) for stream, part in zip(streams, parts)]
    if len(parts) == 1:
        return streams, parts[0]
    import datasets

    from phitune.data.prepare import PreparedSet

    evals = PreparedSet(datasets.concatenate_datasets([part.rows for part in parts]), cfg.max_seq_length)
    starts = np.cumsum([0] + [len(part) for part in parts])
    evals.groups = [(source.name, np.arange(start, start + len(part)))
                    for source, start, part in zip(cfg.train_sources(), starts, parts) if len(part)]
    return streams, evals


def stream_splits(cfg: DataConfig, tokenizer):
    """(StreamedSet for training, eval PreparedSet or None).

    Eval, decided for streams (the set's size is unknown, so eval_split cannot be a fraction of it): data.eval's
    first max_eval_examples examples (default HELD_OUT), or without data.eval, the first max_eval_examples examples
    (blocks, for raw text) of data.train, held out: training starts after them. eval_split: 0 means no eval."""
    counts = StreamCounts()
    train, evals, fmt = train_stream(cfg, tokenizer, counts)
    if evals is not None and not len(evals):
        raise PhituneError(f"{cfg.eval or source_label(cfg)}: no eval examples in its first rows")
    if cfg.max_train_examples:
        train = train.take(cfg.max_train_examples)
    if next(iter(train.take(1)), None) is None:
        raise PhituneError(no_training_examples(cfg, evals))
    counts.restart()  # what training reads from here on
    train = train.select_columns(["input_ids", "labels"]).repeat(None)
    return StreamedSet(stream=train, counts=counts, format=fmt), evals


def no_training_examples(cfg: DataConfig, evals, where: str = "") -> str:
    """The one line for a stream with nothing left to train on: after the held-out examples, when those took all."""
    if evals is not None and not cfg.eval and len(evals):
        return (f"{source_label(cfg)}: no training examples left after the {len(evals)} held out for eval (set "
                "data.eval, or lower data.max_eval_examples)")
    return f"{source_label(cfg)}: no training examples{where or ' left'}"


def first_conversations(cfg: DataConfig, rows: int, wanted: int = 16) -> list:
    """The first `wanted` good conversations among the first `rows` rows of data.train's first source of chats: the
    examples `phitune data` can show."""
    for first, _ in source_configs(cfg):  # the first source of conversations (raw text has none to show)
        fmt = detect_stream_format(first.train, first.split, first)
        if fmt != "text":
            break
    else:
        return []
    found = []
    for row in raw_rows(first.train, first.split, fmt, hub_options(first)).take(rows):
        if len(found) == wanted:
            break
        if row["text"].strip() and check_chat_row(row["where"], row["text"], fmt) is None:
            found.append(to_messages(json.loads(row["text"]), fmt, row["where"]))
    return found


def held_out_conversations(cfg: DataConfig) -> list:
    """`phitune eval` on a streamed run: the conversations of its eval set as training chose them (the first
    max_eval_examples good rows of data.eval, or of data.train without it), read from the head of the source."""
    if cfg.format == "text":
        from phitune.data import load_conversations

        return load_conversations(cfg).eval  # says in one line that a text run's held-out loss is in metrics.json
    if not cfg.eval and cfg.eval_split <= 0:
        return []
    if not cfg.eval and len(train_sources(cfg)) > 1:
        raise PhituneError("a streamed mixture's held-out examples are encoded examples of several sources; to score "
                           "conversations set data.eval, or pass --data FILE")
    source, split = (cfg.eval, cfg.eval_hub_split or cfg.split) if cfg.eval else (cfg.train, cfg.split)
    fmt = detect_stream_format(source, split, cfg)
    conversations = []
    for row in raw_rows(source, split, fmt, hub_options(cfg) if not cfg.eval else {}):
        if len(conversations) == held_out_count(cfg):
            break
        if row["text"].strip() and check_chat_row(row["where"], row["text"], fmt) is None:
            conversations.append(to_messages(json.loads(row["text"]), fmt, row["where"]))
    return conversations


def in_memory(stream, count: int | None, max_seq_length: int):
    """The first `count` examples of `stream` (None: all of a finite one) as a PreparedSet (what evaluation and
    `phitune data` read)."""
    import datasets
    import pyarrow as pa

    from phitune.data.prepare import PreparedSet
    from phitune.data.text import block_schema

    rows = list(stream.take(count) if count is not None else stream)
    table = pa.Table.from_pylist(rows, schema=block_schema()) if rows else block_schema().empty_table()
    return PreparedSet(datasets.Dataset(table), max_seq_length)


def preview_data(cfg: DataConfig, tokenizer):
    """`phitune data` on a streamed config: the first max_train_examples rows (default PREVIEW_ROWS) of data.train,
    and the eval set training would hold out, as a PreparedData the report reads like the cached one."""
    from dataclasses import replace

    from phitune.data.prepare import PreparedData

    cfg = replace(cfg, on_bad_row="skip")  # a report lists bad rows rather than stopping at the first
    rows = cfg.max_train_examples or PREVIEW_ROWS
    counts = StreamCounts(keep=rows)
    prepared, evals, fmt = train_stream(cfg, tokenizer, counts, rows, once=True)
    counts.restart()
    train = in_memory(prepared, None, cfg.max_seq_length)
    if not len(train):
        first = f"; the first bad one: {counts.skipped[0]}" if counts.skipped else ""
        raise PhituneError(no_training_examples(cfg, evals, f" in its first {rows:,} rows{first}"))
    samples = first_conversations(cfg, rows)
    fingerprint = hashlib.sha256(json.dumps([train_sources(cfg), rows, fmt, cfg.max_seq_length, cfg.train_on])
                                 .encode()).hexdigest()[:20]
    return PreparedData(train=train, eval=evals, format=fmt, skipped=list(counts.skipped), samples=samples,
                        fingerprint=f"stream-{fingerprint}", reused=False,
                        stats={"streamed_rows": counts.rows, "documents": {"train": counts.rows}})
