"""`phitune ui` in a real headless Chromium (Debian's, driven by Playwright): the whole loop a person clicks through.

Run by its own CI step (`-m browser`; it needs the ui extra, playwright and `apt-get install chromium`). The page is
started the way a person starts it (`phitune ui FOLDER --port P`, a separate process), trains the demo config as a
`phitune train` process of its own, and is reloaded during training. A screenshot of each step goes to
$PHITUNE_UI_SCREENSHOTS (default: the test's tmp folder) for a person to look at.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("PHITUNE_CHROMIUM", "/usr/bin/chromium")
# The network is closed in CI: without the background-networking switches Chromium floods refused connections.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TRAIN_MINUTES = 30  # upper bound for the demo run (270 steps: 2.5 min on 2 idle cores, 25 at a load of 6)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _printed_url(log_path: Path, server: subprocess.Popen) -> str:
    """The address `phitune ui` printed (with its token), once it has printed it."""
    deadline = time.time() + 120
    while not (found := re.search(r"phitune ui: open (http://\S+) ", log_path.read_text())):
        assert server.poll() is None and time.time() < deadline, log_path.read_text()
        time.sleep(0.5)
    return found.group(1)


@pytest.fixture
def page_url(tmp_path):
    """`phitune ui tmp_path` serving on a free port: the address it printed, with this start's token; stopped (and
    any run it started with it) afterwards."""
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    log = open(tmp_path / "ui.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "phitune.cli", "ui", str(tmp_path), "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    url = _printed_url(tmp_path / "ui.log", server)
    assert url.startswith(f"http://127.0.0.1:{port}/?token=")
    assert urllib.request.urlopen(url, timeout=30).status == 200
    yield url
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("PHITUNE_UI_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _set_yaml(page, text: str) -> None:
    """Replace the editor's text as a person pasting would (the code editor takes input events)."""
    editor = page.locator("#yaml .cm-content")
    editor.click()
    page.keyboard.press("Control+a")
    page.keyboard.insert_text(text)


def _points(page) -> int:
    return int(page.locator("#loss-chart .phitune-chart").get_attribute("data-points"))


def test_the_whole_loop_in_a_browser(page_url, browser, tmp_path):
    shots = _shots(tmp_path)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    outside, origin = [], page_url.split("?")[0]
    page.on("request", lambda request: outside.append(request.url) if not request.url.startswith(
        (origin, "data:", "blob:")) else None)
    page.goto(page_url)
    page.get_by_text("phitune", exact=True).first.wait_for()
    page.screenshot(path=shots / "01-open.png", full_page=True)

    # Configure: pick the demo; a typo is reported inline with the checker's did-you-mean; the fix clears it
    page.locator("#example input").click()
    page.get_by_role("option", name=re.compile("^demo")).click()
    page.wait_for_selector("#problems [data-problems='0']")
    demo_text = page.locator("#yaml .cm-content").inner_text()
    assert "tiny-phi3" in demo_text and str(tmp_path) in demo_text
    _set_yaml(page, demo_text.replace("learning_rate:", "learning_rat:"))
    error = page.locator("#problems .phitune-error")
    error.wait_for()
    assert "unknown key training_config.learning_rat (did you mean 'learning_rate'?)" in error.inner_text()
    page.screenshot(path=shots / "02-config-error.png", full_page=True)
    _set_yaml(page, demo_text)
    page.wait_for_selector("#problems [data-problems='0']")
    # the form edits the same YAML: a value typed there appears in the editor; emptied, it is gone again
    page.locator("#form").get_by_text("or edit the usual settings in a form").click()
    field = page.locator("#form-training_config-max_steps textarea")
    field.click()
    page.keyboard.type("12")
    page.keyboard.press("Tab")  # leaving the field applies it
    page.wait_for_function("document.querySelector('#yaml .cm-content').innerText.includes('max_steps: 12')")
    field.click()
    page.keyboard.press("Control+a")
    page.keyboard.press("Backspace")
    page.keyboard.press("Tab")
    page.wait_for_function("!document.querySelector('#yaml .cm-content').innerText.includes('max_steps')")
    assert "max_steps" not in page.locator("#yaml .cm-content").inner_text()
    page.wait_for_selector("#problems [data-problems='0']")

    # Data: the data doctor's table, the example with trained spans marked, the histogram
    page.get_by_role("tab", name="Data").click()
    page.locator("#check-data").click()
    page.wait_for_selector("#data-example mark.trained", timeout=120_000)
    table = page.locator("#data-table").inner_text()
    assert "train examples" in table and "720" in table
    assert page.locator("#data-histogram img").count() == 1
    page.screenshot(path=shots / "03-data.png", full_page=True)

    # Train: start; the run is running and its loss chart grows
    page.get_by_role("tab", name="Train").click()
    page.locator("#start").click()
    page.wait_for_selector("#train-status [data-state='running']", timeout=60_000)
    page.wait_for_function("document.querySelector('#loss-chart .phitune-chart')"
                           "?.getAttribute('data-points') >= 1", timeout=300_000)
    first = _points(page)
    page.wait_for_function(f"document.querySelector('#loss-chart .phitune-chart')"
                           f".getAttribute('data-points') > {first}", timeout=300_000)
    assert _points(page) > first
    page.screenshot(path=shots / "04-training.png", full_page=True)

    # Reload during training, and a second tab: the run is still there, still running
    page.reload()
    page.get_by_role("tab", name="Train").click()
    page.wait_for_selector("#train-status [data-state='running']", timeout=30_000)
    assert _points(page) >= first
    second = browser.new_page()
    second.goto(page_url)
    second.get_by_role("tab", name="Train").click()
    second.wait_for_selector("#train-status [data-state='running']", timeout=30_000)
    second.close()
    page.screenshot(path=shots / "05-reloaded-still-running.png", full_page=True)

    # The run finishes; the Runs tab lists it with its metrics
    page.wait_for_selector("#train-status [data-state='finished']", timeout=TRAIN_MINUTES * 60_000)
    assert "step 270/270" in page.locator("#train-status").inner_text()
    page.screenshot(path=shots / "06-finished.png", full_page=True)
    page.get_by_role("tab", name="Runs").click()
    page.locator("#runs-refresh").click()
    page.wait_for_function("document.querySelector('#runs-table')?.innerText.includes('finished')")
    assert "outputs/demo" in page.locator("#runs-table").inner_text()
    page.locator("#runs-open input").click()
    page.get_by_role("option", name="outputs/demo").click()
    page.wait_for_selector("#runs-chart .phitune-chart:not([data-points='0'])")
    page.wait_for_selector("#runs-loss-png img")
    page.locator("#runs-eval").click()  # phitune eval as a process; its report.md shows when it is done
    page.wait_for_function("document.querySelector('#runs-report')?.innerText.includes('ROUGE-L')", timeout=300_000)
    assert "fine-tuned" in page.locator("#runs-report").inner_text()
    page.screenshot(path=shots / "07-runs.png", full_page=True)

    # Chat: the fine-tuned model answers as the data taught it; the base model does not
    page.get_by_role("tab", name="Chat").click()
    # the tab offers the runs finished since the page loaded; a person sends once the run shows (a send before that
    # asks the page to chat with no run)
    page.wait_for_function("document.querySelector('#chat-run input')?.value.includes('outputs/demo')")
    page.locator("#chat-input textarea").fill("What noise does a cow make?")
    page.locator("#chat-send").click()
    page.wait_for_function("document.querySelector('#chat-tuned')?.innerText.includes('A cow says moo.')",
                           timeout=120_000)
    assert "A cow says moo." not in page.locator("#chat-base").inner_text()
    page.screenshot(path=shots / "08-chat.png", full_page=True)
    assert outside == [], f"the page asked the network for {outside[:3]}"


def test_stop_and_resume_from_the_page(page_url, browser, tmp_path):
    """Stop is phitune's graceful stop (a checkpoint, then exit): the run reads as interrupted; Resume continues it
    from that checkpoint to the end. A short demo (60 steps, a checkpoint every 10) in its own output directory. A
    ticked --overwrite is spent on the one start it confirms."""
    import yaml

    shots = _shots(tmp_path)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(page_url)
    page.wait_for_selector("#problems [data-problems='0']")
    raw = yaml.safe_load(page.locator("#yaml .cm-content").inner_text())
    raw["training_config"].update(max_steps=60, save_steps=10, eval_steps=30, logging_steps=5,
                                  output_dir=str(tmp_path / "outputs" / "stop-resume"))
    raw["data"]["max_eval_examples"] = 16
    _set_yaml(page, yaml.safe_dump(raw, sort_keys=False))
    page.wait_for_selector("#problems [data-problems='0']")
    page.get_by_role("tab", name="Train").click()
    page.locator("#overwrite input").check()  # harmless on an empty directory, and spent on this one start
    page.locator("#start").click()
    page.wait_for_function("Number(document.querySelector('#train-status .phitune-progress')"
                           "?.getAttribute('data-step')) >= 3", timeout=300_000)
    assert not page.locator("#overwrite input").is_checked()
    page.locator("#stop").click()
    page.wait_for_selector("#train-status [data-state='interrupted']", timeout=120_000)
    stopped = int(page.locator("#train-status .phitune-progress").get_attribute("data-step"))
    assert 3 <= stopped < 60 and (tmp_path / "outputs" / "stop-resume" / f"checkpoint-{stopped}").is_dir()
    page.screenshot(path=shots / "09-stopped.png", full_page=True)
    page.locator("#resume").click()
    page.wait_for_selector("#train-status [data-state='finished']", timeout=600_000)
    assert "step 60/60" in page.locator("#train-status").inner_text()
    page.screenshot(path=shots / "10-resumed-finished.png", full_page=True)


def test_the_page_says_its_address_into_a_file_and_ctrl_c_stops_it_quietly(tmp_path):
    """Output to a file (not a terminal): one flushed line with the address, read before anything else is known
    about the server; Ctrl-C then ends it with one `stopped` line, exit code 0, no error and no gradio banner."""
    import signal

    log_path = tmp_path / "ui.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    env.pop("PYTHONUNBUFFERED", None)
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "phitune.cli", "ui", str(tmp_path), "--port",
                                   str(_free_port())], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            url = _printed_url(log_path, server)
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+/\?token=[\w-]{32}", url), url
            assert urllib.request.urlopen(url, timeout=10).status == 200
            server.send_signal(signal.SIGINT)
            assert server.wait(timeout=60) == 0, log_path.read_text()
        finally:
            if server.poll() is None:
                server.kill()
    lines = log_path.read_text().strip().splitlines()
    assert lines[-1] == "stopped", lines
    assert not any("error" in line.lower() or "Keyboard interruption" in line for line in lines), lines


def _request(url: str, method: str = "GET", headers: dict | None = None, body: bytes | None = None):
    """(status, headers, body) of one request to the page over plain HTTP, to 127.0.0.1 whatever Host it names."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection("127.0.0.1", parts.port, timeout=30)
    try:
        connection.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=body,
                           headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def test_only_the_page_address_with_its_token_is_served(page_url):
    """DNS rebinding and other callers: a foreign Host or Origin is refused with 403 even with the token; the page's
    own addresses are served with it, or with the cookie its first answer sets; nothing is served without it (the
    page, its config, an API call that would queue a job)."""
    port = int(page_url.split(":")[2].split("/")[0])
    base, token = page_url.split("?")[0], page_url.split("token=")[1]
    evil = f"evil.example:{port}"
    call = ("POST", {"Content-Type": "application/json"}, json.dumps({"data": [""]}).encode())
    for method, headers, body in [("GET", {"Host": evil}, None), ("GET", {"Origin": f"http://{evil}"}, None),
                                  ("GET", {"Host": evil, "Origin": f"http://{evil}"}, None),
                                  ("OPTIONS", {"Host": evil, "Origin": f"http://{evil}",
                                               "Access-Control-Request-Method": "POST"}, None),
                                  ("GET", {"Origin": "null"}, None), ("GET", {"Host": f"127.0.0.1:{port + 1}"}, None)]:
        status, answer, text = _request(page_url, method, headers, body)
        assert status == 403 and b"forbidden" in text, (headers, status, text[:200])
        assert "access-control-allow-origin" not in {key.lower() for key in answer}
    status, answer, _ = _request(page_url, headers={"Origin": base.rstrip("/")})
    assert status == 200
    cookie = answer["Set-Cookie"].split(";")[0]
    assert cookie == f"phitune-ui-{port}={token}" and "HttpOnly" in answer["Set-Cookie"]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        assert _request(base + "config", headers={"Host": host, "Cookie": cookie})[0] == 200
    status, _, text = _request(base + "gradio_api/call/check", call[0], {**call[1], "Cookie": cookie}, call[2])
    assert status == 200 and b"event_id" in text
    for refused in ({}, {"Cookie": f"phitune-ui-{port}=wrong"}):
        assert _request(base, headers=refused)[0] == 403
        assert _request(base + "config", headers=refused)[0] == 403
        assert _request(base + "gradio_api/call/check", call[0], {**call[1], **refused}, call[2])[0] == 403
    assert _request(base + "?token=wrong")[0] == 403


def test_a_site_that_resolves_to_127_0_0_1_gets_nothing(page_url, tmp_path):
    """DNS rebinding in a real browser: Chromium resolves evil.example to 127.0.0.1 (as a rebinding site makes it
    do) and loads the page by that name, with the token even: 403 and no page; by its printed address, the page."""
    from playwright.sync_api import sync_playwright

    port = int(page_url.split(":")[2].split("/")[0])
    rule = "--host-resolver-rules=MAP evil.example 127.0.0.1"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, rule])
        page = chromium.new_page()
        for url in (f"http://evil.example:{port}/", f"http://evil.example:{port}/?" + page_url.split("?")[1]):
            response = page.goto(url)
            assert response.status == 403 and "forbidden" in page.content(), url
            assert page.locator("#yaml").count() == 0 and page.context.cookies() == []
        page.screenshot(path=_shots(tmp_path) / "11-rebound-name-refused.png")
        assert page.goto(page_url).status == 200
        page.wait_for_selector("#problems [data-problems='0']")
        chromium.close()


def test_no_token_is_said_and_still_checks_the_address(tmp_path):
    """`phitune ui --no-token` (for a proxy of one's own): a warning on stderr, the bare address served, a foreign
    Host still refused."""
    port, log_path = _free_port(), tmp_path / "ui.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "phitune.cli", "ui", str(tmp_path), "--port", str(port),
                                   "--no-token"], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            url = _printed_url(log_path, server)
            assert url == f"http://127.0.0.1:{port}/"
            assert "warning: --no-token" in log_path.read_text()
            assert _request(url)[0] == 200 and "set-cookie" not in {key.lower() for key in _request(url)[1]}
            assert _request(url, headers={"Host": f"evil.example:{port}"})[0] == 403
        finally:
            server.terminate()
            server.wait(timeout=30)
