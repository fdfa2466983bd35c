"""Bottleneck adapters against hand-written formulas on single layers, plus presets and config validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graftune import AdapterModel, graft
from graftune.errors import ConfigError, GraftuneError
from graftune.methods.bottleneck import BottleneckConfig
from tests.conftest import text_inputs, tiny_bert, tiny_gpt2, tiny_llama

ACT = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "tanh": torch.tanh}


class OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 12)

    def forward(self, x):
        return self.fc(x)


class OneConv(nn.Module):
    """A conv followed by a batch norm: targeting ``block`` exercises width inference from the norm."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6))

    def forward(self, x):
        return self.block(x)


def _randomize(model: AdapterModel, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters[name].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _parts(module):
    return (module.bottleneck_down.weight, module.bottleneck_down.bias, module.bottleneck_up.weight,
            module.bottleneck_up.bias)


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("act", sorted(ACT))
def test_dense_output_equals_formula(act):
    base = OneLinear().eval()
    model = graft(base, "bottleneck", targets=["fc"], bottleneck_size=3, non_linearity=act)
    _randomize(model, "default", seed=1)
    x = _x(2, 5, 8)
    y = F.linear(x, base.fc.weight, base.fc.bias)
    wd, bd, wu, bu = _parts(model.adapters["default"]["fc"])
    expected = y + ACT[act](y @ wd.T + bd) @ wu.T + bu
    torch.testing.assert_close(model(x), expected)


def test_without_residual_the_adapter_replaces_the_output():
    base = OneLinear().eval()
    model = graft(base, "bottleneck", targets=["fc"], bottleneck_size=3, residual=False)
    _randomize(model, "default", seed=1)
    x = _x(4, 8)
    wd, bd, wu, bu = _parts(model.adapters["default"]["fc"])
    y = F.linear(x, base.fc.weight, base.fc.bias)
    torch.testing.assert_close(model(x), F.relu(y @ wd.T + bd) @ wu.T + bu)


def test_starts_unchanged_and_bottleneck_width():
    base = OneLinear().eval()
    x = _x(4, 8)
    model = graft(base, "bottleneck", targets=["fc"], reduction_factor=4)
    assert model.adapters["default"]["fc"].size == 3  # 12 / 4
    assert torch.equal(model(x), base(x))
    other = AdapterModel(base)
    other.add_adapter("a", "bottleneck", targets=["fc"], reduction_factor=4, bottleneck_size=5)
    assert other.adapters["a"]["fc"].size == 5  # bottleneck_size overrides reduction_factor


def test_conv_block_output_equals_1x1_conv_formula():
    base = OneConv().eval()
    model = graft(base, "bottleneck", targets=["block"], bottleneck_size=2, non_linearity="gelu")
    module = model.adapters["default"]["block"]
    assert module.conv and module.width == 6
    _randomize(model, "default", seed=2)
    x = _x(2, 3, 5, 5)
    with model.disabled():
        y = base.block(x)
    wd, bd, wu, bu = _parts(module)
    h = F.gelu(F.conv2d(y, wd[:, :, None, None], bd))
    torch.testing.assert_close(model(x), y + F.conv2d(h, wu[:, :, None, None], bu))


def test_wrongly_inferred_width_names_the_fix():
    class Reordered(nn.Module):  # defines its output layer first, so the last-defined layer is not the output
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(16, 8)
            self.inner = nn.Linear(8, 16)

        def forward(self, x):
            return self.out(self.inner(x))

    base = nn.Sequential()
    base.add_module("block", Reordered())
    model = graft(base, "bottleneck", targets=["block"])
    with pytest.raises(ConfigError, match="output projection"):
        model(_x(2, 8))


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_mixed_batch_equals_per_adapter_runs(kind):
    base, target, x = (OneLinear(), "fc", _x(4, 5, 8)) if kind == "dense" else (OneConv(), "block", _x(4, 3, 5, 5))
    base.eval()
    model = AdapterModel(base)
    model.add_adapter("a", "bottleneck", targets=[target], bottleneck_size=2, non_linearity="tanh")
    model.add_adapter("b", "bottleneck", targets=[target], bottleneck_size=5, non_linearity="tanh")
    _randomize(model, "a", seed=3)
    _randomize(model, "b", seed=4)
    rows = ["a", None, "b", "a"]
    mixed = model(x, adapter_names=rows)
    singles = {None: base(x)}  # no adapter is active yet
    for n in ("a", "b"):
        model.set_active(n)
        singles[n] = model(x)
    for i, n in enumerate(rows):
        torch.testing.assert_close(mixed[i], singles[n][i])


def test_houlsby_adapts_twice_as_many_sites_as_pfeiffer():
    for build in (tiny_bert, tiny_llama, tiny_gpt2):
        model = AdapterModel(build())
        pfeiffer = model.add_adapter("p", "bottleneck").targets
        houlsby = model.add_adapter("h", "bottleneck", placement="houlsby").targets
        assert len(pfeiffer) == 2 and len(houlsby) == 4, (pfeiffer, houlsby)
        assert set(pfeiffer) < set(houlsby)


def test_pfeiffer_targets_the_feed_forward_output():
    expected = {tiny_bert: "encoder.layer.0.output.dense", tiny_llama: "model.layers.0.mlp.down_proj",
                tiny_gpt2: "transformer.h.0.mlp.c_proj"}
    for build, name in expected.items():
        assert AdapterModel(build()).add_adapter("p", "bottleneck").targets[0] == name


def test_bf16_base_keeps_its_dtype():
    base = tiny_bert().to(torch.bfloat16)
    model = graft(base, "bottleneck")
    out = model(**text_inputs()).last_hidden_state
    assert out.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())


def test_merge_explains_why_not():
    model = graft(OneLinear(), "bottleneck", targets=["fc"])
    with pytest.raises(GraftuneError, match="non-linearity sits between"):
        model.merge("default")


@pytest.mark.parametrize("field,value", [
    ("placement", "middle"), ("reduction_factor", 0), ("reduction_factor", "big"), ("bottleneck_size", 0),
    ("bottleneck_size", 2.5), ("non_linearity", "sigmoid"), ("residual", "yes"), ("dropout", 1.0),
    ("init_scale", -1.0),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        BottleneckConfig(**{field: value})
