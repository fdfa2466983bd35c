"""strategies/robustness.py: seeded perturbations, the greedy attack on a scripted black box, a run's metrics.json
updated atomically, refusals, per-group metrics."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from typer.testing import CliRunner

from graftune.cli import app
from graftune.errors import DataError
from graftune.run.scoring import format_groups, group_metrics
from graftune.strategies.robustness import (
    PERTURBATIONS,
    format_table,
    greedy_attack,
    perturb,
    robustness,
)
from tests.train_helpers import fewshot_cli_data, topic_rows

TEXT = "the quick brown fox jumps over the lazy dog while the market share price rose again today"


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def test_perturbations_are_seeded_and_do_what_they_say():
    texts = [TEXT] * 4
    for name in PERTURBATIONS:
        once, again = perturb(texts, name, 0.2, seed=3), perturb(texts, name, 0.2, seed=3)
        assert once == again and perturb(texts, name, 0.2, seed=4) != once  # seeded; another seed differs
        assert len(set(once)) > 1  # each example has its own stream
    words = TEXT.split()
    swapped = perturb([TEXT], "word_swap", 0.2)[0].split()
    assert Counter(swapped) == Counter(words) and swapped != words
    dropped = perturb([TEXT], "word_drop", 0.3)[0].split()
    assert 0 < len(dropped) < len(words) and all(w in words for w in dropped)
    assert perturb(["one two"], "word_drop", 1.0) == ["one"]  # never empty
    cased = perturb([TEXT], "case", 0.5)[0]
    assert cased.lower() == TEXT and cased != TEXT
    long = " ".join(f"{w}{i}" for i, w in enumerate(words * 4))
    letters = sum(not c.isspace() for c in long)
    for s in (0.05, 0.2):  # about s x letters edits (each at most 1 edit away)
        assert 0.5 * s * letters < edit_distance(perturb([long], "char_noise", s)[0], long) <= 1.5 * s * letters


def keyword_box(texts):
    """A black box that says "pos" when the word "excellent" appears intact, else "neg"."""
    return [{"label": "pos" if "excellent" in t.split() else "neg",
             "probabilities": {"pos": 0.9, "neg": 0.1} if "excellent" in t.split() else {"pos": 0.2, "neg": 0.8}}
            for t in texts]


def test_the_attack_finds_the_word_that_matters_within_one_edit():
    texts = [f"{TEXT} excellent {i}" for i in range(5)]
    result = greedy_attack(texts, ["pos"] * 5, keyword_box, budget=3, scan_words=64)
    assert result["success_rate"] == 1.0 and result["success_at"]["1"] == 1.0
    assert result["mean_edits_when_successful"] == 1.0
    ex = result["examples"][0]
    assert "excellent" not in ex["after"].split() and ex["predicted_after"] == "neg"
    n_words = len(texts[0].split())
    assert result["max_queries_per_text"] == 1 + n_words + 4  # importance scan, then one step of 4 candidates


def test_the_attack_fails_against_a_model_it_cannot_move_and_respects_the_budget():
    def length_box(texts):  # decides by length, which one-character edits barely change
        return [{"label": "long", "probabilities": {"long": 0.99, "short": 0.01}} for _ in texts]

    result = greedy_attack([TEXT, TEXT + " more"], ["long", "long"], length_box, budget=4, scan_words=5)
    assert result["success_rate"] == 0.0 and result["mean_edits_when_successful"] is None
    assert result["max_queries_per_text"] == 1 + 5 + 4 * 4 and result["queries"] == 2 * (1 + 5 + 16)
    # the printed line says none flipped (it read "mean None edits when it worked")
    table = format_table({"clean_accuracy": 1.0, "examples": 2, "data": "test split", "strengths": [], "accuracy": {},
                          "attack": {**result, "budget": 4}})
    assert "attack: none of 2 texts flipped within 4 character edits (44 queries)" in table, table
    assert "None" not in table


def test_group_metrics_names_the_largest_gap():
    labels = ["a", "b", "a", "b", "a", "b"]
    preds = ["a", "b", "a", "a", "b", "a"]
    out = group_metrics(labels, preds, ["x", "x", "x", "y", "y", "y"], ["a", "b"])
    assert out["groups"]["x"] == {"examples": 3, "accuracy": 1.0, "macro_f1": 1.0}
    assert out["groups"]["y"]["accuracy"] == 0.0
    assert out["accuracy_gap"] == {"gap": 1.0, "best": "x", "worst": "y"}
    # three examples a group is thin, and the result says so rather than hiding it
    assert out["notes"] == [f"group '{g}' has 3 examples: one example moves its accuracy by 33 points" for g in "xy"]
    assert group_metrics(labels, preds, ["x"] * 6, ["a", "b"], min_examples=2)["notes"] == [
        "one group only ('x'): no gap to measure"]
    # a group holding one class is scored on that class alone: all right is macro-F1 1, not 1/2
    one_class = group_metrics(["a", "a", "b"], ["a", "a", "a"], ["x", "x", "y"], ["a", "b"])["groups"]
    assert one_class["x"]["macro_f1"] == 1.0 and one_class["y"]["macro_f1"] == 0.0
    table = format_groups(out)
    assert "largest gap: accuracy 1.000 (best x, worst y)" in table and table.count("note: ") == 2
    # no gap: no best and worst group (it printed "accuracy 0.000 (best (blank), worst east)")
    level = format_groups(group_metrics(labels, labels, ["", "", "", "east", "east", "east"], ["a", "b"]))
    assert "largest gap: accuracy 0.000 (the groups are level); macro-F1 0.000 (the groups are level)" in level, level
    assert "best" not in level and "worst" not in level
    single = format_groups(group_metrics(labels, preds, ["x"] * 6, ["a", "b"]))
    assert "largest gap: accuracy 0.000 (one group)" in single and "best x, worst x" not in single
    with pytest.raises(DataError, match="one each"):
        group_metrics(labels, preds[:2], labels, ["a", "b"])


def _probe_run(root) -> dict:
    """A probe run on the few-shot CLI data under ``root``: {"run", "bert", "csv", ...}."""
    tiny = fewshot_cli_data(root)
    out = root / "run"
    result = CliRunner().invoke(app, ["train", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--out",
                                      str(out), "--method", "probe", "--shots", "6", "--max-length", "32",
                                      "--precision", "fp32", "--quiet"])
    assert result.exit_code == 0, result.output
    return {"run": out, **tiny}


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    return _probe_run(tmp_path_factory.mktemp("robust"))


def test_robustness_on_a_run_writes_its_metrics_atomically(probe_run):
    run_dir = probe_run["run"]
    before = json.loads((run_dir / "metrics.json").read_text())
    result = robustness(run_dir, strengths=(0.1, 0.3), budget=2, attack_sample=4, scan_words=6, seed=1)
    after = json.loads((run_dir / "metrics.json").read_text())
    assert after["robustness"] == json.loads(json.dumps(result))
    assert {k: after[k] for k in before} == before  # nothing else changed
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []  # no temp file left
    assert result["clean_accuracy"] == pytest.approx(before["accuracy"], abs=1e-4)  # the run's own test split
    assert result["examples"] == before["examples"] and set(result["accuracy"]) == set(PERTURBATIONS)
    assert all(set(row) == {"0.1", "0.3"} for row in result["accuracy"].values())
    attack = result["attack"]
    assert attack["attacked"] <= 4 and attack["max_queries_per_text"] <= 1 + 6 + 4 * 2
    assert result == robustness(run_dir, strengths=(0.1, 0.3), budget=2, attack_sample=4, scan_words=6, seed=1,
                                write=False) | {"seconds": result["seconds"]}  # seeded: the same numbers again
    table = format_table(result)
    assert "char_noise" in table and "greedy character attack" in table


def test_robustness_on_other_data_and_refusals(probe_run, tmp_path):
    rows = topic_rows(4, seed=9)
    path = tmp_path / "more.csv"
    path.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    result = robustness(probe_run["run"], data=str(path), strengths=(0.2,), budget=0, write=False)
    assert result["examples"] == len(rows) and result["attack"] is None and result["data"] == str(path)
    with pytest.raises(DataError, match="strengths"):
        robustness(probe_run["run"], strengths=(0.0,), write=False)
    with pytest.raises(DataError, match="unknown perturbation 'blur'"):
        robustness(probe_run["run"], perturbations=("blur",), write=False)
    assert np.isfinite(result["clean_accuracy"])


def test_robustness_refuses_a_data_file_changed_since_training(tmp_path):
    tiny = _probe_run(tmp_path)
    out = tiny["run"]
    lines = tiny["csv"].read_text().splitlines()
    tiny["csv"].write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")  # the same rows, reordered
    with pytest.raises(DataError, match="changed since the run was trained"):
        robustness(out, strengths=(0.2,), budget=0, write=False)
