"""Data sources: what `data.train` and `data.eval` name, one source or a list of them, each checked on its own.

A source is a local file, a folder (a dataset repository laid out as on the hub, or `.txt` documents with
`format: text`) or a hub dataset, read through `datasets.load_dataset(path, name=subset, data_dir=..., data_files=...,
split=...)`. The list form mixes sources: every source carries a `weight` (its share of the training rows) or none
does (each gives `rows`, an exact count, or all its rows once). phitune.data.mixture turns the list into rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phitune.config.types import did_you_mean

# Keys of one source in the list form; `weight` and `rows` only in data.train.
SOURCE_KEYS = ("path", "name", "subset", "data_dir", "data_files", "split", "format", "weight", "rows",
               "prompt_template")
FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text")


@dataclass(frozen=True)
class Source:
    """One dataset of a run: where it is, how to read it, and (data.train) how much of the mixture it makes."""

    path: str
    name: str  # how messages, `phitune data`'s table and the per-source eval loss call it
    subset: str | None = None  # the hub dataset's config name (`main` of openai/gsm8k)
    data_dir: str | None = None
    data_files: str | list | dict | None = None
    split: str = "train"
    format: str | None = None  # None: data.format
    weight: float | None = None  # share of the training rows (relative to the other sources' weights)
    rows: int | None = None  # exact number of training rows (repeated when the source has fewer)
    prompt_template: str | None = None  # method grpo: this source's prompt (None: data.prompt_template)

    @property
    def hub_options(self) -> dict:
        """The keyword arguments of datasets.load_dataset this source sets."""
        options = {"name": self.subset, "data_dir": self.data_dir, "data_files": self.data_files}
        return {key: value for key, value in options.items() if value is not None}


def parse_sources(value, key: str, problems: list[str], mixing: bool) -> list[Source]:
    """The sources of data.train (`mixing`: weight and rows allowed) or data.eval written as a list; each problem is
    one line naming the source (`data.train[1] (general)`)."""
    if not isinstance(value, list) or not value:
        problems.append(f"{key} must be a path, a hub dataset name or a non-empty list of sources")
        return []
    sources = [_parse_one(item, f"{key}[{index}]", problems, mixing) for index, item in enumerate(value)]
    sources = [source for source in sources if source is not None]
    weighted = [source.weight is not None for source in sources]
    if any(weighted) and not all(weighted):
        missing = ", ".join(source.name for source in sources if source.weight is None)
        problems.append(f"{key}: give every source a weight (shares of the training rows) or none (each takes "
                        f"`rows`, or all its rows); {missing} has none")
    names = [source.name for source in sources]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{key}: two sources are called {name!r}; give them different `name`s")
    return sources


def _parse_one(item, where: str, problems: list[str], mixing: bool) -> Source | None:
    if isinstance(item, str):
        item = {"path": item}
    if not isinstance(item, dict):
        problems.append(f"{where} must be a path or a mapping with `path`, got {item!r}")
        return None
    allowed = SOURCE_KEYS if mixing else tuple(k for k in SOURCE_KEYS if k not in ("weight", "rows"))
    for key in (k for k in item if k not in allowed):
        problems.append(f"{where}: unknown key {key!r}{did_you_mean(key, allowed)} (a source takes "
                        f"{', '.join(allowed)})")
    path = item.get("path")
    if not isinstance(path, str) or not path.strip():
        problems.append(f"{where} needs `path` (a local file or folder, or a hub dataset name)")
        return None
    source = Source(path=path, name=str(item.get("name") or default_name(path, item.get("subset"))),
                    **{k: item[k] for k in SOURCE_KEYS[2:] if item.get(k) is not None and k in allowed})
    where = f"{where} ({source.name})"
    _check_source(source, where, problems)
    return source


FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")  # a local file: read whole, never through the hub


def _check_source(source: Source, where: str, problems: list[str]) -> None:
    if Path(source.path).suffix.lower() in FILE_SUFFIXES:
        given = [key for key in ("subset", "data_dir", "data_files") if getattr(source, key) is not None]
        given += ["split"] if source.split != "train" else []
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            problems.append(f"{where}: {', '.join(given)} {verb} to a hub dataset or a dataset folder; {source.path} "
                            "is a file, read whole (write the rows you want to a file of their own)")
    for key in ("subset", "data_dir", "split", "prompt_template"):
        value = getattr(source, key)
        if value is not None and not isinstance(value, str):
            problems.append(f"{where}: {key} must be a string, got {value!r}")
    if source.format is not None and source.format not in FORMATS:
        problems.append(f"{where}: format must be one of {', '.join(FORMATS)}, got {source.format!r}"
                        f"{did_you_mean(source.format, FORMATS, case_blind=True)}")
    if source.data_files is not None and not isinstance(source.data_files, (str, list, dict)):
        problems.append(f"{where}: data_files must be a path, a list of paths or a mapping of split to paths")
    weight = source.weight
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0):
        problems.append(f"{where}: weight must be a positive number (a share of the training rows), got {weight!r}")
    rows = source.rows
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        problems.append(f"{where}: rows must be a positive whole number, got {rows!r}")
    if weight is not None and rows is not None:
        problems.append(f"{where}: give weight (a share) or rows (a count), not both")


def default_name(path: str, subset: str | None = None) -> str:
    """A source's name when it has none: the file's or folder's name without suffix, or the hub name's last part,
    with its subset (`gsm8k/main`)."""
    stem = Path(path.rstrip("/")).stem if Path(path).suffix else Path(path.rstrip("/")).name
    return f"{stem}/{subset}" if subset else stem
