"""The logic behind `phitune ui`, without a browser or gradio: the folders it may touch, the config checker's
problems as the page lists them, tokens kept off the page, and runs read back from their output directories,
including a real `phitune train` process started, stopped gracefully and resumed the way the page does it.
(tests/test_ui_browser.py clicks through the page itself in Chromium.)"""

from __future__ import annotations

import json
import os
import time

import pytest
import yaml

from phitune.errors import PhituneError
from phitune.run.console import PROGRESS_LOG
from phitune.ui import views
from phitune.ui.runs import find_runs, read_progress, run_row, start_training, stop_training
from phitune.ui.workspace import DEMO, FORM_FIELDS, Workspace, apply_form, form_values, redact


def test_paths_outside_the_folders_are_refused(tmp_path):
    inside, outside = tmp_path / "work", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    workspace = Workspace([inside])
    assert workspace.path("data/train.jsonl") == inside / "data" / "train.jsonl"  # relative: to the first folder
    for escape in (str(outside / "x.jsonl"), "../elsewhere/x.jsonl", "/etc/passwd"):
        with pytest.raises(PhituneError, match="outside the folders this page was started with"):
            workspace.path(escape)
    from phitune.tiny.phi3 import DEMO_DATA

    assert workspace.path(DEMO_DATA / "train.jsonl", shipped_ok=True).is_file()  # the demo's own files: readable
    with pytest.raises(PhituneError, match="outside"):
        workspace.path(DEMO_DATA / "train.jsonl")  # but never as a place to write


def test_the_checker_lists_every_problem_with_its_suggestion(tmp_path):
    workspace = Workspace([tmp_path])
    demo = yaml.safe_load(workspace.example_yaml(DEMO))
    assert workspace.check(yaml.safe_dump(demo))[1] == []
    assert demo["training_config"]["output_dir"] == str(tmp_path / "outputs" / "demo")
    demo["training_config"]["learning_rat"] = demo["training_config"].pop("learning_rate")
    demo["peft_config"]["lora_alpah"] = demo["peft_config"].pop("lora_alpha")
    demo["data"]["eval"] = "/etc/eval.jsonl"
    cfg, problems = workspace.check(yaml.safe_dump(demo))
    assert cfg is None
    assert any("unknown key training_config.learning_rat (did you mean 'learning_rate'?)" in p for p in problems)
    assert any("lora_alpah" in p and "did you mean 'lora_alpha'?" in p for p in problems)
    demo["training_config"]["learning_rate"] = demo["training_config"].pop("learning_rat")
    demo["peft_config"]["lora_alpha"] = demo["peft_config"].pop("lora_alpah")
    assert workspace.check(yaml.safe_dump(demo))[1] == [
        f"/etc/eval.jsonl is outside the folders this page was started with ({tmp_path}); start phitune ui with "
        "its folder too"]
    demo["data"]["eval"] = None  # a mixture: every source's path is checked
    demo["data"]["train"] = [{"path": demo["data"]["train"], "weight": 1}, {"path": "/etc/general.jsonl", "weight": 1}]
    assert workspace.check(yaml.safe_dump(demo))[1] == [
        (f"/etc/general.jsonl is outside the folders this page was started with ({tmp_path}); start phitune ui "
         "with its folder too")]
    html = views.message_html(["unknown key x"])
    assert 'data-problems="1"' in html and "error: unknown key x" in html


def test_the_form_edits_the_yaml_through_set(tmp_path):
    """The form's fields are `--set` keys: typed values land in the YAML as the CLI would parse them, an emptied
    field falls back to the default, and a bad value is the checker's problem like any other."""
    workspace = Workspace([tmp_path])
    text = workspace.example_yaml(DEMO)
    values = dict(zip(FORM_FIELDS, form_values(text)))
    assert values["training_config.learning_rate"] == "0.003" and values["peft_config.r"] == "16"
    values.update({"training_config.learning_rate": "2e-4", "training_config.max_steps": "50", "peft_config.r": ""})
    edited = apply_form(text, list(values.values()))
    cfg, problems = workspace.check(edited)
    assert problems == [] and cfg.training_config["learning_rate"] == 2e-4 and cfg.training_config["max_steps"] == 50
    assert "r" not in cfg.peft_config and cfg.peft_config["lora_alpha"] == 32
    values["training_config.num_train_epochs"] = "six"
    assert any("num_train_epochs" in p for p in workspace.check(apply_form(text, list(values.values())))[1])
    assert form_values("model: [unclosed") == [""] * len(FORM_FIELDS)


def test_tokens_never_reach_the_page(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "my-secret-token-value")
    assert redact("push with hf_abcdefghijklmnopqrstuv and my-secret-token-value") == "push with *** and ***"
    config = tmp_path / "c.yaml"
    config.write_text("training_config:\n  hub_token: hf_abcdefghijklmnopqrstuv\n  max_steps: 3\n")
    text = Workspace([tmp_path]).read_yaml_file("c.yaml")
    assert "hf_" not in text and "hub_token" not in text and "max_steps: 3" in text


def _write_config(make_config, tmp_path, **training) -> tuple:
    """A tiny run's config as the page writes it (phitune-ui/run.yaml), and its output directory."""
    cfg = make_config(training_config=training)
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    workspace = Workspace([tmp_path])
    return workspace, workspace.save_run_config(text, cfg), cfg.output_dir


def _wait(condition, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.5)


@pytest.mark.processes
def test_a_run_started_stopped_and_resumed_like_the_page_does(make_config, tmp_path):
    """`phitune train` as a process: running while it trains, a graceful stop leaves a checkpoint and reads as
    interrupted, resume finishes it; the loss series has each step once (the resumed steps replace the old)."""
    workspace, config_path, output_dir = _write_config(make_config, tmp_path, max_steps=30, save_steps=2,
                                                       eval_steps=15, logging_steps=2)
    process = start_training(config_path, output_dir, workspace.home)
    _wait(lambda: read_progress(output_dir).step >= 3)
    assert read_progress(output_dir).state == "running"
    with pytest.raises(PhituneError, match="is training already"):
        start_training(config_path, output_dir, workspace.home)
    stop_training(output_dir)
    assert process.wait(timeout=120) == 130, config_path.with_suffix(".log").read_text()
    stopped = read_progress(output_dir)
    assert stopped.state == "interrupted" and 3 <= stopped.step < 30
    assert (output_dir / f"checkpoint-{stopped.step}").is_dir()

    resumed = start_training(workspace.config_of_run(output_dir), output_dir, workspace.home, resume=True)
    assert resumed.wait(timeout=600) == 0, config_path.with_suffix(".log").read_text()
    done = read_progress(output_dir)
    assert done.state == "finished" and (done.step, done.max_steps) == (30, 30)
    steps = [step for step, _ in done.loss]
    assert steps == list(range(2, 31, 2))  # logged every 2 steps, once each, across the stop
    assert [step for step, _ in done.eval_loss] == [0, 15, 30]  # before training, then every 15 steps
    assert done.tokens_per_second > 0
    row = run_row(output_dir)
    assert row["state"] == "finished" and row["step"] == "30/30" and row["eval loss after"] != "-"
    assert find_runs([tmp_path]) == [output_dir]
    assert views.loss_chart(done).count("<circle") == len(done.loss) + len(done.eval_loss)


def test_a_run_without_progress_log_reads_its_checkpoint(make_config, tmp_path):
    """A run of an older release (no progress log): its newest checkpoint's log history."""
    from phitune.train import run_training

    cfg = make_config(training_config={"max_steps": 4, "save_steps": 4})
    run_training(cfg)
    (cfg.output_dir / PROGRESS_LOG).unlink()
    progress = read_progress(cfg.output_dir)
    assert progress.state == "finished" and progress.step == 4
    assert [step for step, _ in progress.loss] == [2, 4] and [s for s, _ in progress.eval_loss] == [0, 4]  # before training, then at the checkpoint
    assert read_progress(cfg.output_dir / "missing").state == "empty"


def test_a_dead_process_reads_as_interrupted(tmp_path):
    """A run whose process died without a word (kill -9, a power cut) is not shown as running."""
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    line = {"event": "begin", "time": 0.0, "step": 0, "max_steps": 10, "tokens": 0, "pid": 2**22 + 12345}
    (output_dir / PROGRESS_LOG).write_text(json.dumps(line) + "\n")
    assert read_progress(output_dir).state == "interrupted"
    line["pid"] = os.getpid()
    (output_dir / PROGRESS_LOG).write_text(json.dumps(line) + "\n")
    assert read_progress(output_dir).state == "running"


def test_a_run_that_left_only_its_progress_log_starts_again_there(tmp_path):
    """A run that failed before its first checkpoint leaves only the progress log: the directory counts as empty
    (no --overwrite needed), and the new run's begin line at step 0 drops the old run's points."""
    from phitune.run.output_dir import run_state

    output_dir = tmp_path / "run"
    output_dir.mkdir()
    old = [{"event": "begin", "time": 0.0, "step": 0, "max_steps": 10, "tokens": 0, "pid": 2**22 + 1},
           {"event": "log", "time": 1.0, "step": 0, "max_steps": 10, "tokens": 0, "logs": {"eval_loss": 9.0}},
           {"event": "log", "time": 2.0, "step": 2, "max_steps": 10, "tokens": 50, "logs": {"loss": 8.0}}]
    (output_dir / PROGRESS_LOG).write_text("".join(json.dumps(line) + "\n" for line in old))
    assert run_state(output_dir) == "empty"
    new = [dict(old[0], time=10.0), dict(old[1], time=11.0, logs={"eval_loss": 3.0})]
    with open(output_dir / PROGRESS_LOG, "a") as log:
        log.write("".join(json.dumps(line) + "\n" for line in new))
    progress = read_progress(output_dir)
    assert progress.eval_loss == [(0, 3.0)] and progress.loss == []
    (output_dir / "notes.txt").write_text("mine")
    assert run_state(output_dir) == "foreign"


def test_side_by_side_chat_is_the_base_and_the_tuned_model(make_config, tmp_path):
    """The page's chat holds one copy of the weights: with the adapter switched off it answers as the base model
    alone, with it on as `phitune chat` on the run; a second turn sees the first (multi-turn) and the system prompt."""
    from phitune import api
    from phitune.after.generate import SamplingSettings, generate_replies, load_for_inference
    from phitune.train import run_training
    from phitune.ui.chat import ChatModels

    cfg = make_config(training_config={"max_steps": 4, "learning_rate": 5e-2})
    run_training(cfg)
    models, system, first = ChatModels(), "Answer in one short sentence.", "What noise does a cow make?"

    def replies(tuned: bool) -> tuple[str, str]:
        one = list(models.stream(cfg.output_dir, [], first, system, tuned, 12))[-1]
        history = [{"role": "user", "content": first}, {"role": "assistant", "content": one}]
        return one, list(models.stream(cfg.output_dir, history, "And a dog?", system, tuned, 12))[-1]

    base_model, tokenizer = load_for_inference(cfg.model)
    conversation = [{"role": "system", "content": system}, {"role": "user", "content": first}]
    base_one, _ = replies(tuned=False)
    assert base_one.strip() == generate_replies(base_model, tokenizer, [conversation], SamplingSettings(12))[0]
    session = api.chat(cfg.output_dir, system=system, max_new_tokens=12)
    tuned_one, tuned_two = replies(tuned=True)
    assert tuned_one.strip() == api.chat_turn(session, first)
    assert tuned_two.strip() == api.chat_turn(session, "And a dog?")
    assert tuned_one != base_one  # the adapter is on for one and off for the other


def test_the_page_starts_less_than_the_terminal(tmp_path):
    """What the page may start is narrower than `phitune train`: a model's own code only with phitune ui
    --allow-remote-code; reward code only from a file under the folders (not a module name, not a file outside)."""
    inside, outside = tmp_path / "work", tmp_path / "elsewhere"
    for folder in (inside, outside):
        folder.mkdir()
        (folder / "my_rewards.py").write_text("def score(prompts, completions, **columns):\n    return [0.0]\n")
    demo = yaml.safe_load(Workspace([inside]).example_yaml(DEMO))
    demo["model"]["trust_remote_code"] = True
    text = yaml.safe_dump(demo)
    cfg, problems = Workspace([inside]).check(text)
    assert cfg is None and problems == [
        "model.trust_remote_code: true runs the model repository's code on this machine; the page starts it only "
        "when phitune ui was started with --allow-remote-code"]
    assert Workspace([inside], allow_remote_code=True).check(text)[1] == []

    demo["model"]["trust_remote_code"] = False
    grpo = dict(demo, method="grpo", rewards=[{"name": "answer"}])
    grpo["data"] = dict(demo["data"], prompt_template="{question}")
    assert Workspace([inside]).check(yaml.safe_dump(grpo))[1] == []
    for function, refused in [(f"{inside / 'my_rewards.py'}:score", None), ("my_rewards.py:score", None),
                              ("os.path:join", "rewards[1].function os.path is a module the page does not run"),
                              (f"{outside / 'my_rewards.py'}:score", f"{outside / 'my_rewards.py'} is outside")]:
        grpo["rewards"] = [{"name": "answer"}, {"function": function}]
        problems = Workspace([inside]).check(yaml.safe_dump(grpo))[1]
        assert (problems == []) if refused is None else any(refused in p for p in problems), (function, problems)
