"""graftune serve: predictions equal `graftune predict`, mixed-adapter batches run as one forward, bad requests get
a one-line 4xx and never reach the model, promote/rollback switch without failing requests in flight.

Tiny random BERT/Llama runs (seconds); servers are real uvicorn processes-in-a-thread on 127.0.0.1 and a free port,
or FastAPI's TestClient; everything bounded in count and time."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from graftune.cli import app as cli_app
from graftune.config import RunConfig
from graftune.evaluate import generate, load_run, predict
from graftune.registry import Registry
from graftune.runs import train
from graftune.serve import Limits, ModelStore, Settings, StaticSource, create_app
from tests.train_helpers import bert_folder, llama_folder, one_line_error, pairs_jsonl, topic_csv, train_args

TEXTS = ["goal match team player", "bank market share price profit", "chip phone software the data",
         "the cup and the league", "a stock trade at the fund"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Runs on one tiny BERT: LoRA (two seeds), IA3, bottleneck, head-only, prompt (refused); a tiny Llama LoRA."""
    root = tmp_path_factory.mktemp("serve")
    bert, data = bert_folder(root / "bert"), topic_csv(root / "topics.csv")
    out = {}
    for name, extra in {"lora": {}, "lora2": {"seed": 1, "lr": 2e-2}, "ia3": {"method": "ia3"},
                        "bottleneck": {"method": "bottleneck"}, "head": {"method": "head"},
                        "prompt": {"method": "prompt"}}.items():
        out[name] = root / name
        train(RunConfig(**train_args(bert, data, out[name], epochs=1, val_size=0, **extra)), progress=False)
    for name in ("contrastive", "probe"):  # the few-shot recipes: whole-text embeddings + a fitted head
        out[name] = root / name
        args = train_args(bert, data, out[name], method=name, val_size=0, shots=6,
                          options={"iterations": 2, "top_k_layers": 1} if name == "contrastive" else {})
        for key in ("epochs", "lr") + (("batch_size",) if name == "probe" else ()):
            del args[key]  # the adapter loop's settings: these recipes refuse them
        train(RunConfig(**args), progress=False)
    out["lm"] = root / "lm"
    train(RunConfig(**train_args(llama_folder(root / "llama"), pairs_jsonl(root / "pairs.jsonl"), out["lm"],
                                 epochs=1, max_new_tokens=4)), progress=False)
    out["root"] = root
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_together(client, path: str, bodies: list[dict], timeout: float = 60) -> list:
    """POST every body at once, one thread each (requests that arrive within one batching window); the responses
    in the order they came back."""
    out: list = []
    threads = [threading.Thread(target=lambda b=b: out.append(client.post(path, json=b))) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return out


class LiveServer:
    """The app on a real uvicorn, 127.0.0.1 and a free port, in a thread; stopped on exit."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def same_predictions(got: list[dict], want: list[dict]) -> None:
    """Labels equal; probabilities equal to the rounding of `graftune predict` (the server runs the adapter
    unmerged, predict merged: float32 noise of a few units in the last digit, which a CPU's kernels set)."""
    assert [g["label"] for g in got] == [w["label"] for w in want]
    for g, w in zip(got, want):
        assert g["probabilities"].keys() == w["probabilities"].keys()
        assert g["probabilities"] == pytest.approx(w["probabilities"], abs=1e-5)


# --- predictions -------------------------------------------------------------------------------------------------
def test_predictions_equal_graftune_predict(runs):
    names = ["lora", "ia3", "bottleneck", "head", "contrastive", "probe", "prompt", "lm"]
    store = ModelStore()
    with TestClient(create_app(store, StaticSource({n: runs[n] for n in names}))) as client:
        served = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
        # prompt tuning changes the sequence: refused at load (logged), the others served from ONE base per model
        classifiers = ("lora", "ia3", "bottleneck", "head", "contrastive")
        assert set(served) == {*classifiers, "lm"} and served["contrastive"]["method"] == "contrastive"
        assert len(store.slots) == 2 and len({served[n]["base"] for n in classifiers}) == 1
        assert "prompt@1" in store.failed and "change the input sequence" in store.failed["prompt@1"]
        assert "probe@1" in store.failed and "not served: a --method probe run" in store.failed["probe@1"]
        for name in classifiers:
            r = client.post("/v1/predict", json={"adapter": name, "inputs": TEXTS})
            assert r.status_code == 200, r.text
            same_predictions(r.json()["predictions"], predict(load_run(runs[name]), TEXTS))
        prompts = ["goal match", "bank price"]
        r = client.post("/v1/generate", json={"adapter": "lm", "inputs": prompts})
        assert r.status_code == 200, r.text
        assert r.json()["outputs"] == generate(load_run(runs["lm"]), prompts)
        health = client.get("/health").json()
        assert health == {"status": "ok", "adapters": 6, "bases": 2}
        r = client.post("/v1/predict", json={"adapter": "prompt", "inputs": TEXTS[:1]})
        assert r.status_code == 404 and r.json()["error"].startswith(
            "adapter 'prompt' is given with --run (prompt@1) but this server cannot serve it: prompt adapters change "
            "the input sequence")


def test_a_promoted_version_serve_refuses_is_named_with_why_not_unknown(runs, tmp_path):
    """QA: POST /v1/predict for a promoted probe run answered "unknown adapter 'p8'", as for a name nobody
    promoted. It says the name is promoted, that this server cannot serve it, and why (one line, 404)."""
    reg = Registry(tmp_path / "registry")
    for name, run in (("p8", "probe"), ("news", "lora")):
        reg.push(runs[run], name)
        reg.promote(name, 1)
    store = ModelStore()
    with TestClient(create_app(store, reg)) as client:
        r = client.post("/v1/predict", json={"adapter": "p8", "inputs": TEXTS[:1]})
        assert r.status_code == 404
        assert r.json() == {"error": "adapter 'p8' is promoted (p8@1) but this server cannot serve it: a --method "
                            "probe run is the frozen base's embeddings and a fitted head, with no adapter to share the "
                            "base with others; serve a contrastive, LoRA, IA3 or bottleneck run, or use `graftune "
                            "predict`; served: news"}
        r = client.post("/v1/predict", json={"adapter": "nope", "inputs": TEXTS[:1]})
        assert r.status_code == 404 and r.json() == {"error": "unknown adapter 'nope'; served: news"}
        assert 'reason="not_served"' in client.get("/metrics").text
    # a name the registry no longer asks for is unknown again
    store.sync({"news": ("1", runs["lora"])})
    assert "p8" not in store.refused


def test_contrastive_rows_beside_adapter_rows_answer_as_predict_and_feed_drift(runs):
    """A batch holding a contrastive run's requests between a LoRA run's: the LoRA rows still run as one forward,
    the contrastive rows are read as `graftune predict` reads them (whole-text windows, normalized embeddings, the
    fitted logistic regression), and the drift observer gets the embeddings its reference summary is made of."""
    from graftune.serve.drift import reference_summary
    from graftune.serve.store import Rows

    seen = []

    class Observer:
        def observe(self, entry, features, texts, input_ids, predictions):
            seen.append((entry.name, tuple(features.shape), len(input_ids), [p["label"] for p in predictions]))

    store = ModelStore(observer=Observer())
    try:
        report = store.sync({"lora": ("1", runs["lora"]), "c": ("1", runs["contrastive"])})
        assert sorted(report["loaded"]) == ["c@1", "lora@1"] and not report["failed"]
        c, lora = store.acquire("c"), store.acquire("lora")
        out = store.submit(store.classify, [Rows(c, TEXTS[:2]), Rows(lora, TEXTS), Rows(c, TEXTS[2:])]).result()
        want = predict(load_run(runs["contrastive"]), TEXTS)
        same_predictions(out[0] + out[2], want)
        same_predictions(out[1], predict(load_run(runs["lora"]), TEXTS))
        store.release(c)
        store.release(lora)
    finally:
        store.close()
    reference = reference_summary(runs["contrastive"])
    assert reference.n == 18 and reference.mean.shape == (seen[0][1][1],)  # 6 shots x 3 classes, one width
    assert [s[0] for s in seen] == ["c", "c", "lora"] and seen[0][1][0] == 2 == seen[0][2]  # few-shot rows first
    assert seen[0][3] + seen[1][3] == [w["label"] for w in want]


def test_mixed_batch_from_two_adapters_is_one_forward(runs):
    """Two requests for two adapters, sent together inside the window, run as ONE forward of the base, and each
    gets its own adapter's predictions."""
    store = ModelStore()
    app = create_app(store, StaticSource({"lora": runs["lora"], "ia3": runs["ia3"]}),
                     Settings(max_batch=32, max_wait_ms=300))
    with LiveServer(app) as live:
        base = next(iter(store.slots.values())).model.base
        calls = []
        handle = base.register_forward_hook(lambda m, a, o: calls.append(1))
        barrier = threading.Barrier(2)
        results = {}

        def ask(name, texts):
            barrier.wait()
            results[name] = httpx.post(f"{live.url}/v1/predict", json={"adapter": name, "inputs": texts}, timeout=30)

        threads = [threading.Thread(target=ask, args=("lora", TEXTS[:3])),
                   threading.Thread(target=ask, args=("ia3", TEXTS[3:]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        handle.remove()
        assert all(r.status_code == 200 for r in results.values()), {k: r.text for k, r in results.items()}
        batches = list(app.state.batcher.history)
        assert len(batches) == 1 and batches[0].requests == 2 and batches[0].rows == 5
        assert batches[0].adapters == ("ia3", "lora")
        assert len(calls) == 1  # one forward of the base for both adapters
        same_predictions(results["lora"].json()["predictions"], predict(load_run(runs["lora"]), TEXTS[:3]))
        same_predictions(results["ia3"].json()["predictions"], predict(load_run(runs["ia3"]), TEXTS[3:]))
        metrics = httpx.get(f"{live.url}/metrics").text
        assert 'graftune_batch_adapters_bucket{le="2.0"} 1.0' in metrics
        assert 'graftune_requests_total{adapter="lora",endpoint="predict",status="200"} 1.0' in metrics
        assert 'graftune_request_latency_seconds_count{adapter="ia3",endpoint="predict"} 1.0' in metrics


def test_max_batch_one_serves_one_request_per_forward(runs):
    app = create_app(ModelStore(), StaticSource({"lora": runs["lora"]}), Settings(max_batch=1, max_wait_ms=50))
    with TestClient(app) as client:
        out = post_together(client, "/v1/predict", [{"adapter": "lora", "inputs": [t]} for t in TEXTS[:4]])
        assert [r.status_code for r in out] == [200] * 4
        assert [b.requests for b in app.state.batcher.history] == [1, 1, 1, 1]


# --- bad requests ------------------------------------------------------------------------------------------------
def test_bad_requests_get_one_line_4xx_and_never_reach_the_model(runs):
    limits = Limits(max_inputs=4, max_chars=50, max_body_bytes=2_000)
    store = ModelStore()
    app = create_app(store, StaticSource({"lora": runs["lora"], "lm": runs["lm"]}),
                     Settings(limits=limits, api_key="s3cret"))
    key = {"Authorization": "Bearer s3cret"}
    cases = [
        ({"adapter": "nope", "inputs": ["a"]}, 404, "unknown adapter 'nope'"),
        ({"adapter": "lora", "inputs": "goal"}, 422, "inputs"),
        ({"adapter": "lora", "inputs": ["goal", 3]}, 422, "inputs.1"),
        ({"adapter": "lora", "inputs": []}, 422, "inputs: empty; send at least one text"),
        ({"adapter": "lora", "inputs": ["  "]}, 422, "inputs[0] is empty"),
        ({"adapter": "lora", "inputs": ["x" * 51]}, 422, "inputs.0: a text may have at most 50 characters (the"),
        ({"adapter": "n" * 201, "inputs": ["a"]}, 422, "adapter: String should have at most 200"),  # not --max-chars
        ({"adapter": "lora", "inputs": ["a"] * 5}, 422, "at most 4 items"),
        ({"adapter": "lora"}, 422, "inputs: Field required"),
        ({"adapter": "lora", "inputs": ["a"], "extra": 1}, 422, "extra"),
        ({"adapter": "lm", "inputs": ["a"]}, 400, "use POST /v1/generate"),
        ({"adapter": "lora", "inputs": ["y" * 40] * 4 + ["z" * 1900]}, 413, "larger than 2000 bytes"),
    ]
    with TestClient(app) as client:
        for body, status, words in cases:
            r = client.post("/v1/predict", json=body, headers=key)
            assert r.status_code == status, (body, r.text)
            error = r.json()["error"]
            assert words in error and "\n" not in error, (body, error)
        r = client.post("/v1/predict", content=b'{"adapter": "lora", "inputs": [',
                        headers={**key, "content-type": "application/json"})
        assert r.status_code == 422 and "JSON" in r.json()["error"]
        r = client.post("/v1/predict", content=b"x" * 5000, headers={**key, "content-type": "application/json"})
        assert r.status_code == 413
        r = client.post("/v1/generate", json={"adapter": "lora", "inputs": ["a"]}, headers=key)
        assert r.status_code == 400 and "classifier" in r.json()["error"]
        r = client.post("/v1/generate", json={"adapter": "lm", "inputs": ["a"], "max_new_tokens": 10_000}, headers=key)
        assert r.status_code == 422
        assert list(app.state.batcher.history) == []  # nothing above reached the model
        # the API key: missing or wrong -> 401, /health stays open
        assert client.post("/v1/predict", json={"adapter": "lora", "inputs": ["a"]}).status_code == 401
        wrong = client.get("/v1/adapters", headers={"X-API-Key": "s3creT"})
        assert wrong.status_code == 401 and "API key" in wrong.json()["error"]
        assert client.get("/metrics").status_code == 401
        assert client.get("/health").status_code == 200
        # and the server still answers well-formed requests
        r = client.post("/v1/predict", json={"adapter": "lora", "inputs": ["goal match"]}, headers={"X-API-Key":
                                                                                                     "s3cret"})
        assert r.status_code == 200 and len(app.state.batcher.history) == 1
        errors = client.get("/metrics", headers=key).text
        assert 'graftune_request_errors_total{adapter="_none",reason="unknown_adapter"} 1.0' in errors


def test_bodies_routes_and_keys_answer_in_one_line_and_every_answer_is_counted(runs):
    """The README's `curl -d '{...}'` sends a form: told to send JSON; malformed JSON says where; an unknown route
    answers in the server's format; with a key configured, a request without it is refused before its body is
    read; /metrics counts every answer by status, not only 200/400/500."""
    app = create_app(ModelStore(), StaticSource({"lora": runs["lora"]}),
                     Settings(api_key="s3cret", limits=Limits(max_body_bytes=2_000)))
    key = {"Authorization": "Bearer s3cret"}
    good = json.dumps({"adapter": "lora", "inputs": ["goal match"]}).encode()
    with TestClient(app) as client:
        r = client.post("/v1/predict", content=good, headers={**key, "content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 415 and "send 'Content-Type: application/json'" in r.json()["error"], r.text
        r = client.post("/v1/predict", content=good, headers={**key, "content-type": "application/json; charset=utf-8"})
        assert r.status_code == 200, r.text
        r = client.post("/v1/predict", content=b'{"adapter": "lora", "inputs": [', headers={**key, "content-type":
                                                                                              "application/json"})
        error = r.json()["error"]
        assert r.status_code == 422 and error.startswith("the body is not valid JSON (") and "position 31" in error
        assert "\n" not in error
        # the key first: malformed JSON, a wrong content type or a bad body without it are all 401
        for headers in ({"content-type": "application/json"}, {"content-type": "text/plain"}, {}):
            r = client.post("/v1/predict", content=b'{"adapter": ', headers=headers)
            assert r.status_code == 401 and "API key" in r.json()["error"], (headers, r.text)
        assert client.post("/v1/predict", json={"adapter": "lora"}).status_code == 401
        r = client.get("/nope", headers=key)
        assert r.status_code == 404 and r.json()["error"].startswith("no route GET /nope; the routes are POST "
                                                                     "/v1/predict"), r.text
        r = client.get("/v1/predict", headers=key)
        assert r.status_code == 405 and r.json() == {"error": "GET /v1/predict: method not allowed; use POST"}
        client.post("/v1/predict", json={"adapter": "nope", "inputs": ["a"]}, headers=key)
        client.post("/v1/predict", content=b"x" * 3000, headers=key)
        client.get("/health")
        metrics = client.get("/metrics", headers=key).text
    counted = {'adapter="lora",endpoint="predict",status="200"': 1, 'adapter="_none",endpoint="predict",status="415"':
               1, 'adapter="_none",endpoint="predict",status="422"': 1,
               'adapter="_none",endpoint="predict",status="401"': 4, 'adapter="_none",endpoint="other",status="404"': 1,
               'adapter="_none",endpoint="predict",status="405"': 1, 'adapter="_none",endpoint="predict",status="404"':
               1, 'adapter="_none",endpoint="predict",status="413"': 1, 'adapter="_none",endpoint="health",status="200"':
               1}
    for labels, n in counted.items():
        assert f"graftune_requests_total{{{labels}}} {n:.1f}" in metrics, (labels, metrics)


def test_long_texts_are_truncated_to_the_runs_max_length(runs):
    """A text of 2,000 words (the tiny BERT has 512 positions, the run's max_length is 32) is read as `graftune
    predict` reads it: truncated, so one request's work is bounded by max_length whatever its characters."""
    text = " ".join(TEXTS * 80)
    with TestClient(create_app(ModelStore(), StaticSource({"lora": runs["lora"]}))) as client:
        r = client.post("/v1/predict", json={"adapter": "lora", "inputs": [text, TEXTS[0]]})
        assert r.status_code == 200, r.text
        same_predictions(r.json()["predictions"], predict(load_run(runs["lora"]), [text, TEXTS[0]]))


# --- following the registry --------------------------------------------------------------------------------------
def test_promote_and_rollback_switch_without_failed_requests(runs, tmp_path):
    reg = Registry(tmp_path / "registry")
    reg.push(runs["lora"], "news")
    reg.promote("news", 1)
    reg.push(runs["lora2"], "news")
    want = {1: predict(load_run(runs["lora"]), TEXTS[:2]), 2: predict(load_run(runs["lora2"]), TEXTS[:2])}
    assert want[1] != want[2]
    store = ModelStore()
    app = create_app(store, reg, Settings(poll_s=0.05, max_wait_ms=2))
    with LiveServer(app) as live:
        stop, seen, failures = threading.Event(), [], []

        def hammer():
            with httpx.Client(base_url=live.url, timeout=30) as c:
                while not stop.is_set():
                    r = c.post("/v1/predict", json={"adapter": "news", "inputs": TEXTS[:2]})
                    if r.status_code != 200:
                        failures.append(r.text)
                        continue
                    body = r.json()
                    seen.append(int(body["version"]))
                    same_predictions(body["predictions"], want[int(body["version"])])

        def wait_for(version: int) -> float:
            start = time.monotonic()
            while httpx.get(f"{live.url}/v1/adapters").json()["adapters"][0]["version"] != str(version):
                assert time.monotonic() - start < 20, f"version {version} not served within 20 s"
                time.sleep(0.02)
            return time.monotonic() - start

        clients = [threading.Thread(target=hammer) for _ in range(3)]
        for t in clients:
            t.start()
        try:
            time.sleep(0.3)
            reg.promote("news", 2, force=True, reason="test: switch while serving")
            assert wait_for(2) < 5
            time.sleep(0.3)
            reg.rollback("news")
            assert wait_for(1) < 5
            time.sleep(0.3)
        finally:
            stop.set()
            for t in clients:
                t.join(30)
        assert failures == []
        assert {1, 2} <= set(seen)
        # old versions were dropped once their requests finished: one adapter left on the base
        deadline = time.monotonic() + 5
        while len(next(iter(store.slots.values())).model.info) != 1:
            assert time.monotonic() < deadline, list(next(iter(store.slots.values())).model.info)
            time.sleep(0.05)


class HeldSource:
    """The registry, with a generation the test moves by hand: the server notices a change only when told."""

    def __init__(self, reg: Registry):
        self.reg, self.gen = reg, 0
        self.promoted, self.verify = reg.promoted, reg.verify

    def generation(self) -> int:
        return self.gen


def test_a_changed_file_is_refused_and_the_old_version_keeps_serving(runs, tmp_path):
    reg = Registry(tmp_path / "registry")
    reg.push(runs["lora"], "news")
    reg.promote("news", 1)
    v2 = reg.push(runs["ia3"], "news")
    source = HeldSource(reg)
    store = ModelStore()
    with TestClient(create_app(store, source, Settings(poll_s=0.05))) as client:
        reg.promote("news", 2, force=True, reason="test")
        tensors = v2.path / "adapter" / "adapter.safetensors"  # changed on disk after push and promote
        tensors.chmod(0o644)
        tensors.write_bytes(tensors.read_bytes()[:-4] + b"\0\0\0\0")
        source.gen += 1
        deadline = time.monotonic() + 10
        while "news@2" not in store.failed:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "changed since push" in store.failed["news@2"]
        r = client.post("/v1/predict", json={"adapter": "news", "inputs": TEXTS[:1]})
        assert r.status_code == 200 and r.json()["version"] == "1"


def test_a_damaged_promoted_version_is_logged_once_and_the_rest_served(runs, tmp_path, caplog):
    """QA: a promoted version's folder removed took `graftune serve` down at start-up, and a running server stopped
    following the registry (a traceback every second). The broken version is logged once, the rest are served,
    promotes are still followed."""
    reg = Registry(tmp_path / "registry")
    for name, run in (("con", "lora"), ("news", "ia3")):
        reg.push(runs[run], name)
        reg.promote(name, 1)
    broken = tmp_path / "registry" / "versions" / "con" / "1"
    for p in [broken, *broken.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    shutil.rmtree(broken)
    store = ModelStore()
    caplog.set_level(logging.INFO, logger="graftune.serve")
    with TestClient(create_app(store, reg, Settings(poll_s=0.02))) as client:
        assert [a["name"] for a in client.get("/v1/adapters").json()["adapters"]] == ["news"]
        reg.push(runs["lora2"], "trec")
        reg.promote("trec", 1)
        deadline = time.monotonic() + 20
        while "trec" not in store.names():
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)
        reg.push(runs["lora"], "other")  # more changes: more reads of the registry, the broken version in each
        time.sleep(0.3)
        assert client.post("/v1/predict", json={"adapter": "news", "inputs": TEXTS[:1]}).status_code == 200
        r = client.post("/v1/predict", json={"adapter": "con", "inputs": TEXTS[:1]})
        assert r.status_code == 404 and "served: news, trec" in r.json()["error"]
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "con@1" in m]) == 1, messages
    assert not [r for r in caplog.records if r.exc_info or "failed" in r.getMessage()], messages


def test_a_run_that_fails_to_load_unexpectedly_does_not_stop_the_others(runs, tmp_path):
    """A damaged file that the artifact checks do not name (a fingerprint that is not an object) fails that run's
    load with an unexpected error: logged once, the others served (it took the whole sync, start-up included)."""
    bad = tmp_path / "bad"
    shutil.copytree(runs["lora"], bad)
    meta = json.loads((bad / "adapter" / "adapter.json").read_text())
    meta["base_fingerprint"] = "damaged"
    (bad / "adapter" / "adapter.json").write_text(json.dumps(meta))
    store = ModelStore()
    with TestClient(create_app(store, StaticSource({"bad": bad, "lora": runs["lora"]}))) as client:
        assert [a["name"] for a in client.get("/v1/adapters").json()["adapters"]] == ["lora"]
        assert store.failed["bad@1"].startswith("unexpected AttributeError")


# --- the command ---------------------------------------------------------------------------------------------------
def test_cli_refuses_bad_options_in_one_line(runs):
    runner = CliRunner()
    assert "--max-batch" in one_line_error(runner.invoke(cli_app, ["serve", "--run", f"a={runs['lora']}",
                                                                   "--max-batch", "0"]))
    assert "NAME=RUN_DIR" in one_line_error(runner.invoke(cli_app, ["serve", "--run", str(runs["lora"])]))
    assert "not a run directory" in one_line_error(runner.invoke(cli_app, ["serve", "--run", "a=/nonexistent"]))


@pytest.fixture
def no_server(monkeypatch):
    """uvicorn's run (where models load), recorded instead of run: a refused option never gets there."""
    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: started.append(sockets[0].getsockname()))
    return started


@pytest.mark.parametrize(("flags", "words"), [
    (["--log-level", "bogus"], "--log-level: got 'bogus'; use debug, info"),
    (["--max-chars", "-5"], "--max-chars: got -5"),
    (["--max-chars", "0"], "--max-chars: got 0"),
    (["--max-inputs", "0"], "--max-inputs: got 0"),
    (["--threads", "-1"], "--threads: got -1"),
    (["--threads", "0"], "--threads: got 0"),
    (["--max-wait-ms", "nan"], "--max-wait-ms: got nan"),
    (["--max-wait-ms", "inf"], "--max-wait-ms: got inf"),
    (["--max-wait-ms", "-1"], "--max-wait-ms: got -1"),
    (["--poll", "0"], "--poll: got 0"),
    (["--poll", "-1"], "--poll: got -1"),
    (["--poll", "nan"], "--poll: got nan"),
], ids=["log-level", "max-chars-negative", "max-chars-zero", "max-inputs-zero", "threads-negative", "threads-zero",
        "max-wait-nan", "max-wait-inf", "max-wait-negative", "poll-zero", "poll-negative", "poll-nan"])
def test_serve_refuses_bad_flags_in_one_line_before_loading(runs, no_server, flags, words):
    result = CliRunner().invoke(cli_app, ["serve", "--run", f"a={runs['lora']}", "--port", str(free_port()), *flags])
    assert words in one_line_error(result)
    assert no_server == []


def test_serve_refuses_a_missing_registry_a_taken_port_and_bad_names_before_loading(runs, tmp_path, no_server):
    runner = CliRunner()
    missing = tmp_path / "no-such-registry"
    error = one_line_error(runner.invoke(cli_app, ["serve", "--registry", str(missing), "--port", str(free_port())]))
    assert f"no registry at {missing} (nothing has been pushed there" in error and not missing.exists()
    for name in ("a b", "../../x", "-x"):
        error = one_line_error(runner.invoke(cli_app, ["serve", "--run", f"{name}={runs['lora']}"]))
        assert f"--run '{name}={runs['lora']}'" in error and "a registry name is" in error
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        error = one_line_error(runner.invoke(cli_app, ["serve", "--run", f"a={runs['lora']}", "--port", str(port)]))
    assert f"--port {port}: cannot listen there" in error
    assert no_server == []
    # and good options get there, with the port already bound
    port = free_port()
    result = runner.invoke(cli_app, ["serve", "--run", f"news={runs['lora']}", "--port", str(port), "--threads",
                                     str(torch.get_num_threads()), "--log-level", "WARNING", "--drift-dir",
                                     str(tmp_path / "drift")])
    assert result.exit_code == 0, result.output
    assert no_server == [("127.0.0.1", port)]


@pytest.mark.slow
def test_graftune_serve_command_answers_on_loopback(runs, tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "graftune", "serve", "--run", f"news={runs['lora']}", "--port",
                             str(port), "--drift-dir", str(tmp_path / "drift"), "--log-level", "info"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300  # a cold start imports torch, transformers and FastAPI: slow on a busy CPU
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"adapter": "news", "inputs": TEXTS}, timeout=30)
        same_predictions(r.json()["predictions"], predict(load_run(runs["lora"]), TEXTS))
    finally:
        proc.terminate()
        proc.wait(30)
    # where it listens, said once (uvicorn does not when it is handed a bound socket)
    assert f"listening on http://127.0.0.1:{port} (POST /v1/predict" in proc.stdout.read()
    # shutdown flushed the drift summary of what it served (one time bucket, named by its start)
    [bucket] = (tmp_path / "drift" / "news" / "1").iterdir()
    summary = json.loads(bucket.read_text())
    assert summary["n"] == len(TEXTS)
    assert torch.tensor(summary["mean"]).shape == (32,)
