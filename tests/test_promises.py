"""The README's promises on the paths a new user walks, as tables, one line per case.

Bad input to any command: exit code 2, exactly one line on stderr (`error: ...` saying what to do), no traceback, no
weights loaded, and nothing left behind: the case's directory (its working directory too) holds the same files and
folders after the command as before, and the finished run the commands read is unchanged.
An interrupt (Ctrl-C, SIGTERM) at a command's main stage: exit code 130 and one line saying so.

Bad-input rows run the real CLI in-process (`phitune.cli.main` with the row's arguments), so the table costs no
interpreter start per row; Python warnings are counted as stderr lines, as a real process would print them. A missing
extra is also tried in a real process, as are the rows that need an environment set before the libraries import
(REAL_PROCESS: the hub offline), and the interrupts are real signals to real processes.

Row: case(id, command line, words the stderr line must hold, files=..., hide=...). In the command line and the files,
{d} is the case's directory, {run} a finished run, {model} the tiny model. Every case directory starts with run.yaml
(SFT on {d}/train.jsonl), dpo.yaml (DPO on {d}/pairs.jsonl), grpo.yaml (GRPO on {d}/prompts.jsonl, a length
reward), good data for each, and a file exists.txt; `files` replaces or adds files (a name ending in / is a directory; UNREADABLE a file no one can read);
`hide` names modules made unimportable, as when an extra is not installed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml
from conftest import extra_line

DEMO_DATA = Path(__file__).parents[1] / "src" / "phitune" / "assets" / "demo_chat"
TINY_BASE = DEMO_DATA.parent / "tiny-phi3"  # the bundled model a demo run names (phitune.tiny.phi3.tiny_base_path)
GOOD = {"messages": [{"role": "user", "content": "Which colour is snow?"}, {"role": "assistant", "content": "White."}]}
PAIR = {"prompt": "Is snow white?", "chosen": "Yes.", "rejected": "No."}
LONG_SYSTEM = {"role": "system", "content": "Please read all of this carefully before answering. " * 20}
TOOL_ROW = json.loads((DEMO_DATA.parent / "demo_tools" / "train.jsonl").read_text().splitlines()[0])
TINY_PHI4_MINI = DEMO_DATA.parent / "tiny-phi4-mini"
UNREADABLE = object()


SFT = {"model": {"name_or_path": "{model}", "torch_dtype": "float32"},
       "data": {"train": "{d}/train.jsonl", "eval_split": 0, "max_seq_length": 128, "cache_dir": "{d}/cache"},
       "training_config": {"output_dir": "{d}/out", "max_steps": 1, "seed": 0},
       "peft_config": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}}


def grpo_yaml(reward: str) -> str:
    """GRPO on {d}/prompts.jsonl with one reward (a YAML flow mapping)."""
    config = {**SFT, "method": "grpo", "data": {**SFT["data"], "train": "{d}/prompts.jsonl"},
              "training_config": {**SFT["training_config"], "output_dir": "{d}/grpo-out",
                                  "per_device_train_batch_size": 2, "num_generations": 2, "max_completion_length": 4}}
    return yaml.safe_dump(config) + f"rewards:\n  - {reward}\n"


class Case(NamedTuple):
    id: str
    argv: list
    words: list
    files: dict
    hide: tuple


def case(id: str, argv: list, words: list, files: dict | None = None, hide: tuple = ()) -> Case:
    return Case(id, argv, words, files or {}, hide)


def lines(*rows) -> str:
    """A .jsonl text whose lines are the given rows (dicts dumped as JSON, strings written as they are)."""
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def chat(*turns) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def train(*sets: str, extra: tuple = (), config: str = "run.yaml") -> list:
    """`phitune train CONFIG [EXTRA] --set A --set B ...`"""
    return ["train", f"{{d}}/{config}", *extra, *[part for item in sets for part in ("--set", item)]]


def dpo(*sets: str, extra: tuple = ()) -> list:
    return train(*sets, extra=extra, config="dpo.yaml")


def grpo(*sets: str) -> list:
    return train(*sets, config="grpo.yaml")


def bad_arguments(row: dict) -> dict:
    """The tool-call row with its first call's arguments cut short (not JSON)."""
    row = json.loads(json.dumps(row))
    call = next(m for m in row["messages"] if m.get("tool_calls"))["tool_calls"][0]["function"]
    call["arguments"] = '{"city": '
    return row


USAGE = [
    case("no_command", [], ["no command given", "phitune --help"]),
    case("misspelled_command", ["trian"], ["No such command 'trian'", "Did you mean 'train'?"]),
    case("missing_argument", ["train"], ["Missing argument 'config'", "phitune train --help"]),
    case("unknown_flag", [*train(), "--bogus"], ["No such option: --bogus", "phitune train --help"]),
    case("missing_option", ["merge", "{run}"], ["Missing option '--output'", "phitune merge --help"]),
    case("option_wrong_type", ["eval", "{run}", "--batch-size", "x"], ["'--batch-size'", "integer"]),
    case("option_out_of_range", ["eval", "{run}", "--batch-size", "0"], ["'--batch-size'", "greater than or equal to 1"]),
]

TRAIN_SFT = [
    case("config_missing", ["train", "{d}/nope.yaml"], ["config file not found", "nope.yaml"]),
    case("config_is_directory", ["train", "{d}/configs"], ["configs is a directory, not a config file"],
         {"configs/": ""}),
    case("config_file_empty", ["train", "{d}/run.yaml"], ["run.yaml: the file is empty", "model, data"],
         {"run.yaml": ""}),
    case("config_section_misspelled", ["train", "{d}/run.yaml"], ["unknown top-level key dta (did you mean 'data'?)"],
         {"run.yaml": "model: {name_or_path: '{model}'}\ndta: {train: '{d}/train.jsonl'}\n"}),
    case("data_file_missing", train("data.train={d}/nope.jsonl"), ["data file not found", "nope.jsonl"]),
    case("data_path_is_directory", train("data.train={d}/dir.jsonl"), ["is a directory"], {"dir.jsonl/": ""}),
    case("data_file_unreadable", train(), ["cannot read", "train.jsonl"], {"train.jsonl": UNREADABLE}),
    case("data_file_empty", train(), ["train.jsonl", "the file is empty (0 bytes); it needs rows of chat data"],
         {"train.jsonl": ""}),
    case("data_file_blank", train(), ["train.jsonl", "no rows", "it needs rows of chat data"],
         {"train.jsonl": "  \n\n"}),
    case("malformed_json_line", train(), ["train.jsonl:3", "malformed JSON", "--on-bad-row skip"],
         {"train.jsonl": lines(GOOD, GOOD, '{"messages": [{"role": "user"')}),
    case("unknown_row_format", train(), ["unknown data format", "question"],
         {"train.jsonl": lines({"question": "a?", "answer": "b"})}),
    case("unknown_format_name", train("data.format=chatml"), ["data.format must be one of", "chatml"]),
    case("no_assistant_turn", train(), ["train.jsonl:2", "no assistant turn"],
         {"train.jsonl": lines(GOOD, chat(("user", "hi")))}),
    case("roles_out_of_order", train(), ["train.jsonl:1", "roles out of order"],
         {"train.jsonl": lines(chat(("user", "a"), ("user", "b"), ("assistant", "c")))}),
    case("empty_content", train(), ["train.jsonl:2", "empty content"],
         {"train.jsonl": lines(GOOD, chat(("user", "a"), ("assistant", "  ")))}),
    case("empty_after_skipping", train("data.on_bad_row=skip"), ["every row is bad (2 skipped); the first:", "malformed JSON line"],
         {"train.jsonl": lines(chat(("user", "a")), "not json")}),
    case("every_label_masked", train("data.max_seq_length=32"), ["every label is masked", "max_seq_length"],
         {"train.jsonl": lines({"messages": [LONG_SYSTEM, *GOOD["messages"]]})}),
    case("not_utf8", train(), ["train.jsonl:2", "not UTF-8"],
         {"train.jsonl": json.dumps(GOOD).encode() + b"\n" + b'{"x": "caf\xe9"}\n'}),
    case("unknown_config_key", train("data.trian=x.jsonl"), ["unknown key data.trian", "'train'"]),
    case("mistyped_training_key", train("training_config.learning_rte=0.1"),
         ["unknown key training_config.learning_rte", "'learning_rate'"]),
    case("wrong_type_data_value", train("data.max_seq_length=long"), ["data.max_seq_length must be int", "'long'"]),
    case("wrong_type_training_value", train("training_config.max_steps=ten"),
         ["training_config.max_steps must be int", "'ten'"]),
    case("invalid_training_value", train("training_config.lr_scheduler_type=cosin"),
         ["training_config.lr_scheduler_type must be one of linear, cosine,", "got 'cosin' (did you mean 'cosine'?)"]),
    case("training_values_the_trainer_rejects",
         train("training_config.load_best_model_at_end=true", "training_config.save_strategy=epoch"),
         ["training_config:", "load_best_model_at_end requires the save and eval strategy to match"]),
    case("set_value_not_yaml", train("data.max_seq_length=[1"), ["--set 'data.max_seq_length=[1'", "not valid YAML"]),
    case("batch_size_zero", train("training_config.per_device_train_batch_size=0"),
         ["per_device_train_batch_size must be at least 1, got 0"]),
    case("epochs_negative", train("training_config.num_train_epochs=-1", "training_config.max_steps=-1"),
         ["num_train_epochs must be positive, got -1"]),
    case("learning_rate_not_a_number", train("training_config.learning_rate=fast"),
         ["training_config.learning_rate must be a number", "'fast'"]),
    case("yaml_value_wrong_type", train(), ["data.max_seq_length must be int"],
         {"run.yaml": "model: {name_or_path: '{model}'}\ndata: {train: '{d}/train.jsonl', max_seq_length: [1, 2]}\n"}),
    case("model_path_missing", train("model.name_or_path={d}/no-such-model"),
         ["model path does not exist", "no-such-model"]),
    case("target_modules_match_nothing", train("peft_config.target_modules=[q_proj, o_proj]"),
         ["'q_proj' matches nothing; this model's linear layers are qkv_proj, o_proj, gate_up_proj, down_proj"]),
    case("max_seq_length_beyond_context", train("data.max_seq_length=4096"),
         ["max_seq_length 4096 exceeds the model's context of 1024"]),
    case("output_dir_holds_finished_run", train(), ["already holds a finished run", "--overwrite"],
         {"out/phitune_complete": "finished\n"}),
    case("resume_a_finished_run", train(extra=("--resume",)), ["is already complete, nothing to resume", "--overwrite"],
         {"out/phitune_complete": "finished\n", "out/checkpoint-4/phitune_complete": "{}\n"}),
    case("resume_without_checkpoint", train(extra=("--resume",)), ["no complete checkpoint"]),
    case("output_dir_holds_interrupted_run", train(), ["already holds an interrupted run (checkpoint-4)", "--resume"],
         {"out/checkpoint-4/phitune_complete": "{}\n"}),
    case("output_dir_foreign", train(), ["is not empty and holds no phitune run"], {"out/notes.txt": "mine\n"}),
    case("overwrite_refuses_a_foreign_dir", train(extra=("--overwrite",)), ["holds no phitune run"],
         {"out/notes.txt": "mine\n"}),
]

TRAIN_DPO = [
    case("dpo_pairs_file_missing", dpo("data.train={d}/nope.jsonl"), ["data file not found", "nope.jsonl"]),
    case("dpo_pairs_file_empty", dpo(), ["pairs.jsonl", "empty"], {"pairs.jsonl": ""}),
    case("dpo_malformed_json_line", dpo(), ["pairs.jsonl:2", "malformed JSON", "--on-bad-row skip"],
         {"pairs.jsonl": lines(PAIR, "{")}),
    case("dpo_unknown_training_key", dpo("training_config.betta=0.1"), ["unknown key training_config.betta", "'beta'"]),
    case("dpo_beta_not_a_number", dpo("training_config.beta=high"), ["training_config.beta", "'high'"]),
    case("dpo_batch_size_zero", dpo("training_config.per_device_train_batch_size=0"),
         ["per_device_train_batch_size must be at least 1, got 0"]),
    case("dpo_output_dir_holds_finished_run", dpo(), ["already holds a finished run"],
         {"dpo-out/phitune_complete": "finished\n"}),
    case("dpo_output_dir_holds_interrupted_run", dpo(), ["already holds an interrupted run"],
         {"dpo-out/checkpoint-2/phitune_complete": "{}\n"}),
    case("dpo_output_dir_foreign", dpo(), ["holds no phitune run"], {"dpo-out/notes.txt": "mine\n"}),
    # the other methods on the same pairs (`--set method=...`): their own rules, each one line before any weight loads
    case("simpo_other_cpo_loss", dpo("method=simpo", "training_config.loss_type=hinge"),
         ["method simpo trains CPO's simpo loss", "'hinge'"]),
    case("kto_given_pairs", dpo("method=kto"), ["pairs.jsonl:1", "train them with method dpo"]),
    case("kto_batch_of_one", dpo("method=kto", "training_config.per_device_train_batch_size=1"),
         ["per_device_train_batch_size", "at least 2"]),
    case("reward_from_an_adapter", dpo("method=reward", "model.adapter={d}/dpo-out"), ["method reward", "model.adapter"]),
    case("distill_without_teacher", train("method=distill"), ["teacher"]),
    case("distill_teacher_missing", train("method=distill", "teacher.name_or_path={d}/no-teacher"),
         ["teacher", "no-teacher"]),
    case("method_in_capitals", train("method=SimPO"), ["got 'SimPO'", "did you mean 'simpo'?"]),
]

# GRPO, vision, raw text and tool-call data: each method's and format's own rules, one line before any weight loads
OTHER_DATA = [
    case("grpo_without_rewards", train("method=grpo"), ["method grpo needs rewards"]),
    case("grpo_reward_misspelled", grpo(), ["rewards[0].name must be one of", "got 'answr' (did you mean 'answer'?)"],
         {"grpo.yaml": grpo_yaml("{name: answr}")}),
    case("grpo_rewards_by_set", grpo("rewards=[{name: answer}]"), ["rewards cannot be set with --set", "YAML"]),
    case("grpo_answer_column_missing", grpo(), ["the answer reward compares with column 'answer'"],
         {"grpo.yaml": grpo_yaml("{name: answer}")}),
    case("grpo_empty_prompt", grpo(), ["prompts.jsonl:1", "the prompt is empty", "on_bad_row"],
         {"prompts.jsonl": lines({"prompt": ""})}),
    case("vision_on_a_text_model", train("method=vision"), ["Phi-4-multimodal", "this model is phi3"]),
    case("text_without_a_text_column", train("data.format=text"), ["no `text` column", "data.format: text"]),
    case("text_file_empty", train("data.format=text", "data.train={d}/doc.txt"), ["doc.txt", "the file is empty"],
         {"doc.txt": ""}),
    case("tool_data_on_phi3", train(), ["tool-call data", "template (phi-3) has none"],
         {"train.jsonl": lines(TOOL_ROW)}),
    case("tool_arguments_not_json", train(f"model.name_or_path={TINY_PHI4_MINI}"),
         ["train.jsonl:1", "tool call 'weather': `arguments` is not valid JSON", "--on-bad-row skip"],
         {"train.jsonl": lines(bad_arguments(TOOL_ROW))}),
]

DATA = [
    case("data_config_missing", ["data", "{d}/nope.yaml"], ["config file not found"]),
    case("data_config_is_directory", ["data", "{d}"], ["is a directory, not a config file"]),
    case("data_command_file_missing", ["data", "{d}/run.yaml", "--set", "data.train={d}/nope.jsonl"], ["data file not found"]),
    case("data_set_not_yaml", ["data", "{d}/run.yaml", "--set", "data.format=[x"], ["not valid YAML"]),
    case("data_example_negative", ["data", "{d}/run.yaml", "--example", "-1"], ["'--example'", "greater than or equal"]),
    case("data_unknown_key", ["data", "{d}/run.yaml", "--set", "data.trian=x"], ["unknown key data.trian"]),
]

INFERENCE = [
    case("eval_run_dir_missing", ["eval", "{d}/nope"], ["not a phitune run directory"]),
    case("eval_not_a_run_dir", ["eval", "{d}"], ["not a phitune run directory", "phitune_config.yaml"]),
    case("eval_nothing_named", ["eval"], ["name a run directory, or --model"]),
    case("eval_data_missing", ["eval", "{run}", "--data", "{d}/nope.jsonl"], ["data file not found"]),
    case("eval_data_empty", ["eval", "{run}", "--data", "{d}/train.jsonl"], ["train.jsonl", "empty"],
         {"train.jsonl": ""}),
    case("eval_num_generate_negative", ["eval", "{run}", "--num-generate", "-1"], ["'--num-generate'"]),
    case("eval_max_new_tokens_zero", ["eval", "{run}", "--max-new-tokens", "0"], ["'--max-new-tokens'"]),
    case("chat_not_a_run_dir", ["chat", "{d}"], ["not a phitune run directory"]),
    case("chat_image_missing", ["chat", "{run}", "--image", "{d}/missing.png"], ["image not found", "missing.png"]),
    case("chat_temperature_zero", ["chat", "{run}", "--do-sample", "--temperature", "0"],
         ["--temperature must be above 0", "--greedy"]),
    case("chat_top_p_above_one", ["chat", "{run}", "--do-sample", "--top-p", "2"], ["--top-p must be in (0, 1]"]),
    case("generate_input_missing", ["generate", "{run}", "--input", "{d}/nope.jsonl", "--output", "{d}/a.jsonl"],
         ["input file not found"]),
    case("generate_input_is_directory", ["generate", "{run}", "--input", "{d}/prompts", "--output", "{d}/a.jsonl"],
         ["prompts is a directory, not a prompts file"], {"prompts/": ""}),
    case("generate_input_empty", ["generate", "{run}", "--input", "{d}/prompts.jsonl", "--output", "{d}/a.jsonl"],
         ["prompts.jsonl", "empty"], {"prompts.jsonl": ""}),
    case("generate_input_malformed", ["generate", "{run}", "--input", "{d}/prompts.jsonl", "--output", "{d}/a.jsonl"],
         ["prompts.jsonl:1", "malformed JSON"], {"prompts.jsonl": "{prompt: hi}\n"}),
    case("generate_output_exists", ["generate", "{run}", "--input", "{d}/prompts.jsonl", "--output",
                                    "{d}/exists.txt"], ["already exists", "--overwrite"]),
    case("generate_batch_size_zero", ["generate", "{run}", "--input", "{d}/prompts.jsonl", "--output", "{d}/a.jsonl",
                                      "--batch-size", "0"], ["'--batch-size'"]),
    case("merge_not_a_run_dir", ["merge", "{d}", "--output", "{d}/merged"], ["not a phitune run directory"]),
    case("merge_output_not_empty", ["merge", "{run}", "--output", "{d}"], ["exists and is not empty"]),
    case("merge_dtype_unknown", ["merge", "{run}", "--output", "{d}/merged", "--dtype", "float8"],
         ["--dtype must be one of", "float8"]),
    case("export_format_unknown", ["export", "{run}", "--output", "{d}/m.gguf", "--format", "ggml"],
         ["--format ggml is not one of"]),
    case("export_quant_unknown", ["export", "{run}", "--output", "{d}/m.gguf", "--quant", "q3"],
         ["--quant q3 is not one of"]),
    case("export_output_exists", ["export", "{run}", "--output", "{d}/exists.txt"], ["exists; choose a new --output"]),
    case("export_ollama_with_lora", ["export", "{run}", "--output", "{d}/a.gguf", "--format", "gguf-lora", "--ollama"],
         ["--ollama needs --format gguf"]),
    case("export_without_the_extra", ["export", "{run}", "--output", "{d}/m.gguf"],
         ["needs the gguf package", extra_line("export")], hide=("gguf",)),
    case("export_quant_without_llama_cpp", ["export", "{run}", "--output", "{d}/m.gguf", "--quant", "q4_k_m"],
         ["llama.cpp's quantiser", "pip install llama-cpp-python"], hide=("llama_cpp",)),
]

SERVE = [  # every check before a server starts; port 59123: any free one, so the row does not hang on 8000
    case("serve_not_a_run_dir", ["serve", "{d}", "--port", "59123"], ["not a finished phitune run"]),
    case("serve_engine_unknown", ["serve", "{run}", "--engine", "llamacpp", "--port", "59123"],
         ["--engine llamacpp is not one of: llama.cpp, vllm"]),
    case("serve_port_out_of_range", ["serve", "{run}", "--port", "99999"], ["--port 99999 is not a TCP port"]),
    case("serve_without_a_gguf", ["serve", "{run}", "--engine", "llama.cpp", "--port", "59123"],
         ["serves a GGUF export of the run", "phitune export", "then serve again"]),
]

UI = [  # the checkout's absolute path: the line works from any folder
    case("ui_without_the_extra", ["ui"], [f"phitune ui needs the ui extra: {extra_line('ui')} (gradio)"],
         hide=("gradio",)),
]

DEMO_RUN = {"out/phitune_complete": "finished\n", "out/phitune_config.yaml": f"model: {{name_or_path: '{TINY_BASE}'}}\n"}
DEMO = [  # the demo's own flag is --output-dir: its refusals name that, not train's --overwrite or output_dir
    case("demo_output_dir_foreign", ["demo", "--output-dir", "{d}/out"], ["holds no phitune run", "--output-dir"],
         {"out/notes.txt": "mine\n"}),
    case("demo_run_beside_a_user_file", ["demo", "--output-dir", "{d}/out"],
         ["has beside it notes.txt, which the demo would not delete", "--output-dir"],
         {**DEMO_RUN, "out/notes.txt": "mine\n"}),
]

CASES = USAGE + TRAIN_SFT + TRAIN_DPO + OTHER_DATA + DATA + INFERENCE + SERVE + UI + DEMO


def base_files(model_dir: Path) -> dict:
    """What every case directory starts with: good configs and data for SFT, DPO and GRPO, prompts, one existing
    file."""
    sft = SFT
    preference = {**sft, "method": "dpo", "data": {**sft["data"], "train": "{d}/pairs.jsonl"},
                  "training_config": {**sft["training_config"], "output_dir": "{d}/dpo-out"}}
    return {"run.yaml": yaml.safe_dump(sft), "dpo.yaml": yaml.safe_dump(preference),
            "grpo.yaml": grpo_yaml("{name: length, max_tokens: 8}"),
            "train.jsonl": lines(GOOD, GOOD),
            "pairs.jsonl": lines(PAIR, PAIR), "prompts.jsonl": lines({"prompt": "Hi"}), "exists.txt": "mine\n"}


def fill(text, places: dict):
    if isinstance(text, bytes) or text is UNREADABLE:
        return text
    for name, value in places.items():
        text = text.replace("{" + name + "}", str(value))
    return text


def write_files(directory: Path, files: dict, places: dict) -> None:
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir(exist_ok=True)
        elif content is UNREADABLE:
            # Root reads any file whatever its mode: as root it is /proc/self/mem (reading it at offset 0 fails
            # with EIO for every user); otherwise a file with mode 000.
            if os.geteuid() == 0:
                path.symlink_to("/proc/self/mem")
            else:
                path.write_text("{}\n")
                path.chmod(0)
        else:
            content = fill(content, places)
            path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")


def tree(directory: Path) -> list[str]:
    """Every file and folder under `directory`, with its size for files: what must not change. The data cache's
    machinery is not a leftover: the cache folder, an entry's 0-byte lock (kept after a failed make: a process
    waiting on it holds that file), and a finished entry (cache/FINGERPRINT/ with its meta.json), as a check after
    tokenizing (every label masked, a setting the trainer rejects) stops a run whose data was made whole. A work
    folder, or anything else in the cache, is a leftover."""
    finished = {meta.parent.name for meta in directory.glob("cache/*/meta.json")}

    def kept(path: Path) -> bool:
        parts = path.relative_to(directory).parts
        if parts[0] != "cache":
            return True
        machinery = len(parts) == 1 or (len(parts) == 2 and parts[1].endswith(".lock") and path.is_file()
                                        and not path.stat().st_size)
        return not machinery and parts[1] not in finished

    return sorted(f"{p.relative_to(directory)}{'/' if p.is_dir() else ' ' + str(p.lstat().st_size)}"
                  for p in directory.rglob("*") if kept(p))


class Outcome(NamedTuple):
    code: int
    stdout: str
    stderr: str


def run_in_process(argv: list[str], cwd: Path, hide: tuple, monkeypatch, capsys) -> Outcome:
    """`phitune ARGV` through the real entry point, in this process: exit code, stdout, and stderr with each Python
    warning as a line (a real process prints them there). Signal handlers and environment are restored after."""
    from phitune import cli

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    environment = dict(os.environ)
    monkeypatch.chdir(cwd)
    for module in hide:
        monkeypatch.setitem(sys.modules, module, None)
    capsys.readouterr()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.resetwarnings()
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)  # Python's defaults outside __main__
            with pytest.raises(SystemExit) as exited:
                cli.main(argv)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        os.environ.clear()
        os.environ.update(environment)
    printed = capsys.readouterr()
    warned = "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
    return Outcome(exited.value.code, printed.out, printed.err + warned)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished two-step LoRA run of the tiny model, with an eval file: what eval, chat, merge and export read."""
    from phitune.config.schema import config_from_dict
    from phitune.train import run_training

    output_dir = tmp_path_factory.mktemp("promises") / "run"
    run_training(config_from_dict({
        "model": {"name_or_path": str(tiny_model_dir), "torch_dtype": "float32"},
        "data": {"train": str(DEMO_DATA / "train.jsonl"), "eval": str(DEMO_DATA / "eval.jsonl"),
                 "max_seq_length": 128, "max_train_examples": 16, "max_eval_examples": 8},
        "training_config": {"output_dir": str(output_dir), "max_steps": 2, "per_device_train_batch_size": 4,
                            "save_strategy": "no", "seed": 0},
        "peft_config": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}}))
    return output_dir


@pytest.fixture(scope="module")
def run_before(finished_run) -> list[str]:
    return tree(finished_run)


@pytest.fixture
def weights_loaded(monkeypatch) -> list[str]:
    """The model classes whose weights were loaded: a spy on transformers' from_pretrained (which it still calls)."""
    from transformers import PreTrainedModel

    loaded, original = [], PreTrainedModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        loaded.append(cls.__name__)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(spy))
    return loaded


def assert_one_line_error(outcome: Outcome, words: list[str]) -> None:
    said = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert outcome.code == 2, outcome.stderr[-2000:]
    assert "Traceback" not in outcome.stdout + outcome.stderr
    assert len(said) == 1, outcome.stderr
    assert said[0].startswith("error: ")
    for word in words:
        assert word in said[0]


@pytest.mark.parametrize("row", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(row, tiny_model_dir, finished_run, run_before, tmp_path,
                                                         weights_loaded, monkeypatch, capsys):
    places = {"d": tmp_path, "run": finished_run, "model": tiny_model_dir}
    write_files(tmp_path, {**base_files(tiny_model_dir), **row.files}, places)
    before = tree(tmp_path)
    outcome = run_in_process([fill(arg, places) for arg in row.argv], tmp_path, row.hide, monkeypatch, capsys)
    assert_one_line_error(outcome, row.words)
    assert weights_loaded == []
    assert tree(tmp_path) == before
    assert tree(finished_run) == run_before


def test_bad_data_leaves_no_work_folder_in_the_data_cache(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A stop at bad data after rows were read leaves no work folder and no entry: only the entry's 0-byte lock."""
    places = {"d": tmp_path, "model": tiny_model_dir}
    write_files(tmp_path, {**base_files(tiny_model_dir), "train.jsonl": lines(GOOD, "not json")}, places)
    assert run_in_process([fill(arg, places) for arg in train()], tmp_path, (), monkeypatch, capsys).code == 2
    left = [(p.name, p.is_file() and p.stat().st_size) for p in (tmp_path / "cache").iterdir()]
    assert len(left) == 1 and left[0][0].endswith(".lock") and left[0][1] == 0, left


def test_version_and_help_exit_0():
    from phitune import __version__

    for args, expected in ((["--version"], f"phitune {__version__}\n"), (["--help"], "Usage")):
        done = subprocess.run([sys.executable, "-m", "phitune.cli", *args], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0 and expected in done.stdout and not done.stderr, done.stderr


def run_cli(args: list[str], cwd: Path, prelude: str = "", env: dict | None = None, **options) -> subprocess.Popen:
    """`phitune ARGS` in a real process; `prelude` runs first (e.g. to make a module unimportable); `env` adds to
    the environment."""
    code = f"import sys\n{prelude}\nfrom phitune.cli import main\nmain()\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200", **(env or {})}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **options)


def test_export_without_the_extra_fails_at_once_in_a_real_process(finished_run, run_before, tmp_path):
    """No merge first: the process ends before the model is loaded (well under the time a load takes)."""
    start = time.perf_counter()
    proc = run_cli(["export", str(finished_run), "--output", str(tmp_path / "m.gguf")], tmp_path,
                   prelude="sys.modules['gguf'] = None  # as when the [export] extra is not installed")
    stdout, stderr = proc.communicate(timeout=120)
    assert_one_line_error(Outcome(proc.returncode, stdout, stderr), [extra_line("export")])
    assert "torch" not in stderr and time.perf_counter() - start < 30
    assert tree(tmp_path) == [] and tree(finished_run) == run_before


@pytest.mark.parametrize("argv, words", [
    (["train", "nope.yaml"], ["config file not found"]),
    (["data", "empty.yaml"], ["empty.yaml: the file is empty"]),
    (["train", "broken.yaml"], ["broken.yaml: not valid YAML"]),
], ids=["train_missing", "data_empty", "train_not_yaml"])
def test_a_config_file_that_cannot_be_read_is_said_before_torch_is_imported(argv, words, tmp_path):
    """cli.py's promise that config errors are instant: the command imports torch (seconds; a minute on a loaded
    machine) only after its config file has been read."""
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "broken.yaml").write_text("model: [\n")
    proc = run_cli(argv, tmp_path, prelude="import atexit\natexit.register(lambda: print('torch' in sys.modules))")
    stdout, stderr = proc.communicate(timeout=120)
    assert_one_line_error(Outcome(proc.returncode, "", stderr), words)
    assert stdout == "False\n"


# Rows whose environment must be set before the libraries are imported (they read the hub's offline switch then):
# each runs in a real process, where a spy on phitune's model loader says on stderr when weights would load.
HUB_OFFLINE = {"HF_HUB_OFFLINE": "1"}  # as on a machine without network, whatever this one has
REAL_PROCESS = [
    (case("eval_benchmarks_hub_offline", ["eval", "{run}", "--benchmarks", "gsm8k", "--limit", "2"],
          ["benchmark gsm8k", "(openai/gsm8k)", "cannot be reached", "HF_DATASETS_OFFLINE=1", "local task YAML"]),
     HUB_OFFLINE),
    # not a folder here, and not fetchable as a hub id: both said (transformers' error speaks of the connection only)
    (case("model_neither_a_folder_nor_on_a_reachable_hub", train("model.name_or_path=models/nope"),
          ["model models/nope is not a local folder (no {d}/models/nope)",
           "the hub could not be reached to fetch it as a hub id (HF_HUB_OFFLINE is set)"]), HUB_OFFLINE),
]
WEIGHTS_SPY = """
import phitune.after.generate as generate
loader = generate.load_for_inference
def spy(*args, **kwargs):
    print("weights loaded", file=sys.stderr, flush=True)
    return loader(*args, **kwargs)
generate.load_for_inference = spy
"""


@pytest.mark.parametrize("row, env", REAL_PROCESS, ids=[row.id for row, _ in REAL_PROCESS])
def test_bad_input_in_a_real_process_is_one_line_exit_2_and_leaves_nothing(row, env, tiny_model_dir, finished_run,
                                                                            run_before, tmp_path):
    if "--benchmarks" in row.argv:
        pytest.importorskip("lm_eval", reason="the [bench] extra (lm-eval) is part of the test extras")
    places = {"d": tmp_path, "run": finished_run, "model": tiny_model_dir}
    write_files(tmp_path, {**base_files(tiny_model_dir), **row.files}, places)
    before = tree(tmp_path)
    proc = run_cli([fill(arg, places) for arg in row.argv], tmp_path, prelude=WEIGHTS_SPY, env=env)
    stdout, stderr = proc.communicate(timeout=300)
    assert_one_line_error(Outcome(proc.returncode, stdout, stderr), [fill(word, places) for word in row.words])
    assert tree(tmp_path) == before and tree(finished_run) == run_before


# Interrupts: (id, command line, the function at whose call the process waits for the signal, the signal). The
# process reaches that stage (the model loaded, the work begun), says so, and sleeps in it until the signal comes.
# Training's own interrupts (a checkpoint first; a second signal) are in test_reliability.py.
STAGES = [
    ("eval_scoring", ["eval", "{run}", "--output", "{d}/eval"], "phitune.after.evaluate:teacher_forced_metrics", "SIGINT"),
    ("generate_answering", ["generate", "{run}", "--input", "{d}/prompts.jsonl", "--output", "{d}/a.jsonl"],
     "phitune.after.generate:generate_file", "SIGTERM"),
    ("merge_before_saving", ["merge", "{run}", "--output", "{d}/merged"], "phitune.after.merge:set_generation_stops",
     "SIGINT"),
    ("merge_saving", ["merge", "{run}", "--output", "{d}/new/merged"], "phitune.after.merge:copy_tokenizer_files",
     "SIGTERM"),  # model and tokenizer written, the base's tokenizer files not yet
    ("data_inspecting", ["data", "{d}/run.yaml", "--output", "{d}/report"], "phitune.data.inspect:inspect_data",
     "SIGTERM"),
    ("export_writing", ["export", "{run}", "--output", "{d}/m.gguf"], "phitune.after.export.gguf_writer:write_gguf",
     "SIGINT"),
    ("chat_waiting_for_input", ["chat", "{run}"], None, "SIGINT"),
]
PAUSE = """
import importlib, time
module_name, name = {target!r}.split(":")
module = importlib.import_module(module_name)
original = getattr(module, name)
def paused(*args, **kwargs):
    print("stage reached", file=sys.stderr, flush=True)
    time.sleep(300)
    return original(*args, **kwargs)
setattr(module, name, paused)
"""


def interrupt(stage, places: dict, cwd: Path) -> Outcome:
    _, argv, target, signal_name = stage
    proc = run_cli([fill(arg, places) for arg in argv], cwd, prelude=PAUSE.format(target=target) if target else "",
                   stdin=subprocess.PIPE)
    marker = "stage reached" if target else "chat with the model"
    said = ""
    deadline = time.monotonic() + 180
    while marker not in said:  # stderr holds only phitune's lines until the stage: read them one by one
        assert proc.poll() is None and time.monotonic() < deadline, said + proc.stderr.read()
        said += proc.stderr.readline()
    proc.send_signal(getattr(signal, signal_name))
    stdout, stderr = proc.communicate(timeout=120)
    return Outcome(proc.returncode, stdout, said + stderr)


@pytest.mark.processes
def test_an_interrupt_at_any_stage_exits_130_with_one_line(tiny_model_dir, finished_run, run_before,
                                                           tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupts")
    for stage in STAGES:
        write_files(root / stage[0], base_files(tiny_model_dir),
                    {"d": root / stage[0], "model": tiny_model_dir, "run": finished_run})
    before = {stage[0]: tree(root / stage[0]) for stage in STAGES}

    def one(stage):
        places = {"d": root / stage[0], "run": finished_run, "model": tiny_model_dir}
        return stage, interrupt(stage, places, root / stage[0])

    with ThreadPoolExecutor(max_workers=3) as pool:  # each process spends its seconds importing torch
        outcomes = list(pool.map(one, STAGES))
    for (stage_id, _, _, signal_name), outcome in outcomes:
        last = [line for line in outcome.stderr.splitlines() if line.strip()][-1]
        name = "SIGINT (Ctrl-C)" if signal_name == "SIGINT" else signal_name
        assert outcome.code == 130, f"{stage_id}: {outcome.stderr[-2000:]}"
        assert "Traceback" not in outcome.stderr, f"{stage_id}: {outcome.stderr[-2000:]}"
        assert last == f"error: interrupted by {name}; the command did not finish", stage_id
        assert tree(root / stage_id) == before[stage_id], stage_id  # no partial output, no scratch folder
    assert tree(finished_run) == run_before
