"""Standard benchmarks: lm-evaluation-harness tasks on the base and the fine-tuned model side by side.

    phitune eval RUN --benchmarks gsm8k,ifeval [--limit N]

Did fine-tuning break the model elsewhere? lm-eval (the `bench` extra) runs the tasks; phitune loads the models as
every other command does (`load_for_inference`: dtype, 4-bit, GPU) and hands them to lm-eval's HF backend, the
base first and then the same weights with the run's adapter attached, so both columns see identical prompts. A
task whose answers are generated (lm-eval's `generate_until`: gsm8k, ifeval) is a chat task and gets the chat
template, as an instruct model is used; multiple-choice tasks (mmlu, arc) score the plain prompt, as lm-eval
publishes them. On CUDA with vLLM installed, lm-eval's vllm backend runs both columns instead (the adapter as a
LoRA request). A NAME is an lm-eval task, group or tag, or the path of a task YAML file; a local task's relative
`data_files` are read from the YAML's own folder (lm-eval alone reads them from the current directory), so the file
works from wherever it is named.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import re
import sys
from importlib.metadata import version
from pathlib import Path

from phitune.errors import PhituneError, pip_install

BENCH_EXTRA = pip_install("bench")
CHAT_OUTPUT_TYPES = ("generate_until",)  # tasks where the model writes an answer, as to a user

log = logging.getLogger("phitune")


def parse_benchmark_names(text: str) -> list[str]:
    """"gsm8k, mmlu" -> ["gsm8k", "mmlu"]; an empty list is an error."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise PhituneError("--benchmarks needs at least one lm-eval task name, e.g. --benchmarks gsm8k,ifeval")
    return list(dict.fromkeys(names))


def task_manager(names: list[str]):
    """lm-eval's TaskManager; its index of every shipped task (about 15,000, several seconds to build) only when a
    NAME is not a YAML file. A one-line error when lm-eval is missing."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise PhituneError(f"--benchmarks runs lm-evaluation-harness, which is not installed: {BENCH_EXTRA}") from None
    return TaskManager(include_defaults=not all(_is_yaml(name) for name in names))


def _is_yaml(name: str) -> bool:
    return name.endswith((".yaml", ".yml"))


def check_benchmark_names(names: list[str], manager) -> None:
    """Every NAME is a task, group or tag lm-eval knows, or a task YAML file; else one line with the closest names."""
    for name in names:
        if _is_yaml(name) and not Path(name).is_file():
            raise PhituneError(f"benchmark file not found: {name}")
        if _is_yaml(name) or name in manager.all_tasks:
            continue
        close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "`lm-eval ls tasks` lists them"
        raise PhituneError(f"unknown benchmark {name!r} (not an lm-eval task, group or tag); {hint}")


def load_benchmarks(names: list[str], manager) -> list[dict]:
    """Build each NAME's tasks once (their datasets are read here): [{name, objects, leaves, chat}] in order, one
    entry per task or group the NAME stands for (a tag: each of its tasks)."""
    loaded = []
    for spec in names:
        try:
            built = _build(spec, manager)
        except (FileNotFoundError, ValueError, KeyError) as exc:  # a missing data file, a malformed YAML
            raise PhituneError(f"benchmark {spec}: {str(exc).splitlines()[0]}") from None
        except ConnectionError as exc:  # datasets' own, and huggingface_hub's OfflineModeIsEnabled
            raise PhituneError(hub_unreachable(spec, str(exc))) from None
        tasks, groups = built["tasks"], built["groups"]
        children = {child for members in built["group_map"].values() for child in members}
        for top in [g for g in groups if g not in children] or list(tasks):
            item = groups.get(top) or tasks[top]
            leaves = {t.task_name: t for t in item.get_all_tasks()} if top in groups else {top: item}
            loaded.append(dict(name=top, objects=[item], leaves=leaves,
                               chat=any(t.config.output_type in CHAT_OUTPUT_TYPES for t in leaves.values())))
    return loaded


def hub_unreachable(spec: str, said: str) -> str:
    """What to do when a task's data must come from the hub and the hub cannot be reached (offline, or
    HF_HUB_OFFLINE=1 with nothing cached): datasets says "Couldn't reach 'openai/gsm8k' on the Hub (...)"."""
    found = re.search(r"'([^'\s]+)'", said)  # the name in quotes (not the one of "Couldn't")
    dataset = f" ({found.group(1)})" if found else ""
    return (f"benchmark {spec}: its data{dataset} is on the Hugging Face Hub, which cannot be reached; run it once "
            "online to fill the datasets cache (HF_DATASETS_OFFLINE=1 then reads the cache), or name a local task "
            "YAML file (docs/benchmarks.md)")


def _build(spec: str, manager) -> dict:
    """lm-eval's tasks for `spec`, their data read now. A task YAML runs in its own folder, so that its relative
    `data_files` mean what its author saw next to it; one whose files are relative to the current directory
    (lm-eval's own reading) still loads from there."""
    if not _is_yaml(spec):
        with quiet_unless_debug():
            return manager.load([spec])
    here, path = Path.cwd(), Path(spec).resolve()
    try:
        os.chdir(path.parent)
        with quiet_unless_debug():
            return manager.load([str(path)])
    except FileNotFoundError:
        os.chdir(here)
        with quiet_unless_debug():
            return manager.load([str(path)])
    finally:
        os.chdir(here)


@contextlib.contextmanager
def quiet_unless_debug():
    """Silence stderr (file descriptor 2) around lm-eval's work: the progress bars of datasets and lm-eval (about
    ten per run) and the message of the git it calls (`fatal: not a git repository`) would bury phitune's table.
    Silenced only where lm-eval's own logger is told to say no more than errors, as the CLI does unless --debug;
    errors still arrive as exceptions."""
    if logging.getLogger("lm_eval").isEnabledFor(logging.WARNING):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def stop_at_end_of_turn(benchmarks: list[dict], stops: list[str]) -> None:
    """Add the model's end-of-turn strings (Phi-3: `<|end|>`) to each chat task's stop strings, which hub tasks
    write for other models (gsm8k: "Question:", "<|im_end|>"; ifeval none, up to 1,280 tokens). Generation also
    ends at the eos ids of the model's generation config (Phi-3's list `<|end|>`); this covers a base whose list
    lacks it, whose answers would otherwise run on past their turn into text the metric scores."""
    for bench in benchmarks:
        for task in bench["leaves"].values() if bench["chat"] else ():
            if task.config.output_type not in CHAT_OUTPUT_TYPES:
                continue
            until = (task.config.generation_kwargs or {}).get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            task.set_config("generation_kwargs", {"until": until + [s for s in stops if s not in until]}, update=True)


def end_of_turn_strings(model_cfg) -> list[str]:
    """The tokens generation stops at (eos, `<|end|>`), as text: phitune.after.generate.stop_token_ids."""
    from phitune.after.generate import stop_token_ids
    from phitune.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model_cfg)
    return tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer))


def run_benchmarks(run_dir: Path | None, model: str | None, adapter: Path | None, names: list[str],
                   limit: int | None = None, batch_size: int = 8, output: Path | None = None):
    """Run `names` on the base model and base + adapter; write eval.json, report.md and eval.png; return EvalResult.

    Checks every name before any weight is loaded. The results of an earlier `phitune eval` in the same
    directory (its metrics, other benchmarks) are kept: a benchmark of the same name is replaced."""
    from phitune.after.generate import refuse_reward_model, resolve_model_source

    manager = task_manager(names)
    check_benchmark_names(names, manager)
    model_cfg, adapter_dir = resolve_model_source(run_dir, model, adapter)
    refuse_reward_model(adapter_dir)
    benchmarks = load_benchmarks(names, manager)
    stop_at_end_of_turn(benchmarks, end_of_turn_strings(model_cfg))
    models = ("base", "fine-tuned") if adapter_dir is not None else ("model",)
    raw, backend = {}, "hf"
    for label, lm, backend in _models(model_cfg, adapter_dir, batch_size):
        raw[label] = {b["name"]: _evaluate(lm, b, limit, batch_size, manager) for b in benchmarks}
    table = collect_scores(raw, benchmarks, models, backend, limit)
    out = Path(output or run_dir or Path.cwd())
    info = dict(model=model_cfg.name_or_path, adapter=str(adapter_dir) if adapter_dir else None)
    return write_benchmark_results(out, table, info)


def _models(model_cfg, adapter_dir: Path | None, batch_size: int):
    """Yield (label, lm-eval model, backend) for the base and, with an adapter, the fine-tuned model."""
    import torch

    if torch.cuda.is_available() and _vllm_installed() and not model_cfg.quantization:
        yield from _vllm_models(model_cfg, adapter_dir)
        return
    from lm_eval.models.huggingface import HFLM

    from phitune.after.generate import attach_adapter, load_for_inference

    loaded, tokenizer = load_for_inference(model_cfg)
    yield ("base" if adapter_dir else "model"), HFLM(pretrained=loaded, tokenizer=tokenizer,
                                                     batch_size=batch_size), "hf"
    if adapter_dir is not None:
        tuned = attach_adapter(loaded, adapter_dir).eval()
        yield "fine-tuned", HFLM(pretrained=tuned, tokenizer=tokenizer, batch_size=batch_size), "hf"


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _vllm_models(model_cfg, adapter_dir: Path | None):
    """One vLLM engine for both columns: the base without a LoRA request, then with the run's adapter as one.
    Not run in phitune's CI (no GPU there); lm-eval's VLLM takes the adapter as `lora_local_path`."""
    from lm_eval.models.vllm_causallms import VLLM

    args = dict(pretrained=model_cfg.name_or_path, dtype=model_cfg.torch_dtype or "auto")
    if adapter_dir is None:
        yield "model", VLLM(**args), "vllm"
        return
    rank = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")).get("r", 16)
    lm = VLLM(**args, lora_local_path=str(adapter_dir), max_lora_rank=_vllm_rank(rank))
    request, lm.lora_request = lm.lora_request, None
    yield "base", lm, "vllm"
    lm.lora_request = request
    yield "fine-tuned", lm, "vllm"


def _vllm_rank(rank: int) -> int:
    """vLLM accepts max_lora_rank from a fixed list (8, 16, 32, 64, ...): the smallest that holds `rank`."""
    return next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), rank)


def _evaluate(lm, benchmark: dict, limit: int | None, batch_size: int, manager) -> dict:
    import lm_eval

    with quiet_unless_debug():
        return lm_eval.simple_evaluate(model=lm, tasks=benchmark["objects"], task_manager=manager, limit=limit,
                                       batch_size=batch_size, apply_chat_template=benchmark["chat"],
                                       fewshot_as_multiturn=benchmark["chat"], bootstrap_iters=0, log_samples=False)


def collect_scores(raw: dict, benchmarks: list[dict], models: tuple, backend: str, limit: int | None) -> dict:
    """{benchmark: {version, examples, chat_template, metric, higher_is_better, scores: {model: {metric: value}},
    tasks: {leaf: {version, examples, scores}}}} from lm-eval's results of each model. A group's scores are its own
    aggregate (none for a group that does not aggregate: its tasks' scores are under `tasks`)."""
    table = {}
    for bench in benchmarks:
        name, first = bench["name"], raw[models[0]][bench["name"]]
        scores = {m: _metrics(raw[m][name]["results"].get(name, {})) for m in models}
        metric = next(iter(scores[models[0]]), None)
        leaves = {leaf: dict(version=first["versions"].get(leaf), examples=first["n-samples"][leaf]["effective"],
                             scores={m: _metrics(raw[m][name]["results"].get(leaf, {})) for m in models})
                  for leaf in bench["leaves"] if leaf in first["n-samples"]}
        higher = first.get("higher_is_better", {}).get(name) or {}
        table[name] = dict(version=first["versions"].get(name), examples=sum(v["examples"] for v in leaves.values()),
                           chat_template=bench["chat"], metric=metric, backend=backend, limit=limit,
                           harness=version("lm_eval"),
                           higher_is_better=higher.get(metric.split(",")[0], True) if metric else True,
                           scores=scores, tasks=leaves)
    return table


def _metrics(entry: dict) -> dict:
    """The scores of one lm-eval result entry, e.g. {"exact_match,strict-match": 0.42}: no stderr, no labels."""
    return {k: v for k, v in entry.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))}


def write_benchmark_results(out: Path, table: dict, info: dict):
    """eval.json, report.md and eval.png; return the EvalResult. An earlier eval.json in `out` is kept (its
    metrics, samples and other benchmarks): a benchmark of the same name is replaced."""
    from phitune.after.evaluate import CHART_PNG, REPORT_MD, EvalResult, read_eval_json, save_eval_json
    from phitune.after.report import plot_eval_chart, write_eval_markdown

    earlier = read_eval_json(out)
    result = EvalResult(metrics=earlier.get("metrics") or {}, samples=earlier.get("samples") or [],
                        info={**info, **(earlier.get("info") or {})}, output_dir=out, benchmarks=table)
    result.benchmarks = save_eval_json(result)
    plot_eval_chart(result.metrics, out / CHART_PNG, result.benchmarks)
    write_eval_markdown(result, out / REPORT_MD, CHART_PNG)
    return result
