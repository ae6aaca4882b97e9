"""phitune generate / chat: batched answers to a prompts file, streamed multi-turn chat read from stdin."""

from __future__ import annotations

import json

import pytest
from _fixtures_eval import trained_run, write_jsonl  # noqa: F401  (fixture)
from typer.testing import CliRunner

from phitune.errors import PhituneError
from phitune.after.generate import (
    ChatSession,
    SamplingSettings,
    generate_replies,
    load_for_inference,
    read_prompts,
    resolve_model_source,
)

PROMPTS = [
    {"id": 1, "prompt": "What is the capital of France?"},
    {"id": 2, "messages": [{"role": "system", "content": "You are a concise assistant."},
                           {"role": "user", "content": "What colour is grass?"}]},
    {"id": 3, "prompt": "What is the plural of mouse?"},
]


def test_generate_writes_one_answer_per_prompt_and_refuses_to_overwrite(trained_run, tmp_path):  # noqa: F811
    from phitune.cli import app

    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    answers = tmp_path / "answers.jsonl"
    args = ["generate", str(trained_run), "--input", str(prompts), "--output", str(answers),
            "--max-new-tokens", "12", "--batch-size", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2, 3]
    assert all(isinstance(r["answer"], str) and r["answer"] for r in rows)
    assert rows[1]["messages"] == PROMPTS[1]["messages"]  # input fields kept
    again = CliRunner().invoke(app, args)
    assert isinstance(again.exception, PhituneError) and "--overwrite" in str(again.exception)
    assert CliRunner().invoke(app, args + ["--overwrite"]).exit_code == 0


def test_left_padded_batches_answer_like_single_prompts(trained_run):  # noqa: F811
    model, tokenizer = load_for_inference(*resolve_model_source(trained_run))
    conversations = [[{"role": "user", "content": row["prompt"]}] for row in (PROMPTS[0], PROMPTS[2])]
    conversations.append([{"role": "user", "content": "How many minutes are in an hour? Please answer."}])
    settings = SamplingSettings(max_new_tokens=12)
    batched = generate_replies(model, tokenizer, conversations, settings, batch_size=3)
    single = generate_replies(model, tokenizer, conversations, settings, batch_size=1)
    assert batched == single


def test_read_prompts_names_the_bad_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n{"text": "no prompt"}\n', encoding="utf-8")
    with pytest.raises(PhituneError, match=r"p.jsonl:2"):
        read_prompts(path)


def test_read_prompts_reports_non_utf8_as_a_user_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "hi"}\n\xff\xfe\n')
    with pytest.raises(PhituneError, match=r"p.jsonl:2: not UTF-8"):
        read_prompts(path)


def test_chat_session_keeps_history_and_resets(trained_run):  # noqa: F811
    model, tokenizer = load_for_inference(*resolve_model_source(trained_run))
    session = ChatSession(model, tokenizer, SamplingSettings(max_new_tokens=8), system="Be brief.")
    first = "".join(session.stream_reply("What is the capital of France?"))
    "".join(session.stream_reply("And Germany?"))
    assert [m["role"] for m in session.history] == ["system", "user", "assistant", "user", "assistant"]
    assert session.history[2]["content"] == first.strip()
    session.reset()
    assert session.history == [{"role": "system", "content": "Be brief."}]


def test_chat_command_reads_stdin(trained_run):  # noqa: F811
    from phitune.cli import app

    lines = "What colour is grass?\n/reset\nWhat is 2 plus 2?\n/exit\nnever read\n"
    result = CliRunner().invoke(app, ["chat", str(trained_run), "--max-new-tokens", "8"], input=lines)
    assert result.exit_code == 0, result.output
    assert result.output.count("assistant>") == 2
    assert "(conversation reset)" in result.output
