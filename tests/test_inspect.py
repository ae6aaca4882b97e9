"""phitune data: counts, truncation, the masked example, and each warning, with only a tokenizer on disk."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from _fixtures_eval import write_jsonl
from typer.testing import CliRunner

from phitune.config.schema import config_from_dict
from phitune.data.inspect import inspect_data
from phitune.tiny.phi3 import DEMO_DATA, tiny_base_path


def _tokenizer_dir(tmp_path: Path, pad: str, keep_unk: bool) -> Path:
    """The bundled tokenizer alone (no model weights), with its config's pad token (and unk) changed."""
    from transformers import AutoTokenizer

    folder = tmp_path / f"tok-{keep_unk}"
    AutoTokenizer.from_pretrained(tiny_base_path()).save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["pad_token"] = pad
    if not keep_unk:
        config.pop("unk_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _config(model: Path, train: Path, evals: Path | None = None, **data):
    return config_from_dict({"model": {"name_or_path": str(model)},
                             "data": {"train": str(train), "eval": str(evals) if evals else None, **data}})


def _chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_flags_pad_equal_to_eos_when_training_would_pad_with_eos(tmp_path):
    """Said, but not as "the model may never learn to stop; add a pad token": padding is masked by position and
    <|end|> ends each turn (docs/families.md). That advice was printed for the shipped tiny-phi4-mini-tools.yaml,
    whose bundled tokenizer the user cannot change (issue 35's stranger pass)."""
    model = _tokenizer_dir(tmp_path, pad="<|endoftext|>", keep_unk=False)
    report = inspect_data(_config(model, DEMO_DATA / "train.jsonl", DEMO_DATA / "eval.jsonl"), tmp_path)
    assert any("pads with its eos token ('<|endoftext|>'; it has no unk token): safe for phitune's training" in w
               and "trains <|end|> to end each turn" in w for w in report.warnings), report.warnings
    assert not any("may never learn to stop" in w for w in report.warnings)


def test_flags_raw_pad_equal_to_eos_that_phitune_replaces(tmp_path):
    model = _tokenizer_dir(tmp_path, pad="<|endoftext|>", keep_unk=True)
    report = inspect_data(_config(model, DEMO_DATA / "train.jsonl", DEMO_DATA / "eval.jsonl"), tmp_path)
    assert any("own config pads with its eos" in w for w in report.warnings)
    assert not any("pad token is the eos token" in w for w in report.warnings)


def test_bundled_demo_data_is_clean(tmp_path):
    report = inspect_data(_config(tiny_base_path(), DEMO_DATA / "train.jsonl", DEMO_DATA / "eval.jsonl"), tmp_path)
    assert report.warnings == []
    assert report.format == "messages"
    assert report.counts["train examples"] == 720 and report.counts["eval examples"] == 100
    assert report.histogram == tmp_path / "data_lengths.png" and report.histogram.stat().st_size > 0
    trained = "".join(text for text, keep in report.example if keep)
    assert "<|end|>" in trained  # the model learns to close its turn
    assert "<|user|>" not in trained


def test_flags_duplicates_leaks_empty_answers_truncation_and_missing_end(tmp_path):
    long_answer = " ".join(["word"] * 200)
    train = write_jsonl(tmp_path / "train.jsonl", [
        _chat("What colour is grass?", "Grass is green."),
        _chat("What colour is grass?", "Grass is green."),
        _chat("What colour is snow?", " "),
        _chat("Say many words.", long_answer),
    ])
    evals = write_jsonl(tmp_path / "eval.jsonl", [_chat("What colour is grass?", "Grass is green.")])
    report = inspect_data(_config(tiny_base_path(), train, evals, max_seq_length=64), tmp_path)
    text = " | ".join(report.warnings)
    assert "1 row has an empty assistant turn" in text and "train.jsonl:3" in text
    assert "1 train example is an exact duplicate of another" in text
    assert "1 eval example also appears in train" in text
    assert "train: 1 examples have no end-of-turn token" in text  # the long answer is cut before <|end|>
    assert report.truncated == {"train": 1, "eval": 0}
    assert report.counts["skipped rows"] == 1


def test_a_malformed_row_is_said_to_stop_training_unless_skipped(tmp_path):
    """`phitune data` reads past a malformed line and counted it as skipped; `phitune train` stops at it. The
    warning said only '1 other malformed row' (other than none; issue 35's stranger pass)."""
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps(_chat("What colour is grass?", "Grass is green.")) + "\n{\"messages\": [\n")
    report = inspect_data(_config(tiny_base_path(), train, DEMO_DATA / "eval.jsonl"), tmp_path)
    assert ("1 malformed row (an error in training (set data.on_bad_row: skip)); first: " in report.warnings[0]
            and "train.jsonl:2" in report.warnings[0]), report.warnings
    skipping = inspect_data(_config(tiny_base_path(), train, DEMO_DATA / "eval.jsonl", on_bad_row="skip"), tmp_path)
    assert "1 malformed row (skipped); first: " in skipping.warnings[0]


def test_data_command_prints_the_report(tmp_path):
    from phitune.cli import app

    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{name_or_path: {tiny_base_path()}}}\ndata: {{train: {DEMO_DATA / 'train.jsonl'}}}\n")
    result = CliRunner().invoke(app, ["data", str(config), "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "messages" in result.output and "no warnings" in result.output
    assert (tmp_path / "out" / "data_lengths.png").is_file()


@pytest.mark.parametrize("pad", ["<unk>"])
def test_no_pad_warning_for_phi3_conventions(tmp_path, pad):
    model = _tokenizer_dir(tmp_path, pad=pad, keep_unk=True)
    report = inspect_data(_config(model, DEMO_DATA / "eval.jsonl"), tmp_path)
    assert not any("pad" in w for w in report.warnings)


def test_statistics_are_read_from_the_prepared_columns_and_one_example_is_rendered(tmp_path, monkeypatch):
    """The counts equal a per-conversation count, yet no conversation list is tokenized: only the example is."""
    import phitune.data as data
    import phitune.data.inspect as inspect_module
    from phitune.data import load_conversations, render_with_mask, training_chat_template
    from phitune.data.encode import rendered_with_offsets
    from phitune.models.loading import load_tokenizer

    cfg = _config(tiny_base_path(), DEMO_DATA / "train.jsonl", max_seq_length=64, cache_dir=str(tmp_path / "c"))
    tokenizer = load_tokenizer(cfg.model)
    template = training_chat_template(tokenizer)
    lengths = sorted(len(render_with_mask(tokenizer, c, template)[0]) for c in load_conversations(cfg.data).train)
    rendered = []
    monkeypatch.setattr(data, "tokenize_conversations", lambda *a, **k: pytest.fail("tokenized in memory"))
    monkeypatch.setattr(inspect_module, "rendered_with_offsets",
                        lambda *a: rendered.extend(a[1]) or rendered_with_offsets(*a))
    summary = inspect_data(cfg, tmp_path).summary()
    assert len(rendered) == 1
    assert summary["tokens (train)"] == sum(lengths) and type(summary["tokens (train)"]) is int
    assert summary["length min / median / max"] == f"{lengths[0]} / {lengths[len(lengths) // 2]} / {lengths[-1]}"
    assert summary["truncated (train)"] == sum(n > 64 for n in lengths) > 0


def test_the_histogram_goes_to_the_data_cache_not_the_working_or_run_directory(tmp_path, monkeypatch):
    work, run = tmp_path / "work", tmp_path / "run"
    work.mkdir(), run.mkdir()
    (run / "phitune_complete").write_text("finished\n")
    monkeypatch.chdir(work)
    cfg = config_from_dict({"model": {"name_or_path": str(tiny_base_path())},
                            "data": {"train": str(DEMO_DATA / "eval.jsonl"), "cache_dir": str(tmp_path / "cache")},
                            "training_config": {"output_dir": str(run)}})
    report = inspect_data(cfg)
    assert report.histogram.parent.parent == tmp_path / "cache" and report.histogram.is_file()
    assert (report.histogram.parent / "meta.json").is_file()  # beside its own cache entry
    assert list(work.iterdir()) == [] and [p.name for p in run.iterdir()] == ["phitune_complete"]
    other = inspect_data(replace(cfg, data=replace(cfg.data, max_seq_length=48)))  # another config, same cache
    assert other.histogram != report.histogram and report.histogram.is_file() and other.histogram.is_file()


KANNADA = [{"role": "system", "content": "Answer in Kannada."},
           {"role": "user", "content": "What is the capital of Karnataka?"},
           {"role": "assistant", "content": "ಬೆಂಗಳೂರು  (Bengaluru)."},
           {"role": "user", "content": "ಕರ್ನಾಟಕದ ರಾಜಧಾನಿ ಯಾವುದು?"},
           {"role": "assistant", "content": "\n  ಬೆಂಗಳೂರು.\tಹೌದು 🎉"}]


def test_example_is_the_rendered_text_exactly_with_trained_runs_by_character(phi3_tokenizer_dir):
    """On the real Phi-3 tokenizer: SentencePiece word marks and byte-fallback pieces never reach the display."""
    from transformers import AutoTokenizer

    from phitune.data import training_chat_template
    from phitune.data.inspect import example_runs

    tokenizer = AutoTokenizer.from_pretrained(phi3_tokenizer_dir)
    runs = example_runs(tokenizer, KANNADA, training_chat_template(tokenizer))
    assert "".join(text for text, _ in runs) == tokenizer.apply_chat_template(KANNADA, tokenize=False)
    assert [text for text, trained in runs if trained] == ["ಬೆಂಗಳೂರು  (Bengaluru).<|end|>", "ಬೆಂಗಳೂರು.\tಹೌದು 🎉<|end|>"]
    everything = example_runs(tokenizer, KANNADA, training_chat_template(tokenizer), train_on="all")
    assert everything == [(tokenizer.apply_chat_template(KANNADA, tokenize=False), True)]


def test_data_command_prints_a_kannada_conversation_exactly(tmp_path, phi3_tokenizer_dir):
    """The issue's case: spaces gone and byte pieces shown as U+FFFD when each token was decoded alone. (Tabs are
    left out here: rich expands them to spaces on a terminal; example_runs keeps them, as the test above shows.)"""
    from phitune.cli import app

    chat = [dict(m, content=m["content"].replace("\t", " ")) for m in KANNADA]
    train = write_jsonl(tmp_path / "kn.jsonl", [{"messages": chat}])
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{name_or_path: {phi3_tokenizer_dir}}}\n"
                      f"data: {{train: {train}, eval_split: 0, cache_dir: {tmp_path / 'cache'}}}\n")
    result = CliRunner().invoke(app, ["data", str(config), "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    shown = ("<|system|>\nAnswer in Kannada.<|end|>\n<|user|>\nWhat is the capital of Karnataka?<|end|>\n"
             "<|assistant|>\nಬೆಂಗಳೂರು  (Bengaluru).<|end|>\n<|user|>\nಕರ್ನಾಟಕದ ರಾಜಧಾನಿ ಯಾವುದು?<|end|>\n"
             "<|assistant|>\n\n  ಬೆಂಗಳೂರು. ಹೌದು 🎉<|end|>\n<|endoftext|>")
    assert shown in result.output
    assert "\ufffd" not in result.output and "\u2581" not in result.output
