"""IA3 against hand-written formulas on single layers (Linear and GPT-2's Conv1D), merging, mixed batches."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from graftune import AdapterModel, graft
from graftune.errors import ConfigError
from graftune.methods.ia3 import IA3Config
from tests.conftest import text_inputs, tiny_bert, tiny_gpt2, tiny_llama


class TwoLayers(nn.Module):
    """``proj`` has its output rescaled, ``ff`` (matched by ``feedforward``) its input."""

    def __init__(self, conv1d: bool = False):
        super().__init__()
        self.proj = Conv1D(12, 8) if conv1d else nn.Linear(8, 12)
        self.ff = Conv1D(6, 12) if conv1d else nn.Linear(12, 6)
        with torch.no_grad():  # transformers' Conv1D starts with a zero bias; make it count
            self.proj.bias.normal_()
            self.ff.bias.normal_()

    def forward(self, x):
        return self.ff(torch.relu(self.proj(x)))


def _graft(conv1d: bool = False, name: str = "default", model: AdapterModel | None = None, seed: int = 1):
    torch.manual_seed(0)
    model = model or AdapterModel(TwoLayers(conv1d).eval())
    model.add_adapter(name, "ia3", targets=["proj", "ff"], feedforward=r"(^|\.)ff$")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters[name].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.set_active(name)
    return model


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _weight(layer):  # out x in
    return layer.weight.T if isinstance(layer, Conv1D) else layer.weight


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_output_and_input_scaling_equal_formula(conv1d):
    model = _graft(conv1d)
    base = model.base
    l_out, l_in = model.adapters["default"]["proj"].ia3_l, model.adapters["default"]["ff"].ia3_l
    assert model.adapters["default"]["proj"].site == "output" and model.adapters["default"]["ff"].site == "input"
    assert l_out.shape == (12,) and l_in.shape == (12,)
    x = _x(3, 4, 8)
    y = (x @ _weight(base.proj).T + base.proj.bias) * l_out  # y * l
    expected = (torch.relu(y) * l_in) @ _weight(base.ff).T + base.ff.bias  # W diag(l) x + b
    torch.testing.assert_close(model(x), expected)


def test_starts_unchanged():
    torch.manual_seed(0)
    base = TwoLayers().eval()
    model = graft(base, "ia3", targets=["proj", "ff"], feedforward=r"ff$")
    x = _x(3, 8)
    assert torch.equal(model(x), base(x))


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_merge_equals_unmerged_and_unmerge_is_exact(conv1d):
    model = _graft(conv1d)
    original = {k: v.clone() for k, v in model.base.state_dict().items()}
    x = _x(3, 4, 8)
    unmerged = model(x)
    model.merge("default")
    merged_weights = {k: v.clone() for k, v in model.base.state_dict().items()}
    torch.testing.assert_close(model(x), unmerged)
    assert not torch.equal(merged_weights["ff.weight"], original["ff.weight"])
    assert torch.equal(merged_weights["ff.bias"], original["ff.bias"])  # input scaling leaves the bias
    model.unmerge()
    for k, v in model.base.state_dict().items():
        assert torch.equal(v, original[k]), k


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_mixed_batch_equals_per_adapter_runs(conv1d):
    model = _graft(conv1d, "a", seed=1)
    _graft(conv1d, "b", model=model, seed=2)
    x = _x(4, 5, 8)
    rows = ["b", None, "a", "b"]
    mixed = model(x, adapter_names=rows)
    singles = {}
    for n in (None, "a", "b"):
        model.set_active(*[n] if n else [])
        singles[n] = model(x)
    for i, n in enumerate(rows):
        torch.testing.assert_close(mixed[i], singles[n][i])


def test_presets_scale_keys_values_and_feed_forward_inputs():
    expected = {
        tiny_bert: ({"key", "value"}, "output.dense"),
        tiny_llama: ({"k_proj", "v_proj"}, "down_proj"),
        tiny_gpt2: ({"c_attn"}, "c_proj"),
    }
    for build, (outputs, ff) in expected.items():
        model = graft(build(), "ia3")
        sites = {k.replace(":", "."): m.site for k, m in model.adapters["default"].items()}
        assert len(sites) == 2 * (len(outputs) + 1), sites
        for name, site in sites.items():
            if site == "input":
                assert name.endswith(ff) and "attention" not in name, name
            else:
                assert name.rsplit(".", 1)[-1] in outputs, name


def test_matches_peft_ia3_on_llama():
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    reference = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    model = graft(base, "ia3")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for key, module in model.adapters["default"].items():
            module.ia3_l.add_(torch.randn(module.ia3_l.shape, generator=g) * 0.3)
            layer = reference.base_model.model.get_submodule(key.replace(":", "."))
            layer.ia3_l["default"].copy_(module.ia3_l.view_as(layer.ia3_l["default"]))
    x = text_inputs()
    torch.testing.assert_close(model(**x).logits, reference(**x).logits)


def test_bf16_base_keeps_its_dtype():
    model = graft(tiny_bert().to(torch.bfloat16), "ia3")
    assert model(**text_inputs()).last_hidden_state.dtype == torch.bfloat16


def test_bad_config_names_the_field():
    with pytest.raises(ConfigError, match="^feedforward:"):
        IA3Config(feedforward="(unclosed")
    with pytest.raises(ConfigError, match="^feedforward:"):
        IA3Config(feedforward=3)
