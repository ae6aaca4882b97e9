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
