"""``graftune train --method in-context`` and ``eval`` / ``predict`` on its run, on a tiny random Llama (plain chat
layout: its tokenizer has no template); bad settings give one line, exit 2 and no run directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from graftune.cli import app
from graftune.data.sources import load_data
from graftune.data.splits import make_splits
from graftune.evaluate import evaluate_run, predict
from graftune.recipes import in_context
from graftune.run.rundir import partial_dir
from graftune.runs import load_run
from tests.train_helpers import llama_folder, one_line_error, topic_csv

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-in-context")
    return {"root": root, "llama": llama_folder(root / "llama"), "csv": topic_csv(root / "t.csv", n_per_class=8)}


def train_args(tiny, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(tiny["llama"]), "--data", str(tiny["csv"]), "--out", str(out), "--method",
            "in-context", "--shots", "4", "--set", "k=2", "--set", "max_example_tokens=8", "--max-length", "16", "--quiet", *extra]


@pytest.fixture(scope="module")
def run_dir(tiny):
    out = tiny["root"] / "icl"
    result = runner.invoke(app, train_args(tiny, out))
    assert result.exit_code == 0, result.output
    assert "test: accuracy" in result.stdout and f"run written to {out}/" in result.stdout
    return out


def test_the_run_holds_the_prompt_and_reloads_to_the_same_predictions(run_dir, tiny):
    saved = json.loads((run_dir / "in_context" / in_context.FILE).read_text())
    assert len(saved["examples"]) == 2 * 3  # k=2 per class, 3 classes, chosen from the training split
    run = load_run(run_dir)
    splits = make_splits(load_data(run.cfg.data), **run.cfg.split_args())
    assert {e["text"] for e in saved["examples"]} <= set(splits.train.inputs)  # never a test text
    assert run.cfg.val_size == 0 and len(splits.val) == 0  # nothing reads a validation part: none held out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "in-context" and metrics["trainable_params"] == 0
    assert metrics["in-context"]["prefix_tokens"] > 0 and metrics["in-context"]["seconds_per_text"] > 0
    # eval rebuilds the prompt on the decoder and scores the same test split the same way
    again = evaluate_run(run_dir)
    assert again["accuracy"] == pytest.approx(metrics["accuracy"]) and again["examples"] == metrics["examples"]
    texts = ["goal match team", "bank market share"]
    rows = predict(run, texts)
    assert [r["label"] for r in rows] == [run.label_names[i] for i in run.predictor.predict_proba(texts).argmax(1)]
    assert all(np.isclose(sum(r["probabilities"].values()), 1.0, atol=1e-5) for r in rows)
    result = runner.invoke(app, ["predict", str(run_dir), "goal match team", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[0])["label"] == rows[0]["label"]


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "3"], "epochs: --method in-context trains nothing"),
    (["--set", "rank=4"], "options for in-context: unknown option(s) rank"),
    (["--set", "score=max"], "in-context score='max'"),
    (["--quantize-nothing"], None),
], ids=["loop-setting", "unknown-option", "bad-value", "unknown-flag"])
def test_bad_settings_fail_before_anything_runs(tiny, tmp_path, extra, message):
    out = tmp_path / "bad"
    result = runner.invoke(app, train_args(tiny, out, *extra))
    assert result.exit_code == 2, result.output
    if message is not None:
        assert message in one_line_error(result), result.output
    assert not out.exists() and not partial_dir(out).exists()
