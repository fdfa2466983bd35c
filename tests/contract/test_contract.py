"""The contract every registered method keeps, on tiny random BERT, Llama, GPT-2 and CNN models.

Parametrized over the registry: a new method file is tested here without touching this file. What is checked
is gated on the method's *declared* capabilities, never on a skip list.
"""

from __future__ import annotations

import copy

import pytest
import torch

from graftune import AdapterModel, all_methods, graft
from graftune.core.method import TargetSpec
from graftune.errors import GraftuneError, TargetError
from tests.conftest import TINY, first_tensor

FAMILIES = sorted(TINY)


def _applies(method, family: str) -> bool:
    if method.families:
        return family in method.families
    return family in method.presets or "*" in method.presets


CASES = [pytest.param(m.name, f, id=f"{m.name}-{f}") for m in all_methods() for f in FAMILIES if _applies(m, f)]
# methods that attach to named modules (not to the model's inputs) can be given a bad target
TARGETED = [c for c in CASES if next(m for m in all_methods() if m.name == c.values[0]).site != "model"]


def _setup(method_name: str, family: str):
    build, inputs = TINY[family]
    base = build()
    return base, inputs()


def _perturb(model: AdapterModel, name: str, seed: int = 0) -> None:
    """Move an adapter away from its (often identity) init so that tests can see it act."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters[name].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _out(model, inputs, **kw) -> torch.Tensor:
    return first_tensor(model(**inputs, **kw))


def _state(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("method,family", CASES)
def test_identity_at_init_and_disabled(method, family):
    base, x = _setup(method, family)
    ref = _out(base, x)
    model = graft(base, method)
    if model.info["default"].method.capabilities.identity_at_init:
        torch.testing.assert_close(_out(model, x), ref, rtol=0, atol=1e-6)
    _perturb(model, "default")
    assert not torch.allclose(_out(model, x), ref), "a perturbed adapter must change the output"
    with model.disabled():
        assert torch.equal(_out(model, x), ref), "disabled adapters must give the base bit-identically"


@pytest.mark.parametrize("method,family", CASES)
def test_only_adapter_parameters_train(method, family):
    base, x = _setup(method, family)
    before = _state(base)
    model = graft(base, method)
    _perturb(model, "default")
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable and trainable == {id(p) for p in model.adapters["default"].parameters()}
    assert not any(p.requires_grad for n, p in base.named_parameters() if id(p) not in trainable)
    adapter_before = _state(model.adapters)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    # a fixed random readout, not the mean square: BERT ends in a LayerNorm, whose mean square is constant up to
    # its eps, so that loss has ~1e-9 gradients and one step cannot move adapters that do not start at zero
    out = _out(model, x).float()
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(3))).mean().backward()
    opt.step()
    changed = [k for k, v in model.adapters.state_dict().items() if not torch.equal(v, adapter_before[k])]
    assert changed, "one optimizer step must change the adapter"
    model.set_active()
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), f"base parameter {k} changed"


@pytest.mark.parametrize("method,family", CASES)
def test_state_roundtrip_gives_identical_outputs(method, family):
    base, x = _setup(method, family)
    model = graft(base, method)
    _perturb(model, "default")
    expected = _out(model, x)
    state = model.adapter_state_dict("default")
    config = model.info["default"].config
    other = AdapterModel(copy.deepcopy(model.unload()))
    other.add_adapter("reloaded", method, config)
    other.load_adapter_state_dict("reloaded", state)
    other.set_active("reloaded")
    assert torch.equal(_out(other, x), expected)


@pytest.mark.parametrize("method,family", CASES)
def test_merge_unmerge_unload(method, family):
    base, x = _setup(method, family)
    original = _state(base)
    ref = _out(base, x)
    model = graft(base, method)
    _perturb(model, "default")
    unmerged = _out(model, x)
    if model.info["default"].method.capabilities.mergeable:
        model.merge("default")
        torch.testing.assert_close(_out(model, x), unmerged, rtol=1e-4, atol=1e-5)
        model.unmerge()
        assert torch.equal(_out(model, x), unmerged)
    else:
        with pytest.raises(GraftuneError, match="cannot be merged"):
            model.merge("default")
    restored = model.unload()
    assert restored.state_dict().keys() == original.keys()
    for k, v in restored.state_dict().items():
        assert torch.equal(v, original[k]), f"{k} differs after unload"
    assert torch.equal(_out(restored, x), ref)


@pytest.mark.parametrize("method,family", TARGETED)
def test_bad_target_lists_candidates_and_leaves_model_unchanged(method, family):
    base, x = _setup(method, family)
    model = AdapterModel(base)
    with pytest.raises(TargetError, match="candidate module names"):
        model.add_adapter("bad", method, targets=TargetSpec(names=("no_such_module",)))
    assert not model.info and not list(model.adapters)
    assert torch.equal(_out(model, x), _out(base, x))


@pytest.mark.parametrize("method,family", CASES)
def test_mixed_batch_rows_equal_single_adapter_runs(method, family):
    base, x = _setup(method, family)
    model = AdapterModel(base)
    model.add_adapter("a", method)
    model.add_adapter("b", method)
    _perturb(model, "a", seed=1)
    _perturb(model, "b", seed=2)
    rows = ["a", None, "b"]
    if not model.info["a"].method.capabilities.mixed_batch:
        with pytest.raises(GraftuneError, match="mixed-adapter"):
            model(**x, adapter_names=rows)
        return
    mixed = _out(model, x, adapter_names=rows)
    singles = {}
    for n in ("a", "b"):
        model.set_active(n)
        singles[n] = _out(model, x)
    model.set_active()
    singles[None] = _out(model, x)
    for i, n in enumerate(rows):
        torch.testing.assert_close(mixed[i], singles[n][i], rtol=1e-5, atol=1e-5)
    # gradients reach every adapter used in a mixed (multi-task) batch
    model.set_trainable("a", "b")
    _out(model, x, adapter_names=rows).float().pow(2).mean().backward()
    for n in ("a", "b"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapters[n].parameters()), n
