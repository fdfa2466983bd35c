"""train()'s speed options: the frozen-prefix cache (same weights and metrics as without it, lower layers really
skipped, declined where it cannot apply), the device field, and torch.compile (same result as eager)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from graftune.config import RunConfig
from graftune.errors import ConfigError
from graftune.runs import train
from graftune.speed.precision import cpu_features
from tests.train_helpers import bert_folder, llama_folder, pairs_jsonl, topic_csv, train_args


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"bert": bert_folder(root / "bert"), "llama": llama_folder(root / "llama"),
            "csv": topic_csv(root / "topics.csv", n_per_class=12), "pairs": pairs_jsonl(root / "pairs.jsonl", n=12)}


def _layer_calls(monkeypatch, layer_class) -> list[tuple[int, bool]]:
    """(layer id, grad enabled) of every layer forward that really computes, in call order (a layer the cache stands
    aside in does not reach its class's forward). Grad is enabled in training steps only: checks, cache filling and
    scoring run without it."""
    calls: list[tuple[int, bool]] = []
    forward = layer_class.forward

    def counted(self, *args, **kwargs):
        calls.append((id(self), torch.is_grad_enabled()))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(layer_class, "forward", counted)
    return calls


def _adapter(out) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter.safetensors")


CASES = {
    "bert": ("bert", "csv", "transformers.models.bert.modeling_bert.BertLayer", ("loss", "accuracy", "macro_f1")),
    "llama": ("llama", "pairs", "transformers.models.llama.modeling_llama.LlamaDecoderLayer", ("loss", "perplexity")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_training_matches_uncached_and_skips_the_lower_layer(case, tiny, tmp_path, monkeypatch):
    model, data, layer_path, keys = CASES[case]
    module, cls = layer_path.rsplit(".", 1)
    calls = _layer_calls(monkeypatch, getattr(__import__(module, fromlist=[cls]), cls))
    common = train_args(tiny[model], tiny[data], tmp_path / "plain", epochs=3, options={"top_k_layers": 1},
                        max_new_tokens=2)
    plain = train(RunConfig(**common, cache="off"), progress=False)
    plain_calls = list(calls)
    calls.clear()
    cached = train(RunConfig(**{**common, "out": str(tmp_path / "cached")}, cache="on"), progress=False)

    assert plain["speed"]["cache"] == "off (cache: off)"
    assert cached["speed"]["cache"].startswith("on: layers 1..1 run per step; layer 0 computed once")
    # Both runs compute the same sums in the same order except the cached layer-0 outputs, which come from batches
    # of another composition (another matmul blocking: a last-bit difference that differs between CPUs). The
    # head's LP-FT fit reads features computed before the cache is attached, so it is identical. The tolerance is
    # then float32's rounding grown over the optimizer steps: eps x steps x 100, far above what one run differs by
    # (about 3e-8 here) and far below a real difference (a wrong cached row moves weights by 1e-3 or more).
    tol = torch.finfo(torch.float32).eps * cached["steps"] * 100
    for k in keys:
        assert cached[k] == pytest.approx(plain[k], rel=tol, abs=tol), k
    a, b = _adapter(tmp_path / "plain"), _adapter(tmp_path / "cached")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=tol, atol=tol, msg=k)
    # training steps: without the cache both layers run in every step; with it layer 0 runs in none (it ran only to
    # fill the cache, and in the uncached test scoring at the end), layer 1 in every step
    for run, layer_calls in (("plain", plain_calls), ("cached", calls)):
        lower, upper = layer_calls[0][0], layer_calls[1][0]
        in_steps = [layer for layer, grad in layer_calls if grad]
        expected_lower = cached["steps"] if run == "plain" else 0
        assert (in_steps.count(lower), in_steps.count(upper)) == (expected_lower, cached["steps"]), run
    stats = cached["speed"]["cache_stats"]
    assert stats["hits"] >= cached["steps"] and stats["examples"] > 0


def test_cache_decisions(tiny, tmp_path):
    common = train_args(tiny["bert"], tiny["csv"], tmp_path / "a", epochs=1)
    m = train(RunConfig(**common), progress=False)  # LoRA in every layer: auto declines
    assert m["speed"]["cache"] == "off (an adapter sits in layer 0: nothing below it to cache)"
    assert m["speed"]["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")  # device: auto
    assert m["speed"]["processes"] == 1 and m["speed"]["compile"] is None
    assert m["speed"]["cpu"] == cpu_features()  # which CPU made this run's timings (bf16 in hardware or not)
    with pytest.raises(ConfigError, match="cache: on, but .* layer 0"):
        train(RunConfig(**{**common, "out": str(tmp_path / "b")}, cache="on"), progress=False)
    m = train(RunConfig(**{**common, "out": str(tmp_path / "c")}, method="head", base_dropout=True), progress=False)
    assert m["speed"]["cache"].startswith("off (base_dropout is on")
    m = train(RunConfig(**{**common, "out": str(tmp_path / "d")}, method="head"), progress=False)
    assert m["speed"]["cache"].startswith("on: layers 0..1 (every layer) computed once per example")


def test_device_field(tiny, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the error on a machine without CUDA")
    with pytest.raises(ConfigError, match="no CUDA GPU; use --device cpu"):
        train(RunConfig(**train_args(tiny["bert"], tiny["csv"], tmp_path / "a"), device="cuda"), progress=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ConfigError, match="device: got 'gpu'"):
        RunConfig(**train_args(tiny["bert"], tiny["csv"], tmp_path / "a"), device="gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_cuda_training_matches_cpu(tiny, tmp_path):
    common = train_args(tiny["bert"], tiny["csv"], tmp_path / "on-cpu", epochs=2, dropout=0.0, precision="fp32",
                        options={"top_k_layers": 1})
    cpu = train(RunConfig(**common, device="cpu"), progress=False)
    gpu = train(RunConfig(**{**common, "out": str(tmp_path / "on-gpu")}, device="cuda"), progress=False)
    assert gpu["speed"]["device"].startswith("cuda")
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-3)


def test_compiled_layers_match_eager(monkeypatch):
    # the eager backend runs dynamo's tracing and guards (what can fail in graftune's own code: the adapters' hooks,
    # the routing context variable) in seconds; inductor's code generation takes minutes on a 2-core CPU and is
    # checked by bench/gpu_check.py
    from graftune import graft
    from graftune.speed.compilation import compile_layers
    from tests.conftest import text_inputs, tiny_bert

    monkeypatch.setenv("GRAFTUNE_COMPILE_BACKEND", "eager")
    model = graft(tiny_bert(), "lora", top_k_layers=1)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.normal_(0, 0.1)
    x = text_inputs()

    def loss_and_grads():
        model.zero_grad()
        loss = model(**x).last_hidden_state.pow(2).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.trainable_parameters()]

    eager = loss_and_grads()
    compiled, note = compile_layers(model.base, start=1, check=loss_and_grads)
    if not compiled:
        pytest.skip(f"torch.compile is unavailable here: {note}")
    assert note == "compile: layers 1..1 compiled with torch.compile (backend eager)"
    assert model.base.encoder.layer[1]._compiled_call_impl is not None
    assert model.base.encoder.layer[0]._compiled_call_impl is None  # below start: left alone
    got = loss_and_grads()
    torch.testing.assert_close(got[0], eager[0], rtol=1e-5, atol=1e-6)
    for g, e in zip(got[1], eager[1]):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_compile_failure_falls_back_to_eager(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("GRAFTUNE_COMPILE_BACKEND", "no-such-backend")
    m = train(RunConfig(**train_args(tiny["bert"], tiny["csv"], tmp_path / "a", epochs=1), compile=True),
              progress=False)
    assert m["speed"]["compile"].startswith("compile: torch.compile failed (")
    assert m["speed"]["compile"].endswith("running eager instead")
