"""`graftune eval / predict --quantize int8` on tiny BERT runs: the int8 path is taken, predictions stay those of
the float32 run, and bad values or runs that cannot merge give one line and exit 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from graftune.cli import app
from graftune.config import RunConfig
from graftune.runs import train
from tests.train_helpers import bert_folder, topic_csv, train_args

runner = CliRunner()
TEXTS = ["goal team match", "bank market share", "chip phone code"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-quantize")
    bert, data = bert_folder(root / "bert"), topic_csv(root / "topics.csv")
    for method in ("lora", "bottleneck"):
        train(RunConfig(**train_args(bert, data, root / method, method=method, epochs=2, val_size=0)), progress=False)
    return root


def _one_line_error(result, *parts: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stderr.count("\n") == 1
    assert all(p in result.stderr for p in parts), result.stderr


def test_eval_and_predict_in_int8(runs):
    run = str(runs / "lora")
    plain = runner.invoke(app, ["eval", run, "--json"])
    int8 = runner.invoke(app, ["eval", run, "--quantize", "int8", "--json"])
    assert plain.exit_code == 0 and int8.exit_code == 0, int8.output
    m, mq = json.loads(plain.stdout), json.loads(int8.stdout)
    assert mq["quantize"] == "int8" and "quantize" not in m and mq["examples"] == m["examples"]
    assert mq["accuracy"] == pytest.approx(m["accuracy"], abs=0.1)  # a flipped near-tie or two at most
    rows = [json.loads(line) for line in runner.invoke(app, ["predict", run, *TEXTS, "--json"]).stdout.splitlines()]
    result = runner.invoke(app, ["predict", run, *TEXTS, "--quantize", "int8", "--json"])
    assert result.exit_code == 0, result.output
    rows_q = [json.loads(line) for line in result.stdout.splitlines()]
    clear = 0
    for r, rq in zip(rows, rows_q):
        assert rq["probabilities"] == pytest.approx(r["probabilities"], abs=0.01)
        top, second = sorted(r["probabilities"].values(), reverse=True)[:2]
        if top - second > 0.02:  # int8 moves each probability by < 0.01: only a closer near-tie may flip
            assert rq["label"] == r["label"]
            clear += 1
    assert clear >= len(rows) // 2, "too few clear predictions for the labels to be compared"


def test_bad_value_and_unmergeable_run_are_one_line(runs):
    _one_line_error(runner.invoke(app, ["eval", str(runs / "lora"), "--quantize", "int4"]),
                    "quantize: got 'int4'", "none, int8")
    _one_line_error(runner.invoke(app, ["predict", str(runs / "bottleneck"), "x", "--quantize", "int8"]),
                    "bottleneck adapters", "cannot be merged", "bf16/fp32 inference")
