"""Mixtures: several sources read, checked and held out each on its own, then mixed in the stated shares by seed.

Every source is read as if it were the run's only one (its own format, prompt, hub config, bad rows and eval
share), so an error names the source, and the Arrow cache holds one entry per source: changing a weight re-mixes
indices and tokenizes nothing. Then each source gives the mixture a number of its training rows:

    weights (every source has one):  N = min_i n_i * W / w_i  (n_i rows, w_i weight, W = sum of weights)
                                      source i gives round(w_i / W * N) rows, a seeded sample: nothing repeats;
                                      the mixture is as large as its scarcest source allows (capped, warned)
    rows (or neither):                source i gives `rows` (a seeded sample; whole passes plus a sample when
                                      rows > n_i: repeated, warned), or all of its rows once

and the chosen rows are shuffled together with data.seed. Held-out rows are never mixed: eval keeps every source's
held-out share (or every eval source) whole, grouped by source, so the eval loss is reported per source and overall.
data.max_train_examples and max_eval_examples cap the mixed sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from phitune.config.sources import Source
from phitune.errors import PhituneError


@dataclass
class SourceShare:
    """What one source gave: the rows of `phitune data`'s per-source table."""

    name: str
    available: int  # its training rows (after its eval share was held out)
    used: int = 0  # rows it gives the mixed training set (repeats counted)
    asked: float | None = None  # the share its weight (or rows) asks for
    got: float = 0.0  # its share of the mixed training set
    eval_rows: int = 0
    tokens: int | None = None  # of its rows in the mixed training set
    truncated: int | None = None
    warnings: list[str] = field(default_factory=list)


def plan_counts(sources: list[Source], available: list[int]) -> tuple[list[int], list[str]]:
    """Rows each source gives the training mixture, and the warnings about sources capped or repeated."""
    if all(source.weight is not None for source in sources):
        return _weighted_counts(sources, available)
    counts, warnings = [], []
    for source, n in zip(sources, available):
        want = source.rows if source.rows is not None else n
        if want > n:
            warnings.append(f"{source.name}: its {n:,} rows are repeated to give the {want:,} asked "
                            f"({want / n:.1f} passes)")
        counts.append(want)
    return counts, warnings


def _weighted_counts(sources: list[Source], available: list[int]) -> tuple[list[int], list[str]]:
    total_weight = sum(source.weight for source in sources)
    shares = [source.weight / total_weight for source in sources]
    limit = min(range(len(sources)), key=lambda i: available[i] / shares[i])
    size = available[limit] / shares[limit]  # the largest mixture in which no row repeats
    counts = [min(n, round(share * size)) for share, n in zip(shares, available)]
    unused = [f"{s.name} {c:,} of {n:,}" for s, c, n in zip(sources, counts, available) if c < n]
    warnings = []
    if unused:
        warnings.append(f"the weights cap the mixture at {sum(counts):,} rows: {sources[limit].name} "
                        f"({available[limit]:,} rows) is used whole for its {shares[limit]:.0%}; used of the others: "
                        f"{', '.join(unused)} (to repeat {sources[limit].name} instead, give every source `rows`)")
    return counts, warnings


def sample_rows(count: int, available: int, seed: int, index: int) -> np.ndarray:
    """`count` row numbers of a source of `available` rows: whole shuffled passes, then a seeded sample."""
    rng = np.random.default_rng([seed, index])
    passes, rest = divmod(count, available)
    return np.concatenate([rng.permutation(available) for _ in range(passes)]
                          + [rng.permutation(available)[:rest]]).astype(np.int64)


def mix_order(chosen: list[np.ndarray], seed: int, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(source index, row number) of every chosen row, shuffled together with `seed`, the first `limit` kept."""
    which = np.concatenate([np.full(len(rows), i, dtype=np.int64) for i, rows in enumerate(chosen)])
    rows = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(rows))[:limit]
    return which[order], rows[order]


def eval_order(sizes: list[int], seed: int, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Every held-out row of every source, grouped by source; with `limit`, a seeded sample of them across sources
    (so a cap keeps every source, in proportion)."""
    which, rows = mix_order([np.arange(n, dtype=np.int64) for n in sizes], seed, limit)
    keep = np.lexsort((rows, which))
    return which[keep], rows[keep]


def train_mixture(sources: list[Source], available: list[int], seed: int,
                  limit: int | None) -> tuple[np.ndarray, np.ndarray, list[SourceShare]]:
    """The mixed training rows as (source index, row number), and each source's share of them."""
    counts, warnings = plan_counts(sources, available)
    chosen = [sample_rows(c, n, seed, i) for i, (c, n) in enumerate(zip(counts, available))]
    which, rows = mix_order(chosen, seed, limit)
    used = np.bincount(which, minlength=len(sources))
    asked = _asked(sources, counts)
    shares = [SourceShare(name=s.name, available=n, used=int(u), asked=a, got=float(u / max(1, len(rows))))
              for s, n, u, a in zip(sources, available, used, asked)]
    for warning in warnings:
        for share in shares:
            if warning.startswith(f"{share.name}:") or f" {share.name} (" in warning:
                share.warnings.append(warning)
                break
    if not len(rows):
        raise PhituneError("the data mixture has no training rows")
    return which, rows, shares


def _asked(sources: list[Source], counts: list[int]) -> list[float | None]:
    if all(source.weight is not None for source in sources):
        total = sum(source.weight for source in sources)
        return [source.weight / total for source in sources]
    if any(source.rows is not None for source in sources):
        return [c / max(1, sum(counts)) for c in counts]
    return [None] * len(sources)  # all of every source: no share was asked


def mixture_warnings(shares: list[SourceShare]) -> list[str]:
    """Each source's warnings, once."""
    return list(dict.fromkeys(w for share in shares for w in share.warnings))


def load_mixture(cfg, read) -> tuple[list, list, str, list[str], list[SourceShare]]:
    """(train, eval, format, skipped rows, shares) of a list-form data config, for rows held in memory (pairs,
    prompts, media rows, conversations): `read(source, split, cfg)` as phitune.data.load_splits takes it, each
    source read with its own settings (DataConfig.for_source)."""
    from phitune.data import split_eval

    sources, eval_sources = cfg.train_sources(), cfg.eval_sources()
    held = 0.0 if eval_sources else cfg.eval_split
    trains, evals, formats, skipped = [], [], [], []
    for source in sources:
        items, fmt, bad = _read_named(read, source, cfg.for_source(source, held))
        train, held_out = split_eval(items, held, cfg.seed)
        trains.append(train)
        evals.append(held_out)
        formats.append(fmt)
        skipped += bad
    if eval_sources:
        evals = []
        for source in eval_sources:
            items, _, bad = _read_named(read, source, cfg.for_source(source, 0.0))
            evals.append(items)
            skipped += bad
    which, rows, shares = train_mixture(sources, [len(t) for t in trains], cfg.seed, cfg.max_train_examples)
    train = [trains[s][r] for s, r in zip(which, rows)]
    eval_which, eval_rows = eval_order([len(e) for e in evals], cfg.seed, cfg.max_eval_examples)
    evals_out = [evals[s][r] for s, r in zip(eval_which, eval_rows)]
    if not eval_sources:
        for share, count in zip(shares, np.bincount(eval_which, minlength=len(sources))):
            share.eval_rows = int(count)
    return train, evals_out, mixed_format(formats), skipped, shares


def _read_named(read, source: Source, cfg):
    """read(), with a source's errors prefixed by its name when the path alone does not say which source it is."""
    try:
        return read(source.path, source.split, cfg)
    except PhituneError as exc:
        message = str(exc)
        if source.path in message:
            raise
        raise PhituneError(f"{source.name}: {message}") from None


def mixed_format(formats: list[str]) -> str:
    """One format, or `mixed (a, b)` when the sources differ."""
    distinct = list(dict.fromkeys(formats))
    return distinct[0] if len(distinct) == 1 else f"mixed ({', '.join(distinct)})"


def prepare_mixture(cfg, tokenizer):
    """The PreparedData of a list-form data config: each source prepared (or loaded) as its own cache entry by
    phitune.data.prepare, then the mixed sets selected from them by index (nothing is tokenized again)."""
    import hashlib

    from phitune.data.prepare import PreparedData, prepare_data

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
    import json

    return json.dumps(values, default=str)


def _prepare_named(prepare, cfg, source: Source, tokenizer):
    """One source's PreparedData, its errors prefixed by its name when the message does not name its path."""
    return _read_named(lambda *_: prepare(cfg, tokenizer), source, cfg)


def _gather(sets: list, which: np.ndarray, rows: np.ndarray, max_seq_length: int):
    """The PreparedSet of the chosen (source, row) pairs, as an index over the sources' own Arrow files."""
    import datasets

    from phitune.data.prepare import PreparedSet

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


def source_label(cfg) -> str:
    """The run's data in a few words: `a + general` for a mixture, else the path."""
    if not cfg.is_mixture:
        return str(cfg.train)
    return " + ".join(source.name for source in cfg.train_sources())
