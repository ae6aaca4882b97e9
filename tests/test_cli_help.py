"""Every command's --help works (and imports nothing heavy that could fail)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from phitune.cli import app

COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)


def test_root_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("train", "demo", "eval", "chat", "generate", "merge", "export", "data"):
        assert name in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_usage_mistake_is_one_line_and_exit_code_2(capsys):
    """Through main(), as the installed `phitune` runs: with typer 0.16 (the lowest job) click's own exceptions
    arrive, with newer typers those of its vendored click; either is one line, not a traceback."""
    from phitune.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["trian"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: No such command 'trian'. Did you mean 'train'? (see: phitune --help)", err


def _help_texts(command) -> str:
    """What a command's --help is made of: its docstring and its options' and arguments' help strings."""
    return " ".join([command.help or "", *(getattr(param, "help", None) or "" for param in command.params)])


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_bracketed_words_as_written(command):
    """`pip install -e ".[ui]"` and "the [bench] extra" are commands to copy: no markup may eat their brackets
    (rich markup took `[ui]` for a style and printed `pip install -e "."`)."""
    import re

    import typer

    click_command = typer.main.get_command(app).commands[command]
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    shown = " ".join(result.output.split())
    for word in re.findall(r"\S*\[\w+\]\S*", _help_texts(click_command)):
        assert word in shown, f"{word!r} is not in `phitune {command} --help`:\n{result.output}"
