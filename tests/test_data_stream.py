"""data.streaming: rows read, checked and tokenized as training takes them; the same examples as the Arrow cache,
a kill -9 resume that continues at the right row, `phitune data` on the first rows, one-line errors. Real `phitune
train` / `phitune data` processes on the tiny Phi-3 and the bundled chat data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from conftest import write_jsonl
from phitune.config.schema import DataConfig, ModelConfig
from phitune.run.checkpoints import latest_complete_checkpoint
from test_reliability import ADAPTER, DEMO_DATA, TRAIN_LINE, finish, start_train, wait_for, write_config

STREAM = {"streaming": True, "max_train_examples": None}


def phitune(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "phitune.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}, check=False)


@pytest.fixture(scope="module")
def tokenizer(phi3_tokenizer_dir):
    from phitune.models.loading import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(phi3_tokenizer_dir)), padding_side="right")


def test_a_streamed_example_is_the_cached_example(tmp_path, tokenizer):
    """Same ids and labels as the Arrow cache for every row, in the file's order; the held-out rows are the first
    ones, and training starts after them."""
    from phitune.data.prepare import prepare_data
    from phitune.data.stream import stream_splits

    train = str(DEMO_DATA / "train.jsonl")
    cached = prepare_data(DataConfig(train=train, eval_split=0, max_seq_length=64, cache_dir=str(tmp_path)), tokenizer)
    streamed, evals = stream_splits(DataConfig(train=train, max_seq_length=64, max_eval_examples=5, streaming=True),
                                    tokenizer)
    first = list(streamed.to_dataset().take(len(cached.train) - 5))
    rows = cached.train.rows
    assert [e["input_ids"] for e in first] == rows["input_ids"][5:]
    assert [e["labels"] for e in first] == rows["labels"][5:]
    assert evals.rows["input_ids"] == rows["input_ids"][:5]
    again = list(streamed.to_dataset().skip(len(cached.train) - 5).take(3))  # endless: max_steps ends the run
    assert [e["input_ids"] for e in again] == rows["input_ids"][5:8]


def test_a_hub_dataset_streams_through_load_dataset_as_the_cache_reads_it(tmp_path, tokenizer):
    """A dataset repository laid out as on the hub (a README with `configs:`, parquet shards in data/, as
    `huggingface-cli download` leaves it) streams through datasets.load_dataset(..., streaming=True), the same call a
    hub name takes: the same examples as the Arrow cache's non-streamed read, in order, each row named `repo: row N`."""
    import datasets

    from phitune.data.prepare import prepare_data
    from phitune.data.stream import raw_rows, stream_splits

    rows = [json.loads(line) for line in (DEMO_DATA / "train.jsonl").read_text().splitlines()][:30]
    repo = tmp_path / "chats-repo"
    (repo / "data").mkdir(parents=True)
    for shard in range(2):  # two shards: the stream reads them in order
        datasets.Dataset.from_list(rows[shard * 15:(shard + 1) * 15]).to_parquet(
            str(repo / "data" / f"train-0000{shard}-of-00002.parquet"))
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                    "    path: data/train-*\n---\n# chats\n", encoding="utf-8")
    first = next(iter(raw_rows(str(repo), "train", "messages")))
    assert first["where"] == f"{repo}: row 1" and json.loads(first["text"])["messages"] == rows[0]["messages"]
    cached = prepare_data(DataConfig(train=str(repo), eval_split=0, max_seq_length=64, cache_dir=str(tmp_path / "c")),
                          tokenizer)
    streamed, evals = stream_splits(DataConfig(train=str(repo), max_seq_length=64, max_eval_examples=5,
                                               streaming=True), tokenizer)
    assert len(cached.train) == 30
    assert [e["input_ids"] for e in streamed.to_dataset().take(25)] == cached.train.rows["input_ids"][5:]
    assert evals.rows["input_ids"] == cached.train.rows["input_ids"][:5]


def test_streamed_sources_keep_their_own_hub_config_and_format(tmp_path, tokenizer):
    """A streamed source passes its subset (and data_dir, data_files) to load_dataset as the cache does, so a dataset
    folder with several configs streams; and each streamed source keeps its own format: raw text mixes with chats."""
    from phitune.data.stream import preview_data, stream_splits

    rows = [json.loads(line) for line in (DEMO_DATA / "train.jsonl").read_text().splitlines()]
    repo = tmp_path / "repo"
    for subset in ("main", "other"):
        (repo / subset).mkdir(parents=True)
    write_jsonl(repo / "main" / "train.jsonl", rows[:20])
    write_jsonl(repo / "other" / "train.jsonl", rows[20:30])
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: main\n  data_files: main/train.jsonl\n"
                                    "- config_name: other\n  data_files: other/train.jsonl\n---\n", encoding="utf-8")
    streamed, evals = stream_splits(DataConfig(train=str(repo), subset="other", max_seq_length=64, streaming=True,
                                               max_eval_examples=2), tokenizer)
    assert len(list(streamed.to_dataset().take(8))) == 8 and len(evals) == 2
    notes = write_jsonl(tmp_path / "notes.jsonl", [{"text": f"Note {i}: the sky was grey on day {i}. " * 8}
                                                  for i in range(12)])
    mixture = DataConfig(train=[{"path": str(repo), "subset": "main", "weight": 1},
                                {"path": str(notes), "format": "text", "weight": 1}],
                         max_seq_length=32, streaming=True, max_eval_examples=4, max_train_examples=None)
    prepared = preview_data(mixture, tokenizer)
    assert prepared.format == "mixed (messages, text)" and prepared.samples  # the chat source's rows are shown
    streamed, evals = stream_splits(mixture, tokenizer)
    assert [name for name, _ in evals.groups] == ["repo/main", "notes"]
    labels = [e["labels"] for e in streamed.to_dataset().take(40)]
    assert any(-100 in row for row in labels) and any(-100 not in row for row in labels)  # chats masked, text not


def test_streamed_text_blocks_are_the_cached_blocks_within_a_batch(tmp_path, tokenizer):
    from phitune.data.prepare import prepare_data
    from phitune.data.stream import stream_splits

    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"Document {i} says {'la ' * i}."} for i in range(30)])
    settings = {"train": str(docs), "format": "text", "eval_split": 0, "max_seq_length": 16}
    cached = prepare_data(DataConfig(**settings, cache_dir=str(tmp_path / "cache")), tokenizer)
    streamed, evals = stream_splits(DataConfig(**settings, streaming=True), tokenizer)
    blocks = [e["input_ids"] for e in streamed.to_dataset().take(len(cached.train))]
    assert evals is None and blocks == cached.train.rows["input_ids"]


def test_a_streamed_run_trains_through_the_cli_without_a_cache(tiny_model_dir, tmp_path):
    """Held-out loss falls, metrics.json says it streamed and how many examples it trained, and nothing is written
    to the data cache."""
    config = write_config(tmp_path, tiny_model_dir, {**STREAM, "cache_dir": str(tmp_path / "cache"),
                                                     "eval_split": 0.05, "max_eval_examples": 8}, max_steps=8)
    code, stderr = finish(start_train(config))
    assert code == 0, stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["streaming"] is True and metrics["train_examples"] == 8 * 4 and metrics["eval_examples"] == 8
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert not (tmp_path / "cache").exists()
    scored = phitune("eval", str(tmp_path / "out"), "--num-generate", "1", "--max-new-tokens", "2")
    assert scored.returncode == 0, scored.stderr[-2000:]  # the same 8 held-out rows, the file not read whole
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["info"]["eval_examples"] == 8, report["info"]
    assert report["metrics"]["fine-tuned"]["loss"] == pytest.approx(metrics["eval_loss_after"], rel=1e-4)


@pytest.mark.processes
def test_a_killed_streamed_run_resumes_at_the_right_row_to_the_uninterrupted_adapter(tiny_model_dir, tmp_path):
    """kill -9 after checkpoint-4 of 12; the resumed run reads the 16 rows it had trained again, drops them, and
    trains rows 17-48 as the uninterrupted run did: the same adapter (rtol 1e-4)."""
    data = {**STREAM, "eval": str(DEMO_DATA / "eval.jsonl"), "max_eval_examples": 8}
    reference = start_train(write_config(tmp_path / "reference", tiny_model_dir, data))
    config = write_config(tmp_path / "killed", tiny_model_dir, data)
    out = tmp_path / "killed" / "out"
    proc = start_train(config, hold_at=4)
    wait_for(lambda: latest_complete_checkpoint(out) is not None, proc)
    proc.kill()
    proc.wait()
    assert latest_complete_checkpoint(out).name == "checkpoint-4" and not (out / "checkpoint-8").exists()

    code, stderr = finish(start_train(config, "--resume"))
    assert code == 0, stderr[-3000:]
    assert len(TRAIN_LINE.findall((tmp_path / "killed" / "resume.out").read_text())) == 8  # steps 5-12 only
    assert finish(reference)[0] == 0
    resumed, uninterrupted = load_file(out / ADAPTER), load_file(tmp_path / "reference" / "out" / ADAPTER)
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        np.testing.assert_allclose(resumed[name].numpy(), tensor.numpy(), rtol=1e-4, atol=1e-7, err_msg=name)


def test_phitune_data_on_a_stream_reports_its_first_rows_and_says_so(tiny_model_dir, tmp_path):
    rows = [json.loads(line) for line in (DEMO_DATA / "train.jsonl").read_text().splitlines()[:40]]
    train = write_jsonl(tmp_path / "train.jsonl", rows[:20] + [{"messages": "not a list"}] + rows[20:])
    config = write_config(tmp_path, tiny_model_dir, {**STREAM, "train": str(train), "max_train_examples": 30,
                                                     "eval_split": 0.05, "max_eval_examples": 4})
    result = phitune("data", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    out = " ".join(result.stdout.split())
    assert "streamed: rows read │ 30" in out and "train examples │ 25" in out and "eval examples │ 4" in out
    assert "skipped rows │ 1" in out and f"{train}:21" in out
    assert f"covers the first 30 rows of {train} only" in out


def test_a_bad_row_stops_a_streamed_run_when_reached_and_skip_counts_it(tiny_model_dir, tmp_path):
    rows = [json.loads(line) for line in (DEMO_DATA / "train.jsonl").read_text().splitlines()[:60]]
    train = write_jsonl(tmp_path / "train.jsonl", rows[:30] + [{"prompt": "no answer"}] + rows[30:])
    config = write_config(tmp_path, tiny_model_dir, {**STREAM, "train": str(train), "eval_split": 0}, max_steps=4)
    code, stderr = finish(start_train(config))
    assert code == 2 and stderr.strip().splitlines()[-1].startswith(f"error: {train}:31: "), stderr[-2000:]
    assert "data.on_bad_row: skip" in stderr.strip().splitlines()[-1]
    code, stderr = finish(start_train(config, "--on-bad-row", "skip", "--overwrite"))
    assert code == 0, stderr[-2000:]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["skipped_rows"] == 1


@pytest.mark.parametrize("change, expected", [
    ({"training_config": {"max_steps": None, "num_train_epochs": 1}}, "data.streaming needs training_config.max_steps"),
    ({"method": "dpo"}, "data.streaming applies to method: sft"),
    ({"data": {"train": "rows.json"}}, "rows.json is one JSON value, read whole"),
])
def test_what_streaming_cannot_do_is_one_line(tiny_model_dir, tmp_path, change, expected):
    config = write_config(tmp_path, tiny_model_dir, STREAM)
    raw = yaml.safe_load(config.read_text())
    for section, values in change.items():
        if isinstance(values, dict):
            raw[section] = {k: v for k, v in {**raw[section], **values}.items() if v is not None}
        else:
            raw[section] = values
    config.write_text(yaml.safe_dump(raw))
    result = phitune("train", str(config))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert expected in result.stderr


def sharegpt(rows: list[dict]) -> list[dict]:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in row["messages"]]}
            for row in rows]


def test_weighted_sources_interleave_by_weight_each_in_its_own_format(tmp_path, tokenizer):
    """data.train as a list: each source is encoded in its own format (messages, sharegpt), then examples are drawn
    3:1 by weight, the same sequence for the same data.seed (what a resume replays) and another for another seed."""
    from phitune.data.stream import StreamCounts, encoded, train_stream

    rows = [json.loads(line) for line in (DEMO_DATA / "train.jsonl").read_text().splitlines()]
    first = write_jsonl(tmp_path / "a.jsonl", rows[:300])
    second = write_jsonl(tmp_path / "b.jsonl", sharegpt(rows[300:]))
    settings = {"max_seq_length": 64, "streaming": True, "eval_split": 0}
    keys = {name: {e["key"] for e in encoded(str(path), "train", DataConfig(train=str(path), **settings), tokenizer)[0]}
            for name, path in (("a", first), ("b", second))}

    def drawn(seed: int) -> list[str]:
        cfg = DataConfig(train=[{"path": str(first), "weight": 3}, str(second)], seed=seed, **settings)
        stream, _, fmt = train_stream(cfg, tokenizer, StreamCounts())
        assert fmt == "mixed (messages, sharegpt)"
        return ["a" if e["key"] in keys["a"] else "b" for e in stream.take(400)]

    order = drawn(0)
    assert 0.69 <= order.count("a") / len(order) <= 0.81, order.count("a")
    assert drawn(0) == order and drawn(1) != order


def test_a_streamed_mixture_never_trains_its_held_out_examples(tmp_path, tokenizer):
    """Each source holds out its own first examples (max_eval_examples shared by weight) before the sources are
    mixed: a small source that ends first and starts over in the mixture never brings its held-out examples back
    (they were the mixture's first examples, and came back, when the held-out set was cut from the mixed stream).
    The eval set keeps each source's examples together for the eval loss per source."""
    from phitune.data.stream import stream_splits

    rows = [json.loads(line) for line in (DEMO_DATA / "train.jsonl").read_text().splitlines()]
    small = write_jsonl(tmp_path / "small.jsonl", rows[:12])
    large = write_jsonl(tmp_path / "large.jsonl", rows[12:112])
    cfg = DataConfig(train=[{"path": str(small), "weight": 3}, {"path": str(large), "weight": 1}], max_seq_length=64,
                     streaming=True, max_eval_examples=8)
    train, evals = stream_splits(cfg, tokenizer)
    held = set(evals.rows["key"])
    assert [(name, len(rows)) for name, rows in evals.groups] == [("small", 6), ("large", 2)]
    trained = [e["input_ids"] for e in train.stream.take(600)]  # the small source starts over many times in these
    held_ids = {tuple(ids) for ids in evals.rows["input_ids"]}
    assert len(held) == 8 and not held_ids & {tuple(ids) for ids in trained}


def test_phitune_data_on_a_small_streamed_mixture_reads_each_row_once_and_says_what_it_read(tmp_path, tokenizer):
    """The report counts the rows it read (not the cap), each source's rows once (training's mixture repeats a
    source that ends first; a report that did so showed duplicates the files do not have), and a set the held-out
    examples take whole is refused as training refuses it."""
    from phitune.data.stream import preview_data
    from phitune.errors import PhituneError

    rows = [json.loads(line) for line in (DEMO_DATA / "train.jsonl").read_text().splitlines()]
    small = write_jsonl(tmp_path / "small.jsonl", rows[:12])
    large = write_jsonl(tmp_path / "large.jsonl", rows[12:32])
    cfg = DataConfig(train=[{"path": str(small), "weight": 3}, {"path": str(large), "weight": 1}], max_seq_length=64,
                     streaming=True, max_eval_examples=4, max_train_examples=None)
    prepared = preview_data(cfg, tokenizer)
    assert prepared.stats["streamed_rows"] == 32 and len(prepared.eval) == 4
    assert len(prepared.train) == 28 and len(set(prepared.train.rows["key"])) == 28
    with pytest.raises(PhituneError, match=r"small.jsonl: no training examples left after the 12 held out for eval"):
        preview_data(DataConfig(train=str(small), max_seq_length=64, streaming=True), tokenizer)


def test_a_streamed_mixture_trains_through_the_cli_and_a_source_with_rows_is_refused(tiny_model_dir, tmp_path):
    rows = [json.loads(line) for line in (DEMO_DATA / "train.jsonl").read_text().splitlines()[:200]]
    first = write_jsonl(tmp_path / "a.jsonl", rows[:100])
    second = write_jsonl(tmp_path / "b.jsonl", sharegpt(rows[100:]))
    with open(second, "a", encoding="utf-8") as out:
        out.write('{"conversations": "not a list"}\n')  # read in the first batch: counted once, though mixed
    mixture = [{"path": str(first), "weight": 2}, {"path": str(second), "weight": 1}]
    config = write_config(tmp_path, tiny_model_dir, {**STREAM, "train": mixture, "eval_split": 0.05,
                                                     "max_eval_examples": 6, "on_bad_row": "skip"}, max_steps=3)
    code, stderr = finish(start_train(config))
    assert code == 0, stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["data_format"] == "mixed (messages, sharegpt)"
    assert set(metrics["eval_loss_after_by_source"]) == {"a", "b"}  # each source's own held-out examples
    assert metrics["skipped_rows"] == 1  # counted through the mixture (it copies each source's pipeline)
    counted = [{"path": str(first), "rows": 50}, {"path": str(second), "rows": 50}]  # a count needs the whole source
    refused = write_config(tmp_path / "rows", tiny_model_dir, {**STREAM, "train": counted}, max_steps=3)
    result = phitune("train", str(refused))
    assert result.returncode == 2 and "data.train[0]: a streamed source takes a weight, not rows" \
        in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_streamed_raw_text_trains_through_the_cli_on_held_out_blocks(tiny_model_dir, tmp_path):
    """A folder of .txt documents, streamed: the first 4 blocks are the eval set, training reads the blocks after."""
    from phitune.tiny.phi3 import CORPUS

    paragraphs = CORPUS.read_text(encoding="utf-8").split("\n\n")
    folder = tmp_path / "docs"
    folder.mkdir()
    for index in range(8):
        (folder / f"doc{index}.txt").write_text("\n\n".join(paragraphs[index * 6:(index + 1) * 6]), encoding="utf-8")
    config = write_config(tmp_path, tiny_model_dir, {**STREAM, "train": str(folder), "format": "text",
                                                     "max_seq_length": 64, "eval_split": 0.05,
                                                     "max_eval_examples": 4}, max_steps=4)
    code, stderr = finish(start_train(config))
    assert code == 0, stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["data_format"] == "text" and metrics["eval_examples"] == 4 and metrics["streaming"] is True
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]


def test_a_batch_of_bad_rows_only_is_skipped_whole(tmp_path, tokenizer):
    """With on_bad_row: skip, a stretch of bad rows longer than a batch gives an empty batch, not a crash; the stream
    goes on to the good rows after it and counts each bad row once."""
    from phitune.data.stream import BATCH, stream_splits

    rows = [json.loads(line) for line in (DEMO_DATA / "train.jsonl").read_text().splitlines()[:20]]
    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": "not a list"}] * (BATCH + 10) + rows)
    cfg = DataConfig(train=str(train), max_seq_length=64, eval_split=0, streaming=True, on_bad_row="skip")
    streamed, _ = stream_splits(cfg, tokenizer)
    assert len(list(streamed.to_dataset().take(40))) == 40  # two passes over the 20 good rows
    assert streamed.counts.skipped_rows == BATCH + 10
    assert streamed.counts.skipped[0].startswith(f"{train}:1: ")
