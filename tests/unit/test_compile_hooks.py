"""AdapterModel's adapter hooks under ``torch.compile`` (``compile: true``): traced without a graph break, compiled
once for all adapted modules (not once per module), equal to eager, and following adapter changes made after
compiling.

The backend here only counts the graphs dynamo hands it and runs them as they are: what these tests check is
dynamo's tracing and guards around graftune's hooks, which no backend changes. (Inductor's code generation
would take minutes on a 2-core CPU; ``bench/issue5_compile.py`` measures it.)
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from graftune import AdapterModel
from graftune.speed.cache import layer_stack
from tests.conftest import text_inputs

dynamo = pytest.importorskip("torch._dynamo", reason="torch.compile (dynamo) is not available in this torch build")

# six adapted modules per layer, two layers: 12 adapted modules, more than dynamo's default recompile limit (8),
# which the hook's shared code used to reach by recompiling once per module
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def tiny_model(*adapters: str, targets: list[str] = TARGETS) -> AdapterModel:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64)
    model = AdapterModel(BertModel(cfg, add_pooling_layer=False).eval())
    for name in adapters:
        add(model, name, targets)
    return model


def add(model: AdapterModel, name: str, targets: list[str]) -> None:
    model.add_adapter(name, "lora", r=2, targets={"names": targets})
    with torch.no_grad():
        for p in model.adapters[name].parameters():
            p.normal_(0, 0.2)  # LoRA starts as the identity: make each adapter change the output, differently


class CountingBackend:
    """A torch.compile backend that records each graph dynamo compiles (recompiles and graph-break pieces
    included) and runs it unchanged."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.fixture
def compiled(monkeypatch):
    """Compile a model's layers as ``compile: true`` does (each layer of the stack, in place), with
    ``fullgraph=True``: a graph break in a hook raises instead of silently splitting the layer."""
    # pytest's log capture adds handlers to torch's structured-trace logger, which then formats every graph and
    # guard it traces (about half of this file's time); outside pytest that logger has none
    monkeypatch.setattr(logging.getLogger("torch.__trace"), "handlers", [])
    dynamo.reset()
    backend = CountingBackend()

    def compile_(model: AdapterModel) -> CountingBackend:
        for layer in layer_stack(model.base)[0]:
            layer.compile(backend=backend, fullgraph=True)
        return backend

    yield compile_
    dynamo.reset()


def loss_and_grads(model: AdapterModel, **kwargs):
    model.zero_grad()
    loss = model(**text_inputs(), **kwargs).last_hidden_state.pow(2).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.trainable_parameters()]


def assert_same(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert len(got[1]) == len(want[1])
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_compiled_training_step_matches_eager_with_one_graph_per_input_kind(compiled):
    model = tiny_model("a")
    model.set_active("a")
    model.set_trainable("a")
    assert len(model.info["a"].targets) == 12
    eager = loss_and_grads(model)
    backend = compiled(model)
    for _ in range(3):
        assert_same(loss_and_grads(model), eager)
    # Both layers share one compiled code. Layer 0's input does not require grad and layer 1's does (it depends on
    # layer 0's LoRA): two graphs, whatever the number of adapted modules. Recompiling per module would need 12.
    assert backend.graphs == 2


def test_adapter_changes_after_compiling_take_effect(compiled):
    # dynamo guards on what the hooks read (the route's names, each site's adapters, the merged list): every
    # change below fails a guard and recompiles (once per kind of change; 4 adapted modules keep tracing quick)
    targets = ["query", "value"]
    model = tiny_model("a", "b", targets=targets)
    x = text_inputs()

    def out(**kwargs):
        with torch.no_grad():
            return model(**x, **kwargs).last_hidden_state

    model.set_active("a")
    want = {"a": out()}
    model.set_active("b")
    want["b"] = out()
    want["mixed"] = out(adapter_names=["b", None, "a"])
    model.set_active()
    want["base"] = out()
    model.set_active("a")
    model.merge("a")
    want["merged"] = out()
    model.unmerge()

    compiled(model)
    for name in ("a", "b", "a"):
        model.set_active(name)
        torch.testing.assert_close(out(), want[name])
    model.set_active()
    torch.testing.assert_close(out(), want["base"])
    torch.testing.assert_close(out(adapter_names=["b", None, "a"]), want["mixed"])
    model.set_active("a")
    model.merge("a")  # merged: the hook must skip "a" now that its update is in the weights
    torch.testing.assert_close(out(), want["merged"])
    model.unmerge()
    model.delete_adapter("b")
    torch.testing.assert_close(out(), want["a"])
    add(model, "c", targets)  # attached after compiling
    model.set_active("c")
    got = out()
    assert not torch.allclose(got, want["a"], atol=1e-3)
    with torch.no_grad():
        for p in model.adapters["c"].parameters():
            p.zero_()  # zero LoRA: the base again, if the compiled hook really uses c's own modules
    torch.testing.assert_close(out(), want["base"])


def test_compiled_code_reads_the_same_route_as_eager_code():
    # compiled hooks read routing's thread-local copy of the route (dynamo cannot read a ContextVar): nested blocks
    # and exceptions must leave it equal to the context variable, and another thread sees neither
    from graftune.core import routing

    outer, inner = routing.Route(("a",)), routing.Route(())

    def traced():
        return getattr(routing._TRACED, "route", None)

    assert routing.current() is None and traced() is None
    with routing.routed(outer):
        assert routing.current() is outer and traced() is outer
        with pytest.raises(RuntimeError), routing.routed(inner):
            assert routing.current() is inner and traced() is inner
            raise RuntimeError
        assert routing.current() is outer and traced() is outer
        seen = []
        thread = threading.Thread(target=lambda: seen.append((routing.current(), traced())))
        thread.start()
        thread.join()
        assert seen == [(None, None)]
    assert routing.current() is None and traced() is None
