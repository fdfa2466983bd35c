"""BitFit, top-k layers and full fine-tuning (methods/partial.py) and the params-site swap they rely on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graftune import AdapterModel, graft
from graftune.core.method import TargetSpec
from graftune.errors import ConfigError, TargetError
from tests.conftest import first_tensor, text_inputs, tiny_bert, tiny_gpt2, tiny_llama


def _out(model, x) -> torch.Tensor:
    return first_tensor(model(**x))


def _fill(model: AdapterModel, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters[name].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _snapshot(base: nn.Module) -> dict[str, tuple[nn.Parameter, int, torch.Tensor]]:
    """Each base parameter's object, storage address and value, to check that none is replaced or written."""
    return {n: (p, p.data_ptr(), p.detach().clone()) for n, p in base.named_parameters()}


def _assert_untouched(base: nn.Module, snap: dict) -> None:
    now = dict(base.named_parameters())
    assert now.keys() == snap.keys()
    for n, (p, ptr, value) in snap.items():
        assert now[n] is p and p.data_ptr() == ptr and torch.equal(p, value), n


# --- BitFit ----------------------------------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 4)
        self.norm = nn.LayerNorm(4)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.nobias = nn.Linear(4, 3, bias=False)

    def forward(self, v, img):
        return self.nobias(self.norm(self.lin(v))), self.bn(self.conv(img))


def _net_inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 7, 6, generator=g), torch.randn(2, 3, 8, 8, generator=g)


def test_bitfit_adds_bias_deltas_like_training_the_biases():
    torch.manual_seed(0)
    net = _Net().eval()
    v, img = _net_inputs()
    model = graft(net, "bitfit", targets=TargetSpec(types=("Linear", "LayerNorm", "Conv2d", "BatchNorm2d")))
    assert set(model.info["default"].targets) == {"lin", "norm", "conv", "bn", "nobias"}
    _fill(model, "default", seed=1)
    d = {t: model.adapters["default"][t].bitfit_bias.detach() for t in ("lin", "norm", "conv", "bn", "nobias")}
    assert d["conv"].shape == (5,) and d["nobias"].shape == (3,)
    # reference: the same network with each bias b replaced by b + db (a bias-less module gets db as its bias)
    ref = _Net().eval()
    ref.load_state_dict(net.state_dict())
    with torch.no_grad():
        for t, delta in d.items():
            m = getattr(ref, t)
            if m.bias is None:
                m.bias = nn.Parameter(delta.clone())
            else:
                m.bias.add_(delta)
    out, expected = model(v, img), ref(v, img)
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bitfit_merge_folds_deltas_and_unmerge_restores_missing_bias():
    torch.manual_seed(0)
    net = _Net().eval()
    v, img = _net_inputs()
    keys = set(net.state_dict())
    model = graft(net, "bitfit", targets=TargetSpec(types=("Linear", "LayerNorm", "Conv2d", "BatchNorm2d")))
    _fill(model, "default", seed=1)
    unmerged = model(v, img)
    lin_bias = net.lin.bias
    model.merge("default")
    delta = model.adapters["default"]["lin"].bitfit_bias.detach()
    torch.testing.assert_close(net.lin.bias, lin_bias + delta)
    torch.testing.assert_close(net.nobias.bias, model.adapters["default"]["nobias"].bitfit_bias.detach())
    for a, b in zip(model(v, img), unmerged):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    model.unmerge()
    assert net.nobias.bias is None and net.lin.bias is lin_bias and set(net.state_dict()) == keys


def test_bitfit_presets_train_existing_biases_and_add_them_on_llama():
    bert = graft(tiny_bert(), "bitfit")
    assert all(type(m).__name__ in ("Linear", "LayerNorm") for n, m in bert.base.named_modules()
               if n in bert.info["default"].targets)
    gpt2 = graft(tiny_gpt2(), "bitfit")
    assert "lm_head" not in gpt2.info["default"].targets  # it has no bias
    llama = graft(tiny_llama(), "bitfit")
    assert {t.rsplit(".", 1)[-1] for t in llama.info["default"].targets} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_bitfit_mixed_batch_gathers_per_row():
    base = tiny_gpt2()
    x = {"input_ids": text_inputs()["input_ids"]}
    model = AdapterModel(base)
    model.add_adapter("a", "bitfit")
    model.add_adapter("b", "bitfit")
    _fill(model, "a", 1)
    _fill(model, "b", 2)
    mixed = first_tensor(model(**x, adapter_names=["b", "a", None]))
    for i, n in enumerate(["b", "a", None]):
        model.set_active(*([n] if n else []))
        torch.testing.assert_close(mixed[i], _out(model, x)[i], rtol=1e-5, atol=1e-5)


# --- top-k layers and full fine-tuning -------------------------------------------------------------------
def test_topk_trains_exactly_the_top_layers():
    base = tiny_bert()
    names = {n for n, _ in base.named_parameters()}
    model = graft(base, "topk", top_k_layers=1)
    keys = set(model.adapter_state_dict("default"))
    assert keys == {n for n in names if n.startswith("encoder.layer.1.")}
    assert all(".layer.1." in f".{t}." for t in model.info["default"].targets)
    assert model.info["default"].config.top_k_layers == 1
    assert graft(tiny_bert(), "topk").info["default"].config.top_k_layers == 2  # the default


def test_topk_step_writes_only_the_copies():
    base = tiny_bert()
    x = text_inputs()
    snap = _snapshot(base)
    model = graft(base, "topk", top_k_layers=1)
    ref = _out(model, x)
    trainable = model.trainable_parameters()
    opt = torch.optim.SGD(trainable, lr=0.5)
    _out(model, x).pow(2).mean().backward()
    opt.step()
    assert not torch.allclose(_out(model, x), ref)
    # the base's grad-requiring parameters while active are exactly the copies
    assert {id(p) for p in base.parameters() if p.requires_grad} == {id(p) for p in trainable}
    model.set_active()
    _assert_untouched(base, snap)
    torch.testing.assert_close(_out(model, x), ref, rtol=0, atol=0)


def test_full_covers_every_parameter():
    base = tiny_bert()
    model = graft(base, "full")
    assert set(model.adapter_state_dict("default")) == {n for n, _ in base.named_parameters()}
    assert sum(p.numel() for p in model.trainable_parameters()) == sum(p.numel() for p in base.parameters())


def test_full_keeps_tied_embeddings_tied():
    base = tiny_gpt2()
    x = {"input_ids": text_inputs()["input_ids"]}
    wte = base.transformer.wte.weight
    assert base.lm_head.weight is wte
    model = graft(base, "full")
    keys = set(model.adapter_state_dict("default"))
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys  # one copy of the tied matrix
    assert base.lm_head.weight is base.transformer.wte.weight is not wte
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    _out(model, x).pow(2).mean().backward()
    opt.step()
    assert base.lm_head.weight is base.transformer.wte.weight
    model.set_active()
    assert base.lm_head.weight is wte and base.transformer.wte.weight is wte


def test_switching_topk_adapters_swaps_weights():
    base = tiny_llama()
    x = text_inputs()
    snap = _snapshot(base)
    ref = _out(base, x)
    model = AdapterModel(base)
    model.add_adapter("a", "topk", top_k_layers=1)
    model.add_adapter("b", "topk", top_k_layers=1)
    _fill(model, "a", 1)
    _fill(model, "b", 2)
    outs = {}
    for n in ("a", "b"):
        model.set_active(n)
        assert base.model.layers[1].mlp.up_proj.weight is model.adapters[n]["model:layers:1:mlp:up_proj"].weight
        outs[n] = _out(model, x)
    assert not torch.allclose(outs["a"], outs["b"]) and not torch.allclose(outs["a"], ref)
    model.set_active("a")
    assert torch.equal(_out(model, x), outs["a"])
    with model.disabled():
        assert torch.equal(_out(model, x), ref)
    model.set_active()
    _assert_untouched(base, snap)
    assert torch.equal(_out(model, x), ref)


def test_new_params_adapter_copies_the_base_not_the_active_one():
    base = tiny_bert()
    x = text_inputs()
    ref = _out(base, x)
    model = graft(base, "topk", name="a")
    _fill(model, "a", 1)
    model.add_adapter("b", "topk")
    assert model.active == ("a",)
    model.set_active("b")
    torch.testing.assert_close(_out(model, x), ref, rtol=0, atol=0)


def test_weighted_average_of_topk_adapters():
    base = tiny_bert()
    model = AdapterModel(base)
    for n, seed in (("a", 1), ("b", 2)):
        model.add_adapter(n, "topk", top_k_layers=1)
        _fill(model, n, seed)
    model.add_weighted_adapter("avg", {"a": 0.5, "b": 0.5})
    sa, sb, avg = (model.adapter_state_dict(n) for n in ("a", "b", "avg"))
    for k in sa:
        torch.testing.assert_close(avg[k], (sa[k] + sb[k]) / 2)


@pytest.mark.parametrize("options,error,match", [
    ({"top_k_layers": 0}, ConfigError, "top_k_layers"),
    ({"top_k_layers": None}, ConfigError, "method 'full'"),
    ({"top_k_layers": 3}, TargetError, "has 2 numbered layers; use 1 to 2"),
], ids=["zero", "unset", "too-many"])
def test_topk_bad_k(options, error, match):
    model = AdapterModel(tiny_bert())
    with pytest.raises(error, match=match):
        model.add_adapter("bad", "topk", **options)
    assert not model.info


def test_full_rejects_top_k_and_parameterless_targets():
    model = AdapterModel(tiny_bert())
    with pytest.raises(ConfigError, match="topk"):
        model.add_adapter("bad", "full", top_k_layers=1)
    with pytest.raises(TargetError, match="own no parameters"):
        model.add_adapter("bad", "full", targets=TargetSpec(names=("attention",)))
    assert not model.info and not list(model.adapters)


def test_params_cannot_merge_or_mix():
    model = graft(tiny_bert(), "topk")
    with pytest.raises(ConfigError, match="already are full weights"):
        model.merge("default")
    with pytest.raises(ConfigError, match="mixed-adapter"):
        model(**text_inputs(), adapter_names=["default", None, None])


# --- core behaviour around params-site swaps ------------------------------------------------------------
def test_unmerge_and_unload_next_to_a_swapped_in_adapter():
    base = tiny_bert()
    x = text_inputs()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = AdapterModel(base)
    model.add_adapter("top", "topk", top_k_layers=1)
    model.add_adapter("bias", "bitfit")
    _fill(model, "top", 1)
    _fill(model, "bias", 2)
    model.set_active("top", "bias")
    expected = _out(model, x)
    model.merge("bias")
    torch.testing.assert_close(_out(model, x), expected, rtol=1e-4, atol=1e-5)
    model.unmerge()
    copy = model.adapters["top"]["encoder:layer:1:output:dense"].weight
    assert base.encoder.layer[1].output.dense.weight is copy  # the top-k copies stay swapped in
    assert torch.equal(_out(model, x), expected)
    with pytest.raises(ConfigError, match="unmerge"):
        model.merge("bias")
        model.set_active()
    assert model.active == ("top", "bias")  # a refused switch changes nothing
    restored = model.unload()
    for k, v in restored.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_conversion_moves_the_parameters_set_aside():
    base = tiny_bert()
    x = text_inputs()
    model = graft(base, "topk", top_k_layers=1)
    model.to(torch.float64)
    model.set_active()
    assert {p.dtype for p in base.parameters()} == {torch.float64}
    assert _out(model, x).dtype == torch.float64
