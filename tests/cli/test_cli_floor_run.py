"""The run layer's floor (issue 12, parts 2 and 3) through the CLI: what ``--overwrite`` may replace, the smallest
data the defaults must accept, ``eval`` on a file with some of the run's classes and from another working
directory, ``--resume`` with nothing to resume, the early-stopping line of the summary, Ctrl-C during ``train``,
and the scoring progress bar. Each refusal is checked for its exit code, its one-line message, and that nothing
was written or deleted."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from graftune.cli import app
from graftune.run.checkpoint import checkpoint_file
from graftune.run.rundir import partial_dir
from tests.train_helpers import COMMON, TOPICS, bert_folder, one_line_error, topic_csv, topic_rows, write_csv

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
#: what scikit-learn says when a split cannot be made; it must never reach a user
SKLEARN_WORDING = ("test_size = ", "should be greater or equal", "train_size = ", "The least populated class")


def snapshot(root: Path) -> dict[str, int]:
    """Every file and folder under ``root`` (hidden ones too) with its size: what a refused command must leave."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")}


def no_sklearn_wording(text: str) -> None:
    assert not any(words in text for words in SKLEARN_WORDING), text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("floor-run")
    return {"bert": bert_folder(root / "bert"), "csv": topic_csv(root / "topics.csv"), "root": root}


def train_args(tiny, out: Path | str, *extra: str) -> list[str]:
    return ["train", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--out", str(out), "--epochs", "1",
            "--batch-size", "8", "--max-length", "32", "--precision", "fp32", "--quiet", *extra]


#: the recipes that write a run directory through the run writer, with the flags that make them fast
RECIPE_FLAGS = {
    "lora": ["--method", "lora", "--set", "r=2", "--epochs", "1", "--batch-size", "8"],
    "probe": ["--method", "probe", "--shots", "4"],  # probe trains nothing by gradient: no epochs, no batch size
    "contrastive": ["--method", "contrastive", "--shots", "4", "--set", "iterations=1", "--set", "epochs=1",
                    "--batch-size", "8"],
}


def recipe_args(tiny, out: Path | str, recipe: str, *extra: str) -> list[str]:
    return ["train", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--out", str(out), "--max-length",
            "32", "--precision", "fp32", "--quiet", *RECIPE_FLAGS[recipe], *extra]


# --- 1. --overwrite replaces only a graftune run directory ---------------------------------------------------------
@pytest.mark.parametrize("recipe", list(RECIPE_FLAGS))
def test_overwrite_refuses_an_unrelated_folder_and_a_file(tiny, tmp_path, recipe):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"not really a jpeg")
    (folder / "sub").mkdir()
    (folder / "sub" / "notes.txt").write_text("keep me")
    plain = tmp_path / "report.txt"
    plain.write_text("a user's file")
    before = snapshot(tmp_path)
    text = one_line_error(runner.invoke(app, recipe_args(tiny, folder, recipe, "--overwrite")))
    assert "not a graftune run directory" in text and "nothing was deleted" in text, text
    assert snapshot(tmp_path) == before  # no .photos.partial, nothing of the folder touched
    for flags in (["--overwrite"], []):
        text = one_line_error(runner.invoke(app, recipe_args(tiny, plain, recipe, *flags)))
        assert "is a file, not a folder" in text, text
        assert snapshot(tmp_path) == before and plain.read_text() == "a user's file"


@pytest.mark.parametrize("out", [".", "..", "./", "../.."])
def test_overwrite_refuses_the_current_directory_and_its_parents(tiny, tmp_path, monkeypatch, out):
    here = tmp_path / "a" / "b" / "c"
    here.mkdir(parents=True)
    (here / "mine.txt").write_text("x")
    (tmp_path / "a" / "other.txt").write_text("y")
    monkeypatch.chdir(here)
    before = snapshot(tmp_path)
    text = one_line_error(runner.invoke(app, train_args(tiny, out, "--overwrite")))
    assert "the current directory (or a folder above it) cannot be the run directory" in text, text
    assert snapshot(tmp_path) == before  # no ..partial, no ...partial


def test_overwrite_refuses_the_current_directory_named_by_its_path(tiny, tmp_path, monkeypatch):
    (tmp_path / "mine.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path.parent / tmp_path.name)
    one_line_error(runner.invoke(app, train_args(tiny, str(tmp_path), "--overwrite")))
    one_line_error(runner.invoke(app, train_args(tiny, str(tmp_path.parent), "--overwrite")))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("recipe", list(RECIPE_FLAGS))
def test_an_earlier_run_is_kept_without_overwrite_and_replaced_with_it(tiny, tmp_path, recipe):
    out = tmp_path / "run"
    result = runner.invoke(app, recipe_args(tiny, out, recipe))
    assert result.exit_code == 0, result.output
    (out / "marker.txt").write_text("written after the first run")
    before = snapshot(tmp_path)
    text = one_line_error(runner.invoke(app, recipe_args(tiny, out, recipe)))
    assert "already exists" in text and "--overwrite" in text, text
    assert snapshot(tmp_path) == before

    result = runner.invoke(app, recipe_args(tiny, out, recipe, "--overwrite", "--seed", "1"))
    assert result.exit_code == 0, result.output
    assert not (out / "marker.txt").exists() and (out / "run.yaml").is_file() and (out / "metrics.json").is_file()
    assert "seed: 1" in (out / "run.yaml").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no .run.partial, no .run.old-*


def test_overwrite_accepts_an_empty_folder(tiny, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    result = runner.invoke(app, train_args(tiny, out, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert (out / "run.yaml").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


# --- 2. small data works with the defaults ----------------------------------------------------------------------
def class_rows(n_classes: int, per_class: int, seed: int = 0) -> list[dict]:
    """``n_classes`` classes, each with its own words from the tiny vocabulary (one or two topic words of its own,
    mixed with common words), ``per_class`` examples each."""
    topic_words = [w for ws in TOPICS.values() for w in ws]
    rng = random.Random(seed)
    rows = []
    for k in range(n_classes):
        own = topic_words[k::n_classes] if n_classes <= len(topic_words) else [topic_words[k % len(topic_words)]]
        for _ in range(per_class):
            words = [rng.choice(own) if rng.random() < 0.6 else rng.choice(COMMON) for _ in range(rng.randint(3, 8))]
            rows.append({"text": " ".join(words), "label": f"class{k:02d}"})
    rng.shuffle(rows)
    return rows


def small_args(tiny, data: Path, out: Path, *extra: str) -> list[str]:
    """The defaults (no split flags), with the tiny model made fast."""
    return ["train", "--model", str(tiny["bert"]), "--data", str(data), "--out", str(out), "--epochs", "1",
            "--max-length", "32", "--precision", "fp32", *extra]


@pytest.mark.parametrize("n_classes", [3, 6, 17])
def test_eight_per_class_with_a_test_file_trains_with_the_defaults(tiny, tmp_path, n_classes):
    data = write_csv(tmp_path / "train.csv", class_rows(n_classes, 8))
    test = write_csv(tmp_path / "test.csv", class_rows(n_classes, 2, seed=1))
    out = tmp_path / "run"
    result = runner.invoke(app, small_args(tiny, data, out, "--test", str(test), "--quiet"))
    assert result.exit_code == 0, result.output
    no_sklearn_wording(result.output)
    assert "test: accuracy" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["examples"] == 2 * n_classes and len(metrics["per_class"]) == n_classes
    card = json.loads((out / "data_card.json").read_text())
    sizes = json.dumps(card)
    assert card and sizes  # the card is written
    assert metrics.get("notes", []) == []  # 8 per class leaves one per class for val: no note


@pytest.mark.parametrize(("per_class", "note"), [(8, False), (3, False), (2, True)])
def test_a_small_file_without_a_test_file_trains_and_notes_a_missing_val_part(tiny, tmp_path, per_class, note):
    data = write_csv(tmp_path / "train.csv", class_rows(3, per_class))
    out = tmp_path / "run"
    result = runner.invoke(app, small_args(tiny, data, out, "--quiet"))
    assert result.exit_code == 0, result.output
    no_sklearn_wording(result.output)
    notes = [line for line in result.stdout.splitlines() if line.startswith("note: ")]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["per_class"]) == 3
    if note:
        assert any("no validation part" in line for line in notes), result.stdout
        assert any("no validation part" in n for n in metrics["notes"])
    else:
        assert not any("no validation part" in line for line in notes), result.stdout


def test_method_auto_with_eight_per_class(tiny, tmp_path):
    data = write_csv(tmp_path / "train.csv", class_rows(3, 8))
    test = write_csv(tmp_path / "test.csv", class_rows(3, 2, seed=1))
    out = tmp_path / "auto"
    result = runner.invoke(app, small_args(tiny, data, out, "--test", str(test), "--method", "auto", "--budget", "60",
                                           "--quiet"))
    assert result.exit_code == 0, result.output
    no_sklearn_wording(result.output)
    assert "--method auto picked" in result.stdout and "test: accuracy" in result.stdout
    assert json.loads((out / "metrics.json").read_text())["method"] != "auto"
