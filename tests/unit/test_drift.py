"""Drift watch: running summaries are exact and merge exactly, the test's false-alarm rate is what it states, end to
end a stream from another data set is flagged while a held-out slice of the training data is not, and the window of
recent buckets catches a shift that the all-time summary dilutes, with bounded retention."""

from __future__ import annotations

import json
import shutil
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from graftune.cli import app as cli_app
from graftune.config import RunConfig
from graftune.registry import Registry
from graftune.runs import train
from graftune.serve import DriftTracker, ModelStore, StaticSource, create_app
from graftune.serve.drift import MIN_ROWS, Summary, Window, compare, parse_duration, read_summary, read_window
from graftune.serve.server import check_drift, drift_folder
from tests.train_helpers import bert_folder, one_line_error, topic_csv, topic_rows, train_args


def summary_of(x: np.ndarray, labels: list[str], chars: np.ndarray | None = None) -> Summary:
    s = Summary()
    chars = chars if chars is not None else np.full(len(x), 40)
    s.add(x, ["a" * int(c) for c in chars], [[5, 6, 7]] * len(x), labels, unk_id=1)
    return s


def test_running_sums_give_the_exact_mean_and_variance():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (57, 6))
    s = Summary()
    for part in np.array_split(np.arange(57), 5):  # added in pieces, as batches arrive
        s.add(x[part], ["abc"] * len(part), [[1, 5, 1, 7]] * len(part), ["a"] * len(part), unk_id=1)
    mean, var = s.mean_var()
    assert np.allclose(mean, x.mean(0)) and np.allclose(var, x.var(0, ddof=1))
    assert s.mean_var("unk_rate")[0] == pytest.approx(0.5) and s.mean_var("chars")[0] == pytest.approx(3)
    back = Summary.from_dict(json.loads(json.dumps(s.to_dict())))
    assert np.allclose(back.mean_var()[1], var) and back.labels == {"a": 57} and back.n == 57


def test_merged_summaries_are_the_summary_of_all_their_inputs():
    """Chan's pairwise update: buckets merged in any grouping give the mean and variance of the inputs together,
    also far from zero (where sums of squares lose digits)."""
    rng = np.random.default_rng(1)
    x = rng.normal(1e4, 0.01, (300, 5))
    parts = [summary_of(x[i:j], ["a"] * (j - i)) for i, j in ((0, 7), (7, 150), (150, 151), (151, 300))]
    whole = Summary.merged(parts)
    mean, var = whole.mean_var()
    assert whole.n == 300 and whole.labels == {"a": 300}
    assert np.allclose(mean, x.mean(0), rtol=0, atol=1e-9) and np.allclose(var, x.var(0, ddof=1), rtol=1e-6)
    again = Summary.merged([Summary.merged(parts[2:]), Summary.merged(parts[:2])])
    assert np.allclose(again.mean_var()[1], var, rtol=1e-9)


def test_a_summary_of_the_older_sums_format_is_read_exactly():
    rng = np.random.default_rng(2)
    x = rng.normal(0.5, 2.0, (40, 3))
    old = {"format": "graftune-drift-summary", "dim": 3, "n": 40, "emb_sum": x.sum(0).tolist(),
           "emb_sq": (x * x).sum(0).tolist(), "scalars": {"chars": [400.0, 4000.0], "unk_rate": [0.0, 0.0]},
           "labels": {"a": 40}, "first": 1.0, "last": 2.0}
    s = Summary.from_dict(old)
    assert np.allclose(s.mean_var()[0], x.mean(0)) and np.allclose(s.mean_var()[1], x.var(0, ddof=1))
    assert s.mean_var("chars") == (pytest.approx(10.0), pytest.approx(0.0)) and s.first == 1.0


def test_false_alarm_rate_is_at_most_alpha_and_shifts_are_caught():
    """200 seeds of served inputs drawn from the training distribution: the share of alarms stays within alpha
    (plus sampling noise); a mean shift in one dimension, or a class share that moved, is caught every time."""
    alpha, classes, p = 0.05, np.array(["a", "b", "c"]), [0.5, 0.3, 0.2]
    alarms = caught = moved = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        ref = summary_of(rng.normal(0, 1, (120, 16)), list(rng.choice(classes, 120, p=p)),
                         rng.normal(300, 50, 120))
        same = summary_of(rng.normal(0, 1, (300, 16)), list(rng.choice(classes, 300, p=p)), rng.normal(300, 50, 300))
        alarms += compare(ref, same, alpha=alpha)["drift"]
        shifted = rng.normal(0, 1, (300, 16))
        shifted[:, 3] += 0.8
        report = compare(ref, summary_of(shifted, list(rng.choice(classes, 300, p=p)), rng.normal(300, 50, 300)),
                         alpha=alpha)
        caught += report["drift"] and report["checks"]["embedding"]["dims_moved"] >= 1
        report = compare(ref, summary_of(rng.normal(0, 1, (300, 16)), list(rng.choice(classes, 300,
                                                                                      p=[0.1, 0.3, 0.6])),
                                         rng.normal(300, 50, 300)), alpha=alpha)
        moved += report["drift"] and {m["class"] for m in report["moved"]} >= {"a", "c"}
    assert alarms / 200 <= alpha + 0.03  # the test states <= alpha; 0.03 is ~2 standard errors of 200 draws
    assert caught == 200 and moved >= 195


def test_too_few_inputs_are_not_judged():
    rng = np.random.default_rng(0)
    ref = summary_of(rng.normal(0, 1, (50, 4)), ["a"] * 50)
    report = compare(ref, summary_of(rng.normal(5, 1, (MIN_ROWS - 1, 4)), ["a"] * (MIN_ROWS - 1)))
    assert report["drift"] is None


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny LoRA run served under two names; one gets a held-out slice of its own data set, the other texts
    from another data set (other words, most unknown to the tokenizer). Summaries flushed at shutdown."""
    root = tmp_path_factory.mktemp("drift")
    run = root / "run"
    train(RunConfig(**train_args(bert_folder(root / "bert"), topic_csv(root / "topics.csv", n_per_class=30), run,
                                 epochs=2, val_size=0)), progress=False)
    held_out = [r["text"] for r in topic_rows(40, seed=7)]
    other = [f"weather forecast for {city} says rain and wind tonight with the sun later" for city in
             ["paris", "rome", "oslo", "lima", "cairo", "delhi", "tokyo", "quito"]] * 15
    tracker = DriftTracker(root / "drift")
    app = create_app(ModelStore(observer=tracker), StaticSource({"held": run, "other": run}), tracker=tracker)
    with TestClient(app) as client:
        for name, texts in (("held", held_out), ("other", other)):
            for i in range(0, len(texts), 16):
                assert client.post("/v1/predict", json={"adapter": name, "inputs": texts[i:i + 16]}).status_code == 200
    return {"run": run, "drift": root / "drift", "n": {"held": len(held_out), "other": len(other)}}


def test_held_out_slice_is_not_flagged_and_another_data_set_is(served):
    [bucket] = (served["drift"] / "held" / "1").iterdir()  # one hour-wide bucket, named by its start (UTC)
    assert read_summary(bucket).n == served["n"]["held"]
    held = check_drift("held", run=str(served["run"]), drift_dir=str(served["drift"]))
    assert held["drift"] is False, held["text"]
    assert "still look like the training data" in held["text"]
    other = check_drift("other", run=str(served["run"]), drift_dir=str(served["drift"]))
    assert other["drift"] is True, other["text"]
    assert "do NOT look like" in other["text"] and other["checks"]["unk_rate"]["flagged"]
    assert other["checks"]["embedding"]["dims_moved"] > 0
    # the reference is computed once, then read from its cache beside the served summary
    assert (served["drift"] / "held" / "1.reference-train.json").is_file()


def test_drift_command(served):
    runner = CliRunner()
    result = runner.invoke(cli_app, ["drift", "other", "--run", str(served["run"]), "--drift-dir",
                                     str(served["drift"])])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("other (version 1): recent inputs do NOT look like the training data")
    assert "false-alarm rate" in result.output and "unknown tokens" in result.output
    result = runner.invoke(cli_app, ["drift", "held", "--run", str(served["run"]), "--drift-dir",
                                     str(served["drift"]), "--json"])
    assert json.loads(result.stdout)["drift"] is False
    assert "no served inputs recorded" in one_line_error(runner.invoke(cli_app, [
        "drift", "nobody", "--run", str(served["run"]), "--drift-dir", str(served["drift"])]))
    assert "--split" in one_line_error(runner.invoke(cli_app, ["drift", "held", "--run", str(served["run"]),
                                                               "--split", "nope"]))


def test_drift_of_a_registry_name_reads_the_folder_next_to_the_registry(served, tmp_path):
    """`graftune drift NAME --registry DIR`: the promoted version, its summary in `<registry>-drift/`."""
    reg = Registry(tmp_path / "registry")
    runner = CliRunner()
    # no registry there yet: said, and nothing created (QA: drift made an empty registry at a mistyped path)
    assert "no registry at" in one_line_error(runner.invoke(cli_app, ["drift", "news", "--registry", str(reg.root)]))
    assert not reg.root.exists()
    reg.push(served["run"], "news")
    assert "no promoted version" in one_line_error(runner.invoke(cli_app, ["drift", "news", "--registry",
                                                                           str(reg.root)]))
    reg.promote("news", 1)
    folder = drift_folder(reg.root)
    assert folder == tmp_path / "registry-drift"
    shutil.copytree(served["drift"] / "other" / "1", folder / "news" / "1")  # what a server would have written
    result = runner.invoke(cli_app, ["drift", "news", "--registry", str(reg.root)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("news (version 1): recent inputs do NOT look like the training data")


def test_drift_of_a_version_serve_refuses_says_so_not_serve_it(served, tmp_path):
    """QA: for a promoted probe run, drift said "no served inputs recorded ...; serve it with `graftune serve`",
    which then refuses it. It says the server cannot serve it, and why."""
    probe = tmp_path / "probe"
    args = train_args(bert_folder(tmp_path / "bert"), topic_csv(tmp_path / "topics.csv"), probe, method="probe",
                      val_size=0, shots=6)
    for key in ("epochs", "lr", "batch_size"):
        del args[key]  # the adapter loop's settings: the probe recipe refuses them
    train(RunConfig(**args), progress=False)
    reg = Registry(tmp_path / "registry")
    reg.push(probe, "p8")
    reg.promote("p8", 1)
    for args in (["p8", "--registry", str(reg.root)], ["p8", "--run", str(probe)]):
        error = one_line_error(CliRunner().invoke(cli_app, ["drift", *args]))
        assert error.startswith("error: p8@1: `graftune serve` cannot serve ") and "a --method probe run" in error
        assert "serve it with" not in error and "`graftune predict` reads this one" in error


# --- the window: recent buckets, not everything since the start --------------------------------------------------
class Clock:
    def __init__(self, start: float):
        self.now = start

    def __call__(self) -> float:
        return self.now


def feed(tracker: DriftTracker, clock: Clock, x: np.ndarray, *, name: str = "synth", per_minute: int = 20) -> None:
    """``x``'s rows served as ``name``@1, ``per_minute`` a minute, flushed as the server does."""
    entry = SimpleNamespace(name=name, version=1, task=SimpleNamespace(tokenizer=SimpleNamespace(unk_token_id=1)))
    for i in range(0, len(x), per_minute):
        rows = x[i:i + per_minute]
        tracker.observe(entry, torch.from_numpy(rows), ["a" * 40] * len(rows), [[5, 6, 7]] * len(rows),
                        [{"label": "a"}] * len(rows))
        clock.now += 60
        tracker.flush()


def test_a_recent_shift_is_flagged_in_the_window_and_diluted_in_the_all_time_summary(served, tmp_path):
    """Two days of in-distribution traffic, then one hour shifted: `drift --since 1h` flags it, `--all` does not
    (the shift is 2% of everything served), and `--last` takes the newest buckets."""
    rng = np.random.default_rng(0)
    clock = Clock(time.time() - 49 * 3600)
    tracker = DriftTracker(tmp_path / "d", clock=clock)  # hour-wide buckets, kept a week
    ref = summary_of(rng.normal(0, 1, (500, 16)), ["a"] * 500)
    (tmp_path / "d" / "synth").mkdir(parents=True)
    (tmp_path / "d" / "synth" / "1.reference-train.json").write_text(json.dumps(ref.to_dict()))  # the cache
    feed(tracker, clock, rng.normal(0, 1, (48 * 60 * 2, 16)), per_minute=2)  # 48 h, 2 inputs a minute
    shifted = rng.normal(0, 1, (60 * 2, 16))
    shifted[:, :4] += 1.0
    feed(tracker, clock, shifted, per_minute=2)  # the last hour
    assert tracker.held() <= 1  # closed buckets leave memory once written
    window, info = read_window(tmp_path / "d", "synth", "1", Window(2 * 3600), now=clock.now)
    assert info["buckets"] in (2, 3) and 120 <= window.n <= 3 * 120 and info["kept_inputs"] == 49 * 120
    args = ["drift", "synth", "--run", str(served["run"]), "--drift-dir", str(tmp_path / "d"), "--json"]
    recent = json.loads(runner_invoke(args + ["--since", "1h"]))
    everything = json.loads(runner_invoke(args + ["--all"]))
    assert recent["drift"] is True and recent["checks"]["embedding"]["dims_moved"] >= 2, recent
    assert everything["drift"] is False and everything["served"] == 49 * 120, everything  # diluted
    assert recent["window"]["window"] == "the last 1h" and everything["window"]["window"] == "every input kept"
    last = json.loads(runner_invoke(args + ["--last", "100"]))
    assert last["drift"] is True and 100 <= last["served"] <= 120 + 120
    default = json.loads(runner_invoke(args))  # the last 24 h: half a day of normal traffic beside the shift
    assert default["window"]["since_s"] == 86400 and 24 * 120 <= default["served"] <= 26 * 120
    text = CliRunner().invoke(cli_app, args[:-1] + ["--since", "90m"]).output
    assert text.startswith("synth (version 1): recent inputs do NOT look like the training data") and \
        "window: the last 90m:" in text, text
    few = CliRunner().invoke(cli_app, args[:-1] + ["--since", "1s"]).output  # the newest bucket only
    assert "served inputs in the last 1s" in few


def runner_invoke(args: list[str]) -> str:
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_old_buckets_are_deleted_and_memory_stays_bounded(tmp_path):
    clock = Clock(1_800_000_000.0)
    tracker = DriftTracker(tmp_path / "d", bucket_s=60, keep_s=300, clock=clock)
    feed(tracker, clock, np.random.default_rng(0).normal(0, 1, (30 * 20, 4)), per_minute=20)  # 30 minutes
    files = sorted((tmp_path / "d" / "synth" / "1").iterdir())
    # keep 5 minutes of one-minute buckets: at most the 6 that end after the horizon (the newest still open)
    assert 5 <= len(files) <= 7 and tracker.held() <= 1
    window, info = read_window(tmp_path / "d", "synth", "1", Window(None), now=clock.now)
    assert window.n == info["kept_inputs"] == len(files) * 20
    assert all(f.name.endswith("Z.json") for f in files)


def test_the_server_continues_the_bucket_it_finds_after_a_restart(tmp_path):
    clock = Clock(1_800_000_000.0)
    x = np.random.default_rng(0).normal(0, 1, (40, 4))
    feed(DriftTracker(tmp_path / "d", clock=clock), clock, x[:20], per_minute=20)
    feed(DriftTracker(tmp_path / "d", clock=clock), clock, x[20:], per_minute=20)  # a new process, same hour
    window, info = read_window(tmp_path / "d", "synth", "1", Window(), now=clock.now)
    assert info["buckets"] == 1 and window.n == 40 and np.allclose(window.mean_var()[0], x.mean(0))


def test_an_all_time_summary_of_an_older_graftune_is_read_by_all_and_refused_by_a_window(served, tmp_path):
    rng = np.random.default_rng(0)
    old = summary_of(rng.normal(0, 1, (60, 16)), ["a"] * 60)
    d = old.to_dict()
    d.update(format_version=1, emb_sum=(old.mean * 60).tolist(), emb_sq=(old.m2 + 60 * old.mean ** 2).tolist(),
             scalars={"chars": [40.0 * 60, 1600.0 * 60], "unk_rate": [0.0, 0.0]})  # sums, as version 1 wrote
    (tmp_path / "d" / "synth").mkdir(parents=True)
    (tmp_path / "d" / "synth" / "1.json").write_text(json.dumps(d))  # `first` and `last`: now
    ref = summary_of(rng.normal(0, 1, (200, 16)), ["a"] * 200)
    (tmp_path / "d" / "synth" / "1.reference-train.json").write_text(json.dumps(ref.to_dict()))
    args = ["drift", "synth", "--run", str(served["run"]), "--drift-dir", str(tmp_path / "d")]
    text = one_line_error(CliRunner().invoke(cli_app, args))
    assert "all-time summary written by an older graftune" in text and "--all" in text
    report = json.loads(runner_invoke(args + ["--all", "--json"]))
    assert report["served"] == 60 and report["drift"] is False


@pytest.mark.parametrize("bad", ["5x", "0h", "-1h", "h", "1.5", "1h30"])
def test_a_bad_since_is_one_line_and_exit_2(served, bad):
    text = one_line_error(CliRunner().invoke(cli_app, ["drift", "held", "--run", str(served["run"]),
                                                       "--drift-dir", str(served["drift"]), "--since", bad]))
    assert "--since" in text and bad in text


def test_window_options_exclude_each_other(served):
    base = ["drift", "held", "--run", str(served["run"]), "--drift-dir", str(served["drift"])]
    for extra, part in ((["--since", "1h", "--last", "5"], "--since and --last"), (["--all", "--since", "1h"],
                                                                                    "--all"),
                        (["--last", "0"], "--last")):
        assert part in one_line_error(CliRunner().invoke(cli_app, base + extra))
    assert parse_duration("1h30m", option="--since") == 5400 and parse_duration("2w", option="x") == 14 * 86400


def test_the_words_name_the_split_compared_with():
    # QA: `drift --split test` said "against N training inputs"
    from graftune.serve.drift import render

    report = {"alpha": 0.01, "served": 3, "reference": 40, "drift": None, "window": None, "split": "test"}
    assert "reference: 40 test inputs" in render("news", "1", report)
    assert "reference: 40 training inputs" in render("news", "1", {**report, "split": "train"})
