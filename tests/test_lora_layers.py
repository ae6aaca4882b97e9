"""Differential tests: phitune.lora against loralib 0.1.2 wherever loralib gets it right."""

import loralib
import pytest
import torch
import torch.nn as nn

import phitune.lora as lora
from phitune.errors import PhituneError

# (layer class name, positional args, keyword args): every case loralib handles correctly.
CASES = [
    ("Linear", (10, 6), dict(r=4, lora_alpha=8)),
    ("Linear", (10, 6), dict(r=4, lora_alpha=8, lora_dropout=0.3)),
    ("Linear", (10, 6), dict(r=4, fan_in_fan_out=True, bias=False)),
    ("Linear", (10, 6), dict(r=4, merge_weights=False)),
    ("Linear", (10, 6), dict(r=0)),
    ("Embedding", (20, 6), dict(r=4, lora_alpha=2, padding_idx=0)),
    ("MergedLinear", (10, 12), dict(r=2, lora_alpha=4, enable_lora=[True, False, True])),
    ("MergedLinear", (10, 12), dict(r=2, lora_dropout=0.2, enable_lora=[True, True], fan_in_fan_out=True)),
    ("Conv2d", (4, 6, 3), dict(r=2, lora_alpha=4, padding=1)),
    ("Conv2d", (4, 6, 3), dict(r=2, groups=2)),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for name, _, kw in CASES]


def _pair(name, args, kwargs):
    torch.manual_seed(0)
    ours = getattr(lora, name)(*args, **kwargs)
    torch.manual_seed(0)
    theirs = getattr(loralib, name)(*args, **kwargs)
    return ours, theirs


def _state(module):
    # loralib keeps conv parameters under "conv."; phitune exposes them directly like nn.Conv2d.
    return {k.replace("conv.", ""): v for k, v in module.state_dict().items()}


def _input(name):
    torch.manual_seed(1)
    if name == "Embedding":
        return torch.randint(0, 20, (3, 5))
    if name == "Conv2d":
        return torch.randn(2, 4, 7, 7)
    return torch.randn(3, 5, 10)


def _randomise_B(*modules):
    for module in modules:
        if hasattr(module, "lora_B"):
            torch.manual_seed(2)
            nn.init.normal_(module.lora_B)


def _forward(module, x):
    torch.manual_seed(3)  # the same dropout mask for both libraries
    return module(x)


@pytest.mark.parametrize("name,args,kwargs", CASES, ids=IDS)
def test_same_seed_same_parameters(name, args, kwargs):
    ours, theirs = _pair(name, args, kwargs)
    ours_state, theirs_state = _state(ours), _state(theirs)
    assert ours_state.keys() == theirs_state.keys()
    for key in ours_state:
        assert torch.equal(ours_state[key], theirs_state[key]), key
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n.replace("conv.", "") for n, p in theirs.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name,args,kwargs", CASES, ids=IDS)
def test_same_outputs_in_train_eval_train(name, args, kwargs):
    ours, theirs = _pair(name, args, kwargs)
    _randomise_B(ours, theirs)
    x = _input(name)
    torch.testing.assert_close(_forward(ours, x), _forward(theirs, x), atol=1e-5, rtol=1e-5)
    ours.eval()
    theirs.eval()
    assert ours.merged == theirs.merged
    torch.testing.assert_close(_forward(ours, x), _forward(theirs, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_state(ours)["weight"], _state(theirs)["weight"], atol=1e-6, rtol=1e-6)
    ours.train()
    theirs.train()
    torch.testing.assert_close(_forward(ours, x), _forward(theirs, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_state(ours)["weight"], _state(theirs)["weight"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name,args,kwargs", CASES, ids=IDS)
def test_loralib_checkpoint_loads_strictly(name, args, kwargs):
    """A full loralib state dict (conv keys under "conv." included) loads into phitune unchanged."""
    ours, theirs = _pair(name, args, kwargs)
    _randomise_B(theirs)
    torch.manual_seed(9)
    ours.reset_parameters()  # make sure the values really come from the checkpoint
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval()
    theirs.eval()
    x = _input(name)
    torch.testing.assert_close(_forward(ours, x), _forward(theirs, x), atol=1e-5, rtol=1e-5)


def _randomise_lora(layer, seed):
    # Both factors: a zero A (Embedding's init) would hide the update.
    if hasattr(layer, "lora_A"):
        torch.manual_seed(seed)
        nn.init.normal_(layer.lora_A)
        nn.init.normal_(layer.lora_B)
    layer.eval()  # loralib's eval() returns None
    return layer


@pytest.mark.parametrize("source", ["phitune", "loralib"])
@pytest.mark.parametrize("name,args,kwargs", CASES, ids=IDS)
def test_eval_mode_full_state_dict_round_trip(name, args, kwargs, source):
    """A full state_dict() taken in eval mode (weight merged) loads into an eval-mode layer as in loralib:
    the copy computes what the saved layer does, in eval and after train() (phitune once gave W0 + 2 B A)."""
    ours, theirs = (_randomise_lora(layer, seed=2) for layer in _pair(name, args, kwargs))
    our_copy, their_copy = (_randomise_lora(layer, seed=4) for layer in _pair(name, args, kwargs))
    our_copy.load_state_dict((ours if source == "phitune" else theirs).state_dict(), strict=True)
    their_copy.load_state_dict(theirs.state_dict(), strict=True)
    x = _input(name)
    for _ in ("eval", "train"):
        torch.testing.assert_close(_forward(our_copy, x), _forward(their_copy, x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_forward(our_copy, x), _forward(ours, x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_state(our_copy)["weight"], _state(their_copy)["weight"], atol=1e-6, rtol=1e-6)
        for layer in (ours, our_copy, their_copy):
            layer.train()


def _small_model(lib):
    torch.manual_seed(0)
    return nn.Sequential(lib.Linear(6, 6, r=2), nn.Linear(6, 6),
                         lib.MergedLinear(6, 6, r=2, enable_lora=[True, False]), nn.LayerNorm(6))


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_trainable_and_state_dict_match_loralib(bias):
    ours, theirs = _small_model(lora), _small_model(loralib)
    lora.mark_only_lora_as_trainable(ours, bias=bias)
    loralib.mark_only_lora_as_trainable(theirs, bias=bias)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable == [n for n, p in theirs.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable)
    ours_sd, theirs_sd = lora.lora_state_dict(ours, bias=bias), loralib.lora_state_dict(theirs, bias=bias)
    assert ours_sd.keys() == theirs_sd.keys()
    assert all(torch.equal(ours_sd[k], theirs_sd[k]) for k in ours_sd)


def test_unknown_bias_mode_is_a_user_error():
    with pytest.raises(PhituneError, match="lora_only"):
        lora.mark_only_lora_as_trainable(_small_model(lora), bias="some")
    with pytest.raises(PhituneError):
        lora.lora_state_dict(_small_model(lora), bias="some")


def test_load_lora_state_dict_roundtrip_and_mismatch():
    trained, fresh = _small_model(lora), _small_model(lora)
    _randomise_B(trained[0], trained[2])
    x = torch.randn(4, 6)
    result = lora.load_lora_state_dict(fresh, lora.lora_state_dict(trained))
    assert all("lora_" not in k for k in result.missing_keys)
    torch.testing.assert_close(fresh(x), trained(x))
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    with pytest.raises(PhituneError, match="add the same LoRA layers"):
        lora.load_lora_state_dict(plain, lora.lora_state_dict(trained))
    with pytest.raises(PhituneError, match="lacks 2 LoRA parameters"):
        lora.load_lora_state_dict(fresh, {k: v for k, v in lora.lora_state_dict(trained).items() if "0." in k})


def test_merged_linear_unequal_slices_matches_reference():
    """GQA-style q/k/v of sizes 8/4/4, LoRA on q and v: h = W0 x + b + s * [B_q A_q x, 0, B_v A_v x]."""
    torch.manual_seed(0)
    layer = lora.MergedLinear(6, 16, r=2, lora_alpha=6, enable_lora=[True, False, True], slice_sizes=[8, 4, 4])
    assert layer.lora_A.shape == (4, 6) and layer.lora_B.shape == (12, 2)
    _randomise_B(layer)
    x = torch.randn(5, 6)
    A_q, A_v = layer.lora_A.split(2)
    B_q, B_v = layer.lora_B.split([8, 4])
    lora_out = torch.cat([x @ A_q.T @ B_q.T, torch.zeros(5, 4), x @ A_v.T @ B_v.T], -1)
    expected = x @ layer.weight.T + layer.bias + 3.0 * lora_out
    torch.testing.assert_close(layer(x), expected)
    assert layer.lora_ind.tolist() == [True] * 8 + [False] * 4 + [True] * 4
    torch.testing.assert_close(layer.merge_AB(), torch.cat([B_q @ A_q, torch.zeros(4, 6), B_v @ A_v]))
    torch.testing.assert_close(layer.eval()(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(enable_lora=[True, False, True]),
                                    dict(enable_lora=[True, False, True], fan_in_fan_out=True),
                                    dict(enable_lora=[False, True]),
                                    dict(enable_lora=[True, True, True], fan_in_fan_out=True, bias=False)])
def test_merged_linear_export_helpers_match_loralib(kwargs):
    """merge_AB, zero_pad and lora_ind, which loralib code (microsoft/LoRA's GPT-2 example) calls to
    export merged weights as weight + merge_AB() * scaling."""
    ours, theirs = _pair("MergedLinear", (10, 12), dict(r=2, lora_alpha=4, **kwargs))
    _randomise_B(ours, theirs)
    assert torch.equal(ours.lora_ind, theirs.lora_ind)
    torch.manual_seed(5)
    rows = torch.randn(int(theirs.lora_ind.sum()), 3)
    for x in (rows, rows[:, 0]):
        assert torch.equal(ours.zero_pad(x), theirs.zero_pad(x))
    torch.testing.assert_close(ours.merge_AB(), theirs.merge_AB(), atol=1e-6, rtol=1e-6)
    exported = ours.weight + ours.merge_AB() * ours.scaling
    theirs.eval()
    torch.testing.assert_close(exported, theirs.weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(exported, ours.eval().weight, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(enable_lora=[True, False, True]),
                                    dict(enable_lora=[True, True], slice_sizes=[5, 5]),
                                    dict(enable_lora=[True, True], slice_sizes=[4, 4, 4])])
def test_merged_linear_rejects_bad_slices(kwargs):
    with pytest.raises(PhituneError, match="MergedLinear"):
        lora.MergedLinear(6, 16, r=2, **kwargs)


LORALIB_README_USAGE = '''
import torch
import torch.nn as nn
import loralib as lora

in_features, out_features, d_model = 16, 12, 8
layer = lora.Linear(in_features, out_features, r=16)
qkv_proj = lora.MergedLinear(d_model, 3 * d_model, r=8, enable_lora=[True, False, True])
model = nn.Sequential(layer, nn.ReLU(), nn.Linear(out_features, d_model), qkv_proj)
lora.mark_only_lora_as_trainable(model)
lora.mark_only_lora_as_trainable(model, bias='lora_only')
torch.save(model.state_dict(), ckpt_pretrained)
torch.save(lora.lora_state_dict(model), ckpt_lora)
model.load_state_dict(torch.load(ckpt_pretrained), strict=False)
model.load_state_dict(torch.load(ckpt_lora), strict=False)
result = sorted(lora.lora_state_dict(model))
'''


def test_loralib_usage_lines_run_unchanged(tmp_path):
    """The usage lines of loralib's README, with only the import changed, run and give the same checkpoint keys."""
    outcomes = {}
    for module in ("loralib", "phitune.lora"):
        scope = {"ckpt_pretrained": str(tmp_path / f"{module}-pre.pt"), "ckpt_lora": str(tmp_path / f"{module}.pt")}
        exec(LORALIB_README_USAGE.replace("import loralib as lora", f"import {module} as lora"), scope)
        outcomes[module] = scope["result"]
    assert outcomes["phitune.lora"] == outcomes["loralib"]
    assert "0.lora_A" in outcomes["loralib"] and "3.lora_B" in outcomes["loralib"]
