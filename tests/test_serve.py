"""phitune serve: the engine's command for a run, its one-line refusals, and (slow) the official `openai` client
talking to llama.cpp's server on the run's GGUF export: the same greedy answer as `phitune generate`, ending at the
end of the turn. The vLLM test runs only where vLLM installs (marker `vllm`: CUDA)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from _fixtures_eval import trained_run  # noqa: F401  (fixture)
from conftest import extra_line
from typer.testing import CliRunner

from phitune.after.serve import plan_serve, vllm_command
from phitune.errors import PhituneError

QUESTION = "What noise does a cow make?"
MAX_TOKENS = 40


def run_cli(*args: str):
    from phitune.cli import app

    return CliRunner().invoke(app, list(args))


def refused(capsys, *args: str) -> str:
    """stderr of `phitune ARGS` through main(), as the installed command runs: exit code 2 and one line."""
    from phitune.cli import main

    with pytest.raises(SystemExit) as stop:
        main(list(args))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_llama_cpp_needs_the_runs_gguf_export_and_says_how_to_make_it(trained_run, capsys):  # noqa: F811
    assert refused(capsys, "serve", str(trained_run), "--engine", "llama.cpp") == (
        f"error: the llama.cpp engine serves a GGUF export of the run: phitune export {trained_run} --output "
        f"{trained_run / 'model-f16.gguf'} (or --quant q4_k_m), then serve again")


def test_without_an_engine_one_line_names_what_to_install(trained_run, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as on a machine with neither engine installed
    monkeypatch.setitem(sys.modules, "vllm", None)
    assert refused(capsys, "serve", str(trained_run)) == (
        f"error: no serving engine is installed: {extra_line('serve')} (llama-cpp-python's server), or on "
        "CUDA: pip install vllm")
    assert refused(capsys, "serve", str(trained_run), "--engine", "vllm") == (
        "error: the vllm engine is not installed: pip install vllm (it needs CUDA)")


def test_vllm_command_serves_the_adapter_as_a_lora_module_with_the_runs_template(trained_run):  # noqa: F811
    """The flags users get wrong: the adapter as a LoRA module under the run's name, a --max-lora-rank that holds
    the adapter's rank, the chat template the run was trained with; localhost as `phitune serve` defaults to."""
    command = vllm_command(trained_run, trained_run.name, "127.0.0.1", 8123)
    rank = json.loads((trained_run / "adapter_config.json").read_text())["r"]
    base = json.loads((trained_run / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert command[:3] == ["vllm", "serve", base]
    assert command[command.index("--lora-modules") + 1] == f"{trained_run.name}={trained_run}"
    assert int(command[command.index("--max-lora-rank") + 1]) >= rank and "--enable-lora" in command
    template = Path(command[command.index("--chat-template") + 1])
    from transformers import AutoTokenizer

    assert template.read_text() == AutoTokenizer.from_pretrained(trained_run).chat_template
    assert command[command.index("--host") + 1] == "127.0.0.1"


def test_only_a_public_address_is_warned_about(caplog):
    from phitune.after.serve import warn_if_public

    with caplog.at_level("WARNING", logger="phitune"):
        for host in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
            warn_if_public(host)
    assert [r.getMessage() for r in caplog.records] == [
        "serving on 0.0.0.0: anyone who can reach this machine can use the model (no API key)"]


def test_a_directory_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(PhituneError, match="not a finished phitune run"):
        plan_serve(tmp_path, "llama.cpp")


def test_a_file_that_is_not_gguf_is_one_line(trained_run, tmp_path, capsys):  # noqa: F811
    fake = tmp_path / "fake.gguf"
    fake.write_text("junk\n")
    assert refused(capsys, "serve", str(trained_run), "--engine", "llama.cpp", "--gguf", str(fake)) == (
        f"error: {fake} is not a GGUF file (it does not start with GGUF's magic bytes); make one with phitune "
        "export RUN --output FILE.gguf")


def test_a_port_in_use_is_one_line_before_any_model_loads(trained_run, capsys):  # noqa: F811
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = refused(capsys, "serve", str(trained_run), "--engine", "llama.cpp", "--port", str(port))
    assert err.startswith(f"error: cannot serve on 127.0.0.1:{port} (") and err.endswith("; pass another --port")


def test_llama_cpp_loads_the_model_quietly_unless_debug(tmp_path):
    """llama-cpp-python's server prints llama.cpp's whole load log (some 400 lines before the first request) unless
    told `--verbose false`; `phitune --debug serve` asks for it (the slow test below checks the quiet output)."""
    import gguf

    from phitune.after.serve import llama_cpp_command

    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "phi3")
    writer.add_context_length(4096)
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    for verbose in (False, True):
        command = llama_cpp_command(tmp_path / "m.gguf", "run", "127.0.0.1", 8000, verbose=verbose)
        assert command[command.index("--verbose") + 1] == str(verbose).lower(), command


# ---- slow: the real server and the official client -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: list[str], port: int, timeout_s: float = 300) -> subprocess.Popen:
    """`phitune serve ...` in a process of its own, once /v1/models answers."""
    server = subprocess.Popen([sys.executable, "-m", "phitune.cli", "serve", *args, "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"phitune serve exited with {server.returncode}:\n{server.stdout.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5):
                return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    pytest.fail(f"phitune serve did not answer within {timeout_s} s")


def stop_server(server: subprocess.Popen) -> str:
    """Ctrl-C, as a user stops it: phitune stops the engine's process, says `stopped` and exits 0 (a server is
    meant to end this way: not an "error: interrupted" line, not exit code 130). Returns what it printed."""
    server.send_signal(signal.SIGINT)
    try:
        output, _ = server.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        raise
    assert server.returncode == 0 and output.strip().splitlines()[-1] == "stopped", output[-2000:]
    assert "error: interrupted" not in output
    return output


def phitune_generate_answer(run_dir: Path, tmp_path: Path) -> str:
    """`phitune generate`'s greedy answer to QUESTION (the reference the server must give)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": QUESTION}) + "\n")
    result = run_cli("generate", str(run_dir), "--input", str(prompts), "--output", str(tmp_path / "answers.jsonl"),
                     "--max-new-tokens", str(MAX_TOKENS), "--greedy")
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / "answers.jsonl").read_text())["answer"]


def ask_both_ways(port: int, model: str) -> tuple:
    """A non-streamed and a streamed greedy chat completion from the official client: (message, finish reason,
    streamed text, streamed finish reason, completion tokens)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120)
    messages = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model=model, messages=messages, temperature=0,
                                                max_tokens=MAX_TOKENS, stream=True):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    choice = reply.choices[0]
    return choice.message.content, choice.finish_reason, "".join(pieces), finish, reply.usage.completion_tokens


@pytest.mark.slow
def test_openai_client_gets_phitune_generates_answer_from_llama_cpp(trained_run, tmp_path):  # noqa: F811
    pytest.importorskip("openai")
    pytest.importorskip("llama_cpp.server")
    from phitune.after.export import export_run

    gguf = export_run(trained_run, tmp_path / "model-f16.gguf").path
    expected = phitune_generate_answer(trained_run, tmp_path)
    port = free_port()
    server = start_server([str(trained_run), "--engine", "llama.cpp", "--gguf", str(gguf)], port)
    try:
        text, finish, streamed, stream_finish, tokens = ask_both_ways(port, trained_run.name)
    finally:
        output = stop_server(server)
    assert expected and text.strip() == expected and streamed.strip() == expected
    assert finish == "stop" and stream_finish == "stop" and tokens < MAX_TOKENS  # ended at <|end|>, not the limit
    assert "<|end|>" not in text and "<|" not in streamed
    with pytest.raises(OSError):  # stopping phitune serve stopped the engine's process too: the port is closed
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
    assert "llama_model_loader" not in output and len(output.splitlines()) < 100, output[-3000:]  # no load log


@pytest.mark.vllm
def test_openai_client_gets_phitune_generates_answer_from_vllm(trained_run, tmp_path):  # noqa: F811
    """Where vLLM installs (CUDA): the adapter served as a LoRA module answers as `phitune generate` does."""
    pytest.importorskip("openai")
    expected = phitune_generate_answer(trained_run, tmp_path)
    port = free_port()
    server = start_server([str(trained_run), "--engine", "vllm"], port, timeout_s=600)
    try:
        text, finish, streamed, stream_finish, tokens = ask_both_ways(port, trained_run.name)
    finally:
        stop_server(server)
    assert text.strip() == expected and streamed.strip() == expected
    assert finish == "stop" and stream_finish == "stop" and tokens < MAX_TOKENS
