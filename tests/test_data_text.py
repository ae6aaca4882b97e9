"""data.format: text: raw documents packed into max_seq_length blocks with bos/eos between them, every token trained,
through the same cache, lifecycle and `phitune data` as chat data; on the real Phi-3 tokenizer and the tiny model."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from _resume import assert_resumed, watch_training
from conftest import write_jsonl
from phitune.config.schema import DataConfig, ModelConfig
from phitune.data.prepare import prepare_data
from phitune.errors import PhituneError
from phitune.tiny.phi3 import CORPUS

DOCS = ["Rivers run to the sea.\n\nThe sea does not fill; a second paragraph of the same document.",
        "A document that writes <|end|> and <|endoftext|> as plain text.",
        "Bengaluru is the capital of Karnataka: ಬೆಂಗಳೂರು."]


@pytest.fixture(scope="module")
def tokenizer(phi3_tokenizer_dir):
    from phitune.models.loading import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(phi3_tokenizer_dir)))


def text_folder(folder, documents):
    folder.mkdir()
    for index, text in enumerate(documents):
        (folder / f"doc{index:02d}.txt").write_text(text, encoding="utf-8")
    return folder


def test_blocks_are_the_documents_between_bos_and_eos_cut_to_max_seq_length(tmp_path, tokenizer):
    folder = text_folder(tmp_path / "docs", DOCS)
    data = prepare_data(DataConfig(train=str(folder), format="text", eval_split=0, max_seq_length=16,
                                   cache_dir=str(tmp_path / "cache")), tokenizer)
    rows = data.train.rows
    blocks = [np.asarray(ids) for ids in rows["input_ids"]]
    expected = []
    for text in DOCS:  # a .txt file is one document: its blank line stays inside it, no eos between paragraphs
        expected += [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False,
                                                         split_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    assert np.concatenate(blocks).tolist() == expected
    assert [len(b) for b in blocks[:-1]] == [16] * (len(blocks) - 1) and 2 <= len(blocks[-1]) <= 16
    assert all(labels == ids for labels, ids in zip(rows["labels"], rows["input_ids"]))  # every token trained
    assert expected.count(tokenizer.eos_token_id) == len(DOCS) and expected.count(tokenizer.bos_token_id) == len(DOCS)
    assert tokenizer.convert_tokens_to_ids("<|end|>") not in expected  # written text, not the end-of-turn token
    assert data.format == "text" and data.stats == {"documents": {"train": 3}}
    assert rows["stop"] == [bool(tokenizer.eos_token_id in ids) for ids in rows["input_ids"]]


def test_a_text_column_gives_the_same_blocks_as_txt_files_and_the_cache_is_reused(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    settings = dict(format="text", eval_split=0, max_seq_length=16, cache_dir=str(tmp_path / "cache"))
    jsonl = write_jsonl(tmp_path / "docs.jsonl", [{"text": t, "source": "x"} for t in DOCS])
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "docs.parquet")
    from_txt = prepare_data(DataConfig(train=str(text_folder(tmp_path / "docs", DOCS)), **settings), tokenizer)
    for source in (jsonl, tmp_path / "docs.parquet"):
        data = prepare_data(DataConfig(train=str(source), **settings), tokenizer)
        assert data.train.rows["input_ids"] == from_txt.train.rows["input_ids"]
        assert not data.reused and prepare_data(DataConfig(train=str(source), **settings), tokenizer).reused


def test_eval_split_holds_out_whole_blocks_of_a_single_file(tmp_path, tokenizer):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    data = prepare_data(DataConfig(train=str(corpus), format="text", eval_split=0.1, max_seq_length=64,
                                   cache_dir=str(tmp_path / "cache")), tokenizer)
    train, held = data.train.column("key"), data.eval.column("key")
    assert len(held) == round((len(train) + len(held)) * 0.1) and not np.isin(held, train).any()
    assert data.stats["documents"] == {"train": 1}


@pytest.mark.parametrize("case, expected", [
    ("no_text_column", "docs.jsonl: no `text` column (columns: body); data.format: text reads a `text` column"),
    ("empty_file", "empty.txt: the file is empty (no text); it needs the document's text (set data.on_bad_row"),
    ("no_txt_in_folder", "folder: the folder holds no .txt files"),
    ("blank_row", "docs.jsonl:2: empty `text` (set data.on_bad_row: skip"),
    ("not_a_string", "docs.jsonl:1: `text` is int, not a string (set data.on_bad_row: skip"),
])
def test_bad_text_sources_are_one_line_errors(tmp_path, tokenizer, case, expected):
    sources = {
        "no_text_column": lambda: write_jsonl(tmp_path / "docs.jsonl", [{"body": "x"}]),
        "empty_file": lambda: (tmp_path / "empty.txt").write_text("\n \n") and tmp_path / "empty.txt",
        "no_txt_in_folder": lambda: (tmp_path / "folder").mkdir() or tmp_path / "folder",
        "blank_row": lambda: write_jsonl(tmp_path / "docs.jsonl", [{"text": "a"}, {"text": " "}]),
        "not_a_string": lambda: write_jsonl(tmp_path / "docs.jsonl", [{"text": 3}, {"text": "a"}]),
    }
    source = sources[case]()
    with pytest.raises(PhituneError) as error:
        prepare_data(DataConfig(train=str(source), format="text", eval_split=0, cache_dir=str(tmp_path / "c")),
                     tokenizer)
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "c").exists() or not any(p.suffix == ".arrow" for p in (tmp_path / "c").rglob("*"))


def test_blank_rows_are_skipped_and_counted_with_on_bad_row_skip(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": "one"}, {"text": ""}, {"text": "two"}, {"text": None}])
    data = prepare_data(DataConfig(train=str(source), format="text", eval_split=0, on_bad_row="skip",
                                   cache_dir=str(tmp_path / "c")), tokenizer)
    assert data.stats["documents"]["train"] == 2
    assert data.skipped == [f"{source}:2: empty `text`", f"{source}:4: no `text`"]


def test_malformed_json_lines_are_skipped_and_listed_with_on_bad_row_skip(tmp_path, tokenizer):
    source = tmp_path / "docs.jsonl"
    source.write_text('{"text": "one"}\n{"text": \n{"text": "two"}\n', encoding="utf-8")
    data = prepare_data(DataConfig(train=str(source), format="text", eval_split=0, on_bad_row="skip",
                                   cache_dir=str(tmp_path / "c")), tokenizer)
    assert data.stats["documents"]["train"] == 2 and len(data.skipped) == 1
    assert data.skipped[0].startswith(f"{source}:2: malformed JSON line")


def test_a_tokenizer_whose_bos_is_its_eos_puts_only_the_eos_between_documents(tmp_path):
    """Phi-4-mini's bos and eos are both <|endoftext|>: one separator, not two."""
    from phitune.tiny.families import family_tokenizer

    tokenizer = family_tokenizer("phi-4-mini")
    assert tokenizer.bos_token_id == tokenizer.eos_token_id
    data = prepare_data(DataConfig(train=str(text_folder(tmp_path / "docs", DOCS[:2])), format="text", eval_split=0,
                                   max_seq_length=4096, cache_dir=str(tmp_path / "c")), tokenizer)
    [block] = data.train.rows["input_ids"]
    expected = [i for text in DOCS[:2] for i in tokenizer(text, add_special_tokens=False,
                                                          split_special_tokens=True)["input_ids"]
                + [tokenizer.eos_token_id]]
    assert block == expected


def test_a_txt_file_without_format_text_says_how_to_read_it(tmp_path, tokenizer):
    (tmp_path / "notes.txt").write_text("Some text.")
    with pytest.raises(PhituneError, match="set data.format: text"):
        prepare_data(DataConfig(train=str(tmp_path / "notes.txt"), cache_dir=str(tmp_path / "c")), tokenizer)


def weather_log(seed: int, count: int) -> list[str]:
    """Paragraphs of a made-up domain the tiny base never saw (it was pretrained on the bundled corpus): one frame,
    random stations, amounts and months, so held-out paragraphs share the frame and none of the sentences."""
    import random

    rng = random.Random(seed)
    months = ["January", "March", "May", "July", "September", "November"]
    return [" ".join(f"Station {rng.choice('KLMNPRSTV')}{rng.randint(1, 9)} logged {rng.randint(2, 99)} millimetres "
                     f"of rain in {rng.choice(months)}." for _ in range(6)) for _ in range(count)]


def corpus_split(tmp_path):
    """Train: 48 paragraphs as 4 .txt documents; held-out eval: 16 other paragraphs as rows of a JSONL."""
    paragraphs = weather_log(0, 64)
    folder = text_folder(tmp_path / "docs", ["\n\n".join(paragraphs[i:i + 12]) for i in range(0, 48, 12)])
    return folder, write_jsonl(tmp_path / "eval.jsonl", [{"text": p} for p in paragraphs[48:64]])


def test_training_on_text_lowers_the_held_out_text_loss(make_config, tmp_path):
    from phitune.api import inspect_data
    from phitune.train import run_training

    from phitune.tiny.phi3 import tiny_base_path

    train, held_out = corpus_split(tmp_path)
    cfg = make_config(model={"name_or_path": str(tiny_base_path())},
                      data={"train": str(train), "eval": str(held_out), "format": "text", "max_seq_length": 64,
                            "cache_dir": str(tmp_path / "cache")},
                      training_config={"max_steps": 12, "eval_steps": 12, "save_steps": 12})
    metrics = run_training(cfg).metrics
    saved = json.loads((cfg.output_dir / "metrics.json").read_text())
    assert saved["data_format"] == "text" and saved["train_examples"] == 64  # blocks, capped by max_train_examples
    assert (cfg.output_dir / "checkpoint-12").is_dir()
    # measured: 12.10 -> 4.35 in 12 steps at the fixture's learning rate 2e-2
    assert metrics["eval_loss_after"] < 0.5 * metrics["eval_loss_before"], metrics
    report = inspect_data(cfg)
    assert report.counts["documents (data.train)"] == 4 and report.counts["documents (data.eval)"] == 16
    assert report.counts["blocks (train)"] == 64 and report.summary()["tokens (train)"] == 64 * 64
    assert report.example[0][1] and report.example[0][0].startswith("<s>")  # a block: bos, every token trained


def test_a_text_run_resumes_from_its_checkpoint(make_config, tmp_path, monkeypatch):
    from phitune.train import run_training

    train, held_out = corpus_split(tmp_path)
    data = {"train": str(train), "eval": str(held_out), "format": "text", "max_seq_length": 64,
            "max_train_examples": 16, "cache_dir": str(tmp_path / "cache")}
    settings = {"lr_scheduler_type": "constant", "eval_strategy": "no", "save_steps": 2}
    runs = watch_training(monkeypatch)
    run_training(make_config(data=data, training_config={**settings, "max_steps": 2}))
    resumed = run_training(make_config(data=data, training_config={**settings, "max_steps": 4}), resume=True)
    assert_resumed(runs[-1], resumed.output_dir / "checkpoint-2", max_steps=4)
    assert resumed.metrics["global_step"] == 4


def test_phitune_eval_on_text_data_is_a_one_line_error():
    from phitune.data import load_conversations

    with pytest.raises(PhituneError, match="data.format: text has no conversations"):
        load_conversations(replace(DataConfig(train="x.txt"), format="text"))


def test_phitune_data_on_the_shipped_text_example_prints_documents_tokens_and_blocks(tmp_path):
    from pathlib import Path

    from typer.testing import CliRunner

    from phitune.cli import app

    root = Path(__file__).parents[1]
    example = root / "examples" / "tiny-phi3-text.yaml"
    overrides = [f"model.name_or_path={root / 'src/phitune/assets/tiny-phi3'}",
                 f"data.train={root / 'src/phitune/assets/corpus.txt'}", f"data.cache_dir={tmp_path / 'cache'}"]
    result = CliRunner().invoke(app, ["data", str(example), *[a for o in overrides for a in ("--set", o)],
                                      "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    for row in ("text", "documents (data.train)", "blocks (train)", "blocks (eval)", "tokens (train)"):
        assert row in result.output, row
    assert "<s>The word river" in result.output and "no warnings" in result.output


def test_phitune_data_then_train_stop_at_a_malformed_text_line_in_either_order(tmp_path):
    """`phitune data` prepares with on_bad_row: skip; the `phitune train` after it (default: error) reuses that
    entry and must stop at the malformed line as a fresh preparation does: exit 2 before it, and after it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    source = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": f"Document {n} about rivers and the sea."}) for n in range(45)]
    source.write_text("\n".join(lines[:40] + ['{"text": broken'] + lines[40:]) + "\n", encoding="utf-8")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(Path(__file__).parents[1] / "src/phitune/assets/tiny-phi3")},
        "data": {"train": str(source), "format": "text", "max_seq_length": 32, "cache_dir": str(tmp_path / "cache")},
        "training_config": {"output_dir": str(tmp_path / "run"), "max_steps": 1}}))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    results = [subprocess.run([sys.executable, "-m", "phitune.cli", command, str(config), *extra], env=env,
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
               for command, extra in (("train", []), ("data", ["--output", str(tmp_path / "plots")]), ("train", []))]
    assert [r.returncode for r in results] == [2, 0, 2], results[-1].stderr[-2000:]
    said = " ".join((results[1].stdout + results[1].stderr).split())  # rich wraps the warning at the terminal width
    assert (f"1 malformed row (an error in training (set data.on_bad_row: skip)); first: {source}:41: malformed "
            "JSON line") in said, said
    errors = [r.stderr.strip().splitlines()[-1] for r in (results[0], results[2])]
    assert errors[0] == errors[1] and errors[0].startswith(f"error: {source}:41: malformed JSON line"), errors
    assert "Traceback" not in results[0].stderr + results[2].stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("on_bad_row", ["skip", "error"])
def test_a_malformed_line_is_named_before_what_skipping_it_leaves(tmp_path, tokenizer, on_bad_row):
    """One good row and one malformed line: eval_split then leaves no training rows, but the line is the cause, so
    `phitune data` (which prepares with skip) names it first, as `phitune train` does."""
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text":"ok"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(PhituneError) as error:
        prepare_data(DataConfig(train=str(source), format="text", on_bad_row=on_bad_row,
                                cache_dir=str(tmp_path / "c")), tokenizer)
    assert str(error.value).startswith(f"{source}:2: malformed JSON line (")
    assert ("leaves no training rows" in str(error.value)) == (on_bad_row == "skip")


def test_an_empty_file_says_what_its_method_or_format_needs(tmp_path, tokenizer):
    from phitune.data.prompts import load_prompt_data

    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(PhituneError, match=r"empty.jsonl: the file is empty \(0 bytes\); it needs rows with a "
                                           r"`text` field \(or use .txt documents\)$"):
        prepare_data(DataConfig(train=str(empty), format="text", cache_dir=str(tmp_path / "c")), tokenizer)
    with pytest.raises(PhituneError, match=r"empty.jsonl: the file is empty \(0 bytes\); it needs prompt rows"):
        load_prompt_data(DataConfig(train=str(empty)))
