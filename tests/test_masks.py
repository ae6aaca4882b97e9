"""What is trained, on the real Phi-3 vocabulary: exactly each assistant message's content and its end-of-turn token.

Real text on the bundled Phi-3 tokenizer (byte fallback for Kannada, Devanagari and emoji, multi-byte CJK, code with
tabs and newlines, answers that start with spaces or newlines), in every data format, through the same preparation
as training, for each Phi family's template. Phi-3's chat tokens strip the whitespace after them, so whitespace an
answer starts with belongs to `<|assistant|>` and is not trained (README, "What is trained").
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from phitune.data import render_with_mask, training_chat_template
from phitune.data.encode import rendered_with_offsets
from phitune.data.formats import to_messages
from phitune.data.templates import PHI4_CHAT_TEMPLATE, PHI4_MINI_CHAT_TEMPLATE

SYSTEM = {"role": "system", "content": "Answer briefly; keep the user's language."}
TURNS = [  # (user, assistant): scripts, leading whitespace, emoji, code
    ("What is the capital of Karnataka?", "Bengaluru."),
    ("ಕರ್ನಾಟಕದ ರಾಜಧಾನಿ ಯಾವುದು?", "  ಬೆಂಗಳೂರು."),
    ("भारत की राजधानी क्या है?", "\nनई दिल्ली है।"),
    ("日本の首都は？中国は？", "東京です。中国：北京。한국어: 서울 "),
    ("😀 say hi", " 🎉🦙 hi 👍🏽"),
    ("Loop in Python?", "```python\nfor i in range(3):\n\tprint(i)  # 0..2\n```\n"),
]
ROWS = {  # one row per data format, each with several of the turns above
    "messages": {"messages": [SYSTEM] + [m for u, a in TURNS for m in ({"role": "user", "content": u},
                                                                      {"role": "assistant", "content": a})]},
    "sharegpt": {"conversations": [{"from": "system", "value": SYSTEM["content"]}]
                 + [m for u, a in TURNS[1:4] for m in ({"from": "human", "value": u}, {"from": "gpt", "value": a})]},
    "alpaca": {"instruction": TURNS[2][0], "input": "ಹಿಂದಿಯಲ್ಲಿ", "output": TURNS[2][1]},
    "prompt_completion": {"prompt": TURNS[4][0], "completion": TURNS[4][1]},
}
FAMILIES = {  # family -> (template, end-of-turn token, added special tokens)
    "phi-3": (None, "<|end|>", []),
    "phi-4": (PHI4_CHAT_TEMPLATE, "<|im_end|>", ["<|im_start|>", "<|im_sep|>", "<|im_end|>"]),
    "phi-4-mini": (PHI4_MINI_CHAT_TEMPLATE, "<|end|>", ["<|tool|>", "<|/tool|>"]),
}


@pytest.fixture(scope="module")
def phi3_tokenizer(phi3_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(phi3_tokenizer_dir)


@pytest.fixture
def family_tokenizer(phi3_tokenizer):
    """The real Phi-3 vocabulary (loaded from a model folder, as phitune does) with a family's template."""
    import copy

    def make(family: str):
        template, _, extra = FAMILIES[family]
        tokenizer = copy.deepcopy(phi3_tokenizer)
        tokenizer.add_special_tokens({"additional_special_tokens": extra})
        tokenizer.chat_template = template or tokenizer.chat_template
        return tokenizer

    return make


def trained_texts(text: str, offsets: np.ndarray, mask: np.ndarray) -> list[str]:
    """The characters of each run of trained tokens (byte-fallback tokens share their character's offsets)."""
    runs, current = [], None
    for (start, end), trained in zip(offsets.tolist(), mask.tolist()):
        if trained:
            current = [start, end] if current is None else [current[0], max(current[1], end)]
        elif current is not None:
            runs.append(text[current[0]:current[1]])
            current = None
    return runs + ([text[current[0]:current[1]]] if current else [])


def expected_texts(tokenizer, messages: list[dict], end: str) -> list[str]:
    """Each assistant message's content and its end token; without the leading whitespace a stripping header eats."""
    header = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                           add_generation_prompt=True).removesuffix("\n")
    header_token = next(t for t in tokenizer.added_tokens_decoder.values() if header.endswith(t.content))
    return [(m["content"].lstrip() if header_token.rstrip else m["content"]) + end
            for m in messages if m["role"] == "assistant"]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("fmt", list(ROWS))
def test_trained_characters_are_each_answer_and_its_end_token_and_nothing_else(family_tokenizer, family, fmt):
    tokenizer = family_tokenizer(family)
    _, end, _ = FAMILIES[family]
    messages = to_messages(ROWS[fmt], fmt, "test")
    template = training_chat_template(tokenizer)
    [(text, ids, offsets, mask)] = list(rendered_with_offsets(tokenizer, [messages], template))
    assert text == tokenizer.apply_chat_template(messages, tokenize=False)  # the tokenizer's own rendering
    assert ids.tolist() == tokenizer(text, add_special_tokens=False).input_ids
    assert trained_texts(text, offsets, mask) == expected_texts(tokenizer, messages, end)
    assert tokenizer.eos_token_id not in ids[mask].tolist() or end == tokenizer.eos_token  # final eos masked


@pytest.mark.parametrize("fmt", list(ROWS))
def test_phi3_trained_tokens_decode_to_each_answer_and_end(family_tokenizer, fmt):
    """The issue's check, as a user would do it: decode the trained ids of each assistant turn."""
    tokenizer = family_tokenizer("phi-3")
    messages = to_messages(ROWS[fmt], fmt, "test")
    ids, mask = render_with_mask(tokenizer, messages, training_chat_template(tokenizer))
    runs, current = [], []
    for token, trained in zip(ids + [None], mask + [0]):
        if trained:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    assert runs == [m["content"].lstrip() + "<|end|>" for m in messages if m["role"] == "assistant"]


def test_trls_phi3_variant_would_train_the_newline_and_the_final_eos(family_tokenizer):
    """Why phitune has its own Phi-3 training template: the measured difference to TRL's."""
    from trl.chat_template_utils import phi3_training_chat_template

    tokenizer = family_tokenizer("phi-3")
    messages = to_messages(ROWS["messages"], "messages", "test")
    [(text, _, offsets, mask)] = list(rendered_with_offsets(tokenizer, [messages], phi3_training_chat_template))
    runs = trained_texts(text, offsets, mask)
    assert runs[-1].endswith("<|end|>\n<|endoftext|>")
    assert training_chat_template(tokenizer) != phi3_training_chat_template


def test_prepared_labels_follow_the_mask_for_every_format(family_tokenizer, tmp_path):
    """Through prepare_data (Arrow, batched) as training runs it: labels are the ids exactly where the mask is."""
    from phitune.config.schema import DataConfig
    from phitune.data.encode import IGNORE_INDEX
    from phitune.data.prepare import prepare_data

    tokenizer = family_tokenizer("phi-3")
    template = training_chat_template(tokenizer)
    for fmt, row in ROWS.items():
        path = tmp_path / f"{fmt}.jsonl"
        path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
        cfg = DataConfig(train=str(path), eval_split=0, cache_dir=str(tmp_path / "cache"), max_seq_length=1024)
        labels = prepare_data(cfg, tokenizer).train.to_dataset()[0]["labels"]
        ids, mask = render_with_mask(tokenizer, to_messages(row, fmt, "test"), template)
        assert labels == [t if m else IGNORE_INDEX for t, m in zip(ids, mask)], fmt
