"""The chat rows of the methods that train on SFT's conversations (sft, distill): the tokenized train and eval sets
with masked labels, and their counts for metrics.json.

Below the recipes because two of them read the same rows (a recipe never imports another): `method: distill` scores
the teacher's distributions on exactly the tokens SFT trains on.
"""

from __future__ import annotations

import logging

from phitune.config.schema import RunConfig
from phitune.errors import PhituneError
from phitune.run.plan import RunPlan

log = logging.getLogger("phitune")


def tokenize_splits(cfg: RunConfig, conversations, tokenizer, plan: RunPlan):
    """Train and eval sets with masked labels; log how many rows were truncated or skipped.

    `conversations` None: cfg.data is read and tokenized into the Arrow cache (phitune.data.prepare), by the first
    process of the machine while the others wait and reuse it. A Conversations from load_conversations (small,
    in-memory data, as tests use) is tokenized in memory. Both sets carry `format` and `skipped_rows` for metrics.
    `plan` gives the model's context length.
    """
    from phitune.data import tokenize_conversations
    from phitune.data.mixture import log_mixture
    from phitune.data.prepare import training_set
    from phitune.data.prepare_mixture import prepare_sources

    context = plan.context
    if context and cfg.data.max_seq_length > context:
        raise PhituneError(f"data.max_seq_length {cfg.data.max_seq_length} exceeds the model's context of {context}")
    if conversations is None and cfg.data.streaming:
        from phitune.data.stream import stream_splits

        train_set, eval_set = stream_splits(cfg.data, tokenizer)
        log.info("data streamed from %s (%s): rows are read, checked and tokenized as training takes them",
                 cfg.data.train, train_set.format)
        fmt, skipped = train_set.format, []
        if eval_set is not None:
            eval_set = training_set(eval_set, "eval", cfg.data.on_bad_row)
    elif conversations is None:
        data = prepare_sources(cfg.data, tokenizer)
        log.info("data %s (%s)", data.fingerprint, "reused from the cache" if data.reused else "prepared")
        log_mixture(log, data.shares)
        fmt, skipped = data.format, list(data.skipped)
        train_set = training_set(data.train, "train", cfg.data.on_bad_row)
        eval_set = training_set(data.eval, "eval", cfg.data.on_bad_row) if data.eval is not None else None
    else:
        kwargs = dict(max_seq_length=cfg.data.max_seq_length, train_on=cfg.data.train_on,
                      on_bad_row=cfg.data.on_bad_row)
        fmt, skipped = conversations.format, conversations.skipped
        train_set = tokenize_conversations(conversations.train, tokenizer, name="train", **kwargs)
        eval_set = (tokenize_conversations(conversations.eval, tokenizer, name="eval", **kwargs)
                    if conversations.eval else None)
    for name, tset in (("train", train_set), ("eval", eval_set)):
        if tset is not None and tset.truncated:
            log.warning("%s: %d examples truncated to %d tokens", name, tset.truncated, cfg.data.max_seq_length)
    skipped += train_set.skipped + (eval_set.skipped if eval_set is not None else [])
    if skipped:
        log.warning("skipped %d bad rows; first: %s", len(skipped), "; ".join(skipped[:3]))
    train_set.format, train_set.skipped_rows = fmt, len(skipped)
    return train_set, eval_set



def dataset_metrics(train_set, eval_set) -> dict:
    """Counts for metrics.json; `train_set` as tokenize_splits returns it (it carries format and skipped_rows). A
    streamed set counts skipped and truncated rows in what training read (its read-ahead included)."""
    counts = getattr(train_set, "counts", None)
    if counts is not None:
        return {"data_format": train_set.format, "streaming": True,
                "eval_examples": len(eval_set) if eval_set is not None else 0,
                "truncated_examples": counts.truncated + (eval_set.truncated if eval_set is not None else 0),
                "skipped_rows": counts.skipped_rows}
    return {
        "data_format": train_set.format,
        "train_examples": len(train_set),
        "eval_examples": len(eval_set) if eval_set is not None else 0,
        "truncated_examples": train_set.truncated + (eval_set.truncated if eval_set is not None else 0),
        "skipped_rows": train_set.skipped_rows,
    }
