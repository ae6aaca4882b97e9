"""GRPO's rewards (phitune.after.rewards) and its config section (config_methods.check_rewards): each built-in reward on the
cases that break naive versions, a user's own function loaded from a module or a file with one-line errors, and the
`rewards:` section checked at load."""

from __future__ import annotations

import json

import pytest

from phitune.config.schema import config_from_dict
from phitune.errors import PhituneError
from phitune.after.rewards import (
    answer_reward,
    build_rewards,
    extract_answer,
    format_reward,
    json_reward,
    length_reward,
    same_answer,
)


def conversational(*texts):
    return [[{"role": "assistant", "content": text}] for text in texts]


def test_answer_extraction_takes_the_final_answer_not_the_first_number():
    assert extract_answer("7 plus 5 is 12.") == "12"  # the last number, without the sentence's period
    assert extract_answer("It costs $1,250.50 in total") == "1,250.50"  # thousands separators stay one number
    assert extract_answer("from -3 to -7") == "-7"
    assert extract_answer("no digits here") is None
    assert extract_answer(r"so \boxed{\frac{1}{2}} and not \boxed{3}", "boxed") == "3"  # the last box
    assert extract_answer(r"\boxed{\frac{1}{2}}", "boxed") == r"\frac{1}{2}"  # nested braces kept
    assert extract_answer(r"\boxed{12", "boxed") is None  # unclosed
    assert extract_answer("Answer: 4. Answer: 5!", "regex", r"Answer: (\d+)") == "5"  # the last match's group
    assert extract_answer("x = 9", "regex", r"\d") == "9"  # no group: the whole match
    assert extract_answer("  Paris. ", "text") == "Paris."


def test_answers_compare_as_numbers_when_both_are_numbers_else_as_text():
    assert same_answer("3.0", "3") and same_answer("1,000", "1000") and same_answer("$72", "72")
    assert same_answer("0.1", 0.1) and same_answer("12.", "12")
    assert not same_answer("3.01", "3") and not same_answer("13", "3") and not same_answer(None, "3")
    assert same_answer("Paris.", "paris") and same_answer(" Grass  green", "grass green")
    assert not same_answer("Paris", "Pari")


def test_the_answer_reward_compares_with_the_reference_column():
    reward = answer_reward()
    got = reward(prompts=["p"] * 4, completions=conversational("7 plus 5 is 12.", "It is 12.0", "13", ""),
                 answer=["12", "12", "12", "12"])
    assert got == [1.0, 1.0, 0.0, 0.0]
    gsm8k = answer_reward(column="solution", reference_pattern=r"####\s*(.+)")
    assert gsm8k(prompts=["p", "p"], completions=["so she has 1,072 left", "72"],
                 solution=["3 + 69 = 72 ... #### 1072", "#### 72"]) == [1.0, 1.0]
    boxed = answer_reward(extract="boxed")
    assert boxed(prompts=["p", "p"], completions=[r"12 then \boxed{3}", r"\boxed{12} then 3"],
                 answer=["3", "3"]) == [1.0, 0.0]
    with pytest.raises(PhituneError, match="answer reward compares with column 'answer', which the data does not "
                                           "have \\(its columns besides the prompt: solution\\)"):
        reward(prompts=["p"], completions=["1"], solution=["1"])


def test_format_json_and_length_rewards():
    think = format_reward(r"^<think>.+</think>\s*\S")
    assert think(prompts=["p"] * 3, completions=["<think>a\nb</think> 4", "4 <think>a</think> 4",
                                                "<think></think>4"]) == [1.0, 0.0, 0.0]
    plain = json_reward()
    assert plain(prompts=["p"] * 3, completions=['{"a": 1}', 'Here:\n```json\n{"a": 2}\n```', "{a: 1}"]) == [1, 1, 0]
    schema = json_reward({"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}})
    assert schema(prompts=["p"] * 3, completions=['{"name": "x"}', '{"name": 3}', '[1]']) == [1.0, 0.0, 0.0]
    with pytest.raises(PhituneError, match="not a valid JSON schema"):
        json_reward({"type": 12})
    length = length_reward(max_tokens=4)
    values = length(prompts=["p"] * 3, completions=["a", "b", "c"], completion_ids=[[1] * 4, [1] * 6, [1] * 40])
    assert values == [0.0, -0.5, -1.0]  # -(6 - 4) / 4, then floored at -1


REWARD_FILE = '''
def brevity(prompts, completions, **columns):
    return [1.0 if len(c[-1]["content"]) < 5 else 0.0 for c in completions]

def broken(prompts, completions, **columns):
    raise KeyError("topic")

def too_few(prompts, completions, **columns):
    return [1.0]

def words(prompts, completions, **columns):
    return ["high"] * len(completions)

def sees_columns(prompts, completions, answer, **columns):
    return [float(a == "12") for a in answer]
'''


def test_a_users_reward_loads_from_a_file_or_a_module_with_one_line_errors(tmp_path, monkeypatch):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_FILE, encoding="utf-8")
    rewards = build_rewards([{"function": f"{path}:brevity", "weight": 0.5}, {"name": "answer"}])
    assert [(r.name, r.weight, r.builtin) for r in rewards] == [("brevity", 0.5, None), ("answer", 1.0, "answer")]
    assert rewards[0].func(prompts=["p"] * 2, completions=conversational("ok", "far too long")) == [1.0, 0.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    columns = build_rewards([{"function": "my_rewards:sees_columns"}])[0]
    assert columns.func(prompts=["p"] * 2, completions=["a", "b"], answer=["12", "3"]) == [1.0, 0.0]

    def fails(spec, message, **call):
        with pytest.raises(PhituneError, match=message) as err:
            reward = build_rewards([{"function": spec}])[0]
            reward.func(prompts=["p"] * 2, completions=["a", "b"], **call)
        assert "\n" not in str(err.value)

    fails(f"{tmp_path}/missing.py:brevity", r"rewards\[0\].function: file not found: .*missing.py")
    fails(f"{path}:brevty", r"has no function brevty \(it has: brevity, broken, sees_columns, too_few, words\)")
    fails("no_such_module_xyz:f", "cannot import module no_such_module_xyz")
    fails(f"{path}:broken", r"^reward broken raised KeyError: 'topic'$")
    fails(f"{path}:too_few", r"^reward too_few returned 1 value for 2 completions; it must return one number")
    fails(f"{path}:words", r"^reward words returned a value that is not a number: 'high'")


def test_two_rewards_of_one_kind_log_under_their_own_names():
    rewards = build_rewards([{"name": "format", "pattern": "a"}, {"name": "format", "pattern": "b"}])
    assert [r.name for r in rewards] == ["format", "format_2"]
    assert [r.func.__name__ for r in rewards] == ["format", "format_2"]  # TRL logs rewards/<__name__>/mean


def grpo_config(**sections):
    raw = {"method": "grpo", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "peft_config": {"r": 8},
           "rewards": [{"name": "answer"}]}
    return config_from_dict({**raw, **sections})


def test_the_rewards_section_and_grpo_keys_are_checked_at_load_with_did_you_mean():
    cfg = grpo_config(training_config={"num_generations": 4, "max_completion_length": 32, "beta": 0.04,
                                       "temperature": 0.7})
    assert cfg.rewards == [{"name": "answer"}] and cfg.training_config["num_generations"] == 4
    assert cfg.to_dict()["rewards"] == [{"name": "answer"}]
    with pytest.raises(PhituneError) as err:
        grpo_config(rewards=[{"name": "answr"}, {"name": "format"}, {"name": "answer", "extract": "boxd"},
                             {"name": "length", "max_tokens": 0}, {"function": "just_a_name"},
                             {"name": "answer", "colum": "x", "weight": "high"}, {"name": "format", "pattern": "("},
                             {"name": "length"}],
                    training_config={"num_generation": 4, "reward_weights": [1.0]})
    message = str(err.value)
    assert "\n" not in message
    for part in ["rewards[0].name must be one of answer, format, json, length, got 'answr' (did you mean 'answer'?)",
                 "rewards[1]: the format reward needs a pattern",
                 "rewards[2].extract must be one of last_number, boxed, regex, text, got 'boxd' "
                 "(did you mean 'boxed'?)",
                 "rewards[3].max_tokens must be a positive number of tokens, got 0",
                 "rewards[4].function must be module:function or path/to/file.py:function, got 'just_a_name'",
                 "unknown key rewards[5].colum (did you mean 'column'?)", "rewards[5].weight must be a number",
                 "rewards[6].pattern is not a valid regular expression",
                 "rewards[7]: the length reward needs max_tokens",
                 "unknown key training_config.num_generation (did you mean 'num_generations'?)",
                 "training_config.reward_weights is set through rewards[].weight"]:
        assert part in message, part
    with pytest.raises(PhituneError, match="method grpo needs rewards"):
        grpo_config(rewards=None)
    with pytest.raises(PhituneError, match="rewards apply to method: grpo, not sft"):
        grpo_config(method="sft")
    with pytest.raises(PhituneError, match="method grpo reads prompt rows; leave data.format at auto"):
        grpo_config(data={"train": "t.jsonl", "format": "alpaca"})


def test_a_relative_reward_file_is_saved_absolute(tmp_path, monkeypatch):
    """phitune eval on the run from another directory still finds the function."""
    from phitune.config.schema import load_run_config, save_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.py").write_text(REWARD_FILE, encoding="utf-8")
    cfg = grpo_config(rewards=[{"function": "r.py:brevity", "weight": 2}, {"function": "my_mod:f"}],
                      training_config={"output_dir": str(tmp_path / "run")})
    (tmp_path / "run").mkdir()
    save_config(cfg, tmp_path / "run" / "phitune_config.yaml")
    saved = load_run_config(tmp_path / "run").rewards
    assert saved == [{"function": f"{tmp_path / 'r.py'}:brevity", "weight": 2}, {"function": "my_mod:f"}]
    assert json.dumps(saved)


def test_the_gsm8k_example_loads_and_quotes_the_memory_phitune_memory_computes():
    import math
    import re
    from pathlib import Path

    from phitune.config.schema import load_config
    from phitune.models.memory import SHAPES, estimate_run

    path = Path(__file__).parents[1] / "examples" / "phi4-mini-grpo-gsm8k.yaml"
    cfg = load_config(path)
    assert cfg.method == "grpo" and [r.get("name") for r in cfg.rewards] == ["answer", "format"]
    quoted = re.search(r"LoRA (\d+) GB, QLoRA (\d+) GB", path.read_text())
    assert [int(quoted[1]), int(quoted[2])] == [math.ceil(estimate_run(cfg, q).total) for q in (False, True)]
    shape = SHAPES[cfg.model.name_or_path]  # the KV cache of one step's completions, generated at once
    per_token = shape.layers * shape.kv_heads * (shape.hidden // shape.heads) * 2 * 2
    training = cfg.training_config
    completions = training["per_device_train_batch_size"] * training["gradient_accumulation_steps"]
    assert f"{completions} x {cfg.data.max_seq_length} tokens x {per_token / 1e3:.0f} kB = " \
           f"{completions * cfg.data.max_seq_length * per_token / 1e9:.1f} GB" in path.read_text()
    reward = build_rewards(cfg.rewards)
    row = {"prompts": ["p"], "completions": ["48 + 24 = 72 clips.\nThe answer is 72."],
           "answer": ["Natalia sold 48/2 = 24 clips in May.\n#### 72"]}
    assert [r.func(**row) for r in reward] == [[1.0], [1.0]]


def test_vllm_generation_is_chosen_only_where_asked_or_on_cuda_with_vllm():
    import importlib.util

    import torch

    from phitune.recipes.grpo import use_vllm

    assert use_vllm("true") and not use_vllm("false")
    assert use_vllm("auto") == (torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None)
    assert grpo_config(speed={"vllm": "false"}).speed.vllm == "false"  # YAML's false is the choice "false"
    with pytest.raises(PhituneError, match=r"speed.vllm must be one of"):
        grpo_config(speed={"vllm": "maybe"})
