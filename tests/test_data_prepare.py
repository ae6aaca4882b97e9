"""The Arrow path (phitune.data.prepare) gives exactly the ids and labels of the per-conversation path, caches its
result under a fingerprint, and keeps file:line errors, on_bad_row, truncation counts and the fully-masked check."""

import json
import subprocess
import sys

import pytest

from conftest import write_jsonl
from phitune.config.schema import DataConfig, ModelConfig
from phitune.data import load_conversations, tokenize_conversations
from phitune.data import training_chat_template
from phitune.data.encode import encode_with_masks
from phitune.data.prepare import prepare_data, training_set
from phitune.errors import PhituneError
from phitune.models.loading import load_tokenizer

SYSTEM = {"role": "system", "content": "Be brief."}


def chat(*turns):
    return [{"role": role, "content": text} for role, text in turns]


MULTI = chat(("user", "Capital of France?"), ("assistant", "Paris."), ("user", "And Spain?"), ("assistant", "Madrid."))
ROWS = {
    "messages": [{"messages": [SYSTEM, *MULTI]}, {"messages": MULTI[:2]}, {"messages": [SYSTEM, *MULTI[:2]]}],
    "sharegpt": [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi there"},
                                    {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Bye"},
                                    {"from": "gpt", "value": "Goodbye, " + "see you " * 30}]},
                 {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}],
    "alpaca": [{"instruction": "Add", "input": "2 and 3", "output": "5"},
               {"instruction": "Name a colour", "output": "Blue " * 40}],
    "prompt_completion": [{"prompt": "Say hi", "completion": "Hi!"},
                          {"prompt": [SYSTEM, MULTI[0]], "completion": [MULTI[1]]}],
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))


def _config(tmp_path, path, **data):
    return DataConfig(train=str(path), eval_split=0, cache_dir=str(tmp_path / "cache"), **data)


@pytest.mark.parametrize("train_on", ["assistant", "all"])
@pytest.mark.parametrize("fmt", ROWS)
def test_same_ids_and_labels_as_the_per_conversation_path(tmp_path, tokenizer, fmt, train_on):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[fmt] * 3)
    cfg = _config(tmp_path, path, max_seq_length=48, train_on=train_on)
    prepared = prepare_data(cfg, tokenizer)
    expected = tokenize_conversations(load_conversations(cfg).train, tokenizer, 48, train_on=train_on)
    rows = prepared.train.to_dataset()
    assert prepared.format == fmt
    assert rows["input_ids"] == expected.input_ids and rows["labels"] == expected.labels
    assert prepared.train.truncated == expected.truncated


def test_assistant_mask_equals_apply_chat_templates_on_awkward_text(tokenizer):
    """Multi-byte characters split over byte tokens, leading and trailing spaces, tokens that straddle a turn's edge:
    the vectorised mask marks exactly the tokens transformers' per-token loop marks, but for `<|assistant|>` before
    an answer that starts with whitespace: Phi-3's chat tokens swallow it (rstrip), transformers counts it as theirs
    and trains the header; phitune counts a token's own characters only (tests/test_masks.py)."""
    awkward = [chat(("user", "Grüße 😀"), ("assistant", " 日本語  ends with spaces  "), ("user", "ok\n\n"),
                    ("assistant", "\n\tindented ünïcödé 🎉🎉")),
               [SYSTEM, *chat(("user", "x"), ("assistant", "<|end|> inside"))], chat(("user", "only a question"))]
    template = training_chat_template(tokenizer)
    for messages, (ids, mask) in zip(awkward, encode_with_masks(tokenizer, awkward, template)):
        expected = tokenizer.apply_chat_template(messages, chat_template=template, return_dict=True,
                                                 return_assistant_tokens_mask=True)
        assert ids.tolist() == list(expected["input_ids"])
        header = tokenizer.convert_tokens_to_ids("<|assistant|>")
        assert mask.astype(int).tolist() == [m if t != header else 0 for t, m in zip(ids, expected["assistant_masks"])]
        assert mask[ids == header].sum() == 0
    assert mask.sum() == 0  # no assistant turn: nothing trained


def test_second_run_reuses_the_cache_and_a_changed_file_does_not(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS["messages"])
    cfg = _config(tmp_path, path, max_seq_length=64)
    first, second = prepare_data(cfg, tokenizer), prepare_data(cfg, tokenizer)
    assert not first.reused and second.reused and first.fingerprint == second.fingerprint
    assert prepare_data(_config(tmp_path, path, max_seq_length=32), tokenizer).fingerprint != first.fingerprint
    write_jsonl(path, ROWS["messages"][:2])
    changed = prepare_data(cfg, tokenizer)
    assert not changed.reused and len(changed.train) == 2


def test_eval_split_picks_the_same_rows_as_load_conversations(tmp_path, tokenizer):
    rows = [{"messages": chat(("user", f"Question {i}?"), ("assistant", f"Answer {i}."))} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(train=str(path), eval_split=0.2, seed=5, cache_dir=str(tmp_path / "cache"))
    prepared, conversations = prepare_data(cfg, tokenizer), load_conversations(cfg)
    expected = tokenize_conversations(conversations.eval, tokenizer, cfg.max_seq_length)
    assert prepared.eval.to_dataset()["input_ids"] == expected.input_ids


def test_bad_rows_file_line_and_skip(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS["messages"][0]) + "\n{not json\n" + json.dumps({"messages": MULTI[:1]}) + "\n\n"
                    + json.dumps(ROWS["messages"][1]) + "\n")
    with pytest.raises(PhituneError, match=r"d.jsonl:2: malformed JSON"):
        prepare_data(_config(tmp_path, path), tokenizer)
    prepared = prepare_data(_config(tmp_path, path, on_bad_row="skip"), tokenizer)
    assert len(prepared.train) == 2 and len(prepared.skipped) == 2
    assert "d.jsonl:3: conversation has no assistant turn" in prepared.skipped[1]


def test_a_failed_make_keeps_the_lock_a_waiting_process_holds(tmp_path, tokenizer):
    """A process waiting on the entry's lock when another one's make fails holds that lock file; a run starting
    then must wait for it, not lock a fresh file and make the same entry beside it (the second rename failed)."""
    import fcntl

    from filelock import FileLock, Timeout

    from phitune.data.prepare import data_fingerprint

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS["messages"][0]) + "\n{not json\n")
    cfg = _config(tmp_path, path)
    fingerprint = data_fingerprint(cfg, tokenizer, training_chat_template(tokenizer, cfg.train_on))
    lock = tmp_path / "cache" / f"{fingerprint}.lock"
    lock.parent.mkdir()
    with open(lock, "a") as waiting:  # the waiting process: the lock file open, its turn not yet come
        with pytest.raises(PhituneError, match=r"d.jsonl:2: malformed JSON"):
            prepare_data(cfg, tokenizer)
        fcntl.flock(waiting, fcntl.LOCK_EX | fcntl.LOCK_NB)  # its turn: it makes the entry now
        with pytest.raises(Timeout):
            FileLock(str(lock), timeout=0).acquire()
    assert sorted(p.name for p in lock.parent.iterdir()) == [lock.name]  # no work folder left


@pytest.mark.parametrize("first", ["skip", "error"])
def test_a_cache_entry_made_with_skip_still_stops_a_run_with_on_bad_row_error(tmp_path, tokenizer, first):
    """`phitune data` prepares with on_bad_row: skip; the `phitune train` after it (default: error) reuses the entry
    and must stop at the first bad row as it does without a cache, in either order."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS["messages"][0]) + "\n{not json\n" + json.dumps(ROWS["messages"][1]) + "\n")
    for on_bad_row in (first, "skip" if first == "error" else "error", first):
        cfg = _config(tmp_path, path, on_bad_row=on_bad_row)
        if on_bad_row == "error":
            with pytest.raises(PhituneError, match=r"d.jsonl:2: malformed JSON"):
                prepare_data(cfg, tokenizer)
        else:
            assert len(prepare_data(cfg, tokenizer).train) == 2


def test_phitune_data_then_train_stops_at_a_bad_row_in_either_order(tmp_path, tiny_model_dir):
    """The README's first step (`phitune data`, which prepares with on_bad_row: skip) must not make the `phitune
    train` after it skip bad rows: exit 2 before it, and after it."""
    import os

    import yaml

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS["messages"][0]) + "\n{not json\n" + json.dumps(ROWS["messages"][1]) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(path), "eval_split": 0, "max_seq_length": 128, "cache_dir": str(tmp_path / "cache")},
        "training_config": {"output_dir": str(tmp_path / "run"), "max_steps": 1}}))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200"}
    results = [subprocess.run([sys.executable, "-m", "phitune.cli", command, str(config), *extra], env=env,
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
               for command, extra in (("train", []), ("data", ["--output", str(tmp_path / "plots")]), ("train", []))]
    assert [r.returncode for r in results] == [2, 0, 2], results[-1].stderr[-2000:]
    for train in (results[0], results[2]):
        assert "d.jsonl:2: malformed JSON" in train.stderr and "Traceback" not in train.stderr
    assert not (tmp_path / "run").exists()


def test_train_and_eval_files_are_each_detected_in_their_own_format(tmp_path, tokenizer):
    """format: auto with a sharegpt JSONL train file and an alpaca JSON eval file: each file's rows are read in the
    format of that file, as the in-memory path reads them."""
    train = write_jsonl(tmp_path / "train.jsonl", ROWS["sharegpt"] * 2)
    evals = tmp_path / "eval.json"
    evals.write_text(json.dumps(ROWS["alpaca"]))
    cfg = DataConfig(train=str(train), eval=str(evals), cache_dir=str(tmp_path / "cache"))
    prepared, conversations = prepare_data(cfg, tokenizer), load_conversations(cfg)
    assert prepared.format == "sharegpt" and len(prepared.eval) == 2
    expected = tokenize_conversations(conversations.eval, tokenizer, cfg.max_seq_length)
    assert prepared.eval.to_dataset()["input_ids"] == expected.input_ids


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows) if rows else pa.table({"text": pa.array([], pa.string())}), path)


EMPTY_FILES = {"empty.jsonl": "", "blank.jsonl": "\n  \n\n", "empty.json": "", "blank.json": " \n\t\n",
               "list.json": "[]", "empty.csv": "", "blank.csv": "\n\n", "header.csv": "instruction,output\n",
               "empty.parquet": "", "rowless.parquet": None}


@pytest.mark.parametrize("name", EMPTY_FILES)
def test_an_empty_or_blank_file_is_one_line_in_both_paths(tmp_path, tokenizer, name):
    path = tmp_path / name
    if EMPTY_FILES[name] is None:
        _write_parquet(path, [])
    else:
        path.write_text(EMPTY_FILES[name])
    for load in (lambda cfg: prepare_data(cfg, tokenizer), load_conversations):
        with pytest.raises(PhituneError) as err:
            load(_config(tmp_path, path))
        message = str(err.value)
        assert message.startswith(str(path)) and "\n" not in message
        assert any(words in message for words in ("no rows", "empty", "blank")), message


@pytest.mark.parametrize("source", ["parquet", "hub"])
def test_parquet_and_hub_rows_are_read_in_batches_with_the_same_result(tmp_path, tokenizer, monkeypatch, source):
    """Batches of 2 rows give the ids, labels and `row N` problems of the in-memory readers (row 3: batch 2)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from phitune.data import readers

    rows = [{"messages": MULTI}, ROWS["messages"][0], {"messages": MULTI[:1]}, *ROWS["messages"][1:]]  # row 3 bad
    name = str(tmp_path / "d.parquet")
    if source == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), name)
    else:
        name = "someone/chats"
        monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(rows))
    monkeypatch.setattr(readers, "BATCH_ROWS", 2)
    cfg = DataConfig(train=name, eval_split=0, on_bad_row="skip", cache_dir=str(tmp_path / "cache"))
    prepared, conversations = prepare_data(cfg, tokenizer), load_conversations(cfg)
    expected = tokenize_conversations(conversations.train, tokenizer, cfg.max_seq_length)
    assert prepared.train.to_dataset()["input_ids"] == expected.input_ids
    assert prepared.train.to_dataset()["labels"] == expected.labels
    assert prepared.skipped == conversations.skipped
    assert "row 3: conversation has no assistant turn" in prepared.skipped[0]


def test_csv_rows_are_read_in_batches_with_their_lines(tmp_path, tokenizer, monkeypatch):
    """A CSV file is read from disk a batch at a time (never the whole text in memory): batches of 2 rows give the
    ids and labels of load_conversations, and a bad row is reported with the line it is on, a quoted multi-line
    cell counted."""
    from phitune.data import readers

    path = tmp_path / "d.csv"
    path.write_text('\ufeffinstruction,input,output\nAdd,2 and 3,5\n"Write two lines",,"One.\nTwo."\n'
                    'Name a colour,,\nSay hi,,Hi!\n', encoding="utf-8")  # a BOM, as Excel writes; line 5: no output
    monkeypatch.setattr(readers, "BATCH_ROWS", 2)
    read = list(readers.read_row_batches(str(path)))
    assert [[number for number, _ in rows] for rows in read] == [[2, 4], [5, 6]]
    assert read[0][1][1]["output"] == "One.\nTwo."
    cfg = DataConfig(train=str(path), eval_split=0, on_bad_row="skip", cache_dir=str(tmp_path / "cache"))
    prepared, conversations = prepare_data(cfg, tokenizer), load_conversations(cfg)
    expected = tokenize_conversations(conversations.train, tokenizer, cfg.max_seq_length)
    assert len(expected.input_ids) == 3
    assert prepared.train.to_dataset()["input_ids"] == expected.input_ids
    assert prepared.train.to_dataset()["labels"] == expected.labels
    assert prepared.skipped == conversations.skipped and len(prepared.skipped) == 1
    assert prepared.skipped[0].startswith(f"{path}:5: ")
    with pytest.raises(PhituneError, match=r"d.csv:5: "):
        prepare_data(DataConfig(train=str(path), eval_split=0, cache_dir=str(tmp_path / "cache2")), tokenizer)


def test_fully_masked_examples_are_an_error_or_skipped(tmp_path, tokenizer):
    long_system = {"role": "system", "content": "Rules. " * 40}
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [long_system, *MULTI[:2]]}, {"messages": MULTI[:2]}])
    prepared = prepare_data(_config(tmp_path, path, max_seq_length=24), tokenizer)
    with pytest.raises(PhituneError, match="train example 1: every label is masked"):
        training_set(prepared.train, "train", "error")
    kept = training_set(prepared.train, "train", "skip")
    assert len(kept) == 1 and len(kept.skipped) == 1


@pytest.mark.processes
def test_processes_of_one_machine_prepare_once(tmp_path, tiny_model_dir):
    """Two processes started together (as torchrun starts ranks): one prepares, the other waits and reuses it."""
    path = write_jsonl(tmp_path / "d.jsonl", ROWS["messages"] * 20)
    script = (
        "import sys; from phitune.config.schema import DataConfig, ModelConfig; from phitune.models.loading import load_tokenizer;"
        "from phitune.data.prepare import prepare_data;"
        f"tok = load_tokenizer(ModelConfig(name_or_path={str(tiny_model_dir)!r}));"
        f"p = prepare_data(DataConfig(train={str(path)!r}, eval_split=0, cache_dir={str(tmp_path / 'c')!r}), tok);"
        "print(p.reused, len(p.train), sum(map(len, p.train.to_dataset()['input_ids'])))"
    )
    ranks = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**__import__("os").environ, "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"})
             for rank in range(2)]
    outputs = sorted(rank.communicate(timeout=300)[0].split()[-3:] for rank in ranks)
    assert [o[0] for o in outputs] == ["False", "True"]  # exactly one process prepared the data
    assert outputs[0][1:] == outputs[1][1:]


def test_template_without_markers_trains_on_all_as_the_error_says(tmp_path, tiny_model_dir):
    """A chat template nobody has a training variant of: assistant-only loss cannot find the answers and says so,
    naming `data.train_on: all`; with that setting the run prepares, every token a label."""
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    tokenizer.chat_template = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}### assistant: {% endif %}")
    path = write_jsonl(tmp_path / "d.jsonl", ROWS["messages"] * 2)
    with pytest.raises(PhituneError, match="set data.train_on: all"):
        prepare_data(_config(tmp_path, path, max_seq_length=64), tokenizer)
    cfg = _config(tmp_path, path, max_seq_length=64, train_on="all")
    rows = prepare_data(cfg, tokenizer).train.to_dataset()
    expected = tokenize_conversations(load_conversations(cfg).train, tokenizer, 64, train_on="all")
    assert rows["labels"] == rows["input_ids"] == expected.input_ids
    assert "### assistant: Paris." in tokenizer.decode(rows["input_ids"][0])
