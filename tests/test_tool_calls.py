"""Tool-call conversations (OpenAI-style `tools`, `tool_calls`, `tool` turns) rendered with each family's template.

Phi-4-mini: the definitions go in the system turn between <|tool|> and <|/tool|> (its hub template), a call is the
assistant's `<|tool_call|>[{"name": .., "arguments": {..}}]<|/tool_call|>`, and labels are on the calls and answers,
never on the definitions or the tool results. Masks are checked on the real Phi-3 vocabulary with Phi-4-mini's
template and special tokens (phitune ships no Phi-4-mini tokenizer), and a run trains on the Phi-4-mini-shaped tiny
model of phitune.tiny.families. Phi-3 and Phi-4 have no tool format: one line says so.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from conftest import write_jsonl
from phitune.config.schema import DataConfig
from phitune.data import IGNORE_INDEX, render_with_mask, training_chat_template
from phitune.data.encode import rendered_with_offsets
from phitune.data.formats import to_messages
from phitune.data.prepare import prepare_data
from phitune.data.readers import BadRow
from phitune.data.templates import PHI4_CHAT_TEMPLATE, PHI4_MINI_CHAT_TEMPLATE
from phitune.errors import PhituneError
from phitune.tiny.families import build_family_model

WEATHER = {"type": "function", "function": {"name": "weather", "description": "Sky over a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = '<|tool_call|>[{"name": "weather", "arguments": {"city": "Paris"}}, {"name": "weather", "arguments": {"city": "Rome"}}]<|/tool_call|>'
ROW = {  # OpenAI chat-completions style: tools beside the messages, a call with no text, results as tool turns
    "tools": [WEATHER],
    "messages": [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain, 14 C"},
        {"role": "assistant", "content": "Paris is sunny; Rome has rain."},
    ],
}
RENDERED = ('<|system|>You are a weather bot.<|tool|>[{"name": "weather", "description": "Sky over a city", '
            '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]<|/tool|><|end|>'
            "<|user|>Paris and Rome?<|end|>"
            f"<|assistant|>{CALL}<|end|>"
            "<|tool|>sunny, 21 C<|end|><|tool|>rain, 14 C<|end|>"
            "<|assistant|>Paris is sunny; Rome has rain.<|end|><|endoftext|>")
PHI4_MINI_TOKENS = ["<|tool|>", "<|/tool|>", "<|tool_call|>", "<|/tool_call|>"]


@pytest.fixture(scope="module")
def phi3_tokenizer(phi3_tokenizer_dir):
    from phitune.config.schema import ModelConfig
    from phitune.models.loading import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(phi3_tokenizer_dir)))


@pytest.fixture(scope="module")
def mini_tokenizer(phi3_tokenizer):
    """The real Phi-3 vocabulary with Phi-4-mini's hub template and its tool tokens (as tests/test_masks.py does)."""
    tokenizer = copy.deepcopy(phi3_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": PHI4_MINI_TOKENS})
    tokenizer.chat_template = PHI4_MINI_CHAT_TEMPLATE
    return tokenizer


def test_openai_tool_rows_render_in_phi4_minis_own_format(mini_tokenizer):
    chat = to_messages(ROW, "messages", "train.jsonl:1")
    template = training_chat_template(mini_tokenizer)
    [(text, ids, _, _)] = rendered_with_offsets(mini_tokenizer, [chat], template)
    assert text == RENDERED
    ids = ids.tolist()
    # what the hub template itself renders once the calls are written Phi-4-mini's way: the same ids
    own = [dict(m, content=CALL) if "tool_calls" in m else m for m in chat]
    assert ids == list(mini_tokenizer.apply_chat_template(own, tokenize=True, return_dict=True)["input_ids"])


def test_the_calls_and_answers_are_trained_and_definitions_and_results_are_not(mini_tokenizer, tmp_path):
    """Token labels from the preparation training uses: the trained tokens are exactly the call and the answer,
    each with its <|end|>; every token of the definitions and of both tool results is -100."""
    source = write_jsonl(tmp_path / "tools.jsonl", [ROW] * 2)
    data = prepare_data(DataConfig(train=str(source), eval_split=0, max_seq_length=512,
                                   cache_dir=str(tmp_path / "cache")), mini_tokenizer)
    ids, labels = (np.asarray(data.train.rows[0][k]) for k in ("input_ids", "labels"))
    encode = lambda text: mini_tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    trained = ids[labels != IGNORE_INDEX].tolist()
    assert trained == encode(CALL + "<|end|>") + encode("Paris is sunny; Rome has rain.<|end|>")
    [(text, rendered, offsets, _)] = rendered_with_offsets(mini_tokenizer, [to_messages(ROW, "messages", "x")],
                                                          training_chat_template(mini_tokenizer))
    assert rendered.tolist() == ids.tolist()
    for masked_text in ("sunny, 21 C", "rain, 14 C", '"description": "Sky over a city"', "Paris and Rome?"):
        start = text.index(masked_text)
        covering = (offsets[:, 0] < start + len(masked_text)) & (offsets[:, 1] > start)  # the tokens of that text
        assert covering.any() and (labels[covering] == IGNORE_INDEX).all(), masked_text
    assert mini_tokenizer.convert_tokens_to_ids("<|tool_call|>") in trained
    assert mini_tokenizer.convert_tokens_to_ids("<|tool|>") not in trained


def test_tools_on_the_system_turn_and_calls_written_as_content_render_alike(mini_tokenizer):
    """The older way (Phi-4-mini's call typed into the content, definitions on the system turn) gives the same ids."""
    system = {"role": "system", "content": "You are a weather bot.", "tools": json.dumps([WEATHER["function"]])}
    by_hand = [system, *[dict(m, content=CALL) if m.get("tool_calls") else m for m in ROW["messages"][1:]]]
    for m in by_hand:
        m.pop("tool_calls", None)
    template = training_chat_template(mini_tokenizer)
    assert (render_with_mask(mini_tokenizer, to_messages({"messages": by_hand}, "messages", "x"), template)
            == render_with_mask(mini_tokenizer, to_messages(ROW, "messages", "x"), template))


def test_a_tools_field_without_a_system_turn_opens_one(mini_tokenizer):
    row = {"tools": [WEATHER["function"]], "messages": ROW["messages"][1:]}
    [(text, *_)] = rendered_with_offsets(mini_tokenizer, [to_messages(row, "messages", "x")],
                                         training_chat_template(mini_tokenizer))
    assert text.startswith('<|system|><|tool|>[{"name": "weather"')


@pytest.mark.parametrize("change, problem", [
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="{city: Paris"),
     "tool call 'weather': `arguments` is not valid JSON"),
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].pop("name"), "each tool call needs a function `name`"),
    (lambda r: r["messages"][0].update(tools=[WEATHER]), "tools are given twice, on the row and on its system turn"),
    (lambda r: r.update(tools=[{"description": "no name"}]), "each tool definition needs a `name`"),
])
def test_unreadable_tool_fields_are_bad_rows_with_their_place(change, problem):
    row = copy.deepcopy(ROW)
    change(row)
    with pytest.raises(BadRow) as error:
        to_messages(row, "messages", "train.jsonl:7")
    assert str(error.value) == f"train.jsonl:7: {problem}"


@pytest.mark.parametrize("template, family", [(None, "phi-3"), (PHI4_CHAT_TEMPLATE, "phi-4")])
def test_families_without_a_tool_format_say_so_in_one_line(phi3_tokenizer, tmp_path, template, family):
    """Phi-3's and Phi-4's templates would drop the tool turns and definitions silently; phitune refuses instead."""
    tokenizer = copy.deepcopy(phi3_tokenizer)
    if template:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_sep|>", "<|im_end|>"]})
        tokenizer.chat_template = template
    source = write_jsonl(tmp_path / "tools.jsonl", [ROW])
    with pytest.raises(PhituneError) as error:
        prepare_data(DataConfig(train=str(source), eval_split=0, cache_dir=str(tmp_path / "cache")), tokenizer)
    message = str(error.value)
    assert f"this model's template ({family}) has none" in message and "\n" not in message
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    prepare_data(DataConfig(train=str(write_jsonl(tmp_path / "plain.jsonl", [plain])), eval_split=0,
                            cache_dir=str(tmp_path / "cache")), tokenizer)  # the same model without tools trains


def test_eval_prompts_keep_earlier_calls_and_a_call_is_its_own_reference(mini_tokenizer):
    """phitune eval's generated answers are compared with the calls the model was trained to write: the hub template
    drops `tool_calls`, so without rendering them first the prompt lost the earlier call and a call's reference was
    empty (every answer scored 0)."""
    from phitune.after.evaluate import split_prompts

    conversations = [to_messages(row, "messages", "eval.jsonl") for row in (ROW, {**ROW, "messages": ROW["messages"][:3]})]
    prompts, references = split_prompts(conversations, mini_tokenizer)
    assert references[0] == "Paris is sunny; Rome has rain."
    assert references[1] == CALL.removeprefix("<|tool_call|>").removesuffix("<|/tool_call|>")  # decoded as answers are
    prompt_text = mini_tokenizer.apply_chat_template(prompts[0], tokenize=False, add_generation_prompt=True)
    assert CALL in prompt_text and "<|tool|>sunny, 21 C<|end|>" in prompt_text
    assert len(prompts[1]) == 2 and prompts[1][-1]["role"] == "user"


def test_a_tool_call_run_trains_on_the_phi4_mini_model_and_phitune_data_shows_the_masks(tmp_path):
    from phitune.api import inspect_data
    from phitune.train import run_training

    base = build_family_model("phi-4-mini", tmp_path / "phi4-mini")
    source = write_jsonl(tmp_path / "tools.jsonl", [ROW] * 8)
    raw = {"model": {"name_or_path": str(base), "torch_dtype": "float32"},
           "data": {"train": str(source), "eval_split": 0, "max_seq_length": 256, "cache_dir": str(tmp_path / "c")},
           "training_config": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "learning_rate": 1e-2,
                               "per_device_train_batch_size": 4, "logging_steps": 1, "save_strategy": "no",
                               "eval_strategy": "no", "seed": 0, "report_to": "none", "disable_tqdm": True},
           "peft_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}}
    result = run_training(raw_config(raw))
    assert np.isfinite(result.metrics["train_loss"]) and result.metrics["global_step"] == 2
    report = inspect_data(raw)
    trained = [text for text, on in report.example if on]
    untrained = "".join(text for text, on in report.example if not on)
    assert trained == [CALL + "<|end|>", "Paris is sunny; Rome has rain.<|end|>"]
    assert "sunny, 21 C" in untrained and '"name": "weather", "description"' in untrained


def raw_config(raw: dict):
    from phitune.config.schema import config_from_dict

    return config_from_dict(copy.deepcopy(raw))
