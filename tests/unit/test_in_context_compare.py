"""compare's in-context strategy on a tiny random Llama standing in for SmolLM2: it runs only when named, on the
comparison's own splits, and reports accuracy, cost and no trained parameters."""

from __future__ import annotations

import json

from graftune.strategies import catalog
from graftune.strategies.compare import run_compare
from tests.train_helpers import bert_folder, llama_folder, topic_csv


def test_in_context_runs_when_named_on_the_comparisons_splits(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog, "IN_CONTEXT_MODEL", str(llama_folder(tmp_path / "llama")))
    bert, csv = bert_folder(tmp_path / "bert"), topic_csv(tmp_path / "t.csv", n_per_class=12)
    rows = run_compare(str(bert), str(csv), shots=[2], seeds=1, strategies=["linear-probe", "in-context"],
                       augment=[False], out_dir=tmp_path / "cmp", test_per_class=4, settings={"max_length": 16},
                       progress=False)
    by = {r["strategy"]: r for r in rows}
    assert set(by) == {"linear-probe", "in-context"}
    icl = by["in-context"]
    assert "error" not in icl, icl.get("error")
    assert icl["trainable_params"] == 0 and icl["seconds_per_text"] > 0 and 0 <= icl["accuracy"] <= 1
    assert icl["test_fingerprint"] == by["linear-probe"]["test_fingerprint"]  # the same test set
    assert icl["test_examples"] == 12
    saved = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert any(r["strategy"] == "in-context" for r in saved["rows"])


def test_in_context_is_left_out_unless_named():
    assert not catalog.STRATEGIES["in-context"].default
    assert all(s.default for n, s in catalog.STRATEGIES.items() if n != "in-context")
