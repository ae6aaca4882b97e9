"""Console output of finished runs: rich tables, written once here so every command looks the same (the live
training console is phitune.run.console)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from phitune.errors import replacing
from phitune.terminal import console, format_duration, format_value


def _fmt(value) -> str:
    if isinstance(value, float):
        return format_value(value) if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def print_run_summary(result) -> None:
    """The metrics of a finished training run, with units, and where its files are."""
    table = Table(title=f"phitune run: {result.output_dir}", show_header=False)
    for label, value in run_summary_rows(result.metrics):
        table.add_row(label, value)
    console.print(table)
    console.print(f"adapter, tokenizer, metrics.json and loss.png are in [bold]{result.output_dir}[/bold]")


# metrics.json keys shown as "before -> after" (key_before, key_after), with their label and format; GRPO's
# reward_NAME keys (one per reward function) follow its total reward
BEFORE_AFTER = [("eval_loss", "eval loss", "loss"), ("perplexity", "perplexity", "loss"),
                ("preference_accuracy", "preference accuracy (held out)", "percent"),
                ("reward_margin", "reward margin (held out)", "loss"), ("chosen_logp", "log p(chosen)", "loss"),
                ("rejected_logp", "log p(rejected)", "loss"), ("logp_margin", "log-prob margin (held out)", "loss"),
                ("desirable_logp", "log p(desirable)", "loss"), ("undesirable_logp", "log p(undesirable)", "loss"),
                ("pairwise_accuracy", "pairwise accuracy (held out)", "percent"),
                ("score_margin", "score margin (held out)", "loss"), ("chosen_score", "score of chosen", "loss"),
                ("rejected_score", "score of rejected", "loss"),
                ("pass_rate", "pass rate (held out)", "percent"),
                ("reward", "reward (held out)", "loss"), ("kl_to_teacher", "KL to the teacher (held out)", "loss")]


def run_summary_rows(metrics: dict) -> list[tuple[str, str]]:
    """(label, value) rows of metrics.json for people: units, 4 significant digits, before -> after pairs; keys
    without a row of their own follow under their own names. GRPO's train loss is about 0 by construction: its
    held-out pass rate and rewards lead, and the loss follows with the other keys."""
    m = dict(metrics)
    rows = [("method", str(m.pop("method")))] if "method" in m else []
    rows.append(("steps", f"{m.pop('global_step', 0):,}"))
    # None (nothing trained in a resumed run) follows as "train loss -"
    if m.get("train_loss") is not None and ("method", "grpo") not in rows:
        rows.append(("train loss", format_value(m.pop("train_loss"))))
    rewards = [key[:-len("_after")] for key in m if key.startswith("reward_") and key.endswith("_after")
               and key != "reward_margin_after"]
    for key, label, kind in BEFORE_AFTER + [(key, f"{key.replace('_', ' ')} (held out)", "loss") for key in rewards]:
        before, after = m.pop(f"{key}_before", None), m.pop(f"{key}_after", None)
        if after is not None:
            rows.append((label, " -> ".join(format_value(v, kind) for v in (before, after) if v is not None)))
    for name, loss in (m.pop("eval_loss_after_by_source", None) or {}).items():  # a mixture's sources
        rows.append((f"eval loss after ({name})", format_value(loss, "loss")))
    if "train_runtime_s" in m:
        rows.append(("training time", format_duration(m.pop("train_runtime_s"))))
    tokens, speed = m.pop("train_tokens", None), m.pop("tokens_per_second", None)
    if tokens:
        rows.append(("tokens trained", f"{tokens:,}" + (f" ({speed:,.0f} tokens/s)" if speed else "")))
    trainable, total = m.pop("trainable_parameters", None), m.pop("total_parameters", None)
    if trainable is not None and total:
        rows.append(("trainable parameters", f"{trainable:,} of {total:,} ({trainable / total:.2%})"))
    streamed = " streamed" if m.pop("streaming", False) else ""
    rows.append(("examples", f"{m.pop('train_examples', 0):,}{streamed} train, {m.pop('eval_examples', 0):,} eval "
                             f"({m.pop('data_format', '?')} format)"))
    rows += [(key.replace("_", " "), _fmt(value)) for key, value in m.items()]
    return rows


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


EVAL_ROWS = [  # (metric key, label, higher is better)
    ("loss", "eval loss (assistant tokens)", False),
    ("perplexity", "perplexity", False),
    ("token_accuracy", "token accuracy", True),
    ("rougeL_f1", "ROUGE-L F1 (generated)", True),
    ("exact_match", "exact match (generated)", True),
    ("wer", "word error rate (generated, audio rows)", False),  # method vision, rows with audio: transcription
    ("bleu", "BLEU (generated, audio rows)", True),  # ... and speech translation; 0 to 100, so not in the chart
]
OPTIONAL_ROWS = ("wer", "bleu")  # shown only where a model has them


def print_eval_table(result) -> None:
    """Base and fine-tuned metrics side by side; the better value of each row in bold."""
    if getattr(result, "benchmarks", None):  # phitune eval --benchmarks (phitune.after.benchmarks)
        print_benchmark_table(result)
        return
    names = list(result.metrics)
    if {"preference_accuracy", "reward", "desirable_logp", "undesirable_logp", "pairwise_accuracy",
            "kl_to_teacher"} & set(result.metrics[names[0]]):
        print_preference_eval(result)
        return
    table = Table(title=f"phitune eval: {result.info.get('eval_examples')} eval conversations, "
                        f"{result.info.get('generated')} generated answers")
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    for key, label, higher in EVAL_ROWS:
        values = [result.metrics[n].get(key) for n in names]
        if key in OPTIONAL_ROWS and all(v is None for v in values):
            continue
        best = _best(values, higher) if len(names) > 1 else None
        table.add_row(label, *[f"[bold]{_fmt(v)}[/bold]" if i == best else _fmt(v) for i, v in enumerate(values)])
    console.print(table)
    console.print(f"eval.json, report.md and the chart are in [bold]{result.output_dir}[/bold]")


def benchmark_rows(benchmarks: dict) -> tuple[list[str], list[tuple]]:
    """(model names, rows): one row per benchmark with its main metric, version, example count and chat template."""
    names = list(dict.fromkeys(n for bench in benchmarks.values() for n in bench["scores"]))
    rows = []
    for task, bench in benchmarks.items():
        metric = bench["metric"] or "-"
        values = [bench["scores"].get(n, {}).get(bench["metric"]) for n in names]
        version = bench.get("version")
        rows.append((task, metric.replace(",none", ""), "-" if version is None else str(version), bench.get("examples"),
                     "yes" if bench.get("chat_template") else "no", values, bench.get("higher_is_better", True)))
    return names, rows


def print_benchmark_table(result) -> None:
    """lm-eval benchmarks, the models side by side; the better score of each row in bold."""
    names, rows = benchmark_rows(result.benchmarks)
    table = Table(title="phitune eval: lm-evaluation-harness benchmarks")
    # names and metrics wrap, never cut (80 columns: "phitune_f…"); short headers leave them the room
    table.add_column("benchmark", overflow="fold")
    table.add_column("metric", overflow="fold")
    for column in ("version", "n", "chat"):
        table.add_column(column, no_wrap=True)
    for name in names:
        table.add_column(name, justify="right", no_wrap=True)
    for task, metric, version, examples, chat, values, higher in rows:
        best = _best(values, higher) if len(names) > 1 else None
        table.add_row(task, metric, version, _fmt(examples), chat,
                      *[f"[bold]{_fmt(v)}[/bold]" if i == best else _fmt(v) for i, v in enumerate(values)])
    console.print(table)
    console.print(f"eval.json, report.md and the chart are in [bold]{result.output_dir}[/bold]")


def print_preference_eval(result) -> None:
    """The models side by side, one row per metric: preference accuracy, margin and summed log-probabilities (DPO /
    ORPO / SimPO), the desirable and undesirable completions' log-probabilities and their margin (KTO), a reward
    model's pairwise accuracy and score margin (reward), each reward's mean and the pass rate of greedy completions
    (GRPO), or the KL to the teacher and the held-out loss (distill); KTO, reward, GRPO and distill name their `unit`
    in info."""
    names = list(result.metrics)
    unit = result.info.get("unit", "held-out preference pairs")
    table = Table(title=f"phitune eval: {result.info['eval_examples']} {unit}")
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    for key in result.metrics[names[0]]:
        table.add_row(key, *[_fmt(result.metrics[name][key]) for name in names])
    console.print(table)
    console.print(f"eval.json is in [bold]{result.output_dir}[/bold]")


def _best(values: list, higher: bool) -> int | None:
    known = [(v, i) for i, v in enumerate(values) if v is not None]
    if not known or len({v for v, _ in known}) == 1:
        return None
    return (max(known) if higher else min(known))[1]


def plot_eval_chart(metrics: dict[str, dict[str, float]], path, benchmarks: dict | None = None) -> None:
    """Grouped bars per metric, one bar per model (perplexity left out: its scale dwarfs the rest); each lm-eval
    benchmark adds a group of its main score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(k, label.split(" (")[0]) for k, label, _ in EVAL_ROWS
            if k not in ("perplexity", "bleu") and any(k in m for m in metrics.values())]
    bars = {name: [values.get(k, 0.0) for k, _ in keys] for name, values in metrics.items()}
    names, rows = benchmark_rows(benchmarks or {})
    for name in list(bars) + [n for n in names if n not in bars]:
        scores = [values[names.index(name)] if name in names else None for *_, values, _ in rows]
        bars[name] = bars.get(name, [0.0] * len(keys)) + [score or 0.0 for score in scores]
    labels = [label for _, label in keys] + [f"{task}\n{metric}" for task, metric, *_ in rows]
    width = 0.8 / max(1, len(bars))
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(labels)), 3.5))
    for offset, (name, values) in enumerate(bars.items()):
        ax.bar([i + offset * width for i in range(len(labels))], values, width, label=name)
    ax.set_xticks([i + width * (len(bars) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with replacing(path) as partial:
        fig.savefig(partial, dpi=100)
    plt.close(fig)


def write_eval_markdown(result, path, chart_name: str, max_samples: int = 5) -> None:
    """report.md: what was evaluated, the metrics table, the lm-eval benchmarks, the chart, a few answers."""
    names = list(result.metrics)
    lines = [f"# phitune eval: {result.info.get('adapter') or result.info.get('model')}", ""]
    if names:
        lines += [f"Base model `{result.info.get('model')}`; {result.info.get('eval_examples')} eval conversations "
                  f"(teacher-forced), {result.info.get('generated')} generated answers (greedy, at most "
                  f"{result.info.get('max_new_tokens')} new tokens).", "",
                  "| metric | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
        for key, label, _ in EVAL_ROWS:
            if key in OPTIONAL_ROWS and all(result.metrics[n].get(key) is None for n in names):
                continue
            lines.append(f"| {label} | " + " | ".join(_fmt(result.metrics[n].get(key)) for n in names) + " |")
    lines += benchmark_markdown(getattr(result, "benchmarks", None) or {})
    lines += ["", f"![metrics]({chart_name})"] + (["", "## Sample answers", ""] if result.samples else [])
    for sample in result.samples[:max_samples]:
        lines.append(f"- **prompt:** {sample['prompt']}  \n  **reference:** {sample['reference']}")
        lines += [f"  \n  **{n}:** {sample[n]}" for n in names]
    with replacing(path) as partial:
        partial.write_text("\n".join(lines) + "\n", encoding="utf-8")


def limit_note(benchmarks: dict) -> str:
    """Which benchmarks ran under --limit: eval.json keeps benchmarks of earlier runs, each with its own limit (or
    none), so the note names the rows it covers unless it covers them all."""
    by_limit: dict = {}
    for task, bench in benchmarks.items():
        by_limit.setdefault(bench.get("limit"), []).append(task)
    if list(by_limit) == [None]:
        return ""
    if len(by_limit) == 1:
        return f"; at most {next(iter(by_limit))} examples per task (--limit)"
    return "".join(f"; {', '.join(tasks)}: " + ("every example (no --limit)" if limit is None else
                                                 f"at most {limit} examples per task (--limit)")
                   for limit, tasks in by_limit.items())


def benchmark_markdown(benchmarks: dict) -> list[str]:
    """report.md's lm-eval section: a row per benchmark (main metric, version, examples, chat template)."""
    if not benchmarks:
        return []
    names, rows = benchmark_rows(benchmarks)
    first = next(iter(benchmarks.values()))
    lines = ["", "## Benchmarks (lm-evaluation-harness)", "",
             f"lm-eval {first.get('harness', '?')}, {first.get('backend', 'hf')} backend{limit_note(benchmarks)}; a "
             "chat task's prompts go through the model's chat template.", "",
             "| benchmark | metric | version | examples | chat template | " + " | ".join(names) + " |",
             "| --- | --- | --- | ---: | --- |" + " ---: |" * len(names)]
    for task, metric, version, examples, chat, values, _ in rows:
        lines.append(f"| {task} | {metric} | {version} | {_fmt(examples)} | {chat} | "
                     + " | ".join(_fmt(v) for v in values) + " |")
    return lines


def print_merge_summary(result) -> None:
    """Where the merged model went and how it was made."""
    if result.dequantized:
        console.print("the adapter was trained on a 4-bit (QLoRA) base: it was merged into the unquantised base "
                      f"weights, reloaded in {result.dtype}")
    console.print(f"merged model saved to [bold]{result.output_dir}[/bold]: {result.dtype}, "
                  f"{result.size_bytes / 1e9:.2f} GB (loads with AutoModelForCausalLM.from_pretrained)")
    if result.hub_url:
        console.print(f"pushed to the hub: {result.hub_url}")


def print_data_report(report) -> None:
    """`phitune data`: format, counts, lengths, one example with its trained tokens bright, and the warnings."""
    from rich.text import Text

    table = Table(title=f"phitune data: {report.source}", show_header=False)
    for key, value in report.summary().items():
        table.add_row(key, _fmt(value))
    console.print(table)
    if getattr(report, "sources", None):
        console.print(sources_table(report.sources))
    text = Text()
    for piece, trained in report.example:
        text.append(piece, style="bold green" if trained else "dim")
    console.print("[bold]example[/bold] (trained tokens bright, masked tokens dim):")
    console.print(text)
    console.print(f"token-length histogram: [bold]{report.histogram}[/bold]")
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    if not report.warnings:
        console.print("[green]no warnings[/green]")


def sources_table(shares) -> Table:
    """`phitune data` on a mixture: per source, its training rows, the rows it gives the mixture (used) and their
    tokens, its eval rows, the share of the training rows asked and got, truncated rows, capped or repeated."""
    table = Table(title="sources")
    table.add_column("source", no_wrap=True, min_width=max(len(share.name) for share in shares))  # never cut
    for column in ("rows", "used", "eval", "tokens", "asked", "got", "truncated", "note"):
        table.add_column(column, justify="left" if column == "note" else "right")
    for share in shares:
        note = ("repeated" if share.used > share.available else "capped" if share.used < share.available else "")
        table.add_row(share.name, f"{share.available:,}", f"{share.used:,}", f"{share.eval_rows:,}",
                      "-" if share.tokens is None else f"{share.tokens:,}",
                      "all" if share.asked is None else f"{share.asked:.1%}", f"{share.got:.1%}",
                      "-" if share.truncated is None else f"{share.truncated:,}", note)
    return table


def plot_losses(log_history: list[dict], path: Path) -> None:
    """Train and eval loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for points, label, style in ((train, "train loss", "-"), (evals, "eval loss", "o--")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    else:  # a run shorter than logging_steps with no evaluation: say so, not matplotlib's warning on stderr
        ax.text(0.5, 0.5, "no loss was logged: the run had fewer steps than logging_steps", ha="center",
                va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
