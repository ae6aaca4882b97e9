"""Data sources through the CLI: hub configs (data.subset, data_dir, data_files) read from a local dataset repository
laid out as on the hub, and lists of sources mixed by weight or rows for SFT, text, DPO and GRPO, each source read,
checked and cached on its own, the eval loss reported per source."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from phitune.cli import main
from phitune.tiny.phi3 import tiny_base_path

ROOT = Path(__file__).parents[1]
README = """---
configs:
- config_name: main
  data_files:
  - {split: train, path: main/train.jsonl}
  - {split: test, path: main/test.jsonl}
- config_name: socratic
  data_files:
  - {split: train, path: socratic/train.jsonl}
  - {split: test, path: socratic/test.jsonl}
---
# A GSM8K-shaped dataset: two configs, as openai/gsm8k has on the hub
"""


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def hub_repository(folder: Path) -> Path:
    """A dataset repository as `huggingface-cli download` leaves it: a README.md with `configs:`, files per config."""
    for subset, sizes in (("main", (40, 10)), ("socratic", (30, 6))):
        for split, n in zip(("train", "test"), sizes):
            write_jsonl(folder / subset / f"{split}.jsonl",
                        [{"question": f"[{subset}] What is {i} plus 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}
                         for i in range(n)])
    (folder / "README.md").write_text(README, encoding="utf-8")
    return folder


def chats(prefix: str, n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{prefix} question {i}?"},
                          {"role": "assistant", "content": f"{prefix} answer {i}."}]} for i in range(n)]


def alpaca(prefix: str, n: int) -> list[dict]:
    return [{"instruction": f"{prefix} task {i}", "output": f"{prefix} result {i}."} for i in range(n)]


def config_file(tmp_path: Path, data: dict, method: str = "sft", **extra) -> Path:
    completion = {"max_completion_length": 16, "num_generations": 2} if method == "grpo" else {}
    raw = {"method": method, "model": {"name_or_path": str(tiny_base_path()), "torch_dtype": "float32"},
           "data": {"max_seq_length": 128, "cache_dir": str(tmp_path / "cache"), **data},
           "training_config": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "per_device_train_batch_size": 4,
                               "logging_steps": 1, "save_steps": 2, "seed": 0, "disable_tqdm": True,
                               **completion},
           "peft_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}, **extra}
    path = tmp_path / f"{method}-{len(list(tmp_path.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@dataclass
class Result:
    exit_code: int
    output: str  # stdout and stderr


@pytest.fixture(autouse=True)
def _capture(capsys, monkeypatch):
    from phitune.terminal import console

    monkeypatch.setattr(console, "_width", 200)  # rich's console, whatever an earlier test left it at: tables uncut
    CAPTURE["capsys"] = capsys


CAPTURE: dict = {}


def phitune(*args: str) -> Result:
    """The CLI as a person runs it (phitune.cli.main: a PhituneError is one line and exit code 2), in this process."""
    capsys = CAPTURE["capsys"]
    capsys.readouterr()
    try:
        main(list(args))
    except SystemExit as stop:
        code = stop.code or 0
    printed = capsys.readouterr()
    return Result(code, printed.out + printed.err)


def phitune_data(config: Path, tmp_path: Path, *overrides: str):
    return phitune("data", str(config), *[a for o in overrides for a in ("--set", o)], "--output", str(tmp_path / "out"))


def source_rows(output: str) -> dict[str, list[str]]:
    """The per-source table of `phitune data`: source name -> its cells (rows, used, eval, tokens, asked, got, ...)."""
    table = output.split(" sources ", 1)[1]
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in table.splitlines() if line.startswith("│")]
    return {row[0]: row[1:] for row in cells}


GRPO = {"rewards": [{"name": "answer", "reference_pattern": "####\\s*(.+)"}]}


def test_subset_data_dir_and_data_files_read_a_hub_repository_through_load_dataset(tmp_path):
    repo = hub_repository(tmp_path / "gsm8k")
    config = config_file(tmp_path, {"train": str(repo), "subset": "main", "eval": str(repo), "eval_hub_split": "test",
                                    "prompt_template": "{question}"}, method="grpo", **GRPO)
    result = phitune_data(config, tmp_path)
    assert result.exit_code == 0, result.output
    assert re.search(r"train prompts\s*│\s*40\b", result.output) and re.search(r"eval prompts\s*│\s*10\b", result.output)
    assert "[main] What is 0 plus 1?" in result.output
    result = phitune_data(config, tmp_path, "data.subset=socratic")
    assert re.search(r"train prompts\s*│\s*30\b", result.output) and "[socratic] What is 0" in result.output
    result = phitune_data(config, tmp_path, "data.subset=null", "data.data_dir=socratic", "data.eval=null")
    assert result.exit_code == 0, result.output  # a folder of the repository, read as its own dataset
    assert "no warnings" in result.output
    assert re.search(r"train prompts\s*│\s*28\b", result.output)  # 30 rows, 5% (2) held out
    result = phitune_data(config, tmp_path, "data.subset=null", "data.data_files=main/test.jsonl", "data.eval=null")
    assert re.search(r"train prompts\s*│\s*9\b", result.output)
    result = phitune_data(config, tmp_path, "data.subset=mian")
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "Traceback" not in result.output
    assert "subset 'mian'" in result.output and "'main'" in result.output  # load_dataset's list of the configs


def test_the_gsm8k_example_reads_the_hub_config_directly(tmp_path):
    example = ROOT / "examples" / "phi4-mini-grpo-gsm8k.yaml"
    raw = yaml.safe_load(example.read_text(encoding="utf-8"))
    assert raw["data"]["train"] == "openai/gsm8k" and raw["data"]["subset"] == "main"
    repo = hub_repository(tmp_path / "gsm8k")  # the same config, offline: the repository's layout, not the network
    result = phitune_data(example, tmp_path, f"model.name_or_path={tiny_base_path()}", f"data.train={repo}",
                          f"data.eval={repo}", f"data.cache_dir={tmp_path / 'cache'}")
    assert result.exit_code == 0, result.output
    assert re.search(r"train prompts\s*│\s*40\b", result.output) and re.search(r"eval prompts\s*│\s*10\b", result.output)


def test_weights_give_their_shares_of_10000_rows_within_two_percent(tmp_path):
    from phitune.config.schema import load_config
    from phitune.data.prepare_mixture import prepare_sources
    from phitune.models.loading import load_tokenizer

    own = write_jsonl(tmp_path / "own.jsonl", chats("own", 2_500))
    general = write_jsonl(tmp_path / "general.jsonl", alpaca("general", 9_000))
    config = config_file(tmp_path, {"train": [{"path": str(own), "name": "own", "weight": 1},
                                              {"path": str(general), "name": "general", "weight": 3}],
                                    "eval_split": 0.0})
    result = phitune_data(config, tmp_path)
    assert result.exit_code == 0, result.output
    table = source_rows(result.output)
    assert table["own"][:2] == ["2,500", "2,500"] and table["general"][:2] == ["9,000", "7,500"]
    assert table["own"][4:6] == ["25.0%", "25.0%"] and table["general"][4:6] == ["75.0%", "75.0%"]
    assert "weights cap the mixture at 10,000 rows" in result.output  # general: 1,500 rows left unused, said
    cfg = load_config(config)  # the rows training gets, counted by their text
    tokenizer = load_tokenizer(cfg.model)
    train = prepare_sources(cfg.data, tokenizer).train.rows
    texts = tokenizer.batch_decode(train[:]["input_ids"])
    assert len(texts) == 10_000
    own_share = sum("own question" in text for text in texts) / len(texts)
    assert abs(own_share - 0.25) <= 0.02
    assert len(set(texts)) == 10_000  # a weight never repeats a row
    assert texts[:20] != sorted(texts[:20], key=lambda t: "general" in t)  # shuffled together, not one after another


def test_rows_take_exact_counts_repeating_a_small_source_for_dpo(tmp_path):
    pairs = ROOT / "src" / "phitune" / "assets" / "demo_preference"
    config = config_file(tmp_path, {"train": [{"path": str(pairs / "train.jsonl"), "name": "strings", "rows": 100},
                                              {"path": str(pairs / "eval.jsonl"), "name": "chats", "rows": 200}]},
                         method="dpo")
    result = phitune_data(config, tmp_path)
    assert result.exit_code == 0, result.output
    assert re.search(r"train pairs\s*│\s*300\b", result.output)
    table = source_rows(result.output)
    assert table["strings"][1] == "100" and table["chats"][1] == "200" and table["chats"][-1] == "repeated"
    assert "chats: its 95 rows are repeated to give the 200 asked (2.1 passes)" in result.output


def test_grpo_sources_have_their_own_config_and_prompt_template(tmp_path):
    repo = hub_repository(tmp_path / "gsm8k")
    config = config_file(tmp_path, {"train": [
        {"path": str(repo), "subset": "main", "prompt_template": "Q: {question}"},
        {"path": str(repo), "subset": "socratic", "prompt_template": "Think, then answer: {question}"}],
        "eval": [{"path": str(repo), "subset": "main", "split": "test", "prompt_template": "Q: {question}"}]},
        method="grpo", **GRPO)
    result = phitune_data(config, tmp_path)
    assert result.exit_code == 0, result.output
    table = source_rows(result.output)
    assert table["gsm8k/main"][:3] == ["40", "40", "0"] and table["gsm8k/socratic"][:3] == ["30", "30", "0"]
    assert re.search(r"eval prompts\s*│\s*10\b", result.output)


def test_a_text_source_mixes_with_another(tmp_path):
    corpus = ROOT / "src" / "phitune" / "assets" / "corpus.txt"
    notes = write_jsonl(tmp_path / "notes.jsonl", [{"text": f"Note {i}: the sky was grey on day {i}."}
                                                   for i in range(40)])
    config = config_file(tmp_path, {"train": [{"path": str(corpus), "weight": 0.9}, {"path": str(notes), "weight": 0.1}],
                                    "format": "text", "max_seq_length": 64})
    result = phitune_data(config, tmp_path)
    assert result.exit_code == 0, result.output
    table = source_rows(result.output)
    assert table["corpus"][4:6] == ["90.0%", "90.0%"] and table["notes"][4:6] == ["10.0%", "10.0%"]


def test_changing_a_weight_tokenizes_nothing_again(tmp_path):
    own = write_jsonl(tmp_path / "own.jsonl", chats("own", 60))
    general = write_jsonl(tmp_path / "general.jsonl", alpaca("general", 200))
    sources = [{"path": str(own), "weight": 1}, {"path": str(general), "weight": 1}]
    assert phitune_data(config_file(tmp_path, {"train": sources}), tmp_path).exit_code == 0
    entries = sorted(p.parent for p in (tmp_path / "cache").glob("*/meta.json"))
    assert len(entries) == 2  # one per source, none for the mixture
    stamps = [(e / "meta.json").stat().st_mtime_ns for e in entries]
    sources[1]["weight"] = 3
    result = phitune_data(config_file(tmp_path, {"train": sources}), tmp_path)
    assert result.exit_code == 0, result.output
    assert sorted(p.parent for p in (tmp_path / "cache").glob("*/meta.json")) == entries
    assert [(e / "meta.json").stat().st_mtime_ns for e in entries] == stamps
    assert source_rows(result.output)["own"][4] == "25.0%"


@pytest.mark.parametrize("sources, expected", [
    ([{"path": "own.jsonl", "weight": 1}, {"path": "general.jsonl"}],
     "data.train: give every source a weight (shares of the training rows) or none"),
    ([{"path": "own.jsonl", "weight": 1, "rows": 5}], "data.train[0] (own): give weight (a share) or rows (a count)"),
    ([{"path": "own.jsonl", "wieght": 1}], "data.train[0]: unknown key 'wieght' (did you mean 'weight'?)"),
    ([{"path": "own.jsonl", "format": "mesages"}], "got 'mesages' (did you mean 'messages'?)"),
    ([{"path": "own.jsonl", "split": "train[:50%]"}],
     "data.train[0] (own): split applies to a hub dataset or a dataset folder; own.jsonl is a file, read whole"),
    ([{"path": "own.jsonl", "data_files": "foo.jsonl"}], "data_files applies to a hub dataset or a dataset folder"),
    ([{"path": "own.jsonl"}, {"path": "empty"}], "empty: the folder holds no data files"),
    ([{"path": "own.jsonl", "rows": 0}], "data.train[0] (own): rows must be a positive whole number, got 0"),
    ([{"path": "own.jsonl"}, {"path": "bad.jsonl"}], "bad.jsonl:4: malformed JSON line"),
    ([{"path": "own.jsonl"}, {"path": "missing.jsonl"}], "data file not found: missing.jsonl (relative to "),
    ([{"path": "own.jsonl"}, {"path": "own.jsonl"}], "data.train: two sources are called 'own'"),
])
def test_each_source_is_checked_on_its_own_in_one_line(tmp_path, monkeypatch, sources, expected):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "own.jsonl", chats("own", 10))
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats("bad", 3)) + "{oops\n",
                                        encoding="utf-8")
    result = phitune("train", str(config_file(tmp_path, {"train": sources})))
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.strip().count("\n") == 0, result.output
    assert expected in result.output


def test_a_mixture_trains_and_reports_the_eval_loss_per_source(tmp_path):
    own = write_jsonl(tmp_path / "own.jsonl", chats("own", 40))
    general = write_jsonl(tmp_path / "general.jsonl", alpaca("general", 120))
    config = config_file(tmp_path, {"train": [{"path": str(own), "weight": 0.5}, {"path": str(general), "weight": 0.5}],
                                    "eval_split": 0.1})
    result = phitune("train", str(config))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_examples"] == 72 and metrics["eval_examples"] == 4 + 12  # 36 + 36 mixed; 10% of each held
    by_source = metrics["eval_loss_after_by_source"]
    assert set(by_source) == {"own", "general"} and all(loss > 0 for loss in by_source.values())
    overall = metrics["eval_loss_after"]  # the token-weighted mean of the two lies between them
    assert min(by_source.values()) - 1e-4 <= overall <= max(by_source.values()) + 1e-4
    assert "eval loss after (own)" in result.output
    saved = yaml.safe_load((tmp_path / "run" / "phitune_config.yaml").read_text())
    assert [Path(s["path"]).is_absolute() for s in saved["data"]["train"]] == [True, True]


def test_preference_and_grpo_sources_keep_their_format_detected(tmp_path):
    sources = [{"path": "pairs.jsonl", "format": "messages"}, {"path": "more.jsonl", "prompt_template": "{q}"}]
    result = phitune("train", str(config_file(tmp_path, {"train": sources}, method="dpo")))
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0, result.output
    assert ("data.prompt_template applies to method: grpo, not dpo; method dpo detects its rows itself; leave each "
            "source's format at auto") in result.output


def test_vision_sources_mix_and_show_their_table(tmp_path, caplog):
    """method vision reads a list of sources as the other methods do: each source's audio rows read and held out
    on its own, mixed by weight, the mixture logged by `phitune train` and tabled by `phitune data`."""
    import wave

    import numpy as np

    from phitune.tiny.vision import build_tiny_multimodal_model

    model = build_tiny_multimodal_model(tmp_path / "tiny-mm", ["Which tone? low high"])
    for name, hz, n in (("low", 220, 12), ("high", 880, 6)):
        pcm = (0.5 * np.sin(2 * np.pi * hz * np.arange(4000) / 16000) * 32767).astype(np.int16)
        with wave.open(str(tmp_path / f"{name}.wav"), "wb") as clip:
            clip.setnchannels(1), clip.setsampwidth(2), clip.setframerate(16000), clip.writeframes(pcm.tobytes())
        parts = [{"type": "audio", "path": f"{name}.wav"}, {"type": "text", "text": "Which tone?"}]
        write_jsonl(tmp_path / f"{name}.jsonl", [{"messages": [{"role": "user", "content": parts},
                                                               {"role": "assistant", "content": name}]}] * n)
    config = config_file(tmp_path, {"train": [{"path": str(tmp_path / "low.jsonl"), "weight": 2},
                                              {"path": str(tmp_path / "high.jsonl"), "weight": 1}],
                                    "eval_split": 0.2, "max_seq_length": 256},
                         method="vision", model={"name_or_path": str(model), "torch_dtype": "float32"})
    shown = phitune_data(config, tmp_path)
    assert shown.exit_code == 0, shown.output
    table = source_rows(shown.output)
    assert table["low"][:5] == ["10", "10", "2", "-", "66.7%"] and table["high"][:5] == ["5", "5", "1", "-", "33.3%"]
    assert re.search(r"train examples\s*│\s*15\b", shown.output)  # 10 of low's 10 and 5 of high's 5: 2 to 1 exactly
    trained = phitune("train", str(config))
    assert trained.exit_code == 0, trained.output
    assert "data mixture: low 10 of 10 rows (66.7%); high 5 of 5 rows (33.3%)" in caplog.text
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_audio"] == 15 and metrics["global_step"] == 2


def test_max_train_examples_caps_a_mixture_in_the_shares_asked(tmp_path):
    """A cap smaller than the mixture: 5 and 5 of a 1:1 mixture capped at 10 (it gave 6 and 4, and still warned that
    the weights capped the mixture at the scarcer source's size)."""
    own = write_jsonl(tmp_path / "own.jsonl", chats("own", 38))
    general = write_jsonl(tmp_path / "general.jsonl", alpaca("general", 28))
    config = config_file(tmp_path, {"train": [{"path": str(own), "weight": 1}, {"path": str(general), "weight": 1}],
                                    "eval_split": 0, "max_train_examples": 10})
    result = phitune_data(config, tmp_path)
    assert result.exit_code == 0, result.output
    table = source_rows(result.output)
    assert table["own"][1] == table["general"][1] == "5" and table["own"][5] == "50.0%"
    assert "the weights cap the mixture" not in result.output
