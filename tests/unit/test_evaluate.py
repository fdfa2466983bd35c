"""``graftune eval`` on what a user hands it: a file whose single/multi-label kind differs from the run's, a data file
changed since the run was trained (``data.splits.run_splits`` against the data card), and a test file with
duplicate rows (each one scored)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from graftune.cli import app
from graftune.config import RunConfig, build_config
from graftune.data.card import fingerprint
from graftune.data.splits import CARD_FILE, run_splits
from graftune.errors import DataError
from graftune.evaluate import evaluate_run, read_scored
from graftune.run.scoring import score_probabilities
from graftune.runs import train
from graftune.tasks.classification import encode_labels
from tests.train_helpers import bert_folder, one_line_error, topic_csv, topic_rows, train_args, write_csv


def _rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    return {"bert": bert_folder(root / "bert"), "csv": topic_csv(root / "topics.csv"), "root": root}


@pytest.fixture(scope="module")
def single_run(tiny):
    """A single-label probe run (no training steps: seconds) on its own copy of the topic csv."""
    data = write_csv(tiny["root"] / "single.csv", _rows(tiny["csv"]))
    out = tiny["root"] / "single_run"
    args = train_args(tiny["bert"], data, out, method="probe")
    del args["epochs"], args["lr"], args["batch_size"]
    train(RunConfig(**args), progress=False)
    return out


@pytest.fixture(scope="module")
def multi_run(tiny):
    """A multi-label head-only run: every text is news, and its topic."""
    rows = [{"text": r["text"], "label": f"{r['label']}|news"} for r in topic_rows(10)]
    data = write_csv(tiny["root"] / "multi.csv", rows)
    out = tiny["root"] / "multi_run"
    train(RunConfig(**train_args(tiny["bert"], data, out, method="head", epochs=1)), progress=False)
    return out


# --- labels of the other kind ---------------------------------------------------------------------------------------
def test_encode_labels_reads_the_other_kind_where_valid_and_names_the_rest():
    names = ["money", "sport"]
    assert encode_labels(["sport", ["money", "sport"]], names, True) == [[0.0, 1.0], [1.0, 1.0]]
    assert encode_labels([["sport"], "money"], names, False) == [1, 0]
    with pytest.raises(DataError, match="2 labels .*single-label classifier"):
        encode_labels([["money", "sport"]], names, False)
    with pytest.raises(DataError, match="'tech' is not one of the classifier's classes"):
        encode_labels(["tech"], names, False)
    with pytest.raises(DataError, match="'tech' is not one"):
        encode_labels([["tech"]], names, True)
    with pytest.raises(DataError, match="several|2 labels"):
        score_probabilities(np.full((1, 2), 0.5), [["money", "sport"]], names)


def test_read_scored_for_a_single_label_run_names_the_row_with_several_labels(tmp_path):
    rows = [{"text": "goal match", "label": "sport"}, {"text": "bank rate", "label": "money|sport"}]
    path = write_csv(tmp_path / "pipe.csv", rows)
    with pytest.raises(DataError) as e:
        read_scored(str(path), kind="classification", multi_label=False)
    assert str(e.value) == (f"this run is single-label; {path} line 3 holds several labels ('money|sport'): score "
                            "it on a file with one label per row")
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text('{"text": "goal", "label": "sport"}\n\n{"text": "bank", "label": ["money", "sport"]}\n')
    with pytest.raises(DataError, match=r"list.jsonl line 3 holds several labels"):
        read_scored(str(jsonl), kind="classification", multi_label=False)
    # a row dropped for its empty text before it does not shift the line named
    gaps = write_csv(tmp_path / "gaps.csv", [{"text": " ", "label": "sport"}, *rows])
    with pytest.raises(DataError, match=r"gaps.csv line 4 holds several labels"):
        read_scored(str(gaps), kind="classification", multi_label=False)
    # one label per row, written as a list of one: valid single-label data
    jsonl.write_text('{"text": "goal", "label": ["sport"]}\n{"text": "bank", "label": "money"}\n')
    ds = read_scored(str(jsonl), kind="classification", multi_label=False)
    assert not ds.multi_label and ds.labels == ["sport", "money"]


def test_read_scored_for_a_multi_label_run_makes_single_labels_sets_of_one(tmp_path):
    path = write_csv(tmp_path / "single.csv", [{"text": "goal", "label": "sport"}, {"text": "bank", "label": "money"}])
    ds = read_scored(str(path), kind="classification", multi_label=True)
    assert ds.multi_label and ds.labels == [["sport"], ["money"]]
    ds = read_scored("trec", kind="classification", multi_label=True)  # an alias is single-label whatever is asked
    assert ds.multi_label and all(isinstance(names, list) and len(names) == 1 for names in ds.labels)


def test_eval_of_a_multi_label_run_on_single_label_data(multi_run, tiny):
    m = evaluate_run(multi_run, data=str(write_csv(tiny["root"] / "news_only.csv", [
        {"text": "goal match team", "label": "news"}, {"text": "bank market", "label": "news"}])))
    assert m["examples"] == 2 and set(m["per_class"]) == {"money", "news", "sport", "tech"}


def test_eval_of_a_single_label_run_on_multi_label_data_is_one_line(single_run, tiny):
    rows = _rows(tiny["csv"])
    rows[3]["label"] = "sport|money"
    path = write_csv(tiny["root"] / "pipe.csv", rows)
    text = one_line_error(CliRunner().invoke(app, ["eval", str(single_run), "--data", str(path)]))
    assert "this run is single-label" in text and "pipe.csv line 5 holds several labels ('money|sport')" in text


# --- duplicates -----------------------------------------------------------------------------------------------------
def test_eval_scores_every_row_of_a_test_file_duplicates_included(single_run, tiny):
    rows = _rows(tiny["csv"])[:10]
    path = write_csv(tiny["root"] / "dups.csv", rows + rows[:4])
    m = evaluate_run(single_run, data=str(path))
    assert m["examples"] == 14 and sum(c["support"] for c in m["per_class"].values()) == 14


# --- a data file changed since training -----------------------------------------------------------------------------
def test_eval_refuses_a_data_file_changed_since_training(single_run):
    cfg = build_config(single_run / "run.yaml")
    scored = evaluate_run(single_run)
    assert scored["examples"] == json.loads((single_run / "metrics.json").read_text())["examples"]
    data = Path(cfg.data)
    original = data.read_bytes()
    try:
        rows = _rows(data)
        write_csv(data, rows[::-1])  # the same rows, reversed: another test split
        with pytest.raises(DataError) as e:
            evaluate_run(single_run)
        assert str(e.value) == (f"{data} changed since the run was trained: its test split is not the run's; pass "
                                "--data TEST_FILE (or retrain)")
        one_line_error(CliRunner().invoke(app, ["eval", str(single_run)]))
        # harmless edits keep the split: Windows line endings and a column the run does not read
        with data.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["id", "text", "label"], lineterminator="\r\n")
            writer.writeheader()
            writer.writerows({"id": i, **r} for i, r in enumerate(rows))
        assert evaluate_run(single_run)["accuracy"] == pytest.approx(scored["accuracy"])
    finally:
        data.write_bytes(original)


def _card(run_dir: Path, cfg: RunConfig, **override) -> None:
    splits = run_splits(cfg)
    card = {"splits": {name: {"fingerprint": fingerprint(getattr(splits, name))}
                       for name in ("train", "val", "test")}}
    card["splits"].update(override)
    run_dir.mkdir(exist_ok=True)
    (run_dir / CARD_FILE).write_text(json.dumps(card))


def test_run_splits_checks_the_parts_asked_for(tmp_path, tiny):
    data = write_csv(tmp_path / "data.csv", _rows(tiny["csv"]))
    test = write_csv(tmp_path / "test.csv", topic_rows(3, seed=1))
    cfg = RunConfig(model="minilm", data=str(data), test=str(test))
    run_dir = tmp_path / "run"
    _card(run_dir, cfg)
    assert len(run_splits(cfg, run_dir=run_dir).test) == 9
    write_csv(data, _rows(data)[::-1])
    assert len(run_splits(cfg, run_dir=run_dir, parts=("test",)).test) == 9  # the test file is unchanged
    with pytest.raises(DataError, match=r"data.csv changed since the run was trained: its train split is not"):
        run_splits(cfg, run_dir=run_dir)
    write_csv(test, topic_rows(3, seed=2))
    # the default fix names no flag (export and drift have no --data); a caller with --data says so
    with pytest.raises(DataError, match=r"test.csv changed since the run was trained: its test split is not the "
                                        r"run's; restore the file the run was trained on \(or retrain\)$"):
        run_splits(cfg, run_dir=run_dir, parts=("test",))
    with pytest.raises(DataError, match=r"; pass --data TEST_FILE \(or retrain\)$"):
        run_splits(cfg, run_dir=run_dir, parts=("test",), fix="pass --data TEST_FILE (or retrain)")


def test_run_splits_without_recorded_fingerprints_is_not_checked(tmp_path, tiny):
    cfg = RunConfig(model="minilm", data=str(write_csv(tmp_path / "data.csv", _rows(tiny["csv"]))))
    for card in ({"sha256": "old"}, {"splits": {"test": {"examples": 12}}}, "not json {"):
        (tmp_path / CARD_FILE).write_text(card if isinstance(card, str) else json.dumps(card))
        assert len(run_splits(cfg, run_dir=tmp_path).test) == 12
    (tmp_path / CARD_FILE).unlink()
    assert len(run_splits(cfg, run_dir=tmp_path).test) == 12


def test_run_splits_of_a_built_in_alias(tmp_path):
    cfg = RunConfig(model="minilm", data="trec", test_per_class=2)
    _card(tmp_path, cfg)
    assert len(run_splits(cfg, run_dir=tmp_path, parts=("test",)).test) == 12
    _card(tmp_path, cfg, test={"fingerprint": "0" * 64})
    with pytest.raises(DataError, match="trec changed since the run was trained"):
        run_splits(cfg, run_dir=tmp_path, parts=("test",))
