"""Preparation at scale: rows to token ids and labels in Arrow files, made once per machine and cached.

    source --(raw: one JSON text per row, with its line)--> check (batched map, num_proc) --> problems, good rows
           --> eval split (same seed, same rows as load_conversations) --> tokenize (batched map, num_proc)
           --> <cache_dir>/<fingerprint>/{train,eval}*.arrow + meta.json

Nothing holds the whole set as Python objects: rows live in memory-mapped Arrow files and each worker process sees
one batch at a time. The fingerprint covers the data files (path, size, modification time), the tokenizer, the chat
template, the settings that change tokens, and this module's code, so a second run, and every other process of a
multi-process run, loads the result instead of making it; a file lock makes the first process make it while the
others wait. The cache keeps every row with flags (truncated, fully masked, trains a stop token), so `on_bad_row`
is applied on load and `phitune data` reads its statistics from the same files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from phitune.config.schema import DataConfig
from phitune.data.encode import END_OF_TURN, IGNORE_INDEX, encode_with_masks, label_tokens, training_chat_template
from phitune.data.formats import detect_format, to_messages
from phitune.data.readers import SKIP_HINT, BadRow, hub_options, read_row_batches, read_rows, row_location
from phitune.data.reasoning import row_notes
from phitune.errors import PhituneError, first_line

ROWS_PER_PROCESS = 2_000  # below this, worker start-up costs more than it saves
BATCH = 256  # rows per map batch: big enough for batch encoding, small enough for bounded memory
OK, READ_BAD, ROW_BAD, BLANK = 0, 1, 2, 3  # row status after the check pass
SAMPLES = 16  # raw train rows kept in meta.json for `phitune data` to show
log = logging.getLogger(__name__)


@dataclass
class PreparedSet:
    """Tokenized examples of one split in Arrow, every row kept, with per-row flags; `to_dataset` for the trainer."""

    rows: object  # datasets.Dataset: input_ids, labels (truncated), length (untruncated), truncated, masked, stop, key
    max_seq_length: int
    skipped: list[str] = field(default_factory=list)  # fully-masked examples dropped by on_bad_row: skip
    format: str = ""  # set by run.chat_data.tokenize_splits for metrics.json
    skipped_rows: int = 0
    groups: list = field(default_factory=list)  # a mixture's eval set: (source name, its row numbers here)

    def __len__(self) -> int:
        return len(self.rows)

    def to_dataset(self):
        return self.rows.select_columns(["input_ids", "labels"])

    def column(self, name: str) -> np.ndarray:
        """One column, no Python rows; of a mixture's index over its sources (select), only that column is
        gathered (with_format's `columns` would gather every column first, token ids and all)."""
        return self.rows.select_columns([name]).with_format("arrow")[:][name].to_numpy()

    @property
    def truncated(self) -> int:
        return int(self.column("truncated").sum())

    @property
    def num_tokens(self) -> int:
        return int(np.minimum(self.column("length"), self.max_seq_length).sum())


@dataclass
class PreparedData:
    """Train and eval sets with the data format, the skipped rows (`file:line: why`) and a few raw train rows."""

    train: PreparedSet
    eval: PreparedSet | None
    format: str
    skipped: list[str]
    samples: list[list[dict]]
    fingerprint: str
    reused: bool  # loaded from the cache, not made by this process
    stats: dict = field(default_factory=dict)  # data.format: text: {"documents": {"train": n, "eval": m}}
    shares: list = field(default_factory=list)  # a mixture (phitune.data.mixture): what each source gave


def prepare_data(cfg: DataConfig, tokenizer) -> PreparedData:
    """Prepared train and eval sets of `cfg`, from the cache when another run or process already made them."""
    from filelock import FileLock

    if cfg.is_mixture:
        raise ValueError("prepare_data prepares one source; a list of sources goes to data.prepare_mixture")
    # raw text (phitune.data.text) has no turns to render: a base model without a chat template can read it
    template = "" if cfg.format == "text" else training_chat_template(tokenizer, cfg.train_on)
    cache = cache_root(cfg)
    created = [folder for folder in (cache, *cache.parents) if not folder.exists()]  # deepest first
    cache.mkdir(parents=True, exist_ok=True)
    try:
        fingerprint = data_fingerprint(cfg, tokenizer, template)
        final, lock = cache / fingerprint, cache / f"{fingerprint}.lock"
        with FileLock(str(lock)):
            reused = (final / "meta.json").is_file()
            if not reused:
                _make_entry(cfg, tokenizer, template, cache / f"{fingerprint}.tmp-{os.getpid()}", final)
    except BaseException:
        _forget_new_folders(created)
        raise
    return _load(final, cfg, fingerprint, reused)


def _make_entry(cfg: DataConfig, tokenizer, template: str, work: Path, final: Path) -> None:
    """Make the entry in `work` and rename it to `final`; a stop on the way (bad data, Ctrl-C) removes `work`."""
    shutil.rmtree(work, ignore_errors=True)
    try:
        with _quiet_progress():
            _make(cfg, tokenizer, template, work)
        work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _forget_new_folders(created: list[Path]) -> None:
    """After a failed make: the cache folders this call created, when empty. The entry's lock file stays (0 bytes):
    a process waiting on it holds that file, and removing it would let one starting now lock a new file and make
    the same entry at the same time."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:  # not empty: the lock, or another run's entry
            break


def cache_root(cfg: DataConfig) -> Path:
    """data.cache_dir, else ~/.cache/phitune/data (under $XDG_CACHE_HOME when set); absolute, as the Arrow file
    names inside an entry are taken relative to it."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "phitune" / "data"
    return Path(os.path.abspath(cfg.cache_dir or default))


@contextmanager
def _quiet_progress():
    """No datasets progress bars on stderr: the CLI's output is the errors and the log, nothing else."""
    from datasets import utils as progress

    was_off = progress.are_progress_bars_disabled()
    progress.disable_progress_bars()
    try:
        yield
    finally:
        if not was_off:
            progress.enable_progress_bars()


def data_fingerprint(cfg: DataConfig, tokenizer, template: str) -> str:
    """Hash of everything that changes the prepared tokens and which rows are kept: the files, the tokenizer and its
    template, the data settings, the code. Not of num_proc or cache_dir (no effect on the result), nor on_bad_row:
    an entry keeps every good row and the list of bad ones, and _load applies on_bad_row."""
    code = b"".join((Path(__file__).parent / name).read_bytes()
                    for name in ("prepare.py", "encode.py", "formats.py", "readers.py", "__init__.py", "text.py",
                                 "tools.py", "reasoning.py"))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    settings = {
        "sources": [_source_identity(s, cfg) for s in (cfg.train, cfg.eval) if s],
        "tokenizer": [type(tokenizer).__name__, backend.to_str() if backend else tokenizer.name_or_path,
                      tokenizer.special_tokens_map],
        "template": template,
        "data": {k: getattr(cfg, k) for k in ("format", "max_seq_length", "train_on", "eval_split", "seed",
                                               "max_train_examples", "max_eval_examples", "split", "eval_hub_split")},
        "code": hashlib.sha256(code).hexdigest(),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _source_identity(source: str, cfg: DataConfig) -> list:
    path = Path(source)
    if path.is_file():
        stat = path.stat()
        return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    if path.is_dir():  # .txt documents (data.format: text) or a dataset repository: each file's identity
        return [_source_identity(str(f), cfg) for f in sorted(path.rglob("*")) if f.is_file()] + [
            cfg.split, cfg.eval_hub_split, hub_options(cfg)]
    return [source, cfg.split, cfg.eval_hub_split, hub_options(cfg)]


def _make(cfg: DataConfig, tokenizer, template: str, work: Path) -> None:
    """Read, check, split and tokenize into `work`; meta.json last, so a directory with it is complete."""
    work.mkdir(parents=True)
    if cfg.format == "text":
        from phitune.data.text import make_text_entry

        meta = make_text_entry(cfg, tokenizer, work)
        (work / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        return
    train_raw, fmt = _raw_rows(cfg.train, cfg.split, cfg, work / "train-raw")
    train_good, skipped, error = _check(train_raw, fmt, cfg, cfg.train, work / "train-check")
    eval_fmt = fmt
    if cfg.eval:  # format: auto detects each file's format on its own (a sharegpt train file, an alpaca eval file)
        eval_raw, eval_fmt = _raw_rows(cfg.eval, cfg.eval_hub_split or cfg.split, cfg, work / "eval-raw")
        eval_good, eval_skipped, eval_error = _check(eval_raw, eval_fmt, cfg, cfg.eval, work / "eval-check")
        skipped, error = skipped + eval_skipped, error or eval_error
        train_indices, eval_indices = train_good, eval_good
    else:
        from phitune.data import split_eval

        eval_raw = train_raw
        train_indices, eval_indices = split_eval(train_good, cfg.eval_split, cfg.seed)
    train_indices = train_indices[: cfg.max_train_examples or None]
    eval_indices = eval_indices[: cfg.max_eval_examples or None]
    settings = dict(tokenizer=tokenizer, template=template, cfg=cfg)
    files = {"train": _tokenize(train_raw.select(train_indices), work / "train", fmt=fmt, **settings)}
    if eval_indices:
        files["eval"] = _tokenize(eval_raw.select(eval_indices), work / "eval", fmt=eval_fmt, **settings)
    samples = [_messages(text, fmt) for text in train_raw.select(train_indices[:SAMPLES])["text"]]
    for name in ("train-raw", "train-check", "eval-raw", "eval-check"):
        shutil.rmtree(work / name, ignore_errors=True)
    # `error`: what on_bad_row: error stops with; the entry is shared by both settings and applied on load.
    meta = {"format": fmt, "skipped": skipped, "error": error, "files": files, "samples": samples}
    (work / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")


def _load(final: Path, cfg: DataConfig, fingerprint: str, reused: bool) -> PreparedData:
    """The prepared sets of a cache entry; with on_bad_row: error, the first bad row stops here as it would have
    stopped the preparation (the entry may have been made with skip, by `phitune data` for one)."""
    import datasets

    meta = json.loads((final / "meta.json").read_text(encoding="utf-8"))
    if cfg.on_bad_row == "error" and meta["error"]:
        raise PhituneError(meta["error"])
    sets = {name: PreparedSet(datasets.concatenate_datasets([datasets.Dataset.from_file(str(final / f))
                                                            for f in files]), cfg.max_seq_length)
            for name, files in meta["files"].items()}
    return PreparedData(train=sets["train"], eval=sets.get("eval"), format=meta["format"], skipped=meta["skipped"],
                        samples=meta["samples"], fingerprint=fingerprint, reused=reused,
                        stats=meta.get("stats", {}))


def _raw_rows(source: str, split: str, cfg: DataConfig, folder: Path):
    """An Arrow dataset of (line, text): one JSON object text per row; and the format, detected from row one."""
    import datasets

    folder.mkdir()
    suffix = Path(source).suffix.lower()
    if suffix == ".jsonl" and Path(source).is_file():
        raw = datasets.Dataset.from_file(str(_jsonl_to_arrow(Path(source), folder / "rows.arrow")))
        if not len(raw):  # not a line: said as readers.py says it for eval and generate
            raise PhituneError(f"{source}: the file is empty (0 bytes); it needs rows of chat data")
    elif suffix != ".json":  # .parquet, .csv and hub datasets: a batch of rows at a time
        raw = datasets.Dataset.from_file(str(_batches_to_arrow(read_row_batches(source, split, hub=hub_options(cfg)), folder / "rows.arrow")))
    else:  # .json (one JSON value, parsed whole): read in memory, then kept as Arrow
        rows, bad = read_rows(source, split=split, on_bad_row=cfg.on_bad_row, hub=hub_options(cfg))
        lines = [n for n, _ in rows] + [_bad_line(b) for b in bad]
        texts = [json.dumps(r, ensure_ascii=False, default=str) for _, r in rows] + [None] * len(bad)
        problems = [None] * len(rows) + [str(b) for b in bad]
        raw = datasets.Dataset.from_dict({"line": lines, "text": texts, "problem": problems})
    return raw, cfg.format if cfg.format != "auto" else _detect(raw, source)


def _bad_line(problem: BadRow) -> int:
    return int(problem.where.rsplit(" ", 1)[-1].rsplit(":", 1)[-1])


def _jsonl_to_arrow(path: Path, target: Path, chunk_bytes: int = 32 << 20) -> Path:
    """Copy a JSONL file's lines into an Arrow file, a chunk at a time; a non-UTF-8 byte is an error with its line."""
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    schema = pa.schema({"line": pa.int64(), "text": pa.string()})  # given: a file of no lines has no row to infer it
    writer, number, tail = ArrowWriter(path=str(target), schema=schema), 0, b""
    try:
        with path.open("rb") as source:
            while chunk := source.read(chunk_bytes) or tail:
                lines = (tail + chunk).split(b"\n") if chunk else [tail]
                tail = lines.pop() if chunk else b""
                try:
                    texts = [line.decode("utf-8") for line in lines]
                except UnicodeDecodeError:
                    _raise_not_utf8(path)
                writer.write_table(pa.table([pa.array(range(number + 1, number + len(texts) + 1), pa.int64()),
                                             pa.array(texts, pa.string())], schema=schema))
                number += len(texts)
        writer.finalize()
    except OSError as exc:
        raise PhituneError(f"cannot read {path}: {exc.strerror}") from None
    finally:
        writer.close()
    return target


def _batches_to_arrow(batches, target: Path) -> Path:
    """Write (line, JSON text) of each row, a batch at a time, into an Arrow file: the rows are never all in memory."""
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    schema = pa.schema({"line": pa.int64(), "text": pa.string()})
    writer = ArrowWriter(path=str(target), schema=schema)
    try:
        for rows in batches:
            texts = [json.dumps(row, ensure_ascii=False, default=str) for _, row in rows]
            writer.write_table(pa.table([pa.array([n for n, _ in rows], pa.int64()), pa.array(texts, pa.string())],
                                        schema=schema))
        writer.finalize()
    finally:
        writer.close()
    return target


def _raise_not_utf8(path: Path):
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PhituneError(f"{path}:{line}: not UTF-8 text (byte {exc.start}); re-save the file as UTF-8") from None


def _detect(raw, source: str) -> str:
    """The format of the first row that is a JSON object (as the in-memory reader does). With none, the first
    malformed row is the error (a file of one bad line is not a file of no rows)."""
    first_bad = None
    for start in range(0, len(raw), 1000):
        batch = raw[start:start + 1000]
        for line, text in zip(batch["line"], batch["text"]):
            row = _parse(text)
            if isinstance(row, dict):
                return detect_format(row, row_location(source, line))
            if first_bad is None and text is not None and text.strip():
                first_bad = _check_row(line, text, None, "messages", source)[1]
    raise PhituneError(first_bad or f"{source}: no rows (blank lines only, or an empty dataset); it needs rows of "
                       "chat data")


def _parse(text):
    try:
        return json.loads(text) if text and text.strip() else None
    except ValueError:
        return None


def _check(raw, fmt: str, cfg: DataConfig, source: str, folder: Path) -> tuple[list[int], list[str], str | None]:
    """Indices of good rows, the `file:line: why` of bad ones, and the error of the first (raised when on_bad_row
    is error)."""
    folder.mkdir()
    checked = raw.map(_check_batch, batched=True, batch_size=BATCH * 4, fn_kwargs={"fmt": fmt, "source": source},
                      num_proc=_procs(cfg, len(raw)),
                      remove_columns=[c for c in raw.column_names if c != "line"],
                      cache_file_name=str(folder / "check.arrow"), new_fingerprint=folder.name + _token())
    status = checked.with_format("arrow", columns=["status"])[:]["status"].to_numpy()  # ds["status"] walks rows
    bad = np.flatnonzero((status == READ_BAD) | (status == ROW_BAD))
    order = bad[np.lexsort((bad, status[bad]))]  # reading problems first, as the reader reports them first
    problems = list(checked.select(order)["problem"]) if len(order) else []
    error = None
    if problems:
        error = problems[0] + SKIP_HINT
        if cfg.on_bad_row == "error":
            raise PhituneError(error)
    good = np.flatnonzero(status == OK)
    if not len(good):
        if not np.any(status == ROW_BAD):
            raise PhituneError(f"{source}: no rows")
        raise PhituneError(f"{source}: every row is bad ({len(problems)} skipped); the first: {problems[0]}")
    return good.tolist(), problems, error


def _token() -> str:
    return os.urandom(4).hex()


def _check_batch(batch: dict, fmt: str, source: str) -> dict:
    """Status and problem of each row: OK, READ_BAD (malformed JSON), ROW_BAD (does not fit the format), BLANK."""
    status, problems = [], []
    given = batch.get("problem") or [None] * len(batch["line"])
    for line, text, problem in zip(batch["line"], batch["text"], given):
        code, message = _check_row(line, text, problem, fmt, source)
        status.append(code)
        problems.append(message)
    return {"status": status, "problem": problems}


def _check_row(line: int, text, problem, fmt: str, source: str) -> tuple[int, str | None]:
    if problem is not None:
        return READ_BAD, problem
    if text is None or not text.strip():
        return BLANK, None
    try:
        row = json.loads(text)
        if not isinstance(row, dict):
            raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    except ValueError as exc:
        return READ_BAD, f"{source}:{line}: malformed JSON line ({first_line(exc)})"
    try:
        to_messages(row, fmt, row_location(source, line))
    except BadRow as bad:
        return ROW_BAD, str(bad)
    return OK, None


def _procs(cfg: DataConfig, rows: int) -> int | None:
    wanted = cfg.num_proc or len(os.sched_getaffinity(0))
    procs = max(1, min(wanted, rows // ROWS_PER_PROCESS))
    return procs if procs > 1 else None


def _messages(text: str, fmt: str) -> list[dict]:
    return to_messages(json.loads(text), fmt, "")


def _tokenize(rows, folder: Path, fmt: str, tokenizer, template: str, cfg: DataConfig) -> list[str]:
    """Tokenize `rows` into Arrow files under `folder`; the file names, relative to the cache entry."""
    stops = {tokenizer.convert_tokens_to_ids(END_OF_TURN), tokenizer.eos_token_id} - {None, tokenizer.unk_token_id}
    settings = {"fmt": fmt, "tokenizer": tokenizer, "template": template, "max_seq_length": cfg.max_seq_length,
                "train_on": cfg.train_on, "stops": sorted(stops)}
    folder.mkdir()
    tokenized = rows.map(tokenize_batch, batched=True, batch_size=BATCH, fn_kwargs=settings,
                         num_proc=_procs(cfg, len(rows)), remove_columns=rows.column_names,
                         cache_file_name=str(folder / "rows.arrow"), new_fingerprint=folder.name + _token())
    return [str(Path(f["filename"]).relative_to(folder.parent)) for f in tokenized.cache_files]


def tokenize_batch(batch: dict, fmt: str, tokenizer, template: str, max_seq_length: int, train_on: str,
                   stops: list[int]):
    """Render and tokenize a batch of rows in one call, then label, truncate and flag each row with numpy.

    The encoding and labels are phitune.data.encode's, as for tokenize_conversations (tests/test_data_prepare.py
    holds the two equal): labels are the ids on tokens inside {% generation %} spans (or every token, train_on: all)
    and IGNORE_INDEX elsewhere. `notes` holds what `phitune data` warns about each conversation's text
    (phitune.data.reasoning.row_notes).
    """
    import pyarrow as pa

    conversations = [_messages(text, fmt) for text in batch["text"]]
    ids_out, labels_out, lengths, flags = [], [], [], {"truncated": [], "masked": [], "stop": []}
    for ids, mask in encode_with_masks(tokenizer, conversations, template, train_on):
        ids, labels, length, masked = label_tokens(ids, mask, train_on, max_seq_length)
        trained = labels != IGNORE_INDEX
        lengths.append(length)
        flags["truncated"].append(length > max_seq_length)
        flags["masked"].append(masked)
        flags["stop"].append(bool((trained & np.isin(ids, stops)).any()))
        ids_out.append(ids)
        labels_out.append(labels.astype(np.int32))
    keys = [int.from_bytes(hashlib.blake2b(json.dumps(c, sort_keys=True, ensure_ascii=False).encode(),
                                           digest_size=8).digest(), "little") for c in conversations]
    return pa.table({"input_ids": _list_array(ids_out), "labels": _list_array(labels_out),
                     "length": pa.array(lengths, pa.int32()), **{k: pa.array(v, pa.bool_()) for k, v in flags.items()},
                     "key": pa.array(keys, pa.uint64()), "notes": pa.array(map(row_notes, conversations), pa.uint8())})


def _list_array(arrays: list[np.ndarray]):
    import pyarrow as pa

    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))


def training_set(prepared: PreparedSet, name: str, on_bad_row: str) -> PreparedSet:
    """The set the trainer sees: fully-masked examples are an error, or dropped and listed with on_bad_row: skip."""
    masked = np.flatnonzero(prepared.column("masked"))
    if not len(masked):
        return prepared
    problems = [f"{name} example {i + 1}: every label is masked (assistant turn cut off by max_seq_length?)"
                for i in masked]
    if on_bad_row == "error":
        raise PhituneError(problems[0] + "; raise data.max_seq_length or set data.on_bad_row: skip")
    if len(masked) == len(prepared):
        raise PhituneError(f"the {name} set is empty after skipping {len(masked)} fully-masked examples")
    keep = np.setdiff1d(np.arange(len(prepared)), masked)
    groups = [(name, np.searchsorted(keep, rows[np.isin(rows, keep)])) for name, rows in prepared.groups]
    return PreparedSet(prepared.rows.select(keep), prepared.max_seq_length, problems, groups=groups)
