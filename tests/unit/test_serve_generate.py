"""Batched generation across adapters: prompts for several causal-LM adapters on one base run as ONE batched greedy
generation (left-padded, each row routed to its own adapter at every decoding step, each stopping at its own end token
or limit), and the answers equal those of each request generated alone, token for token; the server batches
concurrent /v1/generate requests inside its window.

A tiny random Llama (2 layers, hidden 32): random adapters for the engine-level check, short trainings for the server;
servers on 127.0.0.1 and a free port or FastAPI's TestClient; everything bounded in count and time."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from graftune.config import RunConfig
from graftune.core.model import AdapterModel
from graftune.evaluate import generate, load_run
from graftune.runs import train
from graftune.serve import Limits, ModelStore, Settings, StaticSource, create_app
from graftune.serve.store import Rows
from graftune.tasks.causal_lm import CausalLM
from tests.train_helpers import WORDS, llama_folder, pairs_jsonl, train_args
from tests.unit.test_serve import LiveServer, post_together

PROMPTS = ["goal match team player", "bank", "chip phone software the data and the cup", "a stock trade"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return llama_folder(tmp_path_factory.mktemp("llama") / "llama")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, llama) -> dict[str, Path]:
    """Three causal-LM runs on the one tiny Llama: LoRA (two seeds and learning rates) and IA3."""
    root = tmp_path_factory.mktemp("serve-generate")
    data = pairs_jsonl(root / "pairs.jsonl")
    out = {}
    for name, extra in {"lm": {}, "lm2": {"seed": 1, "lr": 3e-2}, "lm3": {"method": "ia3", "lr": 3e-2}}.items():
        out[name] = root / name
        train(RunConfig(**train_args(llama, data, out[name], epochs=2, max_new_tokens=6, **extra)), progress=False)
    return out


# --- the engine: one mixed-adapter generation equals each prompt alone ------------------------------------------------
def test_mixed_adapter_generation_equals_each_prompt_alone(llama):
    """LoRA, IA3 and bottleneck adapters (random, so each changes the answers) and the base, prompts of 4 to 13
    tokens, limits of 2, 7 and 12 new tokens (one row ends at its end token first): one batched generation gives every
    row the tokens it gets alone."""
    model = AdapterModel(AutoModelForCausalLM.from_pretrained(llama))
    model.eval()
    torch.manual_seed(1)
    for name, method in (("a", "lora"), ("b", "lora"), ("c", "ia3"), ("d", "bottleneck")):
        model.add_adapter(name, method)
        with torch.no_grad():
            for p in model.adapters[name].parameters():
                p.add_(0.5 * torch.randn_like(p))
    task = CausalLM(AutoTokenizer.from_pretrained(llama))
    rng = random.Random(0)
    prompts = [task.prompt_ids(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))) for _ in range(15)]
    names = [("a", "b", "c", "d", None)[i % 5] for i in range(15)]
    limits = [(12, 2, 7)[i % 3] for i in range(15)]

    together = task.generate_ids(model, prompts, max_new_tokens=limits, adapter_names=names, batch_size=15)
    alone = [task.generate_ids(model, [p], max_new_tokens=n, adapter_names=[a])[0]
             for p, n, a in zip(prompts, limits, names)]
    assert together == alone
    assert all(len(t) <= n and task.eos_id not in t for t, n in zip(together, limits))
    # the adapters matter: the same prompts under each adapter give different answers
    per_adapter = {a: task.generate_ids(model, prompts[:5], max_new_tokens=8, adapter_names=[a] * 5)
                   for a in ("a", "b", "c", "d", None)}
    assert len({str(v) for v in per_adapter.values()}) == 5
    # with no adapter_names the model's active adapters apply to every row, as before
    model.set_active("b")
    assert task.generate_ids(model, prompts[:5], max_new_tokens=8) == per_adapter["b"]


def test_store_generates_a_mixed_batch_as_each_request_alone(runs):
    """ModelStore.generate on requests for three adapters (one with its own max_new_tokens) equals `graftune`'s
    generate on each run alone."""
    store = ModelStore()
    try:
        store.sync({n: ("1", runs[n]) for n in runs})
        assert len(store.slots) == 1  # one base for the three adapters
        batch = [Rows(store.entries["lm"], PROMPTS[:2]), Rows(store.entries["lm2"], PROMPTS[1:], max_new_tokens=3),
                 Rows(store.entries["lm3"], PROMPTS[:1])]
        got = store.submit(store.generate, batch).result(60)
        want = [generate(load_run(runs["lm"]), PROMPTS[:2]), generate(load_run(runs["lm2"]), PROMPTS[1:],
                                                                      max_new_tokens=3),
                generate(load_run(runs["lm3"]), PROMPTS[:1])]
        assert got == want
        # the three adapters answer differently (else the test above could not tell their rows apart)
        assert len({str(generate(load_run(runs[n]), PROMPTS)) for n in runs}) == 3
    finally:
        store.close()


# --- the server ------------------------------------------------------------------------------------------------------
def test_concurrent_generate_requests_for_two_adapters_share_one_generation(runs):
    store = ModelStore()
    app = create_app(store, StaticSource({"lm": runs["lm"], "lm2": runs["lm2"]}),
                     Settings(max_batch=32, max_wait_ms=300))
    with LiveServer(app) as live:
        base = next(iter(store.slots.values())).model.base
        generations = []
        original = base.generate
        base.generate = lambda *a, **k: (generations.append(len(k["input_ids"])), original(*a, **k))[1]
        barrier, results = threading.Barrier(2), {}

        def ask(name, prompts):
            barrier.wait()
            results[name] = httpx.post(f"{live.url}/v1/generate", json={"adapter": name, "inputs": prompts},
                                       timeout=60)

        threads = [threading.Thread(target=ask, args=("lm", PROMPTS[:3])),
                   threading.Thread(target=ask, args=("lm2", PROMPTS[2:]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(r.status_code == 200 for r in results.values()), {k: r.text for k, r in results.items()}
        batches = list(app.state.generator.history)
        assert len(batches) == 1 and batches[0].requests == 2 and batches[0].rows == 5
        assert batches[0].adapters == ("lm", "lm2")
        assert generations == [5]  # one batched generation of the base for both adapters' five prompts
        metrics = httpx.get(f"{live.url}/metrics").text
        assert 'graftune_generate_batch_adapters_bucket{le="2.0"} 1.0' in metrics
        assert 'graftune_requests_total{adapter="lm2",endpoint="generate",status="200"} 1.0' in metrics
        assert list(app.state.batcher.history) == []  # the predict window saw none of it

        # the same texts as one request at a time, and as each run generates alone
        sequential = {n: httpx.post(f"{live.url}/v1/generate", json={"adapter": n, "inputs": p}, timeout=60)
                      for n, p in (("lm", PROMPTS[:3]), ("lm2", PROMPTS[2:]))}
        base.generate = original
    for name, prompts in (("lm", PROMPTS[:3]), ("lm2", PROMPTS[2:])):
        outputs = results[name].json()["outputs"]
        assert outputs == sequential[name].json()["outputs"] == generate(load_run(runs[name]), prompts)


def test_max_batch_one_generates_one_request_at_a_time(runs):
    app = create_app(ModelStore(), StaticSource({"lm": runs["lm"], "lm2": runs["lm2"]}),
                     Settings(max_batch=1, max_wait_ms=50))
    with TestClient(app) as client:
        out = post_together(client, "/v1/generate", [{"adapter": n, "inputs": PROMPTS[:1]}
                                                     for n in ("lm", "lm2", "lm", "lm2")])
        assert [r.status_code for r in out] == [200] * 4
        assert [b.requests for b in app.state.generator.history] == [1, 1, 1, 1]


def test_bad_generate_requests_get_one_line_4xx_and_never_reach_the_model(runs):
    app = create_app(ModelStore(), StaticSource({"lm": runs["lm"]}),
                     Settings(limits=Limits(max_inputs=3, max_chars=40, max_new_tokens=16)))
    cases = [
        ({"adapter": "nope", "inputs": ["a"]}, 404, "unknown adapter 'nope'"),
        ({"adapter": "lm", "inputs": []}, 422, "inputs: empty; send at least one text"),
        ({"adapter": "lm", "inputs": "goal"}, 422, "inputs"),
        ({"adapter": "lm", "inputs": [" "]}, 422, "inputs[0] is empty"),
        ({"adapter": "lm", "inputs": ["a"] * 4}, 422, "at most 3 items"),
        ({"adapter": "lm", "inputs": ["x" * 41]}, 422, "at most 40 characters"),
        ({"adapter": "lm", "inputs": ["a"], "max_new_tokens": 0}, 422, "max_new_tokens"),
        ({"adapter": "lm", "inputs": ["a"], "max_new_tokens": 17}, 422, "max_new_tokens"),
        ({"adapter": "lm", "inputs": ["a"], "max_new_tokens": "many"}, 422, "max_new_tokens"),
        ({"adapter": "lm", "inputs": ["a"], "max_new_tokens": True}, 422, "max_new_tokens"),  # not read as 1
        ({"adapter": "lm", "inputs": ["a"], "max_new_tokens": "5"}, 422, "max_new_tokens"),  # nor as 5
        ({"adapter": "lm", "inputs": ["a"], "max_new_tokens": 5.0}, 422, "max_new_tokens"),
        ({"adapter": "lm", "inputs": ["a"], "temperature": 0.7}, 422, "temperature"),
    ]
    with TestClient(app) as client:
        for body, status, words in cases:
            r = client.post("/v1/generate", json=body)
            assert r.status_code == status, (body, r.text)
            error = r.json()["error"]
            assert words in error and "\n" not in error, (body, error)
        assert list(app.state.generator.history) == []  # nothing above reached the model
        r = client.post("/v1/generate", json={"adapter": "lm", "inputs": ["goal match"], "max_new_tokens": 2})
        assert r.status_code == 200 and len(app.state.generator.history) == 1


def test_a_prompt_longer_than_its_adapter_takes_is_refused_before_anything_is_generated(runs):
    """Characters do not bound tokens (QA: 20,000 CJK characters were 40,000 tokens and held the server for
    minutes). A prompt that leaves no room for its answer within the run's max_length (32 here, 6 new tokens: 26
    for the prompt, as training fitted prompt + response into max_length) gets a 422 naming both numbers before
    anything is generated, and a request batched beside it is answered as if it were alone."""
    store = ModelStore()
    app = create_app(store, StaticSource({"lm": runs["lm"], "lm2": runs["lm2"]}),
                     Settings(max_batch=32, max_wait_ms=300))
    long = " ".join(PROMPTS * 5)  # 200 characters, well within --max-chars: about 75 tokens
    with TestClient(app) as client:
        base = next(iter(store.slots.values())).model.base
        generations = []
        original = base.generate
        base.generate = lambda *a, **k: (generations.append(len(k["input_ids"])), original(*a, **k))[1]
        r = client.post("/v1/generate", json={"adapter": "lm", "inputs": ["bank", long]})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error.startswith("inputs[1]: the prompt is ") and "\n" not in error
        assert "adapter lm takes at most 26 (its max_length 32 minus max_new_tokens 6); shorten it" in error
        r = client.post("/v1/generate", json={"adapter": "lm", "inputs": ["bank"], "max_new_tokens": 40})
        assert r.status_code == 422 and "takes at most 0 (its max_length 32 minus max_new_tokens 40)" in r.text
        assert generations == []  # refused before the model ran
        # a refused request and an answerable one in the same window: one batch, the good one answered
        out = post_together(client, "/v1/generate", [{"adapter": "lm", "inputs": [long]},
                                                     {"adapter": "lm2", "inputs": PROMPTS[:2]}])
        assert sorted(r.status_code for r in out) == [200, 422]
        [good] = [r for r in out if r.status_code == 200]
        assert good.json()["outputs"] == generate(load_run(runs["lm2"]), PROMPTS[:2])
        assert generations == [2]
        base.generate = original
        metrics = client.get("/metrics").text
        assert 'graftune_requests_total{adapter="lm",endpoint="generate",status="422"} 3.0' in metrics
