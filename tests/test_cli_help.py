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
