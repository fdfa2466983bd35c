"""``graftune check`` and ``graftune robustness``: plain-words output, exit codes (0; 1 with --strict and a
problem; 2 and one line for a user error), JSON, nothing written by check; robustness updates metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from graftune.cli import app
from tests.train_helpers import bert_folder, foreign_csv, image_folder, one_line_error, topic_rows, write_csv

runner = CliRunner()


def listing(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-check")
    rows = topic_rows(12, seed=1)
    dirty = rows + [{"text": rows[0]["text"].upper(), "label": rows[0]["label"]},  # a case-only copy
                    {"text": rows[1]["text"], "label": "tech" if rows[1]["label"] != "tech" else "sport"}]
    test_rows = rows[:3] + topic_rows(3, seed=7)
    return {"root": root, "clean": write_csv(root / "clean.csv", rows), "dirty": write_csv(root / "dirty.csv", dirty),
            "test": write_csv(root / "test.csv", test_rows), "bert": bert_folder(root / "bert"),
            "images": image_folder(root / "images", n_per_class=4), "rows": rows}


def test_check_reports_duplicates_and_conflicts_in_plain_words_and_writes_nothing(files):
    before = listing(files["root"])
    result = runner.invoke(app, ["check", str(files["dirty"])])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"{files['dirty']}: 38 texts, 3 classes" in out
    assert "exact duplicates: 2 extra copies of 2 texts" in out and "1 of them equal up to whitespace" in out
    assert "same example, different labels: 1" in out and "problems:" in out
    assert "1 text appears under different labels" in out
    assert listing(files["root"]) == before


def test_strict_exits_1_on_a_problem_and_0_on_clean_data(files):
    assert runner.invoke(app, ["check", str(files["dirty"]), "--strict"]).exit_code == 1
    clean = runner.invoke(app, ["check", str(files["clean"]), "--strict"])
    assert clean.exit_code == 0 and "no problems found" in clean.stdout
    named = runner.invoke(app, ["check", "--data", str(files["clean"]), "--strict"])  # as train names it
    assert named.exit_code == 0 and named.stdout == clean.stdout


def test_an_overlapping_test_file_is_flagged_loudly_and_counted(files):
    result = runner.invoke(app, ["check", str(files["clean"]), "--test", str(files["test"]), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["test"]["exact_overlap"]["count"] == 3 and report["test"]["examples"] == 12
    assert report["problems"][0].startswith("TEST LEAK: 3 of 12 test examples")
    text = runner.invoke(app, ["check", str(files["clean"]), "--test", str(files["test"])]).stdout
    assert "TEST LEAK" in text and "3 also in the data" in text


def test_labels_lists_suspects_with_the_given_and_suggested_label(files):
    rows = [dict(r) for r in files["rows"]]
    for r in rows[:3]:  # three flips
        r["label"] = {"sport": "money", "money": "tech", "tech": "sport"}[r["label"]]
    path = write_csv(files["root"] / "flipped.csv", rows)
    result = runner.invoke(app, ["check", str(path), "--labels", "--model", str(files["bert"]), "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)["labels"]
    assert found["checked"] == len(rows) and found["folds"] == 5
    assert all({"index", "where", "text", "given", "suggested", "score"} <= set(s) for s in found["suspects"])
    # named as the file's editor counts its lines (the header is line 1), as every other data message names a row
    assert all(s["where"] == f"line {s['index'] + 2}" for s in found["suspects"])
    text = runner.invoke(app, ["check", str(path), "--labels", "--model", str(files["bert"]), "--top", "2"]).stdout
    assert "suspect labels:" in text and "given" in text and "suggested" in text
    table = text[text.index("suspect labels:"):].splitlines()
    assert table[1].split()[0] == "where"
    assert [" ".join(line.split()[:2]) for line in table[2:4]] == [s["where"] for s in found["suspects"][:2]]
    # the problem line: review highest first; or, when far more are flagged than data is ever mislabelled, that
    # the encoder cannot tell the classes apart (a tiny random encoder here: its accuracy decides which)
    problem = next(p for p in json.loads(result.stdout)["problems"] if "suspect labels" in p)
    weak = found["fraction"] > 0.2
    assert ("does not tell these classes apart well" in problem) == weak
    assert ("review them, highest score first" in problem) == (not weak)
    # the model's vocabulary reads these texts: measured, and no problem raised
    assert json.loads(result.stdout)["vocabulary"]["reads"] is True
    assert "tokenizer does not read" not in text


def test_labels_says_first_when_the_models_vocabulary_does_not_read_the_texts(files, tmp_path):
    path = foreign_csv(write_csv(tmp_path / "plain.csv", files["rows"]), tmp_path / "foreign.csv")
    result = runner.invoke(app, ["check", str(path), "--labels", "--model", str(files["bert"]), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["vocabulary"]["reads"] is False
    assert report["problems"][0].startswith("the model's tokenizer does not read these texts")


def test_images_say_which_checks_do_not_apply(files):
    result = runner.invoke(app, ["check", str(files["images"])])
    assert result.exit_code == 0, result.output
    assert "not checked: near duplicates: images are compared by exact pixels only" in result.stdout
    assert "not checked: lengths" in result.stdout
    refused = one_line_error(runner.invoke(app, ["check", str(files["images"]), "--labels"]))
    assert "not applicable" in refused and "drop --labels" in refused


@pytest.mark.parametrize("args, message", [
    (["check", "nowhere.csv"], "nowhere.csv: no such file"),
    (["check", "{clean}", "--label-column", "topic"], "no label column 'topic'"),
    (["check", "{clean}", "--test", "missing.csv"], "missing.csv: no such file"),
    (["robustness", "{root}"], "not a run directory"),
    (["check"], "name the data once: graftune check FILE (or --data FILE)"),
    (["check", "{clean}", "--data", "{clean}"], "name the data once"),
], ids=["missing-data", "bad-column", "missing-test", "not-a-run", "no-data", "data-twice"])
def test_user_errors_are_one_line(files, args, message):
    args = [a.format(clean=files["clean"], root=files["root"]) for a in args]
    assert message in one_line_error(runner.invoke(app, args))


def test_robustness_prints_a_table_and_updates_metrics(files):
    run_dir = files["root"] / "run"
    trained = runner.invoke(app, ["train", "--model", str(files["bert"]), "--data", str(files["clean"]), "--out",
                                  str(run_dir), "--method", "probe", "--shots", "4", "--max-length", "32",
                                  "--precision", "fp32", "--quiet"])
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(app, ["robustness", str(run_dir), "--strengths", "0.1,0.3", "--budget", "2",
                                 "--attack-sample", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "accuracy under" in result.stdout and "char_noise" in result.stdout and "0.3" in result.stdout
    assert "greedy character attack" in result.stdout and "(robustness)" in result.stdout
    saved = json.loads((run_dir / "metrics.json").read_text())["robustness"]
    assert saved["strengths"] == [0.1, 0.3] and saved["attack"]["budget"] == 2
    bad = one_line_error(runner.invoke(app, ["robustness", str(run_dir), "--strengths", "0.1,lots"]))
    assert "--strengths" in bad
