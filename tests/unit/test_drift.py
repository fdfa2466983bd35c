"""Drift watch: running summaries are exact, the test's false-alarm rate is what it states, and end to end a stream
from another data set is flagged while a held-out slice of the training data is not."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from graftune.cli import app as cli_app
from graftune.config import RunConfig
from graftune.registry import Registry
from graftune.runs import train
from graftune.serve import DriftTracker, ModelStore, StaticSource, create_app
from graftune.serve.drift import MIN_ROWS, Summary, compare, read_summary
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
    assert read_summary(served["drift"] / "held" / "1.json").n == served["n"]["held"]
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
    assert "no promoted version" in one_line_error(runner.invoke(cli_app, ["drift", "news", "--registry",
                                                                           str(reg.root)]))
    reg.push(served["run"], "news")
    reg.promote("news", 1)
    folder = drift_folder(reg.root)
    assert folder == tmp_path / "registry-drift"
    (folder / "news").mkdir(parents=True)
    shutil.copy(served["drift"] / "other" / "1.json", folder / "news" / "1.json")  # what a server would have written
    result = runner.invoke(cli_app, ["drift", "news", "--registry", str(reg.root)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("news (version 1): recent inputs do NOT look like the training data")
