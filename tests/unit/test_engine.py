"""AdapterModel: many named adapters on one frozen base.

Adding, deleting, activating and stacking adapters; weighted averaging; merge/unmerge/unload (LoRA, IA3);
switch time; mixed-adapter batches in training; the parameter report; bad input leaving the model unchanged.
"""

from __future__ import annotations

import copy
import json
import statistics
import struct
import time

import pytest
import torch
from torch import nn

from graftune import AdapterModel, all_methods, graft, save_adapter
from graftune.errors import ConfigError, TargetError
from tests.conftest import first_tensor, image_inputs, text_inputs, tiny_bert, tiny_cnn, tiny_gpt2


# --- helpers ------------------------------------------------------------------------------------------------
class TwoLinear(nn.Module):
    """Two Linear layers, small enough to check stacking by hand."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(6, 10)
        self.down = nn.Linear(10, 4)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _perturb(model: AdapterModel, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters[name].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _out(model, x: dict, **kw) -> torch.Tensor:
    return first_tensor(model(**x, **kw))


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _adapter_state(model: AdapterModel, name: str) -> dict[str, torch.Tensor]:
    """A snapshot (``adapter_state_dict`` shares storage with the live parameters, like ``state_dict``)."""
    return {k: v.clone() for k, v in model.adapter_state_dict(name).items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert v.dtype == b[k].dtype and torch.equal(v, b[k]), f"{k} differs"


def _hooks(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _x(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- add / delete / activate / deactivate -------------------------------------------------------------------
def test_add_activate_deactivate_delete():
    base = tiny_bert()
    x = text_inputs()
    ref = _out(base, x)
    original = _state(base)
    model = AdapterModel(base)
    assert model.family == "bert" and model.active == ()
    for name, seed in (("a", 1), ("b", 2)):
        model.add_adapter(name, "lora", r=4)
        _perturb(model, name, seed)
    assert set(model.info) == {"a", "b"} and _hooks(base) == 4  # one hook per target (query, value x 2 layers)
    assert torch.equal(_out(model, x), ref), "added but not active: the base computes"

    model.set_active("a")
    out_a = _out(model, x)
    model.set_active("b")
    out_b = _out(model, x)
    assert model.active == ("b",)
    assert not torch.allclose(out_a, ref) and not torch.allclose(out_b, ref) and not torch.allclose(out_a, out_b)
    model.set_active()  # deactivate: the base alone, bit for bit
    assert model.active == () and torch.equal(_out(model, x), ref)

    model.set_active("a", "b")
    model.delete_adapter("a")
    assert model.active == ("b",), "deleting an active adapter deactivates it"
    assert set(model.info) == {"b"} and "a" not in model.adapters
    torch.testing.assert_close(_out(model, x), out_b, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="no adapter named 'a'"):
        model.set_active("a")
    model.delete_adapter("b")
    assert _hooks(base) == 0 and not list(model.adapters) and model.active == ()
    _assert_same_state(base.state_dict(), original)
    assert torch.equal(_out(model, x), ref)


def test_duplicate_or_bad_adapter_names_raise():
    model = AdapterModel(tiny_bert())
    model.add_adapter("a", "lora")
    with pytest.raises(ConfigError, match="already loaded"):
        model.add_adapter("a", "ia3")
    for bad in ("", "has space", "__base__", "x" * 65):
        with pytest.raises(ConfigError, match="adapter name"):
            model.add_adapter(bad, "lora")
    assert set(model.info) == {"a"}


# --- stacking -----------------------------------------------------------------------------------------------
def test_stacked_lora_is_base_plus_both_deltas():
    model = AdapterModel(TwoLinear().eval())
    for name, seed in (("a", 1), ("b", 2)):
        model.add_adapter(name, "lora", targets=["up", "down"], r=2, alpha=4)
        _perturb(model, name, seed)
    model.set_active("a", "b")
    x = _x(5, 6)
    base = model.base

    def lin(layer, key, h):
        w = layer.weight + model.adapters["a"][key].delta() + model.adapters["b"][key].delta()
        return h @ w.T + layer.bias

    expected = lin(base.down, "down", torch.tanh(lin(base.up, "up", x)))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    # the order of a LoRA stack does not matter (the deltas add)
    model.set_active("b", "a")
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_stacked_adapters_apply_in_sequence():
    """A bottleneck stack is b(a(y)), in the order given to set_active (not a sum)."""
    model = AdapterModel(TwoLinear().eval())
    for name, seed in (("a", 1), ("b", 2)):
        model.add_adapter(name, "bottleneck", targets=["up"], bottleneck_size=3)
        _perturb(model, name, seed)
    x = _x(5, 6)
    y = model.base.up(x)
    a, b = model.adapters["a"]["up"], model.adapters["b"]["up"]
    for order, expected_up in ((("a", "b"), b(x, a(x, y))), (("b", "a"), a(x, b(x, y)))):
        model.set_active(*order)
        expected = model.base.down(torch.tanh(expected_up))
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    model.set_active("a", "b")
    ab = model(x)
    model.set_active("b", "a")
    assert not torch.allclose(ab, model(x)), "a non-linear stack depends on the order"


def test_stacked_ia3_multiplies_the_vectors():
    model = AdapterModel(TwoLinear().eval())
    for name, seed in (("a", 1), ("b", 2)):
        model.add_adapter(name, "ia3", targets=["up"], feedforward="^$")
        _perturb(model, name, seed)
    x = _x(5, 6)
    la, lb = model.adapters["a"]["up"].ia3_l, model.adapters["b"]["up"].ia3_l
    expected = model.base.down(torch.tanh(model.base.up(x) * la * lb))  # no adapter active yet: the bare layers
    model.set_active("a", "b")
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


# --- weighted averaging -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "ia3", "bottleneck"])
def test_weighted_adapter_is_the_weighted_mean(method):
    model = AdapterModel(tiny_bert())
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        model.add_adapter(name, method)
        _perturb(model, name, seed)
    weights = {"a": 0.2, "b": 0.5, "c": 0.3}
    model.add_weighted_adapter("avg", weights)
    states = {n: _adapter_state(model, n) for n in (*weights, "avg")}
    assert states["avg"].keys() == states["a"].keys()
    for k in states["avg"]:
        expected = sum(w * states[n][k] for n, w in weights.items())
        torch.testing.assert_close(states["avg"][k], expected, rtol=1e-6, atol=1e-7)
    assert model.info["avg"].targets == model.info["a"].targets and model.info["avg"].method.name == method
    # the average owns its tensors: training it leaves the sources alone
    with torch.no_grad():
        next(model.adapters["avg"].parameters()).add_(1.0)
    for n in weights:
        _assert_same_state(_adapter_state(model, n), states[n])
    model.set_active("avg")
    x = text_inputs()
    assert _out(model, x).shape == _out(model.base, x).shape


def test_weighted_adapter_rejects_mismatched_adapters_and_leaves_model_unchanged():
    model = AdapterModel(tiny_bert())
    model.add_adapter("r4", "lora", r=4)
    model.add_adapter("r8", "lora", r=8)
    model.add_adapter("r4_alpha", "lora", r=4, alpha=64)
    model.add_adapter("r4_key", "lora", r=4, targets=["key", "value"])
    model.add_adapter("ia3", "ia3")
    before = _state(model)
    cases = [({"r4": 0.5, "r8": 0.5}, "same-shaped"),
             ({"r4": 0.5, "ia3": 0.5}, "one method on the same targets"),
             ({"r4": 0.5, "r4_key": 0.5}, "one method on the same targets"),
             ({"r4": 0.5, "r4_alpha": 0.5}, "alpha"),
             ({"r4": 0.5, "missing": 0.5}, "no adapter named 'missing'"),
             ({}, "at least one adapter")]
    for weights, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            model.add_weighted_adapter("avg", weights)
        assert "\n" not in str(err.value)
    assert "avg" not in model.info
    _assert_same_state(model.state_dict(), before)


# --- merge / unmerge / unload ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "ia3"])
@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
def test_merge_unmerge_unload_keep_the_base_exact(method, build):
    base = build()
    x = text_inputs()
    x = x if build is tiny_bert else {"input_ids": x["input_ids"]}
    original = _state(base)
    ref = _out(base, x)
    model = AdapterModel(base)
    for name, seed in (("a", 1), ("b", 2)):
        model.add_adapter(name, method)
        _perturb(model, name, seed)
    model.set_active("a", "b")
    stacked = _out(model, x)
    with model.disabled():
        assert torch.equal(_out(model, x), ref)

    model.merge("a", "b")
    assert model.merged == ("a", "b") and _hooks(base) > 0
    torch.testing.assert_close(_out(model, x), stacked, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(v, original[k]) for k, v in base.state_dict().items()), "merging changes weights"
    with pytest.raises(ConfigError, match="unmerge them first"), model.disabled():
        pass
    model.unmerge("b")  # partial unmerge: a stays merged, b runs through its hooks again
    assert model.merged == ("a",)
    torch.testing.assert_close(_out(model, x), stacked, rtol=1e-4, atol=1e-5)
    model.unmerge()
    assert model.merged == ()
    _assert_same_state(base.state_dict(), original)
    assert torch.equal(_out(model, x), stacked), "unmerge restores the unmerged computation exactly"
    with model.disabled():
        assert torch.equal(_out(model, x), ref)
    assert model.active == ("a", "b"), "disabled() restores the active adapters afterwards"

    model.merge("a")
    restored = model.unload()  # unloading while merged unmerges first
    assert restored is base and _hooks(base) == 0 and not model.info
    _assert_same_state(restored.state_dict(), original)
    assert dict(restored.named_parameters()).keys() == {k for k, _ in base.named_parameters()}
    assert torch.equal(_out(restored, x), ref)


def test_delete_a_merged_adapter_unmerges_it():
    base = tiny_bert()
    original = _state(base)
    model = AdapterModel(base)
    model.add_adapter("a", "lora")
    _perturb(model, "a", 1)
    model.merge("a")
    model.delete_adapter("a")
    assert model.merged == ()
    _assert_same_state(base.state_dict(), original)


def test_bottleneck_cannot_merge():
    model = AdapterModel(tiny_bert())
    model.add_adapter("a", "bottleneck")
    with pytest.raises(ConfigError, match="cannot be merged.*non-linearity"):
        model.merge("a")
    assert model.merged == ()


# --- switching speed ----------------------------------------------------------------------------------------
def test_switching_the_active_adapter_takes_milliseconds():
    model = AdapterModel(tiny_bert())
    names = [f"task{i}" for i in range(20)]
    for i, n in enumerate(names):
        model.add_adapter(n, "lora", r=4)
        _perturb(model, n, i)
    times = []
    for i in range(100):
        start = time.perf_counter()
        model.set_active(names[i % 20])
        times.append(time.perf_counter() - start)
    assert model.active == (names[99 % 20],)
    assert statistics.median(times) < 0.05, f"median switch {statistics.median(times) * 1e3:.2f} ms"
    # the switch takes effect: the next forward uses the newly active adapter alone
    x = text_inputs()
    now = _out(model, x)
    model.set_active(names[0])
    assert not torch.allclose(now, _out(model, x))


# --- mixed-adapter batches in training ------------------------------------------------------------------------
MIXED = [m.name for m in all_methods() if m.capabilities.mixed_batch]


@pytest.mark.parametrize("method", MIXED)
def test_multi_task_batch_gives_each_adapter_the_gradient_of_its_own_rows(method):
    model = AdapterModel(tiny_bert())
    for name, seed in (("a", 1), ("b", 2), ("idle", 3)):
        model.add_adapter(name, method)
        _perturb(model, name, seed)
    model.set_trainable("a", "b", "idle")
    x = text_inputs(batch=5)
    rows = ["a", "b", None, "a", "b"]
    readout = _x(*_out(model.base, x).shape, seed=7)  # a fixed random readout: the loss is a sum over rows

    def grads(name: str) -> list[torch.Tensor | None]:
        return [None if p.grad is None else p.grad.clone() for p in model.adapters[name].parameters()]

    (_out(model, x, adapter_names=rows) * readout).sum().backward()
    mixed = {n: grads(n) for n in ("a", "b", "idle")}
    assert all(g is None for g in mixed["idle"]), "an adapter no row names gets no gradient"

    for name in ("a", "b"):
        model.zero_grad(set_to_none=True)
        model.set_active(name)
        idx = [i for i, r in enumerate(rows) if r == name]
        sub = {k: v[idx] for k, v in x.items()}
        (_out(model, sub) * readout[idx]).sum().backward()
        alone = grads(name)
        assert any(g is not None and g.abs().sum() > 0 for g in alone)
        for g_mixed, g_alone in zip(mixed[name], alone):
            assert (g_mixed is None) == (g_alone is None)
            if g_alone is not None:
                torch.testing.assert_close(g_mixed, g_alone, rtol=1e-4, atol=1e-6)


def test_one_optimizer_step_on_a_multi_task_batch_moves_only_the_named_adapters():
    base = tiny_bert()
    original = _state(base)
    model = AdapterModel(base)
    for name, seed in (("a", 1), ("b", 2), ("idle", 3)):
        model.add_adapter(name, "lora")
        _perturb(model, name, seed)
    model.set_trainable("a", "b", "idle")
    before = {n: _adapter_state(model, n) for n in model.info}
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    x = text_inputs()
    out = _out(model, x, adapter_names=["a", "b", "a"])
    (out * _x(*out.shape, seed=7)).sum().backward()  # not a mean square: BERT ends in a LayerNorm
    opt.step()
    after = {n: _adapter_state(model, n) for n in model.info}
    for n in ("a", "b"):
        assert any(not torch.equal(after[n][k], before[n][k]) for k in before[n]), n
    _assert_same_state(after["idle"], before["idle"])
    _assert_same_state(base.state_dict(), original)


# --- parameter report ---------------------------------------------------------------------------------------
def test_parameter_report_matches_hand_counts(tmp_path):
    base = tiny_bert()
    base_total = sum(p.numel() for p in base.parameters())
    model = AdapterModel(base)
    model.add_adapter("lora", "lora", r=4)  # query and value (32 -> 32) in 2 layers
    model.add_adapter("dora", "lora", r=2, dora=True)
    model.add_adapter("ia3", "ia3")  # key (32), value (32) and the feed-forward input (48) in 2 layers
    model.add_adapter("bn", "bottleneck", bottleneck_size=4)  # after output.dense (32) in 2 layers
    hand = {
        "lora": 2 * 2 * (4 * 32 + 32 * 4),
        "dora": 2 * 2 * (2 * 32 + 32 * 2 + 32),  # + one magnitude per output
        "ia3": 2 * (32 + 32 + 48),
        "bn": 2 * (32 * 4 + 4 + 4 * 32 + 32),
    }
    report = {r["adapter"]: r for r in model.parameter_report()}
    assert set(report) == set(hand)
    for name, n in hand.items():
        r = report[name]
        assert r["method"] == model.info[name].method.name
        assert r["trainable"] == n, name
        assert r["total"] == base_total + n
        assert r["percent"] == pytest.approx(100 * n / (base_total + n))
        assert r["bytes"] == 4 * n  # float32
        # bytes on disk: the tensor payload of the saved safetensors file (file size minus its header)
        path = save_adapter(model, name, tmp_path / name)
        raw = (path / "adapter.safetensors").read_bytes()
        (header_len,) = struct.unpack("<Q", raw[:8])
        assert len(raw) - 8 - header_len == r["bytes"], name
        assert json.loads((path / "adapter.json").read_text())["sizes"]["adapter_params"] == n
    model.to(torch.bfloat16)
    assert {r["adapter"]: r["bytes"] for r in model.parameter_report()} == {k: 2 * n for k, n in hand.items()}


# --- bad input leaves the model unchanged -------------------------------------------------------------------
BAD = [
    pytest.param("no_such_method", {}, ConfigError, "unknown method 'no_such_method'", id="unknown-method"),
    pytest.param("lora", {"r": 0}, ConfigError, "r: got 0", id="r-zero"),
    pytest.param("lora", {"r": 2.5}, ConfigError, "r: got 2.5", id="r-float"),
    pytest.param("lora", {"dropout": -0.1}, ConfigError, "dropout: got -0.1", id="negative-dropout"),
    pytest.param("lora", {"alpha": 0}, ConfigError, "alpha: got 0", id="alpha-zero"),
    pytest.param("lora", {"rank": 4}, ConfigError, "unknown option.*rank", id="unknown-option"),
    pytest.param("lora", {"top_k_layers": 0}, ConfigError, "top_k_layers=0", id="top-k-zero"),
    pytest.param("lora", {"top_k_layers": 9}, TargetError, "top_k_layers=9", id="top-k-too-many"),
    pytest.param("lora", {"targets": ["query", "nope"], "dora": True, "types": 1}, ConfigError, "unknown option",
                 id="unknown-option-with-targets"),
    pytest.param("lora", {"targets": ["word_embeddings", "query"], "dora": True}, ConfigError, "DoRA supports",
                 id="dora-on-embedding"),
    pytest.param("bottleneck", {"reduction_factor": 0}, ConfigError, "reduction_factor", id="bottleneck-factor"),
    pytest.param("ia3", {"feedforward": "("}, ConfigError, "feedforward", id="ia3-bad-regex"),
]


@pytest.mark.parametrize("method,options,error,message", BAD)
def test_bad_input_raises_one_line_and_leaves_the_model_unchanged(method, options, error, message):
    base = tiny_bert()
    x = text_inputs()
    model = AdapterModel(base)
    model.add_adapter("ok", "lora", r=4)
    _perturb(model, "ok", 1)
    model.set_active("ok")
    state, out, hooks = _state(model), _out(model, x), _hooks(base)
    with pytest.raises(error, match=message) as err:
        model.add_adapter("new", method, **options)
    assert "\n" not in str(err.value)
    assert set(model.info) == {"ok"} and list(model.adapters) == ["ok"] and model.active == ("ok",)
    assert _hooks(base) == hooks, "no hook left behind"
    _assert_same_state(model.state_dict(), state)
    assert torch.equal(_out(model, x), out)


def test_a_failure_on_a_later_target_attaches_nothing():
    """The stem convolution builds; a depthwise one (groups > 1) then fails: nothing may be attached."""
    base = tiny_cnn()
    x = image_inputs()
    ref = _out(base, x)
    model = AdapterModel(base)
    with pytest.raises(ConfigError, match="groups=1 only"):
        model.add_adapter("conv", "lora", targets={"types": ["Conv2d"]})
    assert not model.info and _hooks(base) == 0
    assert torch.equal(_out(model, x), ref)
    ok = graft(copy.deepcopy(base), "lora", targets={"regex": r"(_conv_stem|_project_conv)$"})  # groups=1 only
    assert ok.info["default"].targets[0] == "_conv_stem"


@pytest.mark.parametrize("name", ["cpu", "to", "train", "forward"])
def test_names_that_shadow_module_attributes_are_refused_cleanly(name):
    model = AdapterModel(tiny_bert())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="reserved"):
        model.add_adapter(name, "lora")
    assert model.info == {} and len(model.adapters) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_run_directory_named_like_a_module_attribute_still_names_its_adapter(tmp_path):
    from graftune.run.rundir import adapter_name

    assert adapter_name(tmp_path / "cpu") == "cpu-run"
    assert adapter_name(tmp_path / "bbc news") == "bbc-news"
    AdapterModel(tiny_bert()).add_adapter(adapter_name(tmp_path / "to"), "lora")
