"""LoRA, rsLoRA and DoRA against a few lines of plain torch, on single layers of every supported type.

The reference is written from the formulas (lora.py's docstring, PEFT's definitions), not from our code:

    LoRA    y = W x + b + s B A x,  s = alpha / r            (Hu et al. 2021)
    rsLoRA  s = alpha / sqrt(r)                               (Kalajdzievski 2023)
    DoRA    y = m * (W + s B A) x / ||W + s B A||_row + b     (Liu et al. 2024; PEFT: norm over each output's row
            of the out x in weight, m initialised to ||W||_row)
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from graftune import AdapterModel
from graftune.errors import ConfigError


class One(nn.Module):
    """A model that is one layer, so the adapter's effect is the whole output."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _rand(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _graft(layer: nn.Module, name: str = "default", seed: int = 1, model: AdapterModel | None = None, **options):
    """Graft LoRA onto ``layer`` and move B (zero at init) and A to random values."""
    torch.manual_seed(0)
    model = model or AdapterModel(One(layer).eval())
    model.add_adapter(name, "lora", targets=["layer"], **options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters[name].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model.set_active(name)
    return model, model.adapters[name]["layer"]


def _linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(8, 6)


# --- nn.Linear ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("r,alpha", [(1, 1.0), (4, 16.0), (3, 5.0)])
def test_linear_lora_formula(r, alpha):
    layer = _linear()
    x = _rand(2, 5, 8)
    ref = layer(x)
    model, m = _graft(layer, r=r, alpha=alpha)
    A, B = m.lora_A, m.lora_B
    assert A.shape == (r, 8) and B.shape == (6, r)
    expected = x @ layer.weight.T + layer.bias + (alpha / r) * (x @ A.T @ B.T)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(model(x), ref)


def test_linear_lora_starts_as_identity():
    layer = _linear()
    x = _rand(3, 8)
    model = AdapterModel(One(layer))
    model.add_adapter("a", "lora", targets=["layer"], r=4)
    model.set_active("a")
    m = model.adapters["a"]["layer"]
    assert torch.count_nonzero(m.lora_B) == 0 and torch.count_nonzero(m.lora_A) > 0
    assert torch.equal(model(x), layer(x))


def test_rslora_scaling():
    layer = _linear()
    x = _rand(4, 8)
    model, m = _graft(layer, r=4, alpha=6.0, rslora=True)
    s = 6.0 / math.sqrt(4)
    assert m.scaling == pytest.approx(s)
    expected = F.linear(x, layer.weight + s * m.lora_B @ m.lora_A, layer.bias)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    # with the same tensors, plain LoRA scales by alpha / r instead
    plain, pm = _graft(_linear(), r=4, alpha=6.0)
    with torch.no_grad():
        pm.lora_A.copy_(m.lora_A)
        pm.lora_B.copy_(m.lora_B)
    expected_plain = F.linear(x, layer.weight + (6.0 / 4) * m.lora_B @ m.lora_A, layer.bias)
    torch.testing.assert_close(plain(x), expected_plain, rtol=1e-5, atol=1e-6)


def test_dropout_acts_on_the_adapter_input_only():
    layer = _linear()
    x = _rand(64, 8)
    model, m = _graft(layer, r=2, dropout=0.5)
    model.train()
    torch.manual_seed(3)
    out = model(x)
    torch.manual_seed(3)
    dropped = nn.Dropout(0.5).train()(x)  # the same mask, drawn from the same seed
    base_out = F.linear(x, layer.weight, layer.bias)  # the base's part is never dropped
    expected = base_out + (16.0 / 2) * dropped @ m.lora_A.T @ m.lora_B.T
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    model.eval()  # no dropout at inference
    torch.testing.assert_close(model(x), base_out + 8.0 * x @ m.lora_A.T @ m.lora_B.T, rtol=1e-5, atol=1e-5)


# --- DoRA -----------------------------------------------------------------------------------------------------
def _dora_reference(x, weight, bias, A, B, s, magnitude):
    """PEFT's DoRA for a Linear (weight out x in): the adapted weight, renormalised per output row."""
    adapted = weight + s * B @ A
    norm = adapted.norm(p=2, dim=1, keepdim=True)
    return F.linear(x, magnitude[:, None] * adapted / norm, bias)


def test_dora_linear_formula():
    layer = _linear()
    x = _rand(3, 5, 8)
    model = AdapterModel(One(layer).eval())
    model.add_adapter("init", "lora", targets=["layer"], r=4, alpha=8, dora=True)
    model.set_active("init")
    m0 = model.adapters["init"]["layer"]
    # the magnitude starts at the weight's row norms, so the model starts unchanged
    torch.testing.assert_close(m0.lora_magnitude, layer.weight.norm(dim=1))
    torch.testing.assert_close(model(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)

    model, m = _graft(layer, model=model, name="trained", r=4, alpha=8, dora=True)
    expected = _dora_reference(x, layer.weight, layer.bias, m.lora_A, m.lora_B, 8 / 4, m.lora_magnitude)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    adapted = layer.weight + 2.0 * m.lora_B @ m.lora_A
    merged = m.lora_magnitude[:, None] * adapted / adapted.norm(dim=1, keepdim=True)
    model.merge("trained")
    torch.testing.assert_close(model.base.layer.weight, merged, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_dora_norm_is_a_constant_in_backward():
    """The paper (section 4.3) and PEFT detach ||W + sBA||: the gradient flows through the numerator only."""
    layer = _linear()
    x = _rand(4, 8)
    model, m = _graft(layer, r=2, alpha=2, dora=True)
    model.set_trainable("default")
    model(x).sum().backward()
    A = m.lora_A.detach().clone().requires_grad_(True)
    B = m.lora_B.detach().clone().requires_grad_(True)
    mag = m.lora_magnitude.detach().clone().requires_grad_(True)
    adapted = layer.weight + 1.0 * B @ A
    F.linear(x, mag[:, None] * adapted / adapted.norm(dim=1, keepdim=True).detach(), layer.bias).sum().backward()
    for ours, ref in ((m.lora_A, A), (m.lora_B, B), (m.lora_magnitude, mag)):
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-4, atol=1e-6)


def test_dora_conv1d_formula():
    torch.manual_seed(0)
    layer = Conv1D(6, 8)  # GPT-2's layer: weight stored in x out, y = x W + b
    with torch.no_grad():
        layer.bias.normal_()
    x = _rand(2, 3, 8)
    model, m = _graft(layer, r=2, alpha=4, dora=True)
    w = layer.weight.T  # out x in
    torch.testing.assert_close(model(x), _dora_reference(x, w, layer.bias, m.lora_A, m.lora_B, 2.0, m.lora_magnitude),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [nn.Embedding(10, 6), nn.Conv2d(3, 4, 3)], ids=["embedding", "conv2d"])
def test_dora_on_unsupported_layers_raises(layer):
    model = AdapterModel(One(layer))
    with pytest.raises(ConfigError, match="DoRA supports Linear and Conv1D"):
        model.add_adapter("a", "lora", targets=["layer"], dora=True)
    assert not model.info


# --- GPT-2 Conv1D, Conv2d, Embedding --------------------------------------------------------------------------
def test_conv1d_transposed_weight():
    torch.manual_seed(0)
    layer = Conv1D(6, 8)  # nf=6 outputs, nx=8 inputs; weight is 8 x 6
    with torch.no_grad():
        layer.bias.normal_()
    x = _rand(2, 5, 8)
    model, m = _graft(layer, r=3, alpha=6)
    assert m.lora_A.shape == (3, 8) and m.lora_B.shape == (6, 3)
    expected = x @ layer.weight + layer.bias + 2.0 * x @ m.lora_A.T @ m.lora_B.T
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    # merged: the delta is added in the layer's own (in x out) layout
    merged = layer.weight + 2.0 * (m.lora_B @ m.lora_A).T
    model.merge()
    torch.testing.assert_close(model.base.layer.weight, merged, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2)])
def test_conv2d_formula(stride, padding, dilation):
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 5, kernel_size=3, stride=stride, padding=padding, dilation=dilation)
    x = _rand(2, 3, 9, 9)
    model, m = _graft(layer, r=2, alpha=3)
    # A is a conv with the layer's kernel, B a 1x1 conv: their product is a rank-2 kernel added to W
    assert m.lora_A.shape == (2, 3, 3, 3) and m.lora_B.shape == (5, 2, 1, 1)
    delta = (m.lora_B.flatten(1) @ m.lora_A.flatten(1)).view_as(layer.weight) * 1.5
    expected = F.conv2d(x, layer.weight + delta, layer.bias, stride=stride, padding=padding, dilation=dilation)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    model.merge()
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_conv2d_with_groups_raises():
    model = AdapterModel(One(nn.Conv2d(4, 4, 3, groups=4)))
    with pytest.raises(ConfigError, match="groups=1 only"):
        model.add_adapter("a", "lora", targets=["layer"])


def test_embedding_formula():
    torch.manual_seed(0)
    layer = nn.Embedding(12, 6, padding_idx=0)
    ids = torch.tensor([[0, 3, 11, 3], [5, 1, 2, 7]])
    model, m = _graft(layer, r=2, alpha=4)
    # A (r x vocab) is a lookup table, B (dim x r) projects it: E' = E + s (B A)^T
    assert m.lora_A.shape == (2, 12) and m.lora_B.shape == (6, 2)
    expected = F.embedding(ids, layer.weight + 2.0 * (m.lora_B @ m.lora_A).T)
    torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-6)
    model.merge()
    torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-6)


def test_merged_linear_weight_equals_formula():
    layer = _linear()
    model, m = _graft(layer, r=4, alpha=2)
    original = layer.weight.detach().clone()
    model.merge()
    torch.testing.assert_close(model.base.layer.weight, original + 0.5 * m.lora_B @ m.lora_A, rtol=1e-6, atol=1e-7)
    model.unmerge()
    assert model.base.layer.weight is layer.weight and torch.equal(layer.weight, original)


# --- mixed batches: the batched (stacked, padded) computation ----------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_mixed_batch_with_different_ranks_equals_formula(kind):
    torch.manual_seed(0)
    layer = _linear() if kind == "linear" else Conv1D(6, 8)
    model, a = _graft(layer, name="a", seed=1, r=2, alpha=4)
    model, b = _graft(layer, model=model, name="b", seed=2, r=5, alpha=5, rslora=True)
    x = _rand(4, 3, 8)
    rows = ["b", None, "a", "b"]
    with model.disabled():
        base_out = layer(x)
    adapters = {"a": a, "b": b}
    expected = torch.stack([
        base_out[i] if n is None
        else base_out[i] + adapters[n].scaling * x[i] @ adapters[n].lora_A.T @ adapters[n].lora_B.T
        for i, n in enumerate(rows)])
    assert b.scaling == pytest.approx(5 / math.sqrt(5))
    torch.testing.assert_close(model(x, adapter_names=rows), expected, rtol=1e-5, atol=1e-5)
