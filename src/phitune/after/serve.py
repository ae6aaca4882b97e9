"""`phitune serve RUN`: an OpenAI-compatible server for a run, on an engine that already does it well.

    phitune serve RUN [--engine llama.cpp|vllm] [--host 127.0.0.1] [--port 8000] [--gguf FILE]

- llama.cpp: llama-cpp-python's server (the `serve` extra) on the run's GGUF export (`phitune export RUN --output
  FILE`). The file carries what serving needs: the merged weights, the chat template, and `<|end|>` as end of turn
  (llama.cpp ends generation there), so the server runs the GGUF's own template (`chat_template.default`, never a
  built-in format llama-cpp-python might guess). phitune does not export on its own: an export merges the adapter
  and writes the whole model (7.6 GB for Phi-3-mini in f16, minutes), at a quantisation only the user can choose;
  a server should start in seconds and never write gigabytes unasked.
- vLLM (CUDA): `vllm serve BASE --enable-lora --lora-modules NAME=RUN` serves the PEFT adapter as it is, under the
  run's name, with the run's chat template; vLLM ends a turn at the eos ids of the base's generation_config.json
  (Phi-3's lists `<|end|>`, 32007).

Both bind to 127.0.0.1 unless --host says otherwise: neither asks for an API key. The server runs in a child
process; Ctrl-C or SIGTERM stops it.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import logging
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from phitune.errors import PhituneError, pip_install
from phitune.runlock import refuse_while_training

ENGINES = ("llama.cpp", "vllm")
INSTALL = {"llama.cpp": f"{pip_install('serve')} (llama-cpp-python's server)", "vllm": "pip install vllm"}
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts

log = logging.getLogger("phitune")


@dataclass
class ServePlan:
    """What `phitune serve` runs: the engine, the command, and the model name clients ask for."""

    engine: str
    command: list[str]
    model_name: str
    url: str


def plan_serve(run_dir: Path, engine: str | None = None, host: str = "127.0.0.1", port: int = 8000,
               gguf: Path | None = None, verbose: bool = False) -> ServePlan:
    """The server command for `run_dir` on `engine` (default: vLLM on a CUDA machine that has it, else llama.cpp);
    every check runs here, before anything starts. `verbose` (--debug): llama.cpp's own log of loading the model."""
    from phitune.after.generate import refuse_reward_model

    run_dir = Path(run_dir)
    if not (run_dir / "phitune_config.yaml").is_file():
        raise PhituneError(f"{run_dir} is not a finished phitune run (no phitune_config.yaml)")
    refuse_while_training(run_dir)  # whichever engine: the run's adapter and GGUF are about to change
    refuse_reward_model(run_dir)
    if engine is not None and engine not in ENGINES:
        raise PhituneError(f"--engine {engine} is not one of: {', '.join(ENGINES)}")
    if not 0 < port < 65536:
        raise PhituneError(f"--port {port} is not a TCP port (1-65535)")
    check_port_free(host, port)
    engine = engine or default_engine()
    name = run_dir.resolve().name
    gguf = run_gguf(run_dir, gguf) if engine == "llama.cpp" else None  # the run's side first, then the engine
    if not engine_installed(engine):
        raise PhituneError(f"the {engine} engine is not installed: {INSTALL[engine]}"
                           + (" (it needs CUDA)" if engine == "vllm" else ""))
    command = llama_cpp_command(gguf, name, host, port, verbose) if gguf else vllm_command(run_dir, name, host, port)
    return ServePlan(engine=engine, command=command, model_name=name, url=f"http://{_url_host(host)}:{port}/v1")


def engine_installed(engine: str) -> bool:
    if engine == "vllm":
        return importlib.util.find_spec("vllm") is not None
    try:  # the server extra: llama_cpp.server imports fastapi, uvicorn, sse_starlette, pydantic_settings
        return importlib.util.find_spec("llama_cpp.server") is not None and all(
            importlib.util.find_spec(m) is not None for m in ("fastapi", "uvicorn", "sse_starlette",
                                                               "pydantic_settings", "starlette_context"))
    except ImportError:  # llama_cpp itself missing (find_spec imports the parent package)
        return False


def default_engine() -> str:
    """vLLM where it can run (installed, CUDA), else llama.cpp; one line naming both when neither is there."""
    import torch

    if engine_installed("vllm") and torch.cuda.is_available():
        return "vllm"
    if engine_installed("llama.cpp"):
        return "llama.cpp"
    raise PhituneError(f"no serving engine is installed: {INSTALL['llama.cpp']}, or on CUDA: {INSTALL['vllm']}")


def run_gguf(run_dir: Path, gguf: Path | None) -> Path:
    """--gguf FILE, or the one .gguf file in the run directory; else one line saying how to export it."""
    if gguf is not None:
        if not Path(gguf).is_file():
            raise PhituneError(f"--gguf {gguf}: no such file")
        return _checked_gguf(Path(gguf))
    found = sorted(run_dir.glob("*.gguf"))
    if len(found) == 1:
        return _checked_gguf(found[0])
    if found:
        raise PhituneError(f"{run_dir} holds {len(found)} GGUF files; choose one with --gguf FILE")
    raise PhituneError(f"the llama.cpp engine serves a GGUF export of the run: phitune export {run_dir} "
                       f"--output {run_dir / 'model-f16.gguf'} (or --quant q4_k_m), then serve again")


def _checked_gguf(path: Path) -> Path:
    """`path` if it starts with GGUF's magic bytes; else one line (gguf's reader would raise a bare ValueError)."""
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise PhituneError(f"{path} is not a GGUF file (it does not start with GGUF's magic bytes); "
                           f"make one with phitune export RUN --output FILE.gguf")
    return path


def check_port_free(host: str, port: int) -> None:
    """Bind host:port for a moment, before any model loads: a port in use is one line, not the engine's failure
    after it has loaded the weights."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise PhituneError(f"cannot serve on {host}:{port} ({exc.strerror or exc}); pass another --port") from None


def llama_cpp_command(gguf: Path, name: str, host: str, port: int, verbose: bool = False) -> list[str]:
    """llama-cpp-python's server on `gguf`, under `name`, with the template the GGUF carries; llama.cpp's log of
    loading the model (some 400 lines before the first request) only when `verbose`."""
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", name,
            "--chat_format", "chat_template.default", "--n_ctx", str(_context_length(gguf)),
            "--host", host, "--port", str(port), "--verbose", str(verbose).lower()]


def _context_length(gguf: Path) -> int:
    """The model's trained context (the GGUF's `*.context_length`), at most 4096 to keep the KV cache modest."""
    import gguf as gguf_lib

    try:
        fields = gguf_lib.GGUFReader(gguf).fields
    except (ValueError, OSError) as exc:  # a truncated or damaged file past its magic bytes
        raise PhituneError(f"{gguf} is not a readable GGUF file ({str(exc).splitlines()[0]})") from None
    found = [f.contents() for key, f in fields.items() if key.endswith(".context_length")]
    return min(int(found[0]), 4096) if found else 2048


def vllm_command(run_dir: Path, name: str, host: str, port: int) -> list[str]:
    """`vllm serve BASE` with the run's adapter as the LoRA module `name` and the run's chat template."""
    from phitune.after.generate import resolve_model_source

    model_cfg, adapter = resolve_model_source(run_dir)
    command = ["vllm", "serve", model_cfg.name_or_path, "--host", host, "--port", str(port)]
    if adapter is not None:
        rank = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get("r", 16)
        max_rank = next((r for r in VLLM_RANKS if r >= rank), None)
        if max_rank is None:
            raise PhituneError(f"the adapter's rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]})")
        command += ["--enable-lora", "--lora-modules", f"{name}={adapter}", "--max-lora-rank", str(max_rank)]
    template = run_dir / "chat_template.jinja"
    if template.is_file():
        command += ["--chat-template", str(template)]
    return command


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def warn_if_public(host: str) -> None:
    """A server on anything but loopback answers whoever reaches the machine, without a key: say so."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        log.warning("serving on %s: anyone who can reach this machine can use the model (no API key)", host)


def run_server(plan: ServePlan) -> int:
    """Run the server in a child process until it exits or we are interrupted; return its exit code."""
    server = subprocess.Popen(plan.command)
    try:
        return server.wait()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through the CLI's handler: stop the server, then say so
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        raise
