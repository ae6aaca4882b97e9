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
data.max_train_examples caps the mixed training set in the same shares (each source's count scaled down);
max_eval_examples caps the eval set.
"""

from __future__ import annotations

import random
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


def split_eval(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out `fraction` of the items (at least one when fraction > 0), shuffled with `seed`."""
    if fraction <= 0:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(items) * fraction))
    if n_eval >= len(items):
        raise PhituneError(f"data.eval_split {fraction} leaves no training rows out of {len(items)}")
    held = set(order[:n_eval])
    train = [c for i, c in enumerate(items) if i not in held]
    return train, [items[i] for i in sorted(held)]


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


def scaled_counts(counts: list[int], total: int) -> list[int]:
    """`counts` scaled to sum to `total`, in the same proportions (largest remainders)."""
    exact = [c * total / sum(counts) for c in counts]
    scaled = [int(x) for x in exact]
    for i in sorted(range(len(counts)), key=lambda i: exact[i] - scaled[i], reverse=True)[:total - sum(scaled)]:
        scaled[i] += 1
    return scaled


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
    if limit is not None and sum(counts) > limit:  # max_train_examples: the same shares, in fewer rows
        counts = scaled_counts(counts, limit)
        warnings = [f"{s.name}: its {n:,} rows are repeated to give the {c:,} asked ({c / n:.1f} passes)"
                    for s, c, n in zip(sources, counts, available) if c > n]
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


def source_label(cfg) -> str:
    """The run's data in a few words: `a + general` for a mixture, else the path."""
    if not cfg.is_mixture:
        return str(cfg.train)
    return " + ".join(source.name for source in cfg.train_sources())


def log_mixture(log, shares: list[SourceShare]) -> None:
    """Training's log of a mixture: each source's rows and share, then its warnings (`phitune data` shows both as a
    table)."""
    if not shares:
        return
    log.info("data mixture: %s", "; ".join(f"{s.name} {s.used:,} of {s.available:,} rows ({s.got:.1%})"
                                            for s in shares))
    for warning in mixture_warnings(shares):
        log.warning("%s", warning)


def with_sources(report, cfg, shares: list):
    """The report of a mixture (data.train a list): named by its sources, with their table and warnings."""
    if cfg.data.is_mixture:
        report.source, report.sources = source_label(cfg.data), shares
        report.warnings = mixture_warnings(shares) + report.warnings
    return report
