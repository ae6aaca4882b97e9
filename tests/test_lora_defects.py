"""Each loralib 0.1.2 defect that phitune.lora fixes.

Tests parametrised over _libs run the same check on both libraries; the loralib run is marked
xfail(strict=True, raises=...), so it must fail, and with the defect's own error (a failed check, or the crash the
defect causes): that documents the defect and catches a loralib that fixed it or that breaks in another way.
"""

import loralib
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import phitune.lora as lora


def _libs(defect, raises=AssertionError):
    """`raises`: the exception loralib's defect produces (a check that fails), so an unrelated error is no pass."""
    return [pytest.param(lora, id="phitune"),
            pytest.param(loralib, id="loralib", marks=pytest.mark.xfail(strict=True, reason=defect, raises=raises))]


def _conv_weight(layer):
    return getattr(layer, "conv", layer).weight  # loralib hides the conv under .conv


def _randomise_B(layer):
    torch.manual_seed(2)
    nn.init.normal_(layer.lora_B)


CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@pytest.mark.parametrize("lib", _libs("issue 115: B A has the wrong size for Conv1d/Conv3d", RuntimeError))
@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_conv3d_delta_has_weight_shape(lib, dims):
    layer = getattr(lib, f"Conv{dims}d")(4, 6, 3, r=2, lora_alpha=4, groups=2, padding=1)
    _randomise_B(layer)
    torch.manual_seed(0)
    x = torch.randn(2, 4, *([5] * dims))
    W0 = _conv_weight(layer).detach().clone()
    delta = (layer.lora_B @ layer.lora_A).view(W0.shape) * 2.0
    expected = CONV_FNS[dims](x, W0 + delta, getattr(layer, "conv", layer).bias, padding=1, groups=2)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.eval()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.train()
    torch.testing.assert_close(_conv_weight(layer), W0, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("lib", _libs("loralib asserts an int kernel_size"))
def test_tuple_kernel_size(lib):
    layer = lib.Conv2d(4, 6, (3, 1), r=2, padding=(1, 0))
    _randomise_B(layer)
    x = torch.randn(2, 4, 7, 7)
    W0 = _conv_weight(layer).detach()
    expected = F.conv2d(x, W0 + (layer.lora_B @ layer.lora_A).view(W0.shape) * 0.5, layer.bias, padding=(1, 0))
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lib", _libs("loralib never applies lora_dropout in conv layers"))
def test_conv_applies_lora_dropout(lib):
    layer = lib.Conv2d(4, 6, 3, r=2, lora_dropout=0.5)
    _randomise_B(layer)
    x = torch.randn(2, 4, 6, 6)
    W0 = _conv_weight(layer).detach()
    delta = (layer.lora_B @ layer.lora_A).view(W0.shape) * 0.5
    torch.manual_seed(5)
    dropped = F.dropout(x, 0.5, training=True)
    expected = F.conv2d(x, W0, getattr(layer, "conv", layer).bias) + F.conv2d(dropped, delta)
    torch.manual_seed(5)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lib", _libs("loralib crashes: merge_AB reads lora_A, which was never created", AttributeError))
def test_merged_linear_with_every_slice_disabled(lib):
    layer = lib.MergedLinear(8, 12, r=2, enable_lora=[False, False, False])
    x = torch.randn(3, 8)
    expected = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), expected)
    layer.eval()
    torch.testing.assert_close(layer(x), expected)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor an op allocates (outputs sharing an input's storage are views)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("lib", _libs("issue 109: loralib builds the full out x in update every step"))
def test_merged_linear_training_step_never_builds_full_delta(lib):
    layer = lib.MergedLinear(64, 96, r=2, enable_lora=[True, False, True])
    _randomise_B(layer)
    x = torch.randn(2, 64)
    with _LargestAllocation() as recorder:
        layer(x).sum().backward()
    assert layer.lora_A.grad is not None
    assert recorder.numel < 96 * 64


@pytest.mark.parametrize("lib", _libs("PR 125: loralib never turns LoRA parameters back on"))
def test_mark_only_lora_as_trainable_reenables_lora(lib):
    model = nn.Sequential(lib.Linear(4, 4, r=2), nn.Linear(4, 4))
    model.requires_grad_(False)  # e.g. a previous freeze-everything step
    lib.mark_only_lora_as_trainable(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"0.lora_A", "0.lora_B"}


@pytest.mark.parametrize("lib", _libs("issue 190: loading into a merged layer corrupts W0 on train()"))
def test_loading_lora_weights_while_merged_keeps_base_weight(lib):
    layer = lib.Linear(8, 6, r=2, lora_alpha=4)
    _randomise_B(layer)
    W0 = layer.weight.detach().clone()
    layer.eval()  # merged: weight = W0 + old B A
    torch.manual_seed(7)
    new = {"lora_A": torch.randn(2, 8), "lora_B": torch.randn(6, 2)}
    layer.load_state_dict(new, strict=False)
    x = torch.randn(3, 8)
    expected = F.linear(x, W0, layer.bias) + x @ new["lora_A"].T @ new["lora_B"].T * 2.0
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.train()
    torch.testing.assert_close(layer.weight, W0, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("lib", _libs("loading pretrained weights into a merged layer drops B A from "
                                      "the output, and train() then subtracts it from W0"))
def test_loading_base_weights_while_merged_keeps_lora(lib):
    layer = lib.Linear(8, 6, r=2, lora_alpha=4)
    _randomise_B(layer)
    layer.eval()  # merged: weight = old W0 + B A
    torch.manual_seed(7)
    pretrained = nn.Linear(8, 6).state_dict()
    layer.load_state_dict(pretrained, strict=False)
    x = torch.randn(3, 8)
    expected = F.linear(x, pretrained["weight"], pretrained["bias"]) + x @ layer.lora_A.T @ layer.lora_B.T * 2.0
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.train()
    torch.testing.assert_close(layer.weight, pretrained["weight"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("lib", _libs("loralib's train() returns None"))
@pytest.mark.parametrize("name,args", [("Linear", (4, 4)), ("Embedding", (5, 4)),
                                       ("MergedLinear", (4, 4)), ("Conv2d", (2, 2, 3))])
def test_train_and_eval_return_the_module(lib, name, args):
    layer = getattr(lib, name)(*args, r=2)
    assert layer.eval() is layer
    assert layer.train() is layer


BASES = {
    "Linear": lambda: nn.Linear(8, 6),
    "Embedding": lambda: nn.Embedding(10, 6, padding_idx=0),
    "Conv1d": lambda: nn.Conv1d(4, 6, 3, padding=1),
    "Conv2d": lambda: nn.Conv2d(4, 6, (3, 1), stride=2, groups=2),
}
INPUTS = {
    "Linear": lambda: torch.randn(3, 8),
    "Embedding": lambda: torch.randint(0, 10, (3, 4)),
    "Conv1d": lambda: torch.randn(2, 4, 9),
    "Conv2d": lambda: torch.randn(2, 4, 9, 9),
}


@pytest.mark.parametrize("name", BASES)
def test_from_module_keeps_pretrained_weights(name):
    """Issue 55: loralib can only build a fresh layer, whose init throws the pretrained weight away."""
    torch.manual_seed(0)
    base = BASES[name]()
    x = INPUTS[name]()
    expected = base(x)
    layer = getattr(lora, name).from_module(base, r=2, lora_alpha=4)
    assert layer.weight is base.weight and not layer.weight.requires_grad
    assert getattr(layer, "bias", None) is getattr(base, "bias", None)
    torch.testing.assert_close(layer(x), expected)  # LoRA starts at zero (B = 0, or A = 0 for Embedding)
    assert not hasattr(loralib.Linear, "from_module")


def test_merged_linear_from_module_keeps_weights():
    torch.manual_seed(0)
    base = nn.Linear(8, 12, bias=True)
    layer = lora.MergedLinear.from_module(base, r=2, enable_lora=[False, True], slice_sizes=[8, 4])
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), base(x))
    assert layer.weight is base.weight and layer.lora_B.shape == (4, 2)


@pytest.mark.parametrize("lib", _libs("issue 134: loralib hides weight and bias under .conv"))
def test_conv_exposes_weight_and_bias_like_nn_conv(lib):
    layer = lib.Conv2d(4, 6, 3, r=2)
    assert isinstance(layer, nn.Conv2d)
    assert layer.weight.shape == (6, 4, 3, 3) and layer.bias.shape == (6,)
    pretrained = nn.Conv2d(4, 6, 3).state_dict()
    assert layer.load_state_dict(pretrained, strict=False).unexpected_keys == []
    assert torch.equal(layer.weight, pretrained["weight"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", BASES)
def test_lora_parameters_follow_base_dtype(name, dtype):
    torch.manual_seed(0)
    base = BASES[name]().to(dtype)
    layer = getattr(lora, name).from_module(base, r=2, lora_alpha=4)
    assert layer.lora_A.dtype == layer.lora_B.dtype == dtype
    assert layer.lora_A.device == base.weight.device
    _randomise_B(layer)
    x = INPUTS[name]()
    x = x if name == "Embedding" else x.to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    torch.testing.assert_close(layer.eval()(x), out, atol=0.05, rtol=0.05)


def test_loralib_construct_then_load_does_not_follow_dtype():
    """The loralib way to reuse a bf16 layer (build, then load its weights) leaves everything fp32."""
    base = nn.Linear(8, 6).to(torch.bfloat16)
    theirs = loralib.Linear(8, 6, r=2)
    theirs.load_state_dict(base.state_dict(), strict=False)
    assert theirs.weight.dtype == theirs.lora_A.dtype == torch.float32
    assert lora.Linear.from_module(base, r=2).lora_A.dtype == torch.bfloat16
