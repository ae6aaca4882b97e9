"""The one rich console phitune writes to (rich's global one, which phitune's log handler also uses), and numbers
as a person reads them. Everything that prints (the live training console, the result tables) starts here."""

from __future__ import annotations

import math

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
