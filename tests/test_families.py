"""The Phi family at toy size: each model's shape and chat template, trained with assistant-only loss, merged, exported.

Every model is built from a config by phitune.tiny.families (random weights, a small BPE trained on the bundled corpus
with the family's special tokens and chat template; its docstring has the shapes); nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phitune.data import render_with_mask, training_chat_template
from phitune.data.formats import to_messages
from phitune.data.templates import PHI4_CHAT_TEMPLATE
from phitune.errors import PhituneError
from phitune.tiny.families import LONGROPE, SHAPES, build_family_model, family_tokenizer
from phitune.tiny.phi3 import DEMO_DATA

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, since 1871."},
]


_BUILT: dict[str, Path] = {}


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    """family_model(name): the directory of `name`'s tiny model, built once per module."""
    def get(name: str) -> Path:
        if name not in _BUILT:
            _BUILT[name] = build_family_model(name, tmp_path_factory.mktemp(name))
        return _BUILT[name]
    return get


def run_config(base: Path, out: Path, **peft) -> dict:
    return {
        "model": {"name_or_path": str(base), "torch_dtype": "float32"},
        "data": {"train": str(DEMO_DATA / "train.jsonl"), "eval_split": 0, "max_seq_length": 96,
                 "max_train_examples": 16, "cache_dir": str(out.parent / "cache")},
        "training_config": {"output_dir": str(out), "max_steps": 2, "learning_rate": 5e-2,
                            "per_device_train_batch_size": 8, "logging_steps": 1, "save_strategy": "no",
                            "eval_strategy": "no", "seed": 0, "report_to": "none", "disable_tqdm": True},
        "peft_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear", **peft},
    }


def train(base: Path, out: Path, **peft):
    from phitune.config.schema import config_from_dict
    from phitune.train import run_training

    return run_training(config_from_dict(run_config(base, out, **peft)), overwrite=True)


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


def merged_and_adapted(base: Path, run: Path, tmp_path: Path):
    """(merged model loaded with plain transformers, base + adapter through PEFT), both in eval mode."""
    from transformers import AutoModelForCausalLM

    from phitune.after.generate import attach_adapter
    from phitune.after.merge import merge_adapter
    from phitune.config.schema import ModelConfig

    merge_adapter(ModelConfig(name_or_path=str(base), torch_dtype="float32"), run, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    adapted = attach_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), run).eval()
    return merged, adapted


IDS = torch.arange(5, 45).reshape(2, 20)


# ---- assistant-only labels, token by token ----------------------------------------------------------------------


def trained_runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """The contiguous runs of trained (mask 1) token ids."""
    runs, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("family,end", [("phi-4", "<|im_end|>"), ("phi-4-mini", "<|end|>")])
def test_each_assistant_turn_and_its_end_token_are_trained_and_nothing_else(family, end):
    tokenizer = family_tokenizer(family)
    template = training_chat_template(tokenizer)
    assert template != tokenizer.chat_template  # the family's training variant, chosen from the template text
    ids, mask = render_with_mask(tokenizer, CHAT, template)
    own = tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert ids == list(own)  # the training variant renders exactly the tokenizer's own template
    expected = [tokenizer.encode(m["content"] + end, add_special_tokens=False)
                for m in CHAT if m["role"] == "assistant"]
    assert trained_runs(ids, mask) == expected
    assert sum(mask) == sum(map(len, expected))  # headers, system, user turns and a final eos all masked


def test_a_tokenizer_padding_with_eos_is_warned_of_only_without_its_own_end_of_turn(tmp_path, caplog):
    """Phi-4-mini pads with its eos and ends each turn with <|end|>, which training keeps: loading it says nothing
    (it warned on every run, while `phitune data` called it safe). The same tokenizer with its turn ends trained as
    eos would not stop: that still warns."""
    from transformers import AutoTokenizer

    from phitune.config.schema import ModelConfig
    from phitune.models.loading import load_tokenizer, turn_end_token
    from phitune.tiny.families import TINY_PHI4_MINI

    with caplog.at_level("WARNING", logger="phitune"):
        tokenizer = load_tokenizer(ModelConfig(name_or_path=str(TINY_PHI4_MINI)))
    assert tokenizer.pad_token == tokenizer.eos_token and turn_end_token(tokenizer) == "<|end|>"
    assert "pads with its eos" not in caplog.text
    no_turn_end = AutoTokenizer.from_pretrained(TINY_PHI4_MINI)
    no_turn_end.eos_token = "<|end|>"  # its only turn end is now the eos it pads with
    no_turn_end.pad_token = "<|end|>"
    no_turn_end.save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="phitune"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path)))
    assert "pads with its eos token <|end|> and has no unk token" in caplog.text


def test_phi4_mini_tool_turns_train_the_call_not_the_definitions_or_the_result():
    tokenizer = family_tokenizer("phi-4-mini")
    call = '<|tool_call|>[{"name": "weather", "arguments": {"city": "Paris"}}]<|/tool_call|>'
    row = {"messages": [{"role": "system", "content": "You have tools.", "tools": [{"name": "weather"}]},
                        {"role": "user", "content": "Weather in Paris?"},
                        {"role": "assistant", "content": call},
                        {"role": "tool", "content": '{"sky": "clear"}'},
                        {"role": "assistant", "content": "Clear skies."}]}
    chat = to_messages(row, "messages", "train.jsonl:1")  # the data path keeps the tools and the tool turn
    assert chat[0]["tools"] == '[{"name": "weather"}]'
    ids, mask = render_with_mask(tokenizer, chat, training_chat_template(tokenizer))
    assert ids == list(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
    text = tokenizer.decode(ids)
    assert "<|tool|>[{" in text and "<|tool|>{" in text  # definitions in the system turn, the result as a turn
    assert trained_runs(ids, mask) == [tokenizer.encode(call + "<|end|>", add_special_tokens=False),
                                       tokenizer.encode("Clear skies.<|end|>", add_special_tokens=False)]


def test_phi3_family_trains_content_and_end_not_the_newline_after_it_or_the_final_eos():
    """TRL's Phi-3 variant also trains the "\n" after <|end|> and the final eos, which the model never writes."""
    tokenizer = family_tokenizer("phi-3")
    ids, mask = render_with_mask(tokenizer, CHAT, training_chat_template(tokenizer))
    assert ids == list(tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"])
    assert trained_runs(ids, mask) == [tokenizer.encode("Paris.<|end|>", add_special_tokens=False),
                                       tokenizer.encode("Rome, since 1871.<|end|>", add_special_tokens=False)]


OLD_PHI3_TEMPLATE = (  # Phi-3-mini's first hub revision: bos first, no system turn
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}{{'<|user|>' + '\\n' + "
    "message['content'] + '<|end|>' + '\\n' + '<|assistant|>' + '\\n'}}{% elif (message['role'] == 'assistant') %}"
    "{{message['content'] + '<|end|>' + '\\n'}}{% endif %}{% endfor %}")


def test_an_older_phi3_template_falls_back_to_trls_mask_and_says_what_it_trains(monkeypatch, caplog):
    """No silent fallback: TRL's variant trains the "\\n" after <|end|> and the final eos, and the one warning (per
    process) says so."""
    import logging

    from phitune.data import encode

    monkeypatch.setattr(encode, "_said", set())
    tokenizer = family_tokenizer("phi-3")
    tokenizer.chat_template = OLD_PHI3_TEMPLATE
    with caplog.at_level(logging.WARNING, logger="phitune.data.encode"):
        template = training_chat_template(tokenizer)
        assert training_chat_template(tokenizer) == template
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "older Phi-3" in said[0] and "final eos" in said[0], said
    ids, mask = render_with_mask(tokenizer, CHAT[1:3], template)
    assert trained_runs(ids, mask) == [tokenizer.encode("Paris.<|end|>\n", add_special_tokens=False)
                                       + [tokenizer.eos_token_id]]


def test_a_phi4_looking_template_that_renders_otherwise_is_refused():
    tokenizer = family_tokenizer("phi-4")
    tokenizer.chat_template = PHI4_CHAT_TEMPLATE.replace("<|im_sep|>", "<|im_sep|>\n")
    with pytest.raises(PhituneError, match="looks like phi-4's but renders differently"):
        training_chat_template(tokenizer)


# ---- PhiMoE targets ---------------------------------------------------------------------------------------------


def test_phimoe_all_linear_targets_attention_and_experts_never_the_router(family_model):
    from transformers import AutoModelForCausalLM

    from phitune.models.loading import resolve_peft_targets

    model = AutoModelForCausalLM.from_pretrained(family_model("phi-3.5-moe"))
    targets = resolve_peft_targets(model, {"target_modules": "all-linear"})
    assert targets == {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                       "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}
    named = resolve_peft_targets(model, {"target_modules": ["o_proj", "router"]})
    assert named == {"target_modules": ["o_proj"], "target_parameters": ["router.weight"]}
    with pytest.raises(PhituneError) as err:
        resolve_peft_targets(model, {"target_modules": ["gate"]})
    message = str(err.value)
    assert "linear layers are q_proj, k_proj, v_proj, o_proj; the MoE router `router` (adapted only when named)" \
        in message
    assert "expert weights experts.gate_up_proj, experts.down_proj" in message


def test_phimoe_trains_with_assistant_only_loss_and_merges_to_base_plus_adapter(family_model, tmp_path):
    base = family_model("phi-3.5-moe")
    result = train(base, tmp_path / "run")
    adapter = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert any("experts" in k for k in adapter) and any("q_proj" in k for k in adapter)
    assert not any("router" in k for k in adapter)
    assert torch.isfinite(torch.tensor(result.metrics["train_loss"]))
    merged, adapted = merged_and_adapted(base, tmp_path / "run", tmp_path)
    assert_merged_is_base_plus_adapter(merged, adapted)


def assert_merged_is_base_plus_adapter(merged, adapted):
    torch.testing.assert_close(logits_of(merged, IDS), logits_of(adapted, IDS), atol=1e-4, rtol=1e-4)
    with adapted.disable_adapter():
        assert (logits_of(merged, IDS) - logits_of(adapted, IDS)).abs().max() > 1e-3  # the adapter moved something


def test_phimoe_router_trains_when_named(family_model, tmp_path):
    train(family_model("phi-3.5-moe"), tmp_path / "run", target_modules=["router"])
    adapter = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert adapter and all("router" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # it moved


def test_phimoe_with_the_loralib_backend_adapts_attention_and_says_experts_are_left(family_model, tmp_path, caplog):
    base = family_model("phi-3.5-moe")
    with caplog.at_level("WARNING", logger="phitune"):
        train(base, tmp_path / "run", backend="loralib")
    assert "adapts this MoE model's attention only" in caplog.text
    adapter = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    merged, adapted = merged_and_adapted(base, tmp_path / "run", tmp_path)
    assert_merged_is_base_plus_adapter(merged, adapted)


# ---- dense families: train, merge, tie, rope, export -------------------------------------------------------------

_RUNS: dict[str, tuple[Path, dict]] = {}


@pytest.fixture(scope="module")
def trained(family_model, tmp_path_factory):
    """trained(name): (run directory, metrics) of a 2-step all-linear LoRA run on `name`, made once per module."""
    def get(name: str) -> tuple[Path, dict]:
        if name not in _RUNS:
            out = tmp_path_factory.mktemp(f"{name}-run") / "run"
            _RUNS[name] = (out, train(family_model(name), out).metrics)
        return _RUNS[name]
    return get


NEVER_TRAINED = {  # family -> (tokens a run must never train on, the end-of-turn token it must)
    "phi-3": (["<|user|>", "<|assistant|>", "<|system|>"], "<|end|>"),
    "phi-4": (["<|im_start|>", "<|im_sep|>"], "<|im_end|>"),
    "phi-4-mini": (["<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"], "<|end|>"),
}


def trained_token_ids(base: Path, run: Path) -> list[int]:
    """The label ids the run trained on: its prepared data, read back from the run's cache."""
    from phitune.config.schema import config_from_dict
    from phitune.data.prepare import prepare_data
    from phitune.models.loading import load_tokenizer

    cfg = config_from_dict(run_config(base, run))
    data = prepare_data(cfg.data, load_tokenizer(cfg.model))
    assert data.reused  # the very set the run prepared
    return [t for labels in data.train.to_dataset()["labels"] for t in labels if t != -100]


@pytest.mark.parametrize("name", ["phi-3-medium", "phi-4", "phi-4-mini"])
def test_dense_family_trains_on_assistant_tokens_and_merges_to_base_plus_adapter(name, family_model, trained,
                                                                                tmp_path):
    import math

    from transformers import AutoTokenizer

    base = family_model(name)
    run, metrics = trained(name)
    assert math.isfinite(metrics["train_loss"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    never, end = NEVER_TRAINED[SHAPES[name][0]]
    trained_ids = trained_token_ids(base, run)
    assert tokenizer.convert_tokens_to_ids(end) in trained_ids
    assert not set(tokenizer.convert_tokens_to_ids(never)) & set(trained_ids)
    merged, adapted = merged_and_adapted(base, run, tmp_path)
    assert_merged_is_base_plus_adapter(merged, adapted)


def test_phi4_mini_stays_tied_and_keeps_longrope_and_partial_rotary_through_merge_and_gguf(family_model, trained,
                                                                                          tmp_path):
    import gguf

    from phitune.after.export.gguf_writer import write_gguf

    base = family_model("phi-4-mini")
    merged, _ = merged_and_adapted(base, trained("phi-4-mini")[0], tmp_path)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert "lm_head.weight" not in load_file(tmp_path / "merged" / "model.safetensors")
    written, original = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "merged", base))
    for key in ("rope_parameters", "partial_rotary_factor", "tie_word_embeddings", "max_position_embeddings"):
        assert written.get(key) == original.get(key), key
    assert written["rope_parameters"]["long_factor"] == LONGROPE["long_factor"]
    out = write_gguf(tmp_path / "merged", tmp_path / "mini.gguf").path
    reader = gguf.GGUFReader(out)
    meta = {key: field.contents() for key, field in reader.fields.items()}
    weights = {t.name: t for t in reader.tensors}
    assert meta["phi3.rope.dimension_count"] == 12  # 0.75 x head 16: partial rotary
    assert meta["phi3.rope.scaling.original_context_length"] == 256 and meta["phi3.context_length"] == 1024
    assert "output.weight" not in weights  # tied: llama.cpp reuses token_embd
    assert list(weights["rope_factors_long.weight"].data) == pytest.approx(LONGROPE["long_factor"])
    assert list(weights["rope_factors_short.weight"].data) == pytest.approx(LONGROPE["short_factor"])


def test_lora_on_tied_embeddings_unties_them_with_a_warning_and_merges_exactly(family_model, tmp_path, caplog):
    base = family_model("phi-4-mini")  # (TRL 1.16 refuses LoRA on lm_head itself: its fused loss reads the weight)
    with caplog.at_level("WARNING", logger="phitune"):
        train(base, tmp_path / "run", target_modules=["embed_tokens", "o_proj"])
    assert "LoRA targets model.embed_tokens, which this model ties to lm_head" in caplog.text
    merged, adapted = merged_and_adapted(base, tmp_path / "run", tmp_path)
    assert not merged.config.tie_word_embeddings
    assert_merged_is_base_plus_adapter(merged, adapted)
    with adapted.disable_adapter():  # lm_head kept the base's matrix; only the input embeddings learned
        original = adapted.get_input_embeddings()(torch.arange(len(merged.lm_head.weight))).detach()
    torch.testing.assert_close(merged.lm_head.weight, original)
    assert (merged.model.embed_tokens.weight - original).abs().max() > 1e-4


def test_phi4_exports_with_im_end_as_end_of_turn_and_a_chatml_modelfile(family_model, trained, tmp_path):
    import gguf
    from transformers import AutoTokenizer

    from phitune.after.export import export_run

    export_run(trained("phi-4")[0], tmp_path / "phi4.gguf", ollama=True)
    meta = {key: field.contents() for key, field in gguf.GGUFReader(tmp_path / "phi4.gguf").fields.items()}
    im_end = AutoTokenizer.from_pretrained(family_model("phi-4")).convert_tokens_to_ids("<|im_end|>")
    assert meta["tokenizer.ggml.eot_token_id"] == im_end == meta["tokenizer.ggml.eos_token_id"]
    assert meta["tokenizer.chat_template"] == PHI4_CHAT_TEMPLATE
    modelfile = (tmp_path / "Modelfile").read_text()
    assert "<|im_start|>{{ .Role }}<|im_sep|>{{ .Content }}<|im_end|>" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "<|end|>" not in modelfile


# ---- loralib backend: q/k/v and gate/up slices of every GQA shape -----------------------------------------------


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 8, 8), (8, 2, 8), (6, 2, 16)],
                         ids=["phi-3.5-mini 32/32", "phi-3-medium 40/10", "phi-4-mini 24/8"])
@pytest.mark.parametrize("target,index", [("q_proj", 0), ("k_proj", 1), ("v_proj", 2), ("gate_proj", 0),
                                          ("up_proj", 1)])
def test_loralib_slice_lands_on_its_rows_for_every_gqa_shape(heads, kv_heads, head_dim, target, index):
    from transformers import Phi3Config, Phi3ForCausalLM

    import phitune.lora as lora

    config = Phi3Config(vocab_size=64, hidden_size=heads * head_dim, intermediate_size=40, num_hidden_layers=1,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config).eval()
    fused_name = "qkv_proj" if target in ("q_proj", "k_proj", "v_proj") else "gate_up_proj"
    parent = model.model.layers[0].self_attn if fused_name == "qkv_proj" else model.model.layers[0].mlp
    x = torch.randn(3, config.hidden_size)
    before = getattr(parent, fused_name)(x).detach()
    lora.inject(model, [target], r=2, lora_alpha=4)
    layer = getattr(parent, fused_name)
    sizes = ([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim] if fused_name == "qkv_proj" else [40, 40])
    assert layer.slice_sizes == sizes
    torch.nn.init.normal_(layer.lora_B)
    delta = (layer(x) - before).detach()
    start, stop = sum(sizes[:index]), sum(sizes[: index + 1])
    expected = (x @ layer.lora_A.T @ layer.lora_B.T) * layer.scaling
    torch.testing.assert_close(delta[:, start:stop], expected.detach(), atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(delta[:, :start]) == 0 and torch.count_nonzero(delta[:, stop:]) == 0


def test_loralib_backend_trains_gqa_slices_and_merges_through_its_peft_adapter(family_model, tmp_path):
    base = family_model("phi-4-mini")
    train(base, tmp_path / "run", backend="loralib", target_modules=["q_proj", "v_proj", "up_proj"])
    merged, adapted = merged_and_adapted(base, tmp_path / "run", tmp_path)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert_merged_is_base_plus_adapter(merged, adapted)


# ---- shipped family examples: computed GPU memory ---------------------------------------------------------------

EXAMPLES = Path(__file__).parents[1] / "examples"
FAMILY_EXAMPLES = ["phi3.5-mini-lora.yaml", "phi3-medium-lora.yaml", "phi4-mini-lora.yaml", "phi4-lora.yaml",
                   "phi3.5-moe-lora.yaml"]


@pytest.mark.parametrize("name", FAMILY_EXAMPLES)
def test_family_example_quotes_the_memory_phitune_memory_computes(name):
    import math
    import re

    from phitune.config.schema import load_config
    from phitune.models.memory import SHAPES, estimate_run

    text = (EXAMPLES / name).read_text()
    cfg = load_config(EXAMPLES / name)
    assert cfg.model.name_or_path in SHAPES and cfg.peft_config["target_modules"] == "all-linear"
    quoted = re.search(r"LoRA (\d+) GB, QLoRA (\d+) GB", text)
    assert "computed, not measured" in text and quoted, name
    computed = [math.ceil(estimate_run(cfg, quantized).total) for quantized in (False, True)]
    assert [int(quoted[1]), int(quoted[2])] == computed


def run_memory(*args: str) -> "subprocess.CompletedProcess":
    """`python -m phitune.models.memory ARGS` from the repository root, as the README names it."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "phitune.models.memory", *args], cwd=EXAMPLES.parent, env=env,
                          capture_output=True, text=True, timeout=120)


def test_memory_cli_gives_figures_for_every_example_of_a_real_model():
    """Every shipped example of a real Phi model (hub id, or a local folder named as one) gets its LoRA and QLoRA
    figures; the multimodal examples' headers quote them (their encoders and built-in adapters counted)."""
    import re

    import yaml

    names = sorted(path.name for path in EXAMPLES.glob("*.yaml") if not path.name.startswith("tiny-")
                   and yaml.safe_load(path.read_text()).get("peft_config"))
    assert len(names) >= 15
    done = run_memory(*(f"examples/{name}" for name in names))
    assert done.returncode == 0, done.stderr
    figures = dict(re.findall(r"^examples/(\S+\.yaml)\nLoRA: (\d+ GB \(weights [\d.]+)", done.stdout, re.M))
    assert sorted(figures) == names and figures["phi3-mini-4k-lora.yaml"].startswith("14 GB")
    for name in ("phi4-multimodal-lora.yaml", "phi4-multimodal-speech-lora.yaml"):
        lora, weights = re.match(r"(\d+) GB \(weights ([\d.]+)", figures[name]).groups()
        assert f"LoRA {lora} GB ({weights} + " in (EXAMPLES / name).read_text()
    # a distillation's figure is its student's: said, since its teacher loads beside it (about 21 GB in all)
    assert ("phi3-medium-to-mini-distill.yaml\nLoRA: 12 GB (weights 7.6, adapter + Adam 0.4, activations 2.7, "
            "CUDA 1)\nQLoRA: 7 GB") in done.stdout
    assert "(the student only: the teacher microsoft/Phi-3-medium-4k-instruct comes on top" in done.stdout


@pytest.mark.parametrize("args, says", [
    (["nope.yaml"], "error: config file not found: nope.yaml"),
    (["examples/tiny-phi3-text.yaml"], "error: no shape known for src/phitune/assets/tiny-phi3: "),
    (["examples/phi3-mini-4k-dpo.yaml"], "error: phitune.models.memory estimates a LoRA run from its peft_config"),
    ([], "error: the following arguments are required: FILE.yaml (python -m phitune.models.memory --help)"),
    (["--bogus", "examples/phi4-lora.yaml"], "error: unrecognized arguments: --bogus"),
])
def test_memory_cli_errors_are_one_line(args, says):
    done = run_memory(*args)
    assert (done.returncode, done.stdout, done.stderr.count("\n")) == (2, "", 1), done.stderr
    assert done.stderr.startswith(says)


def test_memory_cli_help():
    done = run_memory("--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m phitune.models.memory")


@pytest.mark.parametrize("model", ["microsoft/Phi-3-mini-4k-instruct", "microsoft/Phi-3.5-mini-instruct",
                                   "microsoft/Phi-3-medium-4k-instruct",
                                   "microsoft/Phi-4-mini-instruct", "microsoft/phi-4",
                                   "microsoft/Phi-3.5-MoE-instruct"])
def test_memory_shapes_count_the_parameters_transformers_builds(model):
    """The shapes phitune.models.memory computes from give the parameter count of the real architecture (on the meta
    device: no weights), norms and biases aside."""
    import transformers

    from phitune.models.memory import SHAPES, lora_parameters, parameters

    shape = SHAPES[model]
    arch = "Phimoe" if shape.experts else "Phi3"
    extra = dict(num_local_experts=shape.experts, num_experts_per_tok=shape.top_k) if shape.experts else {}
    config = getattr(transformers, f"{arch}Config")(
        hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, intermediate_size=shape.intermediate, vocab_size=shape.vocab,
        tie_word_embeddings=shape.tied, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    with torch.device("meta"):
        built = getattr(transformers, f"{arch}ForCausalLM")(config)
    matrices = sum(p.numel() for p in built.parameters() if p.dim() >= 2)
    assert sum(parameters(shape).values()) == matrices
    from peft import LoraConfig, get_peft_model

    from phitune.models.loading import resolve_peft_targets

    targets = resolve_peft_targets(built, {"target_modules": "all-linear"})
    adapted = get_peft_model(built, LoraConfig(r=16, **targets))
    assert sum(p.numel() for n, p in adapted.named_parameters() if "lora_" in n) == lora_parameters(shape, 16)


# ---- the shipped tiny Phi-4-mini and Phi-4, through the CLI, offline ----------------------------------------------

REPO = Path(__file__).parents[1]
TOOLS_EXAMPLE = REPO / "examples" / "tiny-phi4-mini-tools.yaml"


def run_cli(*args: str) -> "subprocess.CompletedProcess":
    """`phitune ARGS` from the repository root (the examples' paths are relative to it), one thread, offline."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200",
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "phitune.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_tool_call_example_renders_trains_and_compares_calls_offline(tmp_path):
    """examples/tiny-phi4-mini-tools.yaml, shortened: data shows Phi-4-mini's call format, train learns it, eval
    compares the generated calls with the held-out reference calls (decoded JSON, as the model writes them)."""
    run = tmp_path / "tools"
    where = ["--set", f"training_config.output_dir={run}", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    shown = run_cli("data", str(TOOLS_EXAMPLE), *where)
    assert shown.returncode == 0, shown.stderr
    assert '<|assistant|><|tool_call|>[{"name": "' in shown.stdout and "<|/tool_call|><|end|>" in shown.stdout
    trained = run_cli("train", str(TOOLS_EXAMPLE), *where, "--set", "training_config.max_steps=30",
                      "--set", "training_config.save_steps=30")
    assert trained.returncode == 0, trained.stderr
    evaluated = run_cli("eval", str(run), "--num-generate", "8", "--max-new-tokens", "24")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads((run / "eval.json").read_text())
    base, tuned = result["metrics"]["base"], result["metrics"]["fine-tuned"]
    assert tuned["loss"] < base["loss"] / 2 and tuned["rougeL_f1"] > base["rougeL_f1"] + 0.3
    assert all(json.loads(s["reference"])[0]["arguments"]["city"] in s["prompt"] for s in result["samples"])


def test_the_tiny_phi4_trains_on_its_own_template_and_refuses_tool_rows(tmp_path):
    from phitune.tiny.families import TINY_PHI4

    refused = run_cli("train", str(TOOLS_EXAMPLE), "--set", f"model.name_or_path={TINY_PHI4}",
                      "--set", f"training_config.output_dir={tmp_path / 'refused'}")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "this model's template (phi-4) has none" in refused.stderr and not (tmp_path / "refused").exists()
    config = tmp_path / "phi4.yaml"
    config.write_text(json.dumps({
        "model": {"name_or_path": str(TINY_PHI4), "torch_dtype": "float32"},
        "data": {"train": str(DEMO_DATA / "train.jsonl"), "eval": str(DEMO_DATA / "eval.jsonl"), "max_seq_length": 96,
                 "max_train_examples": 64, "max_eval_examples": 16, "cache_dir": str(tmp_path / "cache")},
        "training_config": {"output_dir": str(tmp_path / "phi4"), "max_steps": 16, "learning_rate": 1e-2,
                            "per_device_train_batch_size": 8, "save_steps": 16, "seed": 0},
        "peft_config": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}}), encoding="utf-8")
    trained = run_cli("train", str(config))
    assert trained.returncode == 0, trained.stderr
    metrics = json.loads((tmp_path / "phi4" / "metrics.json").read_text())
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 1  # answers and <|im_end|> learnt
    assert (tmp_path / "phi4" / "chat_template.jinja").read_text() == PHI4_CHAT_TEMPLATE
