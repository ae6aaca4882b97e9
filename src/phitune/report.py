"""Console output of finished runs: rich tables, written once here so every command looks the same."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

console = Console()


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def print_run_summary(result) -> None:
    """The metrics of a finished training run and where its files are."""
    table = Table(title=f"phitune run: {result.output_dir}", show_header=False)
    for key, value in result.metrics.items():
        table.add_row(key, _fmt(value))
    console.print(table)
    console.print(f"adapter, tokenizer, metrics.json and loss.png are in [bold]{result.output_dir}[/bold]")


def print_demo_summary(result, question: str, reference: str, before: str, after: str) -> None:
    """Eval loss before and after, and one held-out answer before and after fine-tuning."""
    m = result.metrics
    drop = 1 - m["eval_loss_after"] / m["eval_loss_before"]
    table = Table(title="phitune demo: tiny Phi-3, LoRA, bundled chat data")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("eval loss (assistant tokens)", _fmt(m["eval_loss_before"]), _fmt(m["eval_loss_after"]))
    table.add_row("perplexity", _fmt(m.get("perplexity_before")), _fmt(m.get("perplexity_after")))
    console.print(table)
    console.print(f"eval loss fell by [bold]{drop:.0%}[/bold] in {m['train_runtime_s']:.0f} s "
                  f"({m['trainable_parameters']:,} of {m['total_parameters']:,} parameters trained)")
    console.print(f"[bold]question:[/bold]  {question}")
    console.print(f"[bold]reference:[/bold] {reference}")
    console.print(f"[bold]before:[/bold]    {before!r}")
    console.print(f"[bold]after:[/bold]     {after!r}")
    console.print(f"adapter saved to [bold]{result.output_dir}[/bold]; "
                  f"try: phitune eval {result.output_dir}  /  phitune chat {result.output_dir}")
