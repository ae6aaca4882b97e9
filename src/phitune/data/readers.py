"""Readers: a local file or a hub dataset in, a list of (line number, row dict) out.

Line numbers are kept so that a bad row is reported as `file:line`, which is what a person needs to fix row 40,000.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from phitune.errors import PhituneError, first_line

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

Row = tuple[int, dict]  # (1-based line or row number, the row)


class BadRow(Exception):
    """A row that cannot be used; carries its location. Turned into PhituneError or skipped by the caller."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where


def read_rows(source: str, split: str = "train", on_bad_row: str = "error") -> tuple[list[Row], list[BadRow]]:
    """Read every row of `source`: local .jsonl/.json/.csv/.parquet by suffix, else a datasets-hub name."""
    path = Path(source)
    if path.suffix.lower() in LOCAL_SUFFIXES:
        if path.is_dir():
            raise PhituneError(f"{source} is a directory, not a data file; name the file itself")
        if not path.is_file():
            raise PhituneError(f"data file not found: {source}")
        reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        return reader[path.suffix.lower()](path, on_bad_row)
    if path.exists():
        raise PhituneError(f"{source}: unsupported data file type; use one of {', '.join(LOCAL_SUFFIXES)}")
    return _read_hub(source, split), []


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise PhituneError(f"{path}:{line}: not UTF-8 text (byte {exc.start}); re-save the file as UTF-8") from None
    except OSError as exc:
        raise PhituneError(f"cannot read {path}: {exc.strerror}") from None


def _read_jsonl(path: Path, on_bad_row: str) -> tuple[list[Row], list[BadRow]]:
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
                raise PhituneError(str(problem)) from None
            bad.append(problem)
            continue
        rows.append((number, row))
    return rows, bad


def _read_json(path: Path, on_bad_row: str) -> tuple[list[Row], list[BadRow]]:
    try:
        data = json.loads(_read_text(path))
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
    reader = csv.DictReader(_read_text(path).splitlines())
    # Line 1 is the header, so the first data row is line 2.
    return [(number, dict(row)) for number, row in enumerate(reader, start=2)], []


def _read_parquet(path: Path, on_bad_row: str) -> tuple[list[Row], list[BadRow]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise PhituneError(f"{path}: not a readable parquet file ({first_line(exc)})") from None
    return [(number, row) for number, row in enumerate(table.to_pylist(), start=1)], []


def _read_hub(name: str, split: str) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, missing dataset, missing split: all end in one message
        raise PhituneError(
            f"cannot load dataset {name!r} (split {split!r}) from the hub: {first_line(exc)}. "
            f"For a local file use a path ending in {', '.join(LOCAL_SUFFIXES)}"
        ) from None
    return [(number, row) for number, row in enumerate(ds, start=1)]

