"""lora.inject on a tiny Phi-3 and plain torch models, and lora.export_peft_adapter through real PEFT."""

import json

import pytest
import torch
import torch.nn as nn
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Phi3Config, Phi3ForCausalLM

import phitune.lora as lora
from phitune.errors import PhituneError


def tiny_phi3(num_key_value_heads=4):
    config = Phi3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=num_key_value_heads,
                        max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return Phi3ForCausalLM(config).eval()


def _ids():
    torch.manual_seed(1)
    return torch.randint(3, 128, (2, 10))


def _randomise_lora_B(model):
    torch.manual_seed(4)
    for name, param in model.named_parameters():
        if name.endswith("lora_B"):
            nn.init.normal_(param, std=0.5)


@pytest.mark.parametrize("kv_heads,sizes", [(4, [32, 32, 32]), (2, [32, 16, 16])], ids=["mha", "gqa"])
def test_logical_q_v_become_merged_linear(kv_heads, sizes):
    model = tiny_phi3(kv_heads)
    ids = _ids()
    before = model(ids).logits
    weight = model.model.layers[0].self_attn.qkv_proj.weight
    replaced = lora.inject(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    assert list(replaced) == [f"model.layers.{i}.self_attn.qkv_proj" for i in range(2)]
    assert "q_proj+v_proj" in replaced["model.layers.0.self_attn.qkv_proj"]
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, lora.MergedLinear)
    assert qkv.enable_lora == [True, False, True] and qkv.slice_sizes == sizes
    assert qkv.weight is weight  # pretrained weight kept, not copied
    assert qkv.lora_B.shape == (sizes[0] + sizes[2], 4)
    torch.testing.assert_close(model(ids).logits, before)  # B = 0: nothing changes yet
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_whole_layers_suffixes_and_gate_proj():
    model = tiny_phi3()
    replaced = lora.inject(model, ["layers.0.self_attn.o_proj", "gate_proj", "embed_tokens"], r=2)
    assert set(replaced) == {"model.layers.0.self_attn.o_proj", "model.embed_tokens",
                             "model.layers.0.mlp.gate_up_proj", "model.layers.1.mlp.gate_up_proj"}
    assert isinstance(model.model.layers[0].self_attn.o_proj, lora.Linear)
    assert type(model.model.layers[1].self_attn.o_proj) is nn.Linear
    assert isinstance(model.model.embed_tokens, lora.Embedding)
    gate_up = model.model.layers[1].mlp.gate_up_proj
    assert gate_up.enable_lora == [True, False] and gate_up.slice_sizes == [64, 64]


def test_training_moves_only_lora_and_bias_policy():
    model = tiny_phi3().train()
    lora.inject(model, ["qkv_proj", "down_proj"], r=2, bias="all")
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, lora.Linear)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = _ids()
    losses = []
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_conv_and_linear_in_a_plain_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Conv2d(4, 4, 1), nn.Conv3d(4, 4, 1), nn.Linear(4, 3))
    inputs = [torch.randn(2, 2, 5), torch.randn(2, 4, 3, 3), torch.randn(2, 4, 2, 2, 2), torch.randn(2, 4)]
    expected = [layer(x) for layer, x in zip(model, inputs)]
    replaced = lora.inject(model, ["0", "1", "2", "3"], r=2, lora_dropout=0.1)
    assert list(replaced) == ["0", "1", "2", "3"]
    assert [type(m) for m in model] == [lora.Conv1d, lora.Conv2d, lora.Conv3d, lora.Linear]
    model.eval()
    for layer, x, y in zip(model, inputs, expected):
        torch.testing.assert_close(layer(x), y)


def test_unknown_target_lists_existing_layers():
    with pytest.raises(PhituneError) as error:
        lora.inject(tiny_phi3(), ["foo"])
    assert str(error.value) == (
        "target module 'foo' matches nothing; this model's adaptable layers are embed_tokens, o_proj, "
        "qkv_proj, gate_up_proj, down_proj, lm_head (and logical q_proj, k_proj, v_proj, gate_proj, up_proj "
        "inside the fused ones)")


def test_conflicting_and_repeated_targets():
    with pytest.raises(PhituneError, match="both as a whole and by its projections"):
        lora.inject(tiny_phi3(), ["qkv_proj", "q_proj"])
    model = tiny_phi3()
    lora.inject(model, ["o_proj"])
    with pytest.raises(PhituneError, match="already has LoRA"):
        lora.inject(model, ["o_proj"])


def test_fused_split_needs_a_config():
    model = nn.Module()
    model.qkv_proj = nn.Linear(4, 12)
    with pytest.raises(PhituneError, match="without model.config"):
        lora.inject(model, ["q_proj"])


def test_lora_state_dict_roundtrip_after_inject():
    trained = tiny_phi3()
    lora.inject(trained, ["q_proj", "v_proj", "o_proj"], r=4)
    _randomise_lora_B(trained)
    checkpoint = lora.lora_state_dict(trained)
    fresh = tiny_phi3()  # same seed: the same "pretrained" weights
    lora.inject(fresh, ["q_proj", "v_proj", "o_proj"], r=4)
    lora.load_lora_state_dict(fresh, checkpoint)
    torch.testing.assert_close(fresh(_ids()).logits, trained(_ids()).logits)


EXPORT_CASES = [
    pytest.param(4, ["q_proj", "v_proj"], id="mha-q-v"),
    pytest.param(2, ["q_proj", "v_proj", "o_proj", "up_proj", "embed_tokens"], id="gqa-mixed-ranks"),
]


@pytest.mark.parametrize("kv_heads,targets", EXPORT_CASES)
def test_export_reproduces_logits_with_plain_peft(tmp_path, kv_heads, targets):
    model = tiny_phi3(kv_heads)
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    lora.inject(model, targets, r=4, lora_alpha=8)
    _randomise_lora_B(model)
    expected = model(_ids()).logits

    out = lora.export_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny-phi3")
    base = tiny_phi3(kv_heads)
    base.load_state_dict(pretrained)
    without_adapter = base(_ids()).logits
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    torch.testing.assert_close(peft_model(_ids()).logits, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(without_adapter, expected, atol=1e-2)  # the adapter really matters


def test_export_file_layout(tmp_path):
    model = tiny_phi3(2)
    lora.inject(model, ["q_proj", "v_proj", "o_proj"], r=4, lora_alpha=8)
    lora.export_peft_adapter(model, tmp_path, base_model_name_or_path="microsoft/Phi-3-mini-4k-instruct")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == "microsoft/Phi-3-mini-4k-instruct"
    # o_proj (rank 4, alpha 8) is the common case; each qkv_proj is rank 8 (q + v), alpha 16.
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert config["rank_pattern"] == {f"model.layers.{i}.self_attn.qkv_proj": 8 for i in range(2)}
    assert config["alpha_pattern"] == {f"model.layers.{i}.self_attn.qkv_proj": 16 for i in range(2)}
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.qkv_proj.lora_{}.weight"
    assert tensors[key.format("A")].shape == (8, 32)
    B = tensors[key.format("B")]
    assert B.shape == (64, 8)
    assert torch.count_nonzero(B[32:48]) == 0  # k rows stay zero
    assert len(tensors) == 8


def test_export_refuses_models_without_lora_or_with_conv(tmp_path):
    with pytest.raises(PhituneError, match="no LoRA layers"):
        lora.export_peft_adapter(tiny_phi3(), tmp_path, "tiny")
    conv = nn.Sequential(nn.Conv2d(2, 2, 3))
    lora.inject(conv, ["0"], r=2)
    with pytest.raises(PhituneError, match="convolution"):
        lora.export_peft_adapter(conv, tmp_path, "tiny")
