"""The Arrow path of a mixture (data.train a list): each source prepared as its own cache entry by
phitune.data.prepare, then the mixed sets chosen from them by index, as phitune.data.mixture plans them.

prepare_sources is what training and `phitune data` call: one source goes straight to prepare_data.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from phitune.config.sources import Source
from phitune.data.mixture import (
    SourceShare,
    _read_named,
    eval_order,
    mixed_format,
    train_mixture,
)
from phitune.data.prepare import PreparedData, PreparedSet, prepare_data


def prepare_sources(cfg, tokenizer) -> PreparedData:
    """The prepared train and eval sets of cfg.data: prepare_data's for one source, a mixture's for a list."""
    return prepare_mixture(cfg, tokenizer) if cfg.is_mixture else prepare_data(cfg, tokenizer)


def prepare_mixture(cfg, tokenizer):
    """The PreparedData of a list-form data config: each source prepared (or loaded) as its own cache entry by
    phitune.data.prepare, then the mixed sets selected from them by index (nothing is tokenized again)."""
    sources, eval_sources = cfg.train_sources(), cfg.eval_sources()
    held = 0.0 if eval_sources else cfg.eval_split
    parts = [_prepare_named(prepare_data, cfg.for_source(s, held), s, tokenizer) for s in sources]
    eval_parts = [_prepare_named(prepare_data, cfg.for_source(s, 0.0), s, tokenizer) for s in eval_sources]
    which, rows, shares = train_mixture(sources, [len(p.train) for p in parts], cfg.seed, cfg.max_train_examples)
    train = _gather([p.train for p in parts], which, rows, cfg.max_seq_length)
    _count_tokens(train, which, shares, cfg.max_seq_length)
    held_sets = [p.train for p in eval_parts] if eval_sources else [p.eval for p in parts]
    held_names = [s.name for s in (eval_sources or sources)]
    eval_which, eval_rows = eval_order([len(h) if h is not None else 0 for h in held_sets], cfg.seed,
                                       cfg.max_eval_examples)
    evals = _gather(held_sets, eval_which, eval_rows, cfg.max_seq_length) if len(eval_rows) else None
    counts = np.bincount(eval_which, minlength=len(held_sets))
    if evals is not None:
        evals.groups = [(name, np.flatnonzero(eval_which == i)) for i, name in enumerate(held_names) if counts[i]]
    if not eval_sources:
        for share, count in zip(shares, counts):
            share.eval_rows = int(count)
    everything = parts + eval_parts
    fingerprint = hashlib.sha256(json_text([p.fingerprint for p in everything], [s.weight for s in sources],
                                           [s.rows for s in sources], cfg.seed, cfg.max_train_examples,
                                           cfg.max_eval_examples).encode()).hexdigest()[:20]
    documents = [p.stats.get("documents", {}) for p in everything]
    stats = {"documents": {"train": sum(d.get("train", 0) for d in documents[:len(parts)]),
                           **({"eval": sum(d.get("train", 0) for d in documents[len(parts):])} if eval_parts else {})}}
    return PreparedData(train=train, eval=evals, format=mixed_format([p.format for p in parts]),
                        skipped=[problem for p in everything for problem in p.skipped],
                        samples=[sample for p in parts for sample in p.samples], fingerprint=fingerprint,
                        reused=all(p.reused for p in everything), stats=stats, shares=shares)


def json_text(*values) -> str:
    return json.dumps(values, default=str)


def _prepare_named(prepare, cfg, source: Source, tokenizer):
    """One source's PreparedData, its errors prefixed by its name when the message does not name its path."""
    return _read_named(lambda *_: prepare(cfg, tokenizer), source, cfg)


def _gather(sets: list, which: np.ndarray, rows: np.ndarray, max_seq_length: int):
    """The PreparedSet of the chosen (source, row) pairs, as an index over the sources' own Arrow files."""
    import datasets

    present = [s.rows for s in sets if s is not None]
    offsets = np.cumsum([0] + [len(s.rows) if s is not None else 0 for s in sets])
    joined = datasets.concatenate_datasets(present)
    return PreparedSet(joined.select(offsets[which] + rows), max_seq_length)


def _count_tokens(train, which: np.ndarray, shares: list[SourceShare], max_seq_length: int) -> None:
    lengths = train.column("length")
    tokens = np.bincount(which, weights=np.minimum(lengths, max_seq_length), minlength=len(shares))
    truncated = np.bincount(which, weights=lengths > max_seq_length, minlength=len(shares))
    for share, n, cut in zip(shares, tokens, truncated):
        share.tokens, share.truncated = int(n), int(cut)
