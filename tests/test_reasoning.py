"""Reasoning traces on the reasoning models' real templates: what is trained, token by token, with `train_on:
assistant` (trace, answer and end token) and `answer` (the trace in the context only); `reasoning_content` rows;
`phitune data`'s trace and system-turn warnings; the GRPO example's rewards.

The tokenizers are the bundled tiny Phi-4-mini and Phi-4 (each family's special tokens, a small byte-level BPE) with
the reasoning models' own chat templates set (phitune.data.templates, copied verbatim: docs/reasoning.md). The
expected labels are built from the format as the model cards describe it, one piece of text at a time, and checked
first against the real template's own rendering (transformers' apply_chat_template) and tokenization.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from phitune.data.encode import IGNORE_INDEX
from phitune.data.formats import to_messages
from phitune.data.readers import BadRow
from phitune.data.reasoning import AFTER_ANSWER, EMPTY, UNCLOSED, UNOPENED, content_notes
from phitune.data.templates import (
    PHI4_MINI_REASONING_CHAT_TEMPLATE,
    PHI4_MINI_REASONING_SYSTEM_PROMPT,
    PHI4_REASONING_CHAT_TEMPLATE,
    PHI4_REASONING_SYSTEM_BRANCH_TEMPLATE,
    PHI4_REASONING_SYSTEM_PROMPT,
)
from phitune.tiny.families import TINY_PHI4, TINY_PHI4_MINI

ROW = {"messages": [  # a system turn, a trace given as reasoning_content, one in the content, a turn without one
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "What is 12 times 3?"},
    {"role": "assistant", "reasoning_content": "\n12 times 3: 10 times 3 is 30, 2 times 3 is 6, so 36.\n",
     "content": "12 × 3 = **36**."},
    {"role": "user", "content": "And plus 4?"},
    {"role": "assistant", "content": "<think>\n36 + 4 = 40.\n</think>\n\n40."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]}
TEMPLATES = {  # name -> (tokenizer folder, chat template)
    "phi-4-mini-reasoning": (TINY_PHI4_MINI, PHI4_MINI_REASONING_CHAT_TEMPLATE),
    "phi-4-reasoning": (TINY_PHI4, PHI4_REASONING_CHAT_TEMPLATE),
    "phi-4-reasoning, system branch": (TINY_PHI4, PHI4_REASONING_SYSTEM_BRANCH_TEMPLATE),
}


def tokenizer_with(name: str):
    from transformers import AutoTokenizer

    folder, template = TEMPLATES[name]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = template
    return tokenizer


def assistant_pieces(content: str, end: str, train_on: str) -> list[tuple[str, bool]]:
    """An assistant turn's text and end token as (text, trained) pieces: a leading trace is trained only with
    train_on: assistant; the answer and the end token always."""
    if content.startswith("<think>"):
        cut = content.index("</think>") + len("</think>")
        return [(content[:cut], train_on == "assistant"), (content[cut:] + end, True)]
    return [(content + end, True)]


def expected_pieces(name: str, messages: list[dict], train_on: str) -> list[tuple[str, bool]]:
    """The conversation as each model card's format writes it, in (text, trained) pieces."""
    own_system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    if name == "phi-4-mini-reasoning":  # the sentence, then a row's system text after a space, in one system turn
        pieces = [("<|system|>" + PHI4_MINI_REASONING_SYSTEM_PROMPT + "".join(" " + s for s in own_system)
                   + "<|end|>", False)]
        for m in turns:
            if m["role"] == "user":
                pieces.append(("<|user|>" + m["content"] + "<|end|>", False))
            else:
                pieces += [("<|assistant|>", False), *assistant_pieces(m["content"], "<|end|>", train_on)]
        return pieces + [("<|endoftext|>", False)]  # the eos after a whole conversation: never written, masked
    # Phi-4-reasoning: the copied revision always writes its prompt (a row's system turn is dropped); the
    # revision with a system branch writes the row's own system turn in its place
    system = own_system[0] if own_system and name.endswith("system branch") else PHI4_REASONING_SYSTEM_PROMPT
    pieces = [("<|im_start|>system<|im_sep|>" + system + "<|im_end|>", False)]
    for m in turns:
        if m["role"] == "user":
            pieces.append(("<|im_start|>user<|im_sep|>" + m["content"] + "<|im_end|>", False))
        else:
            pieces += [("<|im_start|>assistant<|im_sep|>", False),
                       *assistant_pieces(m["content"], "<|im_end|>", train_on)]
    return pieces


@pytest.mark.parametrize("train_on", ["assistant", "answer"])
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_trained_tokens_are_exact_on_the_real_reasoning_templates(name, train_on):
    from phitune.data import tokenize_conversations

    tokenizer = tokenizer_with(name)
    messages = to_messages(ROW, "messages", "test")
    pieces = expected_pieces(name, messages, train_on)
    text = "".join(piece for piece, _ in pieces)
    assert text == tokenizer.apply_chat_template(messages, tokenize=False)  # the real template's own rendering
    ids, labels = [], []
    for piece, trained in pieces:
        piece_ids = tokenizer(piece, add_special_tokens=False).input_ids
        ids += piece_ids
        labels += piece_ids if trained else [IGNORE_INDEX] * len(piece_ids)
    assert ids == tokenizer(text, add_special_tokens=False).input_ids  # the pieces cut between tokens

    encoded = tokenize_conversations([messages], tokenizer, max_seq_length=4096, train_on=train_on)
    assert encoded.input_ids == [ids]
    assert encoded.labels == [labels]  # token by token
    trained = tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert ("12 times 3" in trained) == (train_on == "assistant") and "**36**" in trained


def test_reasoning_content_is_written_as_a_think_trace_before_the_answer():
    [_, _, first, _, second, _, third] = to_messages(ROW, "messages", "test")
    assert first == {"role": "assistant", "content": "<think>\n12 times 3: 10 times 3 is 30, 2 times 3 is 6, so 36."
                                                     "\n</think>\n\n12 × 3 = **36**."}
    assert second["content"] == ROW["messages"][4]["content"] and third["content"] == "You're welcome."
    twice = {"messages": [{"role": "user", "content": "q"},
                          {"role": "assistant", "reasoning_content": "t", "content": "<think>t</think>a"}]}
    with pytest.raises(BadRow, match=r"^rows\.jsonl:3: the trace is given twice: in reasoning_content and as "
                                           r"<think>\.\.\.</think> in the content$"):
        to_messages(twice, "messages", "rows.jsonl:3")
    wrong = {"messages": [{"role": "user", "content": "q"},
                          {"role": "assistant", "reasoning_content": ["t"], "content": "a"}]}
    with pytest.raises(BadRow, match=r"reasoning_content must be text, not list$"):
        to_messages(wrong, "messages", "rows.jsonl:4")


def test_the_mini_reasoning_training_template_keeps_a_reworded_system_sentence():
    """A fine-tune that rewrote the sentence (one README found renames the model) keeps its own text: the markers
    are put into the tokenizer's template, not taken from phitune's copy."""
    from phitune.data import training_chat_template

    tokenizer = tokenizer_with("phi-4-mini-reasoning")
    tokenizer.chat_template = PHI4_MINI_REASONING_CHAT_TEMPLATE.replace(PHI4_MINI_REASONING_SYSTEM_PROMPT,
                                                                        "You are Cosimo.")
    template = training_chat_template(tokenizer)
    messages = to_messages(ROW, "messages", "test")
    rendered = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert "{% generation %}" in template and rendered.startswith("<|system|>You are Cosimo. Answer in one line.")
    assert rendered == tokenizer.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("content, notes", [
    ("<think>\nfine\n</think>\n\nanswer", 0),
    ("no trace at all", 0),
    ("<think>\nthinking and thinking", UNCLOSED),
    ("thinking\n</think>\n\nanswer", UNOPENED),
    ("<think>\n \n</think>answer", EMPTY),
    ("The answer is 4. <think>because 2 + 2</think>", AFTER_ANSWER),
    ("So: <think> </think>", AFTER_ANSWER | EMPTY),
])
def test_content_notes(content, notes):
    assert content_notes(content) == notes


def tokenizer_folder(tmp_path: Path, name: str) -> Path:
    """A model folder (the bundled tiny one) whose tokenizer carries the named reasoning template."""
    folder = tmp_path / "model"
    shutil.copytree(TEMPLATES[name][0], folder)
    tokenizer_with(name).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name, says", [("phi-4-reasoning", "drops without a word"),
                                        ("phi-4-reasoning, system branch", "in place of the reasoning system prompt")])
def test_phitune_data_counts_trace_problems_and_says_what_happens_to_system_turns(tmp_path, make_config, name, says):
    from phitune.data.inspect import inspect_data

    def row(answer: str, system: bool = False) -> dict:
        turns = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": answer}]
        return {"messages": ([{"role": "system", "content": "Be brief."}] if system else []) + turns}

    rows = [row("<think>\n2 + 2 = 4\n</think>\n\n4", system=True), row("<think>\n2 + 2 = 4, so", system=True),
            row("<think>\n2 + 2\n</think>\n\n4."), row("2 + 2 =\n</think>\n\n4"), row("<think>\n\n</think>\n\n4"),
            row("4. <think>2 + 2</think>"), row("<think>\nagain\n</think>\n\nfour")]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_config(data={"train": str(data), "eval": None, "eval_split": 0, "max_seq_length": 512,
                            "cache_dir": str(tmp_path / "cache")})
    cfg.model.name_or_path = str(tokenizer_folder(tmp_path, name))
    warnings = inspect_data(cfg, output_dir=tmp_path / "report").warnings
    assert "train: 1 example with a <think> trace that never closes with </think> (trained so, the model learns to " \
           "think without end)" in warnings
    assert "train: 1 example with a </think> that no <think> opened (the reasoning models write <think> first " \
           "themselves)" in warnings
    assert "train: 1 example with an empty trace (nothing but whitespace between <think> and </think>)" in warnings
    assert "train: 1 example with answer text before the <think> trace (the reasoning models think first)" in warnings
    [system] = [w for w in warnings if "system turn" in w]
    assert system.startswith("2 examples (train and eval) have a system turn of their own") and says in system


def test_answer_only_reaches_the_prepared_labels(tmp_path):
    """Through prepare_data (Arrow, batched), as training runs it: the trace is in the ids, not in the labels."""
    from phitune.config.schema import DataConfig
    from phitune.data.prepare import prepare_data

    tokenizer = tokenizer_with("phi-4-mini-reasoning")
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(ROW, ensure_ascii=False) + "\n", encoding="utf-8")
    prepared = {}
    for train_on in ("assistant", "answer"):
        cfg = DataConfig(train=str(data), eval_split=0, cache_dir=str(tmp_path / "cache"), train_on=train_on)
        prepared[train_on] = prepare_data(cfg, tokenizer).train.to_dataset()[0]
    assistant, answer = prepared["assistant"], prepared["answer"]
    assert assistant["input_ids"] == answer["input_ids"]
    dropped = [i for i, a, b in zip(assistant["input_ids"], assistant["labels"], answer["labels"]) if a != b]
    assert tokenizer.decode(dropped) == ("<think>\n12 times 3: 10 times 3 is 30, 2 times 3 is 6, so 36.\n</think>"
                                         "<think>\n36 + 4 = 40.\n</think>")


def test_the_grpo_example_rewards_a_closed_trace_and_a_right_answer():
    from phitune.after.rewards import build_rewards
    from phitune.config.schema import load_config

    cfg = load_config(Path(__file__).parents[1] / "examples" / "phi4-mini-reasoning-grpo.yaml")
    rewards = {reward.name: reward.func for reward in build_rewards(cfg.rewards)}
    completions = {
        "<think>\n3 and 4 make 7.\n</think>\n\nThe answer is \\boxed{7}.": (1.0, 1.0),
        "<think>\n3 and 4 make 7, so the answer is 7": (0.0, 0.0),  # never closed: right number, no reward
        "The answer is 7.": (0.0, 0.0),  # no trace at all
        "<think>\n3 and 4 make 8?\n</think>\n\n8": (1.0, 0.0),  # closed, wrong
        "<think>\n</think>\n\n7": (0.0, 1.0),  # an empty trace is not a trace
    }
    got = {name: func(["q"] * len(completions), list(completions), answer=["3 + 4 = 7 #### 7"] * len(completions))
           for name, func in rewards.items()}
    assert list(zip(got["format"], got["answer"])) == list(completions.values())


def test_a_reasoning_run_trains_the_answers_only_and_phitune_data_shows_it(tmp_path):
    """End to end on the bundled tiny Phi-4-mini with Phi-4-mini-reasoning's template: `train_on: answer` trains,
    and the example `phitune data` shows has exactly the answers and their <|end|> trained, every trace dim."""
    import numpy as np

    from phitune.api import inspect_data
    from phitune.config.schema import config_from_dict
    from phitune.train import run_training

    data = tmp_path / "rows.jsonl"
    data.write_text((json.dumps(ROW, ensure_ascii=False) + "\n") * 8, encoding="utf-8")
    raw = {"model": {"name_or_path": str(tokenizer_folder(tmp_path, "phi-4-mini-reasoning")), "torch_dtype": "float32"},
           "data": {"train": str(data), "eval_split": 0, "max_seq_length": 256, "train_on": "answer",
                    "cache_dir": str(tmp_path / "cache")},
           "training_config": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "learning_rate": 1e-2,
                               "per_device_train_batch_size": 4, "logging_steps": 1, "save_strategy": "no",
                               "eval_strategy": "no", "seed": 0, "report_to": "none", "disable_tqdm": True},
           "peft_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}}
    result = run_training(config_from_dict(json.loads(json.dumps(raw))))
    assert np.isfinite(result.metrics["train_loss"]) and result.metrics["global_step"] == 2
    example = inspect_data(raw).example
    assert [text for text, trained in example if trained] == ["\n\n12 × 3 = **36**.<|end|>", "\n\n40.<|end|>",
                                                              "You're welcome.<|end|>"]
    assert "<think>\n36 + 4 = 40.\n</think>" in "".join(text for text, trained in example if not trained)


@pytest.mark.parametrize("name, prompt, turn", [
    ("phi-4-mini-reasoning", PHI4_MINI_REASONING_SYSTEM_PROMPT, "<|{{ .Role }}|>{{ .Content }}<|end|>"),
    ("phi-4-reasoning", PHI4_REASONING_SYSTEM_PROMPT, "<|im_start|>{{ .Role }}<|im_sep|>{{ .Content }}<|im_end|>")])
def test_the_ollama_modelfile_of_a_reasoning_model_carries_its_system_prompt(tmp_path, name, prompt, turn):
    """Ollama runs its own Go template, not the GGUF's Jinja one, so the prompt the Jinja template writes by default
    must become the Modelfile's SYSTEM. The GGUF here holds only the chat template (what write_modelfile reads)."""
    import gguf

    from phitune.after.export.ollama import write_modelfile

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_chat_template(TEMPLATES[name][1])
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    text = write_modelfile(path).read_text()
    assert f'SYSTEM """{prompt}"""' in text and turn in text
    assert 'SYSTEM """mine"""' in write_modelfile(path, system="mine").read_text()  # a user's own wins
