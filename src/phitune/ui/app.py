"""The page: five tabs (Configure, Data, Train, Runs, Chat) in Gradio Blocks, each handler a thin call to the
functions the CLI calls (phitune.config.schema, phitune.train.inspect_run_data, `phitune train` itself as a process,
phitune.after.generate.ChatSession). A PhituneError becomes the same one line the CLI prints, shown on the page."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import uvicorn
from fastapi import FastAPI
from starlette.middleware import Middleware

from phitune.errors import PhituneError, first_line
from phitune.run.output_dir import prepare_output_dir
from phitune.runlock import refuse_while_training
from phitune.ui import views
from phitune.ui.chat import ChatModels
from phitune.ui.guard import PageGuard, new_token, url_host
from phitune.ui.runs import evaluate_run, find_runs, read_progress, run_row, start_training, stop_training
from phitune.ui.workspace import CONFIG_FOLDER, DEMO, FORM_FIELDS, Workspace, apply_form, form_values, redact

REFRESH_S = 2.0  # how often the Train and Runs tabs re-read the run directories
START_S = 60  # the longest the server may take to start listening
STOP_S = 10  # the longest Ctrl-C waits for the server to finish its requests


def build_app(workspace: Workspace) -> gr.Blocks:
    """The whole page for `workspace`; handlers close over it (one page serves one person's folders)."""
    chat_models = ChatModels()
    with gr.Blocks(title="phitune", analytics_enabled=False) as app:
        gr.Markdown(f"# phitune\nfolders: {', '.join(f'`{root}`' for root in workspace.roots)}")
        with gr.Tabs():
            with gr.Tab("Configure", id="configure"):
                yaml_box = _configure_tab(workspace)
            with gr.Tab("Data", id="data"):
                _data_tab(workspace, yaml_box)
            with gr.Tab("Train", id="train"):
                _train_tab(workspace, yaml_box, app)
            with gr.Tab("Runs", id="runs") as tab:
                _runs_tab(workspace, app, tab)
            with gr.Tab("Chat", id="chat") as tab:
                _chat_tab(workspace, chat_models, app, tab)
    return app


def _configure_tab(workspace: Workspace):
    with gr.Row():
        example = gr.Dropdown(workspace.example_names(), value=DEMO, label="start from a shipped example",
                              elem_id="example")
        path = gr.Textbox(label="or open a YAML file (under the folders)", elem_id="config-path")
        open_button = gr.Button("Open", elem_id="open-config")
    first = workspace.example_yaml(DEMO)  # the page opens on the demo: Start trains it at once
    yaml_box = gr.Code(first, language="yaml", label="config (YAML)", elem_id="yaml", interactive=True)
    problems = gr.HTML(views.message_html(workspace.check(first)[1]), elem_id="problems")
    with gr.Accordion("or edit the usual settings in a form", open=False, elem_id="form"):
        with gr.Row():
            fields = [gr.Textbox(value, label=key, elem_id=f"form-{key.replace('.', '-')}", min_width=200)
                      for key, value in zip(FORM_FIELDS, form_values(first))]

    written = gr.State("")  # the YAML the form last wrote: the editor echoing it back is not a person's input

    def from_form(text, *values):
        try:
            text = apply_form(text, list(values))
        except PhituneError:  # the YAML does not parse: the problems line says so already
            return gr.skip(), gr.skip()
        return text, text

    def follow_editor(text, last):
        if text == last:  # the form's own rewrite, reported back as input: the fields already say it
            return [gr.skip()] * len(fields)
        return form_values(text)

    def pick(name):
        return workspace.example_yaml(name) if name else gr.skip()

    def open_file(value):
        try:
            return workspace.read_yaml_file(value), ""
        except PhituneError as exc:
            return gr.skip(), views.message_html([str(exc)])

    def check(text):
        if not (text or "").strip():
            return ""
        try:
            return views.message_html(workspace.check(text)[1])
        except PhituneError as exc:
            return views.message_html([str(exc)])

    # The form follows the editor only when a person types in the editor (input) or a config is loaded, never when
    # the form itself rewrote the YAML: a form refresh computed from an older YAML arrived after the person had
    # cleared a field, put the old value back, and the next blur wrote it into the YAML again (a cleared max_steps
    # came back and the run trained 12 steps). The editor's input event is also ignored when it reports the YAML the
    # form has just written: CI's journey once saw a cleared max_steps stay in the YAML, which such an echo would do
    # (the old value put back into the field after the person cleared it); not reproduced here in 5 runs.
    example.change(pick, example, yaml_box).then(form_values, yaml_box, fields)
    open_button.click(open_file, path, [yaml_box, problems]).then(form_values, yaml_box, fields)
    yaml_box.change(check, yaml_box, problems)
    yaml_box.input(follow_editor, [yaml_box, written], fields)
    for field in fields:  # a field a person leaves (Tab, a click elsewhere) or submits: the YAML follows
        field.blur(from_form, [yaml_box, *fields], [yaml_box, written])
        field.submit(from_form, [yaml_box, *fields], [yaml_box, written])
    return yaml_box


def _checked(workspace: Workspace, text: str):
    """The RunConfig of `text`, or a PhituneError with every problem, as the CLI says them."""
    from phitune.ui.workspace import parse_yaml

    parse_yaml(text or "")
    cfg, problems = workspace.check(text or "")
    if cfg is None:
        raise PhituneError("invalid config: " + "; ".join(problems))
    return cfg


def _data_tab(workspace: Workspace, yaml_box):
    gr.Markdown("The data as training sees it: the data doctor (`phitune data`) on the config of the Configure tab.")
    button = gr.Button("Check the data", elem_id="check-data", variant="primary")
    message = gr.HTML(elem_id="data-message")
    table = gr.Dataframe(headers=["what", "value"], label="summary", elem_id="data-table", interactive=False)
    warnings = gr.HTML(elem_id="data-warnings")
    example = gr.HTML(elem_id="data-example")
    histogram = gr.HTML(elem_id="data-histogram")

    def inspect(text):
        from phitune.train import inspect_run_data

        try:
            cfg = _checked(workspace, text)
            report = inspect_run_data(cfg, workspace.path("phitune-ui/data"), example_index=0)
        except PhituneError as exc:
            return views.message_html([str(exc)]), None, "", "", ""
        rows = [[key, str(value)] for key, value in report.summary().items()]
        notes = views.message_html(report.warnings, "warning") or "<p>no warnings</p>"
        return ("", rows, notes, views.example_html(report.example),
                views.image_html(report.histogram, "token-length histogram"))

    button.click(inspect, yaml_box, [message, table, warnings, example, histogram])


def _run_choices(workspace: Workspace, state: str | None = None) -> list[tuple[str, str]]:
    """(name, path) of every run under the folders (in `state` only, when given), newest first; the name is the
    path relative to its folder."""
    choices = []
    for path in find_runs(workspace.roots):
        if state is None or read_progress(path).state == state:
            root = next(root for root in workspace.roots if root == path or root in path.parents)
            choices.append((str(path.relative_to(root)) if path != root else str(path), str(path)))
    return choices


def _default_run(workspace: Workspace) -> str | None:
    """The run a fresh page follows: one training now, else the newest."""
    running, runs = _run_choices(workspace, "running"), _run_choices(workspace)
    return (running or runs or [(None, None)])[0][1]


def _train_tab(workspace: Workspace, yaml_box, app):
    gr.Markdown("Training runs as `phitune train CONFIG` in its own process: it goes on when this page is closed, "
                "and a run started from a terminal shows up here too.")
    with gr.Row():
        overwrite = gr.Checkbox(label="--overwrite (replace a run in the output directory)", elem_id="overwrite")
        start = gr.Button("Start training", elem_id="start", variant="primary")
    run = gr.Dropdown(label="run", elem_id="train-run", allow_custom_value=True)
    with gr.Row():
        stop = gr.Button("Stop (checkpoint, then exit)", elem_id="stop")
        resume = gr.Button("Resume", elem_id="resume")
    message = gr.HTML(elem_id="train-message")
    status = gr.HTML(elem_id="train-status")
    chart = gr.HTML(elem_id="loss-chart")
    log_tail = gr.Textbox(label="training output", lines=8, max_lines=8, elem_id="train-log", interactive=False)
    processes = []  # the page's own children, reaped when they end

    def launch(text, replace):
        """Start `phitune train` on the editor's config; a ticked --overwrite is spent on this one start (unticked
        again), so a later Start on another config never replaces a run unless ticked anew."""
        try:
            cfg = _checked(workspace, text)
            refuse_while_training(workspace.path(cfg.output_dir))  # phitune train's own refusals, said at once
            prepare_output_dir(cfg, resume=False, overwrite=replace)
            config_path = workspace.save_run_config(text, cfg)
            output_dir = workspace.path(cfg.output_dir)
            processes.append(start_training(config_path, output_dir, workspace.home, overwrite=replace))
        except PhituneError as exc:
            return views.message_html([str(exc)]), gr.skip(), gr.skip()
        note = f"started: phitune train {config_path}{' --overwrite' if replace else ''}"
        choices = _run_choices(workspace)
        if str(output_dir) not in [path for _, path in choices]:  # nothing written there yet
            choices.insert(0, (str(output_dir), str(output_dir)))
        return views.message_html([note], "note"), gr.update(choices=choices, value=str(output_dir)), False

    def follow_up(chosen, action):
        try:
            output_dir = workspace.path(chosen or "")
            if action == "stop":
                return views.message_html([stop_training(output_dir)], "note")
            config_path = workspace.config_of_run(output_dir)
            processes.append(start_training(config_path, output_dir, workspace.home, resume=True))
            return views.message_html([f"resumed: phitune train {config_path} --resume"], "note")
        except PhituneError as exc:
            return views.message_html([str(exc)])

    def refresh(chosen):
        for process in list(processes):
            if process.poll() is not None:
                processes.remove(process)
        if not chosen:
            return "", views.line_chart({}), ""
        progress = read_progress(workspace.path(chosen))
        return views.progress_html(progress), views.loss_chart(progress), _log_tail(workspace, Path(chosen))

    start.click(launch, [yaml_box, overwrite], [message, run, overwrite])
    stop.click(lambda chosen: follow_up(chosen, "stop"), run, message)
    resume.click(lambda chosen: follow_up(chosen, "resume"), run, message)
    run.change(refresh, run, [status, chart, log_tail])
    gr.Timer(REFRESH_S).tick(refresh, run, [status, chart, log_tail])
    app.load(lambda: gr.update(choices=_run_choices(workspace), value=_default_run(workspace)), None, run)


def _log_tail(workspace: Workspace, output_dir: Path, lines: int = 8) -> str:
    """The last lines of the output of a run the page started (tokens redacted)."""
    path = workspace.path(CONFIG_FOLDER) / f"{output_dir.name}.log"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return redact("\n".join(text.replace("\r", "\n").splitlines()[-lines:]))


def _runs_tab(workspace: Workspace, app, tab):
    refresh_button = gr.Button("Refresh", elem_id="runs-refresh")
    table = gr.Dataframe(label="runs", elem_id="runs-table", interactive=False)
    chosen = gr.Dropdown(label="open a run", elem_id="runs-open", allow_custom_value=True)
    chart = gr.HTML(elem_id="runs-chart")
    loss_png = gr.HTML(elem_id="runs-loss-png")
    evaluate = gr.Button("Evaluate (phitune eval RUN --num-generate 5 --max-new-tokens 32)", elem_id="runs-eval")
    report = gr.Markdown(elem_id="runs-report")

    def listing():
        runs = _run_choices(workspace)
        rows = [dict(run_row(Path(path)), run=name) for name, path in runs]
        columns = list(rows[0]) if rows else ["run"]
        return gr.update(value=[[row[c] for c in columns] for row in rows], headers=columns), gr.update(choices=runs)

    def open_run(run):
        if not run:
            return "", "", ""
        output_dir = workspace.path(run)
        report_md = output_dir / "report.md"
        text = report_md.read_text(encoding="utf-8") if report_md.is_file() else (
            f"no eval report yet: `phitune eval {output_dir} --num-generate 5` writes one")
        images = views.image_html(output_dir / "loss.png", "loss") + views.image_html(output_dir / "eval.png", "eval")
        text = re.sub(r"!\[[^\]]*\]\([^)]*\)\n?", "", text)  # report.md's chart: shown beside it, inlined
        return views.loss_chart(read_progress(output_dir)), images, redact(text)

    def run_eval(run):
        try:
            output_dir = workspace.path(run or "")
            evaluate_run(output_dir, workspace.path(CONFIG_FOLDER) / f"{output_dir.name}.eval.log", workspace.home)
        except PhituneError as exc:
            return gr.skip(), gr.skip(), views.message_html([str(exc)])
        return open_run(run)

    refresh_button.click(listing, None, [table, chosen])
    evaluate.click(run_eval, chosen, [chart, loss_png, report])
    tab.select(listing, None, [table, chosen])
    app.load(listing, None, [table, chosen])
    chosen.change(open_run, chosen, [chart, loss_png, report])


def _chat_tab(workspace: Workspace, chat_models: ChatModels, app, tab):
    with gr.Row():
        run = gr.Dropdown(label="run", elem_id="chat-run", allow_custom_value=True)
        system = gr.Textbox(label="system prompt", elem_id="chat-system")
        max_new = gr.Slider(8, 512, value=64, step=8, label="max new tokens", elem_id="chat-max-new")
    with gr.Row():
        base_box = gr.Chatbot(label="base model", elem_id="chat-base", height=320)
        tuned_box = gr.Chatbot(label="fine-tuned", elem_id="chat-tuned", height=320)
    text = gr.Textbox(label="message", elem_id="chat-input", placeholder="What noise does a cow make?")
    with gr.Row():
        send = gr.Button("Send", elem_id="chat-send", variant="primary")
        clear = gr.Button("New conversation", elem_id="chat-clear")
    message = gr.HTML(elem_id="chat-message")

    def respond(chosen, system_text, limit, said, base_history, tuned_history):
        if not (said or "").strip():
            yield gr.skip(), gr.skip(), gr.skip(), ""
            return
        histories = {"base": list(base_history or []), "tuned": list(tuned_history or [])}
        try:
            output_dir = workspace.path(chosen or "")
            for name, prior in list(histories.items()):  # the base answers first, then the fine-tuned model
                histories[name] = prior + [{"role": "user", "content": said}, {"role": "assistant", "content": ""}]
                for reply in chat_models.stream(output_dir, prior, said, system_text, name == "tuned", int(limit)):
                    histories[name][-1] = {"role": "assistant", "content": reply}
                    yield histories["base"], histories["tuned"], "", ""
        except PhituneError as exc:
            yield gr.skip(), gr.skip(), gr.skip(), views.message_html([str(exc)])

    def runs_with_models(chosen=None):
        runs = _run_choices(workspace, "finished")
        keep = chosen if chosen in [path for _, path in runs] else None
        return gr.update(choices=runs, value=keep or (runs[0][1] if runs else None))

    send.click(respond, [run, system, max_new, text, base_box, tuned_box], [base_box, tuned_box, text, message])
    text.submit(respond, [run, system, max_new, text, base_box, tuned_box], [base_box, tuned_box, text, message])
    clear.click(lambda: ([], []), None, [base_box, tuned_box])
    tab.select(runs_with_models, run, run)  # a run that finished since the page opened is offered at once
    app.load(runs_with_models, None, run)


@dataclass
class Page:
    """A page being served: the address to open (with this start's token) and the server thread behind it."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread


def launch(folders: list[str], host: str = "127.0.0.1", port: int = 7860, token: bool = True,
           allow_remote_code: bool = False) -> Page:
    """Serve the page for `folders` on host:port (localhost unless told otherwise) in the background, behind
    phitune.ui.guard's PageGuard (the page's own Host and Origin only, and this start's token unless `token` is
    False); relative paths in configs mean relative to the first folder, which becomes the working directory, as it
    is for `phitune train` typed there. Gradio is mounted in a FastAPI app of ours (gradio.mount_gradio_app, its
    public hook for that) so that the guard runs before any of Gradio's code, its CORS middleware included."""
    workspace = Workspace(folders, allow_remote_code=allow_remote_code)
    os.chdir(workspace.home)
    blocks = build_app(workspace)
    blocks.queue(default_concurrency_limit=4)
    secret = new_token() if token else None
    outer = FastAPI(docs_url=None, redoc_url=None, openapi_url=None,
                    middleware=[Middleware(PageGuard, host=host, port=port, token=secret)])
    gr.mount_gradio_app(outer, blocks, "/", server_name=host, server_port=port, show_error=False, footer_links=[],
                        theme=gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]),
                        css=views.CSS)
    server = uvicorn.Server(uvicorn.Config(outer, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [_bind(host, port)]}, daemon=True)
    thread.start()
    deadline = time.time() + START_S
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise PhituneError(f"the page's server did not start on {host}:{port} (its message is above)")
        time.sleep(0.05)
    return Page(f"http://{url_host(host)}:{port}/" + (f"?token={secret}" if secret else ""), server, thread)


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a busy port is one line (uvicorn would only log it)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise PhituneError(f"cannot serve on {host}:{port} ({exc.strerror or first_line(exc)}); "
                           "pass another --port") from None
    return sock


def serve_until_stopped(page: Page) -> None:
    """Wait while the page serves; Ctrl-C (or SIGTERM, which phitune's CLI turns into the same KeyboardInterrupt)
    stops the server and returns: stopping the page is the normal way to end `phitune ui`, not an error."""
    try:
        while page.thread.is_alive():
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        page.server.should_exit = True
        page.thread.join(timeout=STOP_S)
