"""The command line: parse, call one function, turn PhituneError into one line on stderr and exit code 2.

Heavy imports (torch, transformers) happen inside the commands, so `phitune --help` and config errors are instant.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from phitune.errors import PhituneError, pip_install
from phitune.terminal import setup_logging

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Help text as written: rich markup would take `[ui]` in `pip install 'phitune[ui]'` for a style and drop it.
    rich_markup_mode=None,
    help="Fine-tune Microsoft's Phi family (Phi-3, 3.5, 4, 4-mini, 4-multimodal) with LoRA and QLoRA: one YAML file "
    "in, a standard PEFT adapter out.",
)
STATE = {"debug": False, "signal": "SIGINT (Ctrl-C)"}


def _print_version(value: bool) -> None:
    if value:
        from phitune import __version__

        print(f"phitune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="show full tracebacks and library logs instead of one-line errors"),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="print phitune's version and exit"),
):
    STATE["debug"] = debug
    setup_logging(verbose=debug)


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML file with model, data, training_config and peft_config"),
    set_: list[str] = typer.Option([], "--set", help="override a value: section.key=value, or method=NAME (repeatable)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest complete checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a finished run in output_dir"),
    auto_resume: bool = typer.Option(False, "--auto-resume", help="start, continue or skip (finished), by what "
                                     "output_dir holds: the one command for every attempt of a requeued job"),
    on_bad_row: Optional[str] = typer.Option(
        None, "--on-bad-row", help="error | skip: what to do with a malformed row (sets data.on_bad_row)"
    ),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="upload the adapter to this hub repo"),
):
    """Fine-tune as CONFIG says; writes the adapter, tokenizer, config, metrics.json and loss.png to output_dir."""
    from phitune.config.schema import load_config

    cfg = load_config(config, [*set_, *([f"data.on_bad_row={on_bad_row}"] if on_bad_row else [])])
    # imported after the config is read, so a missing or broken file is said before torch loads
    from phitune.after.report import print_run_summary
    from phitune.train import run_training

    result = run_training(cfg, resume=resume, overwrite=overwrite, push_to_hub=push_to_hub, auto_resume=auto_resume)
    _ignore_interrupts()  # the run is complete on disk: a late Ctrl-C cannot undo it, and must not say otherwise
    if os.environ.get("RANK", "0") != "0":  # under torchrun every worker ends the same run: rank 0 reports it
        return
    if result.already_complete:
        print(f"the run in {result.output_dir} is already complete; nothing to do", flush=True)
    else:
        print_run_summary(result)


@app.command()
def demo(
    output_dir: Path = typer.Option(Path("outputs/demo"), help="where the demo run is written"),
    set_: list[str] = typer.Option([], "--set", help="override a value of the demo config: section.key=value"),
):
    """Fine-tune the bundled tiny Phi-3 on the bundled chat data (offline, on a CPU; README gives its measured time)."""
    from phitune.demo import run_demo

    run_demo(output_dir, set_)


RUN_DIR_ARG = typer.Argument(None, help="a finished run's output directory (names the base model and the data)")
MODEL_OPT = typer.Option(None, "--model", help="base model (hub id or directory), or a merged model")
ADAPTER_OPT = typer.Option(None, "--adapter", help="PEFT adapter directory to apply to the base")


def _sampling(max_new_tokens: int, do_sample: bool, temperature: float, top_p: float, top_k: int, seed: int):
    """The sampling settings, checked before any weight is loaded (transformers would stop mid-generation)."""
    from phitune.after.generate import SamplingSettings

    if do_sample and temperature <= 0:
        raise PhituneError(f"--temperature must be above 0 when sampling, got {temperature}; for deterministic "
                           "answers use --greedy")
    if do_sample and not 0 < top_p <= 1:
        raise PhituneError(f"--top-p must be in (0, 1], got {top_p}")

    return SamplingSettings(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                            top_p=top_p, top_k=top_k, seed=seed)


MAX_NEW_OPT = typer.Option(256, "--max-new-tokens", min=1, help="most tokens generated per answer")
SAMPLE_OPT = typer.Option(False, "--do-sample/--greedy", help="sample (with the settings below) or decode greedily")
TEMPERATURE_OPT = typer.Option(0.7, "--temperature", help="sampling temperature (with --do-sample)")
TOP_P_OPT = typer.Option(0.9, "--top-p", help="nucleus sampling mass (with --do-sample)")
TOP_K_OPT = typer.Option(50, "--top-k", min=0, help="sample among the k likeliest tokens (with --do-sample)")
SEED_OPT = typer.Option(0, "--seed", help="random seed of sampling")


@app.command("eval")
def eval_(
    run_dir: Optional[Path] = RUN_DIR_ARG,
    model: Optional[str] = MODEL_OPT,
    adapter: Optional[Path] = ADAPTER_OPT,
    data: Optional[str] = typer.Option(None, "--data", help="eval file, all rows scored (default: the run's eval set)"),
    num_generate: int = typer.Option(50, "--num-generate", min=0, help="held-out prompts to answer for ROUGE-L / exact match"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="most tokens per generated answer"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="conversations per forward pass"),
    output: Optional[Path] = typer.Option(None, "--output", help="where eval.json and report.md go (default: the run)"),
    benchmarks: Optional[str] = typer.Option(
        None, "--benchmarks", help="NAME[,NAME...]: lm-evaluation-harness tasks (or task YAML files) instead, e.g. "
        "gsm8k,ifeval; needs the [bench] extra"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="with --benchmarks: at most N examples per task"),
):
    """Compare base and fine-tuned model as the run's method scores it: eval loss, perplexity, token accuracy,
    ROUGE-L and exact match (sft, vision); preference accuracy and margin on held-out pairs (dpo, orpo, simpo); the
    log-probability margin of desirable over undesirable held-out completions (kto); pairwise accuracy of the untrained
    head and the reward model on held-out pairs (reward); reward means and pass rate of greedy completions (grpo);
    KL to the teacher and held-out loss (distill); with --benchmarks, lm-eval's tasks."""
    from phitune.after.report import print_eval_table
    from phitune.train import evaluate_run

    if benchmarks is not None or limit is not None:
        from phitune.after.benchmarks import parse_benchmark_names, run_benchmarks

        if benchmarks is None or data is not None:
            raise PhituneError("--limit goes with --benchmarks" if benchmarks is None else
                               "--data does not apply to --benchmarks (lm-eval reads each task's own data)")
        print_eval_table(run_benchmarks(run_dir, model, adapter, parse_benchmark_names(benchmarks), limit=limit,
                                        batch_size=batch_size, output=output))
        return
    print_eval_table(evaluate_run(run_dir, model, adapter, data, num_generate=num_generate,
                                  max_new_tokens=max_new_tokens, batch_size=batch_size, output=output))


@app.command()
def chat(
    run_dir: Optional[Path] = RUN_DIR_ARG,
    model: Optional[str] = MODEL_OPT,
    adapter: Optional[Path] = ADAPTER_OPT,
    system: Optional[str] = typer.Option(None, "--system", help="system prompt for the whole conversation"),
    max_new_tokens: int = MAX_NEW_OPT,
    do_sample: bool = SAMPLE_OPT,
    temperature: float = TEMPERATURE_OPT,
    top_p: float = TOP_P_OPT,
    top_k: int = TOP_K_OPT,
    seed: int = SEED_OPT,
    image: list[Path] = typer.Option([], "--image", help="a picture for the first turn; repeatable (Phi-4-multimodal)"),
    audio: list[Path] = typer.Option([], "--audio", help="an audio clip (WAV, FLAC, MP3, OGG) for the first turn, "
                                     "after the pictures; repeatable (Phi-4-multimodal)"),
):
    """Talk to the model; replies stream as they are generated. /help lists the commands (/reset, /exit)."""
    from phitune.after.generate import ChatSession, chat_command, load_for_inference, resolve_model_source

    settings = _sampling(max_new_tokens, do_sample, temperature, top_p, top_k, seed)
    model_cfg, adapter_dir = resolve_model_source(run_dir, model, adapter)
    if image or audio:
        from phitune.after.vision_eval import MediaChatSession, load_chat_media

        media = load_chat_media(image, audio)  # a missing picture or clip is said before the model loads
    loaded, tokenizer = load_for_inference(model_cfg, adapter_dir)
    if image or audio:
        session = MediaChatSession(loaded, tokenizer, model_cfg.name_or_path, settings, system, media)
    else:
        session = ChatSession(loaded, tokenizer, settings, system=system)
    interactive = sys.stdin.isatty()
    print("chat with the model; /help lists the commands, /exit ends", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.strip()
        said = chat_command(session, text)
        if said is not None:
            print(said, flush=True)
            continue
        if not text:
            continue
        print("assistant> ", end="", flush=True)
        for piece in session.stream_reply(text):
            print(piece, end="", flush=True)
        print(flush=True)


@app.command()
def generate(
    run_dir: Optional[Path] = RUN_DIR_ARG,
    input_: Path = typer.Option(..., "--input", help='prompts .jsonl: {"prompt": ...} or {"messages": [...]} per line'),
    output: Path = typer.Option(..., "--output", help="answers .jsonl: each input row plus an \"answer\" field"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output file"),
    model: Optional[str] = MODEL_OPT,
    adapter: Optional[Path] = ADAPTER_OPT,
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="prompts per generate call (left-padded)"),
    max_new_tokens: int = MAX_NEW_OPT,
    do_sample: bool = SAMPLE_OPT,
    temperature: float = TEMPERATURE_OPT,
    top_p: float = TOP_P_OPT,
    top_k: int = TOP_K_OPT,
    seed: int = SEED_OPT,
):
    """Answer every prompt of a .jsonl file in batches and write the answers to another .jsonl file."""
    from rich.progress import Progress

    from phitune.after.generate import (check_output_file, generate_file, load_for_inference, read_prompts,
                                  resolve_model_source)

    settings = _sampling(max_new_tokens, do_sample, temperature, top_p, top_k, seed)
    output = check_output_file(output, overwrite)
    rows = read_prompts(input_)
    model_cfg, adapter_dir = resolve_model_source(run_dir, model, adapter)
    loaded, tokenizer = load_for_inference(model_cfg, adapter_dir)
    from phitune.data.multimodal import is_multimodal_row

    if any(is_multimodal_row(row) or isinstance(row.get("prompt"), list) for row in rows):  # image / audio parts
        from phitune.after.vision_eval import generate_media_file

        count = generate_media_file(loaded, tokenizer, model_cfg.name_or_path, rows, input_, output, settings)
        print(f"wrote {count} answers to {output}")
        return
    with Progress(transient=False) as progress:
        task = progress.add_task("generating", total=len(rows))
        count = generate_file(loaded, tokenizer, rows, output, settings, batch_size=batch_size,
                              progress=lambda n: progress.advance(task, n))
    print(f"wrote {count} answers to {output}")


@app.command()
def merge(
    run_dir: Optional[Path] = RUN_DIR_ARG,
    output: Path = typer.Option(..., "--output", help="new (or empty) directory for the merged model"),
    adapter: Optional[Path] = ADAPTER_OPT,
    model: Optional[str] = typer.Option(None, "--model", help="base model, when the adapter's own record is wrong"),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="upload the merged model to this hub repo"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the base's own dtype) | bfloat16 | float16 | float32"),
):
    """Merge the adapter into its base and save a standalone model (safetensors, tokenizer, generation config)."""
    from phitune.after.generate import resolve_model_source
    from phitune.after.merge import merge_adapter
    from phitune.after.report import print_merge_summary

    model_cfg, adapter_dir = resolve_model_source(run_dir, model, adapter)
    print_merge_summary(merge_adapter(model_cfg, adapter_dir, output, push_to_hub=push_to_hub, dtype=dtype))


@app.command()
def export(
    run_dir: Optional[Path] = RUN_DIR_ARG,
    output: Path = typer.Option(..., "--output", help="the file to write, e.g. model.gguf (must not exist)"),
    format_: str = typer.Option("gguf", "--format", help="gguf: the whole model | gguf-lora: the adapter alone"),
    quant: str = typer.Option("f16", "--quant", help="f16 | bf16 | f32 | q8_0 | q4_k_m, q5_k_m, q6_k, ... "
                              "(other than f16/bf16/f32/q8_0: llama.cpp's quantiser, via llama-cpp-python)"),
    ollama: bool = typer.Option(False, "--ollama", help="also write an Ollama Modelfile next to the GGUF file"),
    adapter: Optional[Path] = ADAPTER_OPT,
    model: Optional[str] = typer.Option(None, "--model", help="a merged or full model directory to export"),
):
    """Write a GGUF file for llama.cpp, LM Studio and Ollama: weights, tokenizer, chat template, <|end|> stop."""
    from phitune.after.export import export_run

    result = export_run(run_dir, output, format_, quant, ollama, model=model, adapter=adapter)
    print(f"wrote {result.path} ({result.format}{', ' + result.quant if result.quant else ''}, "
          f"{result.path.stat().st_size / 2**20:.1f} MiB)")
    if result.kept_f16:
        print(f"kept f16 (shape does not fit {result.quant}): {len(result.kept_f16)} tensors, e.g. {result.kept_f16[0]}")
    if result.modelfile:
        where = result.modelfile.parent  # no `cd .` when it is here; the model named after the file, not NAME
        go = "" if where.resolve() == Path.cwd().resolve() else f"cd {where} && "
        print(f"wrote {result.modelfile}; run: {go}ollama create {result.path.stem} -f Modelfile")


@app.command()
def serve(
    run_dir: Path = typer.Argument(..., help="a finished run's output directory"),
    engine: Optional[str] = typer.Option(None, "--engine", help="llama.cpp | vllm (default: vllm on CUDA when "
                                         "installed, else llama.cpp)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind; 0.0.0.0 serves other machines (no key)"),
    port: int = typer.Option(8000, "--port", help="TCP port"),
    gguf: Optional[Path] = typer.Option(None, "--gguf", help="llama.cpp: the run's GGUF export (default: the one "
                                        ".gguf file in the run directory)"),
):
    """An OpenAI-compatible server for the run (/v1/chat/completions): llama.cpp on its GGUF export, or vLLM with
    the adapter as a LoRA module. Stops with Ctrl-C."""
    from phitune.after.serve import plan_serve, run_server, warn_if_public

    plan = plan_serve(run_dir, engine, host, port, gguf, verbose=STATE["debug"])
    warn_if_public(host)
    try:  # from the first line on: a Ctrl-C right after it is the same stop
        print(f"serving {run_dir} with {plan.engine} at {plan.url} as model \"{plan.model_name}\"", flush=True)
        print("$ " + " ".join(plan.command), flush=True)
        code = run_server(plan)
    except KeyboardInterrupt:  # Ctrl-C is how a server is meant to stop: not an error, and exit code 0
        print("stopped", flush=True)
        return
    if code != 0:
        raise PhituneError(f"the {plan.engine} server exited with code {code} (its own message is above)")


@app.command()
def data(
    config: Path = typer.Argument(..., help="YAML run config whose data section is inspected"),
    set_: list[str] = typer.Option([], "--set", help="override a value: section.key=value, or method=NAME (repeatable)"),
    output: Optional[Path] = typer.Option(None, "--output", help="folder for the length histogram (default: the data cache; the path is printed)"),
    example: int = typer.Option(0, "--example", min=0, help="index of the train example to show"),
):
    """Show the data as training sees it: format, counts, lengths, one masked example, and warnings."""
    from phitune.config.schema import load_config

    cfg = load_config(config, set_)
    # after the config, as in train
    from phitune.after.report import print_data_report
    from phitune.train import inspect_run_data

    print_data_report(inspect_run_data(cfg, output, example_index=example))


@app.command()
def ui(
    folders: list[Path] = typer.Argument(None, help="folders the page may read and write (default: the current one); "
                                         "relative paths in configs start at the first"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to serve on (127.0.0.1: this machine only)"),
    port: int = typer.Option(7860, "--port", min=1, max=65535, help="port to serve on"),
    no_token: bool = typer.Option(False, "--no-token", help="serve without this start's secret token (only behind "
                                  "a proxy of your own that checks who you are)"),
    allow_remote_code: bool = typer.Option(False, "--allow-remote-code", help="let the page start configs with "
                                           "trust_remote_code: true (a hub model's own code)"),
):
    """A local web page for the whole loop: configure, check the data, train, compare runs, chat (needs the ui
    extra, gradio; without it the error gives the pip line)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from the page's server
    try:
        from phitune.ui.app import launch, serve_until_stopped
    except ImportError as exc:
        if exc.name != "gradio":
            raise
        raise PhituneError(f"phitune ui needs the ui extra: {pip_install('ui')} (gradio)") from None

    if no_token:
        print("warning: --no-token: any program on this machine, and any web page a proxy in front lets through, can "
              "start runs here; use it only behind a proxy that checks who you are", file=sys.stderr, flush=True)
    page = launch([str(folder) for folder in folders or [Path.cwd()]], host=host, port=port, token=not no_token,
                  allow_remote_code=allow_remote_code)
    # our own line, flushed: buffered output to a file would hide the address (and its token)
    print(f"phitune ui: open {page.url} (Ctrl-C stops it)", flush=True)
    serve_until_stopped(page)  # Ctrl-C is how the page is meant to stop: not an error, and exit code 0
    print("stopped", flush=True)


def _click_exceptions(name: str) -> tuple[type[BaseException], ...]:
    """`name` from click and from typer's vendored copy of click (typer 0.26+), whichever are installed: typer 0.16
    (the lowest pyproject.toml allows) raises click's own, newer typers their copy's."""
    import importlib

    found = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if cls is not None and cls not in found:
            found.append(cls)
    return tuple(found)


_USAGE_ERRORS = _click_exceptions("ClickException")
_NO_COMMAND = _click_exceptions("NoArgsIsHelpError")  # `phitune` alone: its message is the help screen
_ABORTS = _click_exceptions("Abort") + (typer.Abort,)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and end with one line and an exit code a script can test.

    Bad input of any kind (a PhituneError, or a usage mistake caught by typer's parser) is one line on stderr and
    exit code 2 (a traceback only with --debug); an interrupt (Ctrl-C, SIGTERM) is one line and exit code 130."""
    STATE["signal"] = "SIGINT (Ctrl-C)"  # what an interrupt is called unless a handler names another signal
    STATE["process_exits"] = argv is None  # the `phitune` program itself, not main() called from Python (tests)
    _interrupts_raise()
    try:
        code = app(args=argv, prog_name="phitune", standalone_mode=False)
    except PhituneError as exc:
        if STATE["debug"]:
            raise
        code = getattr(exc, "exit_code", 2)
        _say(f"error: {exc}")
    except KeyboardInterrupt:  # typer turns it into exit code 130 itself; this covers the moments outside its reach
        code = _interrupted()
    except _USAGE_ERRORS as exc:  # click's, or typer's own vendored click's: usage mistakes
        code = _usage_error(exc)
    except _ABORTS:  # end of input at a prompt
        code = _interrupted()
    except Exception as exc:  # a crash: one known cause gets its one line, any other its traceback
        code = _known_crash(exc)
    else:
        if code == 130:  # typer's answer to a KeyboardInterrupt inside a command
            code = _interrupted()
    _ignore_interrupts()  # the outcome is decided and said: a signal while Python shuts down would change the exit
    sys.exit(code if isinstance(code, int) else 0)  # code (killed by SIGINT) or print a traceback, with no line said


def _ignore_interrupts() -> None:
    """Ignore SIGINT and SIGTERM from here on, in the `phitune` program only: a Python program that called main()
    goes on after it, and keeps its own Ctrl-C."""
    if not STATE.get("process_exits"):
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread (an embedding program): leave its signals alone
            return


def _known_crash(exc: Exception) -> int:
    """Two known causes get one line and exit 2; other crashes re-raise.

    A full disk (or a quota, a read-only disk) in a write no command wraps itself: the file when the error names it,
    the OS's reason. A torchvision made for another torch breaks transformers' own imports, in every command, with
    an error that names neither: the pip line that fits this torch."""
    from phitune.data.multimodal_batch import require_torchvision
    from phitune.errors import is_write_failure, write_error, write_reason

    if not STATE["debug"] and is_write_failure(exc) and not isinstance(exc, PermissionError):
        named = getattr(exc, "filename", None)
        _say(f"error: {write_error(exc, named)}" if named else
             f"error: a write failed: {write_reason(exc)} (phitune --debug ... shows where)")
        return 2
    if not STATE["debug"]:
        try:
            require_torchvision(absent_ok=True)
        except PhituneError as broken:
            _say(f"error: {broken}")
            return 2
    raise exc


def _interrupted() -> int:
    _say(f"error: interrupted by {STATE['signal']}; the command did not finish")
    return 130


def _usage_error(exc) -> int:
    """A usage mistake as one line: typer's message (with its 'Did you mean ...?') and where help is."""
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "phitune"
    message = exc.format_message().strip().rstrip(".")
    if isinstance(exc, _NO_COMMAND) or not message:  # `phitune` alone: the help screen, then one line
        print(exc.format_message(), end="", flush=True)
        message = "no command given; choose one of the commands above"
    _say(f"error: {message} (see: {where} --help)")
    return getattr(exc, "exit_code", 2)


def _say(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun every worker fails alike: say it once
        print(line, file=sys.stderr, flush=True)


def _interrupts_raise() -> None:
    """SIGTERM stops a command as Ctrl-C does (KeyboardInterrupt, exit code 130), and the final line names it.
    Training installs its own handler on top (phitune.run.signals.GracefulStop), which defers to this one on a
    second signal."""
    def interrupt(signum, frame):
        STATE["signal"] = "SIGINT (Ctrl-C)" if signum == signal.SIGINT else signal.Signals(signum).name
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, interrupt)
        except ValueError:  # not the main thread (an embedding program): leave its signals alone
            return


if __name__ == "__main__":
    main()
