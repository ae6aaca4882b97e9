"""The training console a person reads: a progress bar and one formatted line per log, never a raw dict; the final
table with units. Real short runs (SFT and DPO) on the tiny Phi-3, their console captured."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

import phitune.run.console
from phitune.after.report import run_summary_rows
from phitune.errors import PhituneError
from phitune.terminal import format_duration, format_value
from phitune.train import run_training

LOSS = r"(?:\d\.\d{3,4}|\d\d\.\d\d)"  # 4 significant digits: 5.375, or 10.37 (a random model on Phi-3's 32,064 tokens)
TRAIN_LINE = re.compile(rf"^step +(\d+)/(\d+)  loss {LOSS}  .*lr \d\.\d\de-\d\d  [\d,]+ tok/s  [\d a-z]+ left$", re.M)
EVAL_LINE = re.compile(rf"^step +\d+/\d+  eval loss {LOSS}  ", re.M)
RAW_DICT = re.compile(r"\{'\w+': ")  # what transformers prints per log: {'loss': '5.375', 'grad_norm': ...}


@pytest.fixture
def terminal(monkeypatch) -> io.StringIO:
    """phitune's console as a 150-column terminal writing into a buffer, so the live bar is drawn."""
    buffer = io.StringIO()
    monkeypatch.setattr(phitune.run.console, "console", Console(file=buffer, force_terminal=True, width=150,
                                                            color_system=None))
    return buffer


def test_sft_run_shows_a_bar_and_one_readable_line_per_log(make_config, terminal, capsys):
    result = run_training(make_config())  # 8 steps, a log every 2, an evaluation every 4
    # the live display redraws its line in place: each printed line follows a carriage return and an erase code
    text = "\n".join(re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal.getvalue())))
    printed = capsys.readouterr()
    lines = TRAIN_LINE.findall(text)
    assert [int(step) for step, _ in lines] == [2, 4, 6, 8] and {total for _, total in lines} == {"8"}
    assert len(EVAL_LINE.findall(text)) == 3  # at the start, step 4 and step 8
    bar = [line for line in text.splitlines() if line.startswith("training ")][-1]
    assert re.search(rf"━+ 8/8 loss {LOSS}  eval loss {LOSS}  lr \d\.\d\de-\d\d  [\d,]+ tok/s", bar), bar
    assert not RAW_DICT.search(text + printed.out + printed.err)
    assert result.metrics["global_step"] == 8


def test_dpo_lines_show_reward_margin_and_accuracy_not_a_dict(tiny_model_dir, tmp_path, capsys):
    """On a pipe (no terminal) there is no bar: the lines carry step / total, loss, lr, tokens/s and time left."""
    from test_preference import make_pairs, preference_config

    from conftest import write_jsonl

    files = write_jsonl(tmp_path / "train.jsonl", make_pairs(0, 16)), write_jsonl(tmp_path / "eval.jsonl",
                                                                                  make_pairs(1, 4))
    run_training(preference_config(tiny_model_dir, files, tmp_path / "run",
                                   training_config={"max_steps": 4, "logging_steps": 2, "save_strategy": "no"}))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [bool(TRAIN_LINE.match(line)) for line in lines] == [True, True, False], out
    assert EVAL_LINE.match(lines[2])  # the held-out pairs after training
    assert all(re.search(r"  reward accuracy \d+\.\d%  reward margin [+-]\d", line) for line in lines), out
    assert "token accuracy" not in out  # TRL logs it for DPO, on the chosen answers; DPO does not optimise it
    assert max(map(len, lines)) < 160  # a line a person reads (transformers' DPO dict: about 700 characters)
    assert not RAW_DICT.search(out) and "━" not in out


def test_numbers_and_durations_read_well():
    assert [format_value(v) for v in (6.27, "5.375", 528.6077, 12345.6, 0.0)] == \
        ["6.270", "5.375", "528.6", "12,346", "0.000"]
    assert format_value(4.333e-3, "rate") == "4.33e-03" and format_value(0.2409, "percent") == "24.1%"
    assert [format_value(v, "signed") for v in (0.01234, -0.5, 0.0)] == ["+0.0123", "-0.500", "+0.00"]
    assert [format_duration(s) for s in (0.4, 51.08, 185, 7620)] == ["0 s", "51 s", "3 min 05 s", "2 h 07 min"]


def test_summary_table_has_units_and_before_after():
    rows = dict(run_summary_rows({
        "train_loss": 5.977012, "train_runtime_s": 51.08, "train_tokens": 5267, "tokens_per_second": 3206.4,
        "global_step": 30, "trainable_parameters": 8128, "total_parameters": 171264, "eval_loss_after": 5.9204,
        "perplexity_after": 372.5765, "eval_loss_before": 6.2702, "perplexity_before": 528.6077,
        "data_format": "messages", "train_examples": 64, "eval_examples": 16, "skipped_rows": 0}))
    assert rows["training time"] == "51 s"
    assert rows["tokens trained"] == "5,267 (3,206 tokens/s)"
    assert rows["eval loss"] == "6.270 -> 5.920" and rows["perplexity"] == "528.6 -> 372.6"
    assert rows["trainable parameters"] == "8,128 of 171,264 (4.75%)"
    assert rows["train loss"] == "5.977" and rows["steps"] == "30" and rows["skipped rows"] == "0"


def test_chat_help_lists_the_commands_and_is_not_sent_to_the_model(tiny_model_dir):
    from typer.testing import CliRunner

    from phitune.after.generate import CHAT_COMMANDS
    from phitune.cli import app

    lines = "/help\n/rest\nhello\n/exit\n"
    result = CliRunner().invoke(app, ["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "4"], input=lines)
    assert result.exit_code == 0, result.output
    for command, what in CHAT_COMMANDS.items():
        assert f"{command:<7} {what}" in result.output
    assert "unknown command /rest; /help lists the commands" in result.output
    assert result.output.count("assistant>") == 1  # only "hello" went to the model


def test_a_failed_run_stops_the_bar_and_shows_the_cursor_again(make_config, terminal):
    """A NaN stop (like a second Ctrl-C or any exception) leaves trainer.train without on_train_end; the live bar must
    still stop, or the terminal is left with its cursor hidden (rich hides it while a bar is live)."""
    cfg = make_config(training_config={"learning_rate": 1e30, "max_steps": 6, "eval_strategy": "no"})
    with pytest.raises(PhituneError, match="NaN or infinite"):
        run_training(cfg)
    text = terminal.getvalue()
    hidden, shown = text.rfind("\x1b[?25l"), text.rfind("\x1b[?25h")
    assert hidden >= 0 and shown > hidden


def test_grpo_lines_and_summary_lead_with_the_rewards_not_the_loss(tiny_model_dir, tmp_path, capsys):
    """GRPO's loss is about 0 by construction (docs/grpo.md): each line shows the sampled completions' reward and
    each reward's mean instead, and the final table leads with the held-out pass rate and rewards, before -> after."""
    from test_grpo import grpo_config, make_prompts

    from conftest import write_jsonl
    from phitune.after.report import print_run_summary

    files = (write_jsonl(tmp_path / "train.jsonl", make_prompts(8)), write_jsonl(tmp_path / "eval.jsonl",
                                                                               make_prompts(4, 100)), tmp_path)
    cfg = grpo_config(tiny_model_dir, files, tmp_path / "run", rewards=[{"name": "answer", "extract": "text"},
                                                                       {"name": "length", "max_tokens": 4}],
                      training_config={"max_steps": 2, "save_strategy": "no"})
    print_run_summary(run_training(cfg))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and all(re.match(rf"step \d/2  reward -?{LOSS}  answer -?{LOSS}  length -?{LOSS}  ", line)
                                   for line in lines), out
    assert not any(" loss " in line for line in lines), out
    rows = [line.split("│")[1].strip() for line in out.splitlines() if line.count("│") == 3]
    assert rows[2:6] == ["pass rate (held out)", "reward (held out)", "reward answer (held out)",
                         "reward length (held out)"], rows
    assert "train loss" not in rows[:6]
