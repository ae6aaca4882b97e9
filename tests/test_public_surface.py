"""The public surface stays where the docs say it is, whatever moves inside the package: every `api.NAME` and
`lora.NAME` that README.md, docs/ or examples/ write resolves, phitune.lora keeps loralib's names, and the
`phitune` command keeps its subcommands (their --help is tests/test_cli_help.py)."""

from __future__ import annotations

import re
from pathlib import Path

import phitune.api
import phitune.lora

ROOT = Path(__file__).parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").glob("*.py")),
             ROOT / "examples" / "quickstart.ipynb"]
LORALIB_NAMES = ["LoRALayer", "Linear", "Embedding", "MergedLinear", "ConvLoRA", "Conv1d", "Conv2d", "Conv3d",
                 "mark_only_lora_as_trainable", "lora_state_dict"]  # loralib 0.1.2's own


def documented(module: str) -> set[str]:
    """`module.NAME` as the documents write it in code (a call or an attribute), file names such as api.py left out."""
    names = set()
    for path in DOCUMENTS:
        names |= set(re.findall(rf"\b{module}\.([A-Za-z_]\w*)\b(?!\.(?:py|md|yaml|pt)\b)", path.read_text()))
    return {name for name in names if name not in ("py", "md", "yaml", "pt")}


def test_every_documented_api_function_exists():
    names = documented("api")
    assert {"train", "evaluate", "generate", "chat", "merge", "load_run", "inspect_data"} <= names
    missing = sorted(name for name in names if not callable(getattr(phitune.api, name, None)))
    assert not missing, f"documented but not in phitune.api: {missing}"


def test_phitune_lora_keeps_loralib_names_and_the_documented_ones():
    names = documented("lora") - {"alpha"}  # `adapter.lora.alpha` in docs/export.md is a GGUF key, not a name
    missing = sorted(name for name in [*LORALIB_NAMES, *names] if not hasattr(phitune.lora, name))
    assert not missing, f"not in phitune.lora: {missing}"


def test_the_command_keeps_its_subcommands():
    from typer.main import get_command

    from phitune.cli import app

    assert {"train", "data", "eval", "chat", "generate", "merge", "export", "serve", "demo", "ui"} <= set(
        get_command(app).commands)
