"""The command line: parse, call one function, turn PhituneError into one line on stderr and exit code 2.

Heavy imports (torch, transformers) happen inside the commands, so `phitune --help` and config errors are instant.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from phitune.errors import PhituneError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune Microsoft Phi-3 with LoRA and QLoRA: one YAML file in, a standard PEFT adapter out.",
)
STATE = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show full tracebacks instead of one-line errors")):
    STATE["debug"] = debug
    setup_logging()


def setup_logging() -> None:
    """phitune's own messages through rich; the libraries' chatter down to warnings."""
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[RichHandler(show_path=False)])
    logging.getLogger("phitune").setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for noisy in ("bitsandbytes", "transformers.modeling_utils"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML file with model, data, training_config and peft_config"),
    set_: list[str] = typer.Option([], "--set", help="override a value: section.key=value (repeatable)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest complete checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a finished run in output_dir"),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="upload the adapter to this hub repo"),
):
    """Fine-tune as CONFIG says; writes the adapter, tokenizer, config, metrics.json and loss.png to output_dir."""
    from phitune.config import load_config
    from phitune.report import print_run_summary
    from phitune.train import run_training

    cfg = load_config(config, set_)
    result = run_training(cfg, resume=resume, overwrite=overwrite, push_to_hub=push_to_hub)
    print_run_summary(result)


@app.command()
def demo(
    output_dir: Path = typer.Option(Path("outputs/demo"), help="where the demo run is written"),
    set_: list[str] = typer.Option([], "--set", help="override a value of the demo config: section.key=value"),
):
    """Fine-tune the bundled tiny Phi-3 on the bundled chat data (CPU, offline, about a minute)."""
    from phitune.demo import run_demo

    run_demo(output_dir, set_)


def main() -> None:
    """Entry point: run the app, printing PhituneError as one line (a traceback only with --debug)."""
    try:
        app(standalone_mode=False)
    except PhituneError as exc:
        if STATE["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # click's usage errors and friends arrive here in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
