"""Readers: a local file, a dataset folder or a hub dataset in, a list of (line number, row dict) out, or batches of them for sources
too large for a list (read_row_batches: parquet, CSV and hub; JSONL is copied line by line by phitune.data.prepare).

Line numbers are kept so that a bad row is reported as `file:line`, which is what a person needs to fix row 40,000.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from phitune.errors import PhituneError, first_line

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

Row = tuple[int, dict]  # (1-based line or row number, the row)
BATCH_ROWS = 10_000  # rows per batch when reading a large source a batch at a time


CHAT_ROWS = "rows of chat data"  # what a data file needs, said when it is empty; callers of other data name theirs
# How to go on past a malformed line of training data (`phitune train --on-bad-row skip` sets data.on_bad_row)
SKIP_HINT = " (pass --on-bad-row skip, or set data.on_bad_row: skip, to skip such rows)"


class BadRow(Exception):
    """A row that cannot be used; carries its location. Turned into PhituneError or skipped by the caller."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where


def row_location(source: str, number: int) -> str:
    """Where a row is, for messages: `file:line` in line-based files, `source: row N` elsewhere."""
    return f"{source}:{number}" if source.endswith((".jsonl", ".csv")) else f"{source}: row {number}"


def relative_to_cwd(path) -> str:
    """` (relative to /where/you/are)` for a relative path that was not found: data paths are read from the working
    directory, which a message should name (a config run from another directory finds nothing)."""
    return "" if Path(path).expanduser().is_absolute() else f" (relative to {Path.cwd()})"


def hub_options(cfg) -> dict:
    """datasets.load_dataset's `name`, `data_dir` and `data_files` as a data config (data.subset, ...) sets them."""
    options = {"name": getattr(cfg, "subset", None), "data_dir": getattr(cfg, "data_dir", None),
               "data_files": getattr(cfg, "data_files", None)}
    return {key: value for key, value in options.items() if value is not None}


def read_rows(source: str, split: str = "train", on_bad_row: str = "error",
              needs: str = CHAT_ROWS, hint: str = SKIP_HINT, hub: dict | None = None) -> tuple[list[Row], list[BadRow]]:
    """Read every row of `source`: local .jsonl/.json/.csv/.parquet by suffix, else a dataset folder or a
    datasets-hub name, read by load_dataset with `hub` (hub_options). `needs`: what the caller reads, for the
    message of an empty file; `hint`: what the error of a malformed JSON line adds (how to skip such rows: "" where
    data.on_bad_row does not apply)."""
    path = Path(source)
    if _is_local(path, needs):
        if path.suffix.lower() == ".jsonl":
            return _read_jsonl(path, on_bad_row, hint)
        reader = {".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        return reader[path.suffix.lower()](path, on_bad_row)
    return [row for rows in _hub_batches(source, split, BATCH_ROWS, hub) for row in rows], []


def read_row_batches(source: str, split: str = "train", batch_rows: int | None = None,
                     needs: str = CHAT_ROWS, hub: dict | None = None) -> Iterator[list[Row]]:
    """The rows of a .parquet or .csv file or a hub dataset, `batch_rows` at a time, numbered as read_rows numbers them.

    What the Arrow preparation reads these sources with, so a dataset larger than memory never becomes a list.
    """
    path = Path(source)
    if _is_local(path, needs):
        batches = {".parquet": _parquet_batches, ".csv": _csv_batches}.get(path.suffix.lower())
        if batches is None:
            raise ValueError(f"{source}: read_row_batches reads .parquet and .csv files and hub datasets")
        return batches(path, batch_rows or BATCH_ROWS)
    return _hub_batches(source, split, batch_rows or BATCH_ROWS, hub)


def _is_local(path: Path, needs: str = CHAT_ROWS) -> bool:
    """A local data file by its suffix (checked to exist), or False for a hub name or a dataset folder (one laid out
    as a hub repository: a README.md with `configs:`, or data files, which load_dataset reads as it reads the hub)."""
    if path.suffix.lower() in LOCAL_SUFFIXES:
        if path.is_dir():
            raise PhituneError(f"{path} is a directory, not a data file; name the file itself")
        if not path.is_file():
            raise PhituneError(f"data file not found: {path}{relative_to_cwd(path)}")
        if path.stat().st_size == 0:  # each reader would say it differently, one in a library's traceback
            raise PhituneError(f"{path}: the file is empty (0 bytes); it needs {needs}")
        return True
    if path.is_dir() and is_dataset_folder(path):
        return False
    if path.is_dir() and not any(child.is_file() for child in path.rglob("*")):
        raise PhituneError(f"{path}: the folder holds no data files (it needs {needs}: a {', '.join(LOCAL_SUFFIXES)} "
                           "file, or .txt documents with data.format: text)")
    if path.exists():
        raw_text = path.suffix.lower() == ".txt" or path.is_dir()
        hint = " (raw text for continued pre-training: set data.format: text)" if raw_text else ""
        raise PhituneError(f"{path}: unsupported data file type; use one of {', '.join(LOCAL_SUFFIXES)}{hint}")
    return False


def is_dataset_folder(path: Path) -> bool:
    """A folder load_dataset reads: a dataset card (README.md) or data files of a kind phitune reads, at any depth."""
    return (path / "README.md").is_file() or any(
        f.suffix.lower() in LOCAL_SUFFIXES for f in path.rglob("*") if f.is_file() and ".git" not in f.parts)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise PhituneError(f"{path}:{line}: not UTF-8 text (byte {exc.start}); re-save the file as UTF-8") from None
    except OSError as exc:
        raise PhituneError(f"cannot read {path}: {exc.strerror}") from None


def _read_jsonl(path: Path, on_bad_row: str, hint: str) -> tuple[list[Row], list[BadRow]]:
    rows, bad = [], []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        except ValueError as exc:
            problem = BadRow(f"{path}:{number}", f"malformed JSON line ({first_line(exc)})")
            if on_bad_row == "error":
                raise PhituneError(f"{problem}{hint}") from None
            bad.append(problem)
            continue
        rows.append((number, row))
    return rows, bad


def _read_json(path: Path, on_bad_row: str) -> tuple[list[Row], list[BadRow]]:
    text = _read_text(path)
    if not text.strip():
        raise PhituneError(f"{path}: the file holds only blank space; it needs a JSON list of rows")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise PhituneError(f"{path}: malformed JSON ({first_line(exc)})") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}: take the single list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list):
        raise PhituneError(f"{path}: expected a JSON list of rows")
    rows, bad = [], []
    for number, row in enumerate(data, start=1):
        if isinstance(row, dict):
            rows.append((number, row))
        elif on_bad_row == "error":
            raise PhituneError(f"{path}: row {number}: expected a JSON object, got {type(row).__name__}")
        else:
            bad.append(BadRow(f"{path}: row {number}", "expected a JSON object"))
    return rows, bad


def _read_csv(path: Path, on_bad_row: str) -> tuple[list[Row], list[BadRow]]:
    return [row for rows in _csv_batches(path, BATCH_ROWS) for row in rows], []


def _csv_batches(path: Path, batch_rows: int) -> Iterator[list[Row]]:
    """CSV rows read from the open file a batch at a time, each numbered by the line it ends on (line 1 is the
    header; a quoted cell may span lines)."""
    rows: list[Row] = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:  # -sig: a BOM, as Excel writes, is not a key
            reader = csv.DictReader(handle)
            for row in reader:
                rows.append((reader.line_num, dict(row)))
                if len(rows) == batch_rows:
                    yield rows
                    rows = []
    except UnicodeDecodeError:
        _read_text(path)  # raises the error with the line of the first bad byte
        raise
    except OSError as exc:
        raise PhituneError(f"cannot read {path}: {exc.strerror}") from None
    except csv.Error as exc:
        raise PhituneError(f"{path}: not a readable CSV file ({first_line(exc)})") from None
    if rows:
        yield rows


def _read_parquet(path: Path, on_bad_row: str) -> tuple[list[Row], list[BadRow]]:
    return [row for rows in _parquet_batches(path, BATCH_ROWS) for row in rows], []


def _parquet_batches(path: Path, batch_rows: int) -> Iterator[list[Row]]:
    import pyarrow.parquet as pq

    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
            rows = batch.to_pylist()
            yield list(enumerate(rows, start=number + 1))
            number += len(rows)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise PhituneError(f"{path}: not a readable parquet file ({first_line(exc)})") from None


def _hub_batches(name: str, split: str, batch_rows: int, hub: dict | None = None) -> Iterator[list[Row]]:
    """A hub dataset's (or a dataset folder's) rows through datasets.load_dataset, `hub` its name (the subset),
    data_dir and data_files."""
    import datasets
    from datasets import utils as progress

    hub, was_off = hub or {}, progress.are_progress_bars_disabled()
    progress.disable_progress_bars()  # the CLI's output is phitune's lines, not a bar per split generated
    try:
        ds = datasets.load_dataset(name, split=split, **hub)
    except Exception as exc:  # network, missing dataset, config or split: all end in one message
        subset = f", subset {hub['name']!r}" if hub.get("name") else ""
        where = "from the hub" if not Path(name).is_dir() else "from its folder"
        hint = "" if Path(name).is_dir() else f". For a local file use a path ending in {', '.join(LOCAL_SUFFIXES)}"
        raise PhituneError(
            f"cannot load dataset {name!r} (split {split!r}{subset}) {where}: {first_line(exc)}{hint}"
        ) from None
    finally:
        if not was_off:
            progress.enable_progress_bars()
    number = 0
    for columns in ds.iter(batch_size=batch_rows):  # the memory-mapped Arrow table, one slice at a time
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        yield list(enumerate(rows, start=number + 1))
        number += len(rows)
