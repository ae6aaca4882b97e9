"""The one rich console phitune writes to (rich's global one, which phitune's log handler also uses), and numbers
as a person reads them, and how much the libraries beneath may say. Everything that prints (the live training
console, the result tables, the logs) starts here."""

from __future__ import annotations

import logging
import math
import os
import warnings

from rich import get_console

console = get_console()


def format_value(value, kind: str = "loss") -> str:
    """A number as a person reads it: 4 significant digits (whole numbers from 1,000), a learning rate in e-notation, shares in percent."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(number):
        return str(number)
    if kind == "rate":
        return f"{number:.2e}"
    if kind == "percent":
        return f"{number:.1%}"
    if kind == "signed":
        return f"{number:+#.3g}"
    return f"{number:,.0f}" if abs(number) >= 1000 else f"{number:#.4g}"


def format_duration(seconds: float) -> str:
    """12 s, 3 min 05 s, 2 h 07 min."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def setup_logging(verbose: bool = False) -> None:
    """phitune's own messages through rich; the libraries' chatter (hub retries, load reports) only with --debug."""
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[RichHandler(show_path=False)])
    logging.getLogger("phitune").setLevel(logging.INFO)
    if os.environ.get("RANK", "0") != "0":  # under torchrun every worker would say the same: only rank 0 speaks
        logging.getLogger("phitune").setLevel(logging.ERROR)
        warnings.simplefilter("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        # Both libraries set their own log level when imported (inside the commands), so say it through the
        # environment they read then.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
        # transformers' weight-loading bars read this too; phitune's own console shows training progress
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        logging.getLogger("lm_eval").setLevel(logging.ERROR)  # `eval --benchmarks`: its set-up notes, per model
        # llama-cpp-python's log callback prints llama.cpp's messages when this logger's own level lets them through:
        # `export --quant` would print the quantiser's loader, some 80 lines (errors still show)
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        # transformers 5 renames gradient_checkpointing; the old names users write still work, so don't nag.
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
