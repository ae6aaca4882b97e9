"""The one SFT encoding: a conversation rendered with the training chat template, tokenized, and labelled.

Training (phitune.data.prepare, into the Arrow cache), evaluation and in-memory sets (phitune.data's
tokenize_conversations), and `phitune data`'s example all go through `rendered_with_offsets` and `label_tokens`, so
the ids and labels a model is trained on are the ones it is evaluated on, and the ones a user is shown.
"""

from __future__ import annotations

import logging
from itertools import chain

import numpy as np

from phitune.data.reasoning import answer_spans
from phitune.data.templates import template_family
from phitune.data.tools import render_for_template
from phitune.errors import PhituneError

log = logging.getLogger(__name__)
_said: set[str] = set()  # one-time warnings already given in this process

IGNORE_INDEX = -100  # label value that the loss ignores
END_OF_TURN = "<|end|>"  # Phi-3's end of a turn: trained on, so the model learns to stop


def label_tokens(ids: np.ndarray, mask: np.ndarray, train_on: str, max_seq_length: int):
    """(ids, labels, length before truncation, fully masked): labels are the ids where `mask` is set (the tokens of
    {% generation %} spans, less each reasoning trace with train_on: answer), or every id with train_on: all and IGNORE_INDEX elsewhere; both cut to max_seq_length. A row is fully
    masked when no label after the first token is kept (the first token is never predicted)."""
    labels = ids if train_on == "all" else np.where(mask, ids, IGNORE_INDEX)
    length = len(ids)
    ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    return ids, labels, length, not (labels[1:] != IGNORE_INDEX).any()


def encode_with_masks(tokenizer, conversations: list, template: str, train_on: str = "assistant"):
    """(ids, assistant mask) per conversation, as numpy arrays; `rendered_with_offsets` gives the texts too."""
    for _, ids, _, mask in rendered_with_offsets(tokenizer, conversations, template, train_on):
        yield ids, mask


def rendered_with_offsets(tokenizer, conversations: list, template: str, train_on: str = "assistant"):
    """(text, ids, own-text character offsets, assistant mask) per conversation.

    Three steps, as in `apply_chat_template(..., return_assistant_tokens_mask=True)`: render with the template (which
    also gives the character span of each {% generation %} block), tokenize the texts in one batch call, and mark
    every token whose own text overlaps a span. A token's own text: Phi-3's chat tokens strip the whitespace after
    them (rstrip), and the tokenizer reports that whitespace in the token's offsets; transformers' per-token loop
    then marks `<|assistant|>` when the answer starts with a space or a newline. Here only the token's own
    characters count (`_own_offsets`). The walk is vectorised: a token's span is the first one that ends after the
    token starts, never moving back (the running maximum), and the token is marked when it ends after that span
    starts. The batch encode itself is about 85% of the CPU. With train_on: answer each span starts after the
    reasoning trace that opens it (phitune.data.reasoning.answer_spans), by the same rule: a token is trained when its
    own text overlaps the answer.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    conversations = render_for_template(conversations, template_family(template))  # tool calls, Phi-4-mini's way
    texts, spans = render_jinja_template(conversations=conversations, chat_template=template,
                                         return_assistant_tokens_mask=True, **tokenizer.special_tokens_map)
    if train_on == "answer":
        spans = [answer_spans(text, row_spans) for text, row_spans in zip(texts, spans)]
    encoded = tokenizer(texts, add_special_tokens=False)
    stripping = _stripping_added_tokens(tokenizer)
    for text, encoding, row_spans in zip(texts, encoded.encodings, spans):
        ids = np.asarray(encoding.ids, dtype=np.int32)
        offsets = np.fromiter(chain.from_iterable(encoding.offsets), np.int64, 2 * len(ids)).reshape(-1, 2)
        offsets = _own_offsets(text, ids, offsets, stripping)
        mask = np.zeros(len(ids), dtype=bool)
        if row_spans and len(ids):
            bounds = np.asarray(row_spans, dtype=np.int64)
            span = np.maximum.accumulate(np.searchsorted(bounds[:, 1], offsets[:, 0], side="right"))
            inside = span < len(bounds)
            mask[inside] = offsets[inside, 1] > bounds[span[inside], 0]
        yield text, ids, offsets, mask


def _stripping_added_tokens(tokenizer) -> dict[int, str]:
    """id -> text of the added tokens that swallow whitespace beside them (lstrip / rstrip)."""
    return {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.lstrip or t.rstrip}


def _own_offsets(text: str, ids: np.ndarray, offsets: np.ndarray, stripping: dict[int, str]) -> np.ndarray:
    """Offsets narrowed, for each whitespace-stripping added token, to the characters of the token itself."""
    if not stripping:
        return offsets
    offsets = offsets.copy()
    for position in np.flatnonzero(np.isin(ids, list(stripping))):
        start, end = offsets[position]
        content = stripping[int(ids[position])]
        found = text.find(content, start, end)
        if found >= 0:
            offsets[position] = found, found + len(content)
    return offsets


def render_with_mask(tokenizer, messages, template: str) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation and a 0/1 mask of the tokens inside {% generation %} blocks.

    The same code as prepared data (encode_with_masks), so evaluation and training mask alike."""
    ids, mask = next(encode_with_masks(tokenizer, [messages], template))
    return ids.tolist(), mask.astype(int).tolist()


def _say_if_trl_phi3(template: str, train_on: str) -> str:
    """`template`; once per process, a warning when it is TRL's Phi-3 training variant (an older Phi-3 template
    revision: bos first, no system turn), whose assistant mask differs from phitune's own Phi-3 variant."""
    from trl.chat_template_utils import phi3_training_chat_template

    if template == phi3_training_chat_template and train_on == "assistant" and "trl-phi3" not in _said:
        _said.add("trl-phi3")
        log.warning("the tokenizer's chat template is an older Phi-3 revision phitune has no training variant of: "
                    "TRL's is used, which also trains the \"\\n\" after each <|end|> and the final eos token (the "
                    "model never writes them); for phitune's mask use the current Phi-3 template")
    return template


def training_chat_template(tokenizer, train_on: str = "assistant") -> str:
    """The tokenizer's chat template with {% generation %} markers: phitune's for the Phi family, else TRL's.

    With `train_on: all` the markers are not needed (every token is a label), so a template nobody has a training
    variant of is used as it is.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    from phitune.data.templates import training_template_for

    template = tokenizer.chat_template
    if not template:
        raise PhituneError("the tokenizer has no chat template; phitune needs one to render conversations")
    if has_generation_markers(template):
        return template
    try:
        family_template = training_template_for(tokenizer)  # Phi-3, Phi-4, Phi-4-mini (phitune.data.templates)
    except ValueError as exc:
        if train_on == "all":
            return template
        raise PhituneError(f"{exc}; add {{% generation %}} markers to the tokenizer's template") from None
    if family_template is not None:
        return family_template
    try:
        return _say_if_trl_phi3(get_training_chat_template(tokenizer) or template, train_on)
    except Exception:  # TRL raises for templates it has no training variant of
        if all(tag in template for tag in ("<|user|>", "<|assistant|>", "<|end|>")):
            from trl.chat_template_utils import phi3_training_chat_template

            return _say_if_trl_phi3(phi3_training_chat_template, train_on)  # a revision TRL does not know verbatim
        if train_on == "all":
            return template
        raise PhituneError(
            "the tokenizer's chat template has no {% generation %} markers and TRL has no training variant of it, "
            "so assistant turns cannot be found; add the markers to the template or set data.train_on: all"
        ) from None
