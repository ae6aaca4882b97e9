"""Data: every format normalises to messages; labels cover assistant content and its <|end|>, nothing else."""

import json

import pytest

from conftest import write_jsonl
from phitune.config.schema import DataConfig
from phitune.config.schema import ModelConfig
from phitune.data import IGNORE_INDEX, load_conversations, split_eval, tokenize_conversations
from phitune.errors import PhituneError
from phitune.models.loading import load_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]

ROWS = {
    "messages": {"messages": CONVERSATION},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."},
                                   {"from": "human", "value": "What is the capital of France?"},
                                   {"from": "gpt", "value": "The capital of France is Paris."}]},
    "alpaca": {"instruction": "What is the capital of", "input": "France?", "output": "The capital of France is Paris."},
    "prompt_completion": {"prompt": "What is the capital of France?", "completion": "The capital of France is Paris."},
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))


@pytest.mark.parametrize("fmt", ROWS)
def test_each_format_is_detected_and_normalised(tmp_path, fmt):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[fmt]] * 3)
    conversations = load_conversations(DataConfig(train=str(path), eval_split=0))
    assert conversations.format == fmt
    messages = conversations.train[0]
    assert messages[-1] == {"role": "assistant", "content": "The capital of France is Paris."}
    assert messages[-2]["role"] == "user" and "France" in messages[-2]["content"]


@pytest.mark.parametrize("suffix", [".json", ".csv", ".parquet"])
def test_other_file_types(tmp_path, suffix):
    rows = [ROWS["alpaca"], {**ROWS["alpaca"], "output": "Paris."}]
    path = tmp_path / f"d{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        path.write_text("instruction,input,output\n" + "".join(f"{r['instruction']},{r['input']},{r['output']}\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    conversations = load_conversations(DataConfig(train=str(path), eval_split=0))
    assert [c[-1]["content"] for c in conversations.train] == ["The capital of France is Paris.", "Paris."]


def test_labels_cover_assistant_content_and_end_of_turn_only(tokenizer):
    tokenized = tokenize_conversations([CONVERSATION], tokenizer, max_seq_length=256)
    ids, labels = tokenized.input_ids[0], tokenized.labels[0]
    trained = tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX])
    masked = tokenizer.decode([t for t, l in zip(ids, labels) if l == IGNORE_INDEX])
    assert trained.startswith("The capital of France is Paris.<|end|>")
    assert "Be brief." in masked and "What is the capital" in masked and "<|assistant|>" in masked
    assert "Paris" not in masked


def test_multi_turn_trains_every_assistant_turn(tokenizer):
    turns = CONVERSATION + [{"role": "user", "content": "And Spain?"},
                            {"role": "assistant", "content": "The capital of Spain is Madrid."}]
    tokenized = tokenize_conversations([turns], tokenizer, max_seq_length=256)
    trained = tokenizer.decode([t for t, l in zip(tokenized.input_ids[0], tokenized.labels[0]) if l != IGNORE_INDEX])
    assert "Paris.<|end|>" in trained and "Madrid.<|end|>" in trained and "Spain?" not in trained


def test_train_on_all_labels_every_token(tokenizer):
    tokenized = tokenize_conversations([CONVERSATION], tokenizer, max_seq_length=256, train_on="all")
    assert tokenized.labels[0] == tokenized.input_ids[0]


def test_truncation_is_counted_and_fully_masked_rows_are_caught(tokenizer):
    length = len(tokenize_conversations([CONVERSATION], tokenizer, max_seq_length=1000).input_ids[0])
    long_answer = CONVERSATION[:2] + [{"role": "assistant", "content": "Paris " * 50}]
    tokenized = tokenize_conversations([CONVERSATION, long_answer], tokenizer, max_seq_length=length)
    assert tokenized.truncated == 1 and all(len(ids) <= length for ids in tokenized.input_ids)
    with pytest.raises(PhituneError, match="every label is masked"):
        tokenize_conversations([CONVERSATION], tokenizer, max_seq_length=10)
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    cut = len(tokenize_conversations([short], tokenizer, max_seq_length=1000).input_ids[0])
    skipped = tokenize_conversations([CONVERSATION, short], tokenizer, max_seq_length=cut, on_bad_row="skip")
    assert len(skipped.skipped) == 1 and len(skipped.input_ids) == 1


def test_eval_split_is_seeded_and_disjoint():
    items = list(range(100))
    train, held = split_eval(items, 0.1, seed=3)
    assert len(held) == 10 and not set(train) & set(held)
    assert split_eval(items, 0.1, seed=3) == (train, held)
    assert split_eval(items, 0.1, seed=4)[1] != held


def test_bad_rows_can_be_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS["messages"]) + "\n{not json\n" + json.dumps({"messages": CONVERSATION[:2]}) + "\n")
    with pytest.raises(PhituneError, match=r"d.jsonl:2: malformed JSON"):
        load_conversations(DataConfig(train=str(path), eval_split=0))
    loaded = load_conversations(DataConfig(train=str(path), eval_split=0, on_bad_row="skip"))
    assert len(loaded.train) == 1 and len(loaded.skipped) == 2
    assert "d.jsonl:3: conversation has no assistant turn" in loaded.skipped[1]
