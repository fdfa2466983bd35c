"""``graftune bench`` (strategies/bench.py) on a tiny random BERT and synthetic 3-topic csvs: the job list, one job
from its spec alone (the same splits for every strategy, auto choosing on the training examples only and trained on
the same splits), regret computed from the rows, the outputs written atomically, one-line errors for bad input, and
Ray tasks giving the same rows as a local run. The frozen-encoder strategies and auto run for real on the tiny
model; the adapter strategies through a fake train() where only the plumbing is under test."""

from __future__ import annotations

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from graftune.cli import app
from graftune.data.sources import ALIASES
from graftune.errors import ConfigError, DataError
from graftune.strategies import bench
from graftune.strategies.bench import (
    AUTO,
    TIMING_KEYS,
    JobSpec,
    check_inputs,
    describe_data,
    plan_jobs,
    run_job,
    run_jobs,
    summarize_bench,
)
from tests.train_helpers import bert_folder, scripted_predictions, topic_csv

SETTINGS = {"max_length": 32, "epochs": 1, "batch_size": 8, "precision": "fp32"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-bench")
    return {"bert": str(bert_folder(root / "bert")), "a": str(topic_csv(root / "a.csv", n_per_class=14)),
            "b": str(topic_csv(root / "b.csv", n_per_class=14, seed=1))}


class FakeTrain:
    """Stands in for the adapter loop: records the config and splits; accuracy depends on method and seed only."""

    def __init__(self):
        self.calls = []

    def __call__(self, cfg, *, progress=True, splits=None):
        self.calls.append((cfg, splits))
        acc = {"lora": 0.9}.get(cfg.method, 0.7) - 0.01 * cfg.seed
        return {"accuracy": acc, "macro_f1": acc - 0.01, "trainable_params": 1000, "train_seconds": 0.01,
                "predicted": scripted_predictions(splits.test.labels, splits.test.label_names, acc)}


def _models(tiny):
    return {"text": tiny["bert"], "image": tiny["bert"]}


def test_defaults_are_the_builtin_classification_sets():
    assert all(name in ALIASES for name in bench.DEFAULT_DATA)
    assert "digits" in bench.DEFAULT_DATA and "json-answers" not in bench.DEFAULT_DATA
    # every built-in single-label classification alias is benched by default (mnist-5k: digits covers images)
    text = [n for n in ALIASES if n not in ("json-answers", "mnist-5k", "digits")]
    assert set(text) <= set(bench.DEFAULT_DATA)


def test_job_list_covers_every_combination_once_cheap_first(tiny):
    sets = describe_data([tiny["a"], tiny["b"]], [2, 4])
    assert sets[tiny["a"]]["test_per_class"] == 14 - 4  # leaves the largest shot count for training
    jobs = plan_jobs(sets, shots=[2, 4], seeds=[0, 1, 2], strategies=["lora", "linear-probe", "prototypes"],
                     models=_models(tiny), settings=SETTINGS)
    assert len(jobs) == 2 * 2 * 3 * 4
    keys = [(j.data, j.strategy, j.shots, j.seed) for j in jobs]
    assert len(set(keys)) == len(keys)
    # within one split: the frozen baselines, then auto, then the trained strategies
    assert [j.strategy for j in jobs[:4]] == ["linear-probe", "prototypes", AUTO, "lora"]
    assert {j.test_per_class for j in jobs if j.data == tiny["a"]} == {10}
    no_auto = plan_jobs(sets, shots=[2], seeds=[0], strategies=["linear-probe"], with_auto=False)
    assert [j.strategy for j in no_auto] == ["linear-probe", "linear-probe"]
    assert no_auto[0].model == bench.DEFAULT_MODELS["text"]


def test_jobs_share_splits_and_auto_never_sees_the_test_set(tiny, monkeypatch):
    seen = []
    real = bench.auto.auto_pick

    def spy(*args, **kwargs):
        record = real(*args, **kwargs)
        seen.append(kwargs["split_args"])
        return record

    monkeypatch.setattr(bench.auto, "auto_pick", spy)
    fake = FakeTrain()
    common = {"data": tiny["a"], "shots": 4, "seed": 1, "model": tiny["bert"], "test_per_class": 6,
              "settings": SETTINGS}
    rows = {s: run_job(JobSpec(strategy=s, **common, auto_budget=60), train_fn=fake)
            for s in ("linear-probe", "prototypes", "lora", AUTO)}
    for name, row in rows.items():
        assert "accuracy" in row, (name, row)
    assert len({r["train_fingerprint"] for r in rows.values()}) == 1
    assert len({r["test_fingerprint"] for r in rows.values()}) == 1
    assert rows["lora"]["train_examples"] == 4 * 3 and rows["lora"]["test_examples"] == 6 * 3
    # auto cross-validated on exactly the job's training examples (the bench's split arguments), then trained its
    # pick on the same splits: the run's data card fingerprints the same test set (checked inside run_job)
    assert seen[-1]["shot_seed"] == 1 and seen[-1]["seed"] == 0 and seen[-1]["test_per_class"] == 6
    assert rows[AUTO]["auto_training_examples"] == 4 * 3
    assert rows[AUTO]["pick"] in ("probe", "prototypes", "head", "lora", "contrastive")
    assert rows[AUTO]["reason"]
    cfg, splits = fake.calls[0]
    assert cfg.method == "lora" and len(splits.train) == 12


@pytest.mark.parametrize("pick", ["lora", "probe"])
def test_bench_settings_reach_the_strategies_that_use_them_without_dropping_autos_candidates(tiny, monkeypatch,
                                                                                           pick):
    # QA: `bench --set epochs=3` made auto's selection that of `train --method auto --epochs 3`: no contrastive, no
    # probe (a baseline of `head`), as if the user were configuring LoRA
    asked = []

    def pick_fixed(*args, **kwargs):
        asked.append(kwargs)
        return {"method": pick, "reason": "scripted", "seconds": 0.1, "training_examples": 12}

    monkeypatch.setattr(bench.auto, "auto_pick", pick_fixed)
    fake = FakeTrain()
    spec = JobSpec(data=tiny["a"], strategy=AUTO, shots=4, seed=0, model=tiny["bert"], test_per_class=6,
                   settings={**SETTINGS, "epochs": 2, "lr": 1e-3}, auto_budget=60)
    row = run_job(spec, train_fn=fake)
    assert "accuracy" in row, row
    assert asked[0]["not_for_contrastive"] == [] and asked[0]["not_for_probe"] == []
    if pick == "lora":  # the adapter loop's pick trains with the bench's settings, as the lora job does
        cfg, _ = fake.calls[-1]
        assert (cfg.method, cfg.epochs, cfg.lr, cfg.batch_size, cfg.max_length) == ("lora", 2, 1e-3, 8, 32)
    else:  # a probe pick trains as `train --method probe` would (it refused epochs, lr and batch_size)
        assert row["pick"] == "probe" and not fake.calls


def test_auto_says_why_a_tie_went_to_its_pick_truly():
    assert bench.auto._ties_go_to("contrastive").endswith("the candidate most often best across data sets")
    head = bench.auto._ties_go_to("head")
    assert "most often best" not in head
    assert head.startswith("ties go to head, the first of the tied candidates in auto's preference order (contrastive, ")


def test_not_applicable_and_failing_jobs_give_rows_not_crashes(tiny):
    class Boom:
        def __call__(self, cfg, **kw):
            raise RuntimeError("out of memory\nsecond line")

    spec = JobSpec(data=tiny["a"], strategy="lora", shots=2, seed=0, model=tiny["bert"], test_per_class=6,
                   settings=SETTINGS)
    row = run_job(spec, train_fn=Boom())
    assert row["error"] == "RuntimeError: out of memory" and "accuracy" not in row


def test_an_in_context_job_runs_as_compare_runs_it(tiny, monkeypatch):
    """bench had no in-context branch: the job fell through to the adapter loop ("method: missing"), so
    ``--strategies all`` always reported a failed job. Both now run strategies through catalog.run_strategy."""
    import numpy as np

    from graftune.strategies import catalog

    seen = {}

    class Prompted:  # SmolLM2 stands in: every text gets its first training example's class, surely
        def __init__(self, texts, labels, names, **kwargs):
            seen.update(kwargs, train=len(texts))
            self.first = names.index(labels[0]) if labels[0] in names else int(labels[0])
            self.n = len(names)

        def predict_proba(self, texts):
            p = np.zeros((len(texts), self.n))
            p[:, self.first] = 1.0
            return p

    monkeypatch.setattr(catalog.in_context, "fit", Prompted)
    spec = JobSpec(data=tiny["a"], strategy="in-context", shots=2, seed=0, model=tiny["bert"], test_per_class=6,
                   settings=SETTINGS)
    row = run_job(spec)
    assert "error" not in row, row
    assert row["trainable_params"] == 0 and row["accuracy"] == pytest.approx(1 / 3)  # one class of 3, 6 each
    assert seen["model"] == catalog.IN_CONTEXT_MODEL and seen["train"] == 6 and seen["calibrate"]
    assert row["model"] == catalog.IN_CONTEXT_MODEL  # the row names the model that ran, not the encoder

def _row(data, strategy, seed, acc, shots=8, **extra):
    return {"data": data, "strategy": strategy, "shots": shots, "seed": seed, "accuracy": acc, "macro_f1": acc,
            "train_seconds": 1.0, "wall_seconds": 2.0 + seed, "trainable_params": 10, **extra}


def test_regret_is_best_mean_minus_autos_on_the_same_seeds():
    rows = [_row("x", "linear-probe", s, a) for s, a in enumerate((0.70, 0.72, 0.74))]
    rows += [_row("x", "lora", s, a) for s, a in enumerate((0.80, 0.84, 0.82))]
    rows += [_row("x", AUTO, s, a, pick="lora") for s, a in enumerate((0.80, 0.80, 0.78))]
    # contrastive is best on the one seed it finished but missing the others: left out of "best"
    rows += [_row("x", "contrastive", 0, 0.99), {"data": "x", "strategy": "contrastive", "shots": 8, "seed": 1,
                                                 "skipped": "would exceed the budget"}]
    rows += [_row("y", "linear-probe", 0, 0.9), _row("y", AUTO, 0, 0.92, pick="probe")]
    summary = summarize_bench(rows)
    by = {s["data"]: s for s in summary["sets"]}
    x = by["x"]
    assert x["best"] == "lora" and x["seeds"] == [0, 1, 2] and x["incomplete"] == ["contrastive"]
    assert x["regret"] == pytest.approx(0.82 - 0.7933333, abs=1e-6)
    assert x["auto_minus_probe"] == pytest.approx(0.7933333 - 0.72, abs=1e-6)
    assert x["auto_picks"] == {"lora": 3} and x["auto_seconds"] == pytest.approx(3.0)
    assert not x["auto_best"]
    # auto above the best other strategy: the true, negative regret, and the tables say so
    assert by["y"]["regret"] == pytest.approx(-0.02) and by["y"]["auto_best"]
    assert summary["overall"]["max_regret"] == pytest.approx(x["regret"])
    assert summary["overall"]["mean_regret"] == pytest.approx((x["regret"] - 0.02) / 2)
    assert summary["overall"]["sets_within_1_point"] == 1
    assert summary["not_finished"][0]["skipped"] == "would exceed the budget"
    md = bench.format_markdown(summary, {"command": "graftune bench --data x", "date": "today", "machine": "cpu"})
    assert "| x | 8 | 3 | lora | 82.0 ± 2.0 | 72.0 ± 2.0 | 79.3 ± 1.2 | lora ×3 | 2.7 | +7.3 | 3 | 3 |" in md
    assert "| y | 8 | 1 | linear-probe | 90.0 | 90.0 | 92.0 | probe ×1 | -2.0 (auto above every listed strategy) |" in md
    page = bench.render_bench(summary, {"command": "graftune bench --data x,y"})
    assert "<td>-2.0 (auto above every listed strategy)</td>" in page and "<td>2.7</td>" in page
    assert ">-2.0</text>" in page  # the regret plot draws it below 0


def test_budget_skips_jobs_that_would_not_fit(tiny):
    fake = FakeTrain()
    sets = describe_data([tiny["a"]], [2])
    jobs = plan_jobs(sets, shots=[2], seeds=[0, 1, 2], strategies=["linear-probe"], models=_models(tiny),
                     settings=SETTINGS, with_auto=False)
    rows = run_jobs(jobs, budget_s=1e-6, train_fn=fake)
    assert "accuracy" in rows[0]  # the first is the measurement
    assert all("budget" in r["skipped"] for r in rows[1:])


def test_cli_writes_the_three_files_atomically(tiny, tmp_path, monkeypatch):
    written = []
    real = bench.write_file_atomically

    def spy(path, text, *a, **k):
        written.append(path.name)
        return real(path, text, *a, **k)

    monkeypatch.setattr(bench, "write_file_atomically", spy)
    out = tmp_path / "b"
    args = ["bench", "--data", f"{tiny['a']},{tiny['b']}", "--shots", "2", "--seeds", "2", "--strategies",
            "linear-probe,prototypes", "--model", tiny["bert"], "--auto-budget", "30", "--out", str(out), "--quiet"]
    for kv in ("max_length=32", "epochs=1", "batch_size=8", "precision=fp32"):
        args += ["--set", kv]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["bench.html", "bench.json", "bench.md"]
    assert set(written) == {"bench.json", "bench.html", "bench.md"} and written.count("bench.json") > 1
    saved = json.loads((out / "bench.json").read_text())
    assert saved["meta"]["finished"] is True and len(saved["rows"]) == 2 * 2 * 3
    assert all("accuracy" in r for r in saved["rows"]), saved["rows"]
    page = (out / "bench.html").read_text()
    for part in ('id="sets"', 'id="plot-accuracy"', 'id="plot-regret"', 'id="plot-time"', "<svg", 'id="strategies"'):
        assert part in page
    assert "<script" not in page
    assert "| data set | shots |" in result.output and "regret" in result.output
    # a second run into the same folder is refused without --overwrite, and replaces it with it
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output
    assert CliRunner().invoke(app, args + ["--overwrite"]).exit_code == 0


@pytest.mark.parametrize("extra, message", [
    (["--strategies", "lora,nope"], "--strategies: unknown nope"),
    (["--shots", "0"], "--shots"),
    (["--seeds", "0"], "--seeds 0"),
    (["--budget", "-5"], "--budget -5"),
    (["--data", "no-such-data.csv"], "no-such-data.csv"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, extra, message):
    out = tmp_path / "never"
    args = ["bench", "--data", tiny["a"], "--shots", "2", "--seeds", "1", "--model", tiny["bert"], "--out", str(out)]
    result = CliRunner().invoke(app, args + extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_too_few_examples_for_the_shots_is_refused(tiny):
    with pytest.raises(DataError, match="lower --shots"):
        describe_data([tiny["a"]], [14])
    with pytest.raises(ConfigError, match="--data"):
        check_inputs([], shots=[8], seeds=1, strategies=["lora"])


def test_ray_without_ray_installed_is_a_one_line_error(tiny, tmp_path, monkeypatch):
    real = bench.importlib.import_module

    def no_ray(name, *a, **k):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real(name, *a, **k)

    monkeypatch.setattr(bench.importlib, "import_module", no_ray)
    result = CliRunner().invoke(app, ["bench", "--data", tiny["a"], "--shots", "2", "--seeds", "1", "--model",
                                      tiny["bert"], "--out", str(tmp_path / "r"), "--ray", "local"])
    assert result.exit_code == 2 and "pip install ray" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_an_unreachable_cluster_is_a_one_line_error(monkeypatch):
    class FakeRay:
        def init(self, **kwargs):
            raise ConnectionError(f"Could not find any running Ray instance at {kwargs['address']}.\nmore")

    monkeypatch.setattr(bench, "check_ray_reachable", lambda address: None)  # the host answers; Ray does not
    with pytest.raises(bench.RayStartError, match=r"^--ray head-node:6379: could not connect .*Could not find"):
        bench.start_ray(FakeRay(), "head-node:6379")


@pytest.mark.parametrize("form", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_an_address_nobody_answers_on_is_refused_at_once_and_writes_nothing(tiny, tmp_path, form):
    # QA: `--ray HOST:PORT` with nothing there retried for 9+ minutes (Ray's own loop), and left an empty folder
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = form.format(port=s.getsockname()[1])
    started = time.monotonic()
    result = CliRunner().invoke(app, ["bench", "--data", tiny["a"], "--shots", "2", "--seeds", "1", "--model",
                                      tiny["bert"], "--out", str(tmp_path / "r"), "--ray", address])
    assert result.exit_code == 2 and f"--ray {address}: nothing answers at" in result.output, result.output
    assert time.monotonic() - started < 30 and not (tmp_path / "r").exists()


def _reproducible(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


@pytest.mark.slow  # starting Ray takes 30 s or more on 2 cores
@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="ray is not installed (pip install ray, or the project's ray extra)")
def test_ray_local_gives_the_same_rows_as_a_local_run(tiny):
    sets = describe_data([tiny["a"], tiny["b"]], [2])
    jobs = plan_jobs(sets, shots=[2], seeds=[1], strategies=["linear-probe", "prototypes", "lora"],
                     models=_models(tiny), settings=SETTINGS, auto_budget=60)
    local = run_jobs(jobs)
    try:
        remote = run_jobs(jobs, ray_address="local")
    except bench.RayStartError as e:  # Ray's raylet gives up after 30 s when the machine is overloaded
        pytest.skip(f"Ray could not start here: {e}")
    assert all("accuracy" in r for r in local), [r for r in local if "accuracy" not in r]
    assert [_reproducible(r) for r in remote] == [_reproducible(r) for r in local]


def test_bench_charts_have_round_ticks_and_a_zero_regret_is_written():
    import itertools
    import re

    from graftune.strategies.report.bench import bar_chart

    def ticks(svg):
        return re.findall(r'class="ytick">([^<]+)<', svg)

    acc = bar_chart(["a", "b"], ["probe", "auto"], {("a", "probe"): (0.562, 0.037), ("a", "auto"): (0.786, 0.015),
                                                    ("b", "probe"): (0.932, 0.015), ("b", "auto"): (0.953, 0.008)},
                    ylabel="accuracy", lo=None)
    values = [float(t) for t in ticks(acc)]
    steps = {round(b - a, 6) for a, b in itertools.pairwise(values)}
    assert len(values) >= 3 and len(steps) == 1 and steps.pop() in (0.05, 0.1, 0.2), values
    times = bar_chart(["a"], ["probe", "auto"], {("a", "probe"): (0.4, 0.0), ("a", "auto"): (184.5, 0.0)},
                      ylabel="seconds", log=True)
    assert ticks(times) == ["0.1", "1", "10", "100", "1k"]
    regret = bar_chart(["a", "b"], ["auto"], {("a", "auto"): (0.0, 0.0), ("b", "auto"): (1.9, 0.0)},
                       ylabel="points", lo=0.0)
    assert ">0.0</text>" in regret and ">1.9</text>" in regret and ticks(regret)[0] == "0"
    # a negative regret (auto above every listed strategy) takes the axis below 0, still on round ticks
    negative = bar_chart(["a", "b"], ["auto"], {("a", "auto"): (-1.2, 0.0), ("b", "auto"): (1.9, 0.0)},
                         ylabel="points", lo=0.0)
    assert ticks(negative) == ["-2", "-1", "0", "1", "2"] and ">-1.2</text>" in negative
