"""HTML the page shows, drawn here without a charting library or any file from the network: the loss chart as
inline SVG, the progress bar, the data doctor's example with trained characters marked, images inlined as data
URLs (so nothing is copied out of the folders to be served)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from phitune.ui.runs import RunProgress

COLORS = {"loss": "#1f77b4", "eval loss": "#d62728"}


def line_chart(series: dict[str, list[tuple[int, float]]], width: int = 640, height: int = 260) -> str:
    """Lines of (step, value) points on shared axes; the element says how many points it holds (data-points), so
    a test or a script can see it grow."""
    points = [p for values in series.values() for p in values]
    count = len(points)
    if not points:
        return '<div class="phitune-chart" data-points="0"><p>no loss logged yet</p></div>'
    pad = 40
    x_max = max(x for x, _ in points) or 1
    y_min, y_max = min(y for _, y in points), max(y for _, y in points)
    y_span = (y_max - y_min) or 1.0

    def xy(x, y):
        return (pad + x / x_max * (width - 2 * pad), height - pad - (y - y_min) / y_span * (height - 2 * pad))

    parts = [f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#888"/>',
             f'<text x="{pad}" y="{pad - 8}" font-size="11">{y_max:.3g}</text>',
             f'<text x="{pad}" y="{height - pad + 14}" font-size="11">{y_min:.3g}</text>',
             f'<text x="{width - pad}" y="{height - pad + 14}" font-size="11" text-anchor="end">step {x_max}</text>']
    for row, (name, values) in enumerate(series.items()):
        if not values:
            continue
        color = COLORS.get(name, "#2ca02c")
        coords = " ".join(f"{a:.1f},{b:.1f}" for a, b in (xy(x, y) for x, y in values))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>')
        parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.5" fill="{color}"/>' for a, b in (xy(x, y) for x, y in values)]
        parts.append(f'<text x="{width - pad}" y="{pad + 14 * row}" font-size="12" fill="{color}" '
                     f'text-anchor="end">{html.escape(name)} {values[-1][1]:.4g}</text>')
    svg = f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'
    return f'<div class="phitune-chart" data-points="{count}">{svg}</div>'


def progress_html(progress: RunProgress) -> str:
    """A progress bar and the console's line of numbers; data-state and data-step for tests and scripts."""
    total = max(progress.max_steps, 1)
    return (f'<div class="phitune-progress" data-state="{progress.state}" data-step="{progress.step}">'
            f'<div><b>{html.escape(str(progress.output_dir))}</b></div>'
            f'<progress value="{progress.step}" max="{total}" style="width:100%"></progress>'
            f'<div>{html.escape(progress.summary())}</div></div>')


def loss_chart(progress: RunProgress) -> str:
    return line_chart({"loss": progress.loss, "eval loss": progress.eval_loss})


def example_html(runs: list[tuple[str, bool]]) -> str:
    """The rendered example exactly, trained characters highlighted, masked ones grey."""
    spans = [f'<mark class="trained">{html.escape(text)}</mark>' if trained
             else f'<span class="masked">{html.escape(text)}</span>' for text, trained in runs]
    return ('<div class="phitune-example"><p>trained characters <mark class="trained">highlighted</mark>, masked '
            f'ones <span class="masked">grey</span>:</p><pre style="white-space:pre-wrap">{"".join(spans)}</pre></div>')


def image_html(path: Path | None, alt: str) -> str:
    """An image file inlined as a data URL; nothing when there is none."""
    if path is None or not Path(path).is_file():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" style="max-width:100%"/>'


def message_html(lines: list[str], kind: str = "error") -> str:
    """Problems (or notes) one per line, as the CLI prints them."""
    if not lines:
        return '<div class="phitune-ok" data-problems="0">no problems</div>' if kind == "error" else ""
    items = "".join(f"<li>{kind}: {html.escape(line)}</li>" for line in lines)
    return f'<ul class="phitune-{kind}" data-problems="{len(lines)}">{items}</ul>'


CSS = """
mark.trained { background: #c6f6c6; color: #064; }
span.masked { color: #999; }
.phitune-error { color: #b00020; }
"""
