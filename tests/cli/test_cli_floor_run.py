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


@pytest.mark.parametrize("recipe", list(RECIPE_FLAGS))
def test_overwrite_never_deletes_the_data_file_it_reads(tiny, tmp_path, recipe):
    """QA: a data file kept inside the old run folder was deleted with it by --overwrite (and the run then read
    it from nowhere). A folder that is not a run is not advised to use --overwrite either."""
    out = tmp_path / "run"
    assert runner.invoke(app, recipe_args(tiny, out, recipe)).exit_code == 0
    mine = out / "mydata.csv"
    mine.write_text(tiny["csv"].read_text())
    args = recipe_args(tiny, out, recipe, "--overwrite")
    args[args.index("--data") + 1] = str(mine)
    before = snapshot(tmp_path)
    text = one_line_error(runner.invoke(app, args))
    assert "--overwrite would delete" in text and "--data names inside" in text, text
    assert snapshot(tmp_path) == before
    from graftune.errors import ConfigError
    from graftune.run.rundir import check_out

    with pytest.raises(ConfigError, match="--init-from names inside"):  # the run folder itself, as a warm start
        check_out(out, overwrite=True, inputs={"--init-from": str(out), "--data": "bbc-news"})
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"x")
    text = one_line_error(runner.invoke(app, recipe_args(tiny, folder, recipe)))
    assert "already exists; choose another --out" in text and "pass --overwrite" not in text, text


@pytest.mark.parametrize("flags", [["--overwrite"], []], ids=["overwrite", "plain"])
@pytest.mark.parametrize("out", [".", "..", "./", "../.."])
def test_overwrite_refuses_the_current_directory_and_its_parents(tiny, tmp_path, monkeypatch, out, flags):
    here = tmp_path / "a" / "b" / "c"
    here.mkdir(parents=True)
    (here / "mine.txt").write_text("x")
    (tmp_path / "a" / "other.txt").write_text("y")
    monkeypatch.chdir(here)
    before = snapshot(tmp_path)
    text = one_line_error(runner.invoke(app, train_args(tiny, out, *flags)))
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
    rows, seen = [], set()
    for k in range(n_classes):
        own = topic_words[k::n_classes]
        while len(rows) < (k + 1) * per_class:  # distinct texts: loading drops duplicates
            words = [rng.choice(own) if rng.random() < 0.6 else rng.choice(COMMON) for _ in range(rng.randint(3, 8))]
            if " ".join(words) not in seen:
                seen.add(" ".join(words))
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
    splits = json.loads((out / "data_card.json").read_text())["splits"]
    names = {f"class{k:02d}" for k in range(n_classes)}
    assert set(splits["val"]["counts"]) == set(splits["train"]["counts"]) == names  # every class on both sides
    assert splits["train"]["examples"] + splits["val"]["examples"] == 8 * n_classes
    assert metrics.get("notes", []) == []  # 8 per class leaves one per class for val: no note


@pytest.mark.parametrize(("n_classes", "per_class", "note"), [(3, 8, False), (3, 3, False), (3, 2, True),
                                                              (17, 2, True)])
def test_a_small_file_without_a_test_file_trains_and_notes_a_missing_val_part(tiny, tmp_path, n_classes, per_class,
                                                                              note):
    data = write_csv(tmp_path / "train.csv", class_rows(n_classes, per_class))
    out = tmp_path / "run"
    result = runner.invoke(app, small_args(tiny, data, out, "--quiet"))
    assert result.exit_code == 0, result.output
    no_sklearn_wording(result.output)
    notes = [line for line in result.stdout.splitlines() if line.startswith("note: ")]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["per_class"]) == n_classes
    if note:
        assert any("no validation part" in line for line in notes), result.stdout
        assert any("no validation part" in n for n in metrics["notes"])
    else:
        assert not any("no validation part" in line for line in notes), result.stdout


@pytest.mark.parametrize("method", ["head", "lora"])
def test_one_training_example_per_class_trains_with_the_frozen_prefix_cache(tiny, tmp_path, method):
    """3 per class without --test leaves one per class each for train, val and test: fewer training examples than
    the cache's check batch, which once mixed labelled train and unlabelled val examples in one batch (what
    --method auto picks, head, crashed there)."""
    data = write_csv(tmp_path / "train.csv", class_rows(3, 3))
    out = tmp_path / "run"
    result = runner.invoke(app, small_args(tiny, data, out, "--method", method, "--cache", "auto", "--quiet"))
    assert result.exit_code == 0, result.output
    splits = json.loads((out / "data_card.json").read_text())["splits"]
    assert splits["train"]["examples"] == splits["val"]["examples"] == 3


@pytest.mark.slow
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


# --- 3. eval on a file with some of the run's classes, and from another working directory ----------------------
@pytest.fixture(scope="module")
def relative_run(tiny, tmp_path_factory):
    """A run trained from its data's folder with relative paths (model, data, test), as a new user types them."""
    root = tmp_path_factory.mktemp("relative")
    write_csv(root / "train.csv", class_rows(3, 12))
    write_csv(root / "test.csv", class_rows(3, 4, seed=1))
    os.symlink(tiny["bert"], root / "bert")
    here = Path.cwd()
    os.chdir(root)
    try:
        result = runner.invoke(app, ["train", "--model", "bert", "--data", "train.csv", "--test", "test.csv",
                                     "--out", "runs/first", "--epochs", "2", "--batch-size", "8", "--max-length",
                                     "32", "--precision", "fp32", "--quiet", "--set", "r=2"])
    finally:
        os.chdir(here)
    assert result.exit_code == 0, result.output
    return root / "runs" / "first"


def test_run_yaml_holds_absolute_local_paths(relative_run):
    saved = (relative_run / "run.yaml").read_text()
    root = relative_run.parent.parent
    for name in ("model", "data", "test"):
        line = next(line for line in saved.splitlines() if line.startswith(f"{name}:"))
        assert Path(line.split(":", 1)[1].strip().strip("'\"")).is_absolute(), line
    assert str(root / "train.csv") in saved and str(root / "test.csv") in saved


def test_eval_works_from_another_working_directory(relative_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["eval", str(relative_run), "--json"])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    metrics = json.loads((relative_run / "metrics.json").read_text())
    assert scored["accuracy"] == metrics["accuracy"] and scored["per_class"] == metrics["per_class"]
    assert list(tmp_path.iterdir()) == []  # eval writes nothing where it runs
    result = runner.invoke(app, ["eval", os.path.relpath(relative_run, tmp_path)])  # a relative RUN too
    assert result.exit_code == 0 and "macro-F1" in result.stdout, result.output


@pytest.mark.parametrize("kept", [["class00", "class02"], ["class01"]], ids=["two-of-three", "one-of-three"])
def test_eval_scores_a_file_with_some_of_the_runs_classes(relative_run, tmp_path, kept):
    rows = [r for r in class_rows(3, 5, seed=2) if r["label"] in kept]
    data = write_csv(tmp_path / "some.csv", rows)
    before = snapshot(relative_run)
    result = runner.invoke(app, ["eval", str(relative_run), "--data", str(data), "--json"])
    assert result.exit_code == 0, result.output
    assert "Warning" not in result.output and "ill-defined" not in result.output, result.output
    scored = json.loads(result.stdout)
    assert set(scored["per_class"]) == {"class00", "class01", "class02"}  # the run's label set
    for name, row in scored["per_class"].items():
        assert row["support"] == (5 if name in kept else 0), (name, row)
    assert len(scored["confusion_matrix"]) == 3 and sum(map(sum, scored["confusion_matrix"])) == len(rows)
    assert 0.0 <= scored["accuracy"] <= 1.0 and 0.0 <= scored["macro_f1"] <= 1.0
    text = runner.invoke(app, ["eval", str(relative_run), "--data", str(data)])
    assert text.exit_code == 0 and "macro-F1" in text.stdout and "Warning" not in text.output, text.output
    assert snapshot(relative_run) == before


@pytest.fixture(scope="module")
def fewshot_runs(tiny):
    """A probe and a contrastive run on the topic csv (sport, money, tech): they score through their own head."""
    runs = {}
    for recipe in ("probe", "contrastive"):
        out = tiny["root"] / f"fewshot-{recipe}"
        result = runner.invoke(app, recipe_args(tiny, out, recipe))
        assert result.exit_code == 0, result.output
        runs[recipe] = out
    return runs


@pytest.mark.parametrize("recipe", ["probe", "contrastive"])
@pytest.mark.parametrize("kept", [["money", "tech"], ["sport"]], ids=["two-of-three", "one-of-three"])
def test_eval_of_a_fewshot_run_scores_a_file_with_some_of_its_classes(fewshot_runs, tmp_path, recipe, kept):
    rows = [r for r in topic_rows(4, seed=3) if r["label"] in kept]
    data = write_csv(tmp_path / "some.csv", rows)
    before = snapshot(fewshot_runs[recipe])
    result = runner.invoke(app, ["eval", str(fewshot_runs[recipe]), "--data", str(data), "--json"])
    assert result.exit_code == 0, result.output
    assert "Warning" not in result.output, result.output
    scored = json.loads(result.stdout)
    assert {name: row["support"] for name, row in scored["per_class"].items()} == {
        name: (4 if name in kept else 0) for name in ("money", "sport", "tech")}
    assert sum(map(sum, scored["confusion_matrix"])) == len(rows)
    assert snapshot(fewshot_runs[recipe]) == before


def test_eval_refuses_a_file_with_a_class_the_run_never_saw(relative_run, tmp_path):
    data = write_csv(tmp_path / "new.csv", [{"text": "goal match", "label": "class00"},
                                            {"text": "bank price", "label": "weather"}])
    text = one_line_error(runner.invoke(app, ["eval", str(relative_run), "--data", str(data)]))
    assert "weather" in text, text


# --- 4. --resume with nothing to resume ----------------------------------------------------------------------------
def test_resume_with_nothing_to_resume_says_so_in_plain_words(tiny, tmp_path):
    out = tmp_path / "never"
    text = one_line_error(runner.invoke(app, train_args(tiny, out, "--resume")))
    assert f"there is no interrupted run to continue in {out}" in text and "--config" not in text, text
    text = one_line_error(runner.invoke(app, ["train", "--out", str(out), "--resume"]))  # the bare form
    assert f"there is no interrupted run to continue in {out}" in text and "--config" not in text, text
    assert list(tmp_path.iterdir()) == []


def test_resume_on_a_complete_run_says_it_is_complete(tiny, tmp_path):
    out = tmp_path / "done"
    assert runner.invoke(app, train_args(tiny, out)).exit_code == 0
    before = snapshot(tmp_path)
    for args in (["train", "--out", str(out), "--resume"], train_args(tiny, out, "--resume")):
        text = one_line_error(runner.invoke(app, args))
        assert "no interrupted run" in text and "complete" in text and "--config" not in text, text
    assert snapshot(tmp_path) == before


# --- 5. the summary says when early stopping ended the run --------------------------------------------------------
def test_summary_says_early_stopping_ended_the_run_and_which_epoch_was_restored(tiny, tmp_path):
    out = tmp_path / "stopped"
    args = train_args(tiny, out, "--epochs", "6", "--patience", "1", "--lr", "3", "--head-lr", "3", "--metric",
                      "loss", "--warmup", "0", "--schedule", "constant")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped_early"], metrics  # a lr this high makes val loss worse within a few epochs
    assert metrics["epochs_run"] < 6 and metrics["best_epoch"] < metrics["epochs_run"]
    line = next(line for line in result.stdout.splitlines() if line.startswith("early stopping"))
    assert line == (f"early stopping ended the run after epoch {metrics['epochs_run']} of 6; the best epoch on val, "
                    f"{metrics['best_epoch']}, was restored"), line


def test_summary_has_no_early_stopping_line_when_every_epoch_ran(tiny, tmp_path):
    result = runner.invoke(app, train_args(tiny, tmp_path / "all", "--epochs", "2", "--patience", "0"))
    assert result.exit_code == 0, result.output
    assert not json.loads((tmp_path / "all" / "metrics.json").read_text()).get("stopped_early")
    assert "early stopping" not in result.stdout


# --- 7. scoring after training shows a progress bar ------------------------------------------------------------------
def test_scoring_after_training_shows_a_testing_bar_unless_quiet(tiny, tmp_path):
    args = train_args(tiny, tmp_path / "loud")
    args.remove("--quiet")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "testing" in result.stderr, result.stderr
    quiet = runner.invoke(app, train_args(tiny, tmp_path / "quiet"))
    assert quiet.exit_code == 0 and "testing" not in quiet.stderr, quiet.stderr


# --- 6. Ctrl-C during train ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_during_train_prints_the_resume_command_and_resume_finishes(tiny, tmp_path):
    """A real SIGINT to a real process (the CLI's handler, not a simulated exception), sent once the first epoch's
    checkpoint exists; the checks after it run in-process (a fresh interpreter costs tens of seconds here)."""
    out = tmp_path / "slow"
    data = topic_csv(tmp_path / "many.csv", n_per_class=60)
    # 30 epochs (about 9 s): the SIGINT must land while training, even when a loaded machine wakes this poll late
    args = ["train", "--model", str(tiny["bert"]), "--data", str(data), "--out", str(out), "--epochs", "30",
            "--batch-size", "4", "--max-length", "32", "--precision", "fp32", "--patience", "0", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    # SIGINT's default action in the child: a suite started in the background by a shell without job control (nohup
    # ... &) runs with SIGINT ignored, which children inherit, and Python then never raises KeyboardInterrupt. A
    # handled signal is reset to its default at exec, so the child starts while this process handles SIGINT
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "graftune", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)
    checkpoint = checkpoint_file(partial_dir(out))
    deadline = time.monotonic() + 300
    while not checkpoint.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert checkpoint.is_file() and proc.poll() is None, ("no checkpoint while training", proc.poll())
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, stdout, stderr)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == [f"interrupted; continue with: graftune train --resume --out {out}"], stderr
    assert not out.exists() and checkpoint.is_file()

    before = snapshot(tmp_path)
    text = one_line_error(runner.invoke(app, ["train", "--resume", "--out", str(out), "--epochs", "31"]))
    assert "epochs differs (saved 30, given 31)" in text, text  # --resume continues the saved run only
    assert snapshot(tmp_path) == before
    result = runner.invoke(app, ["train", "--resume", "--out", str(out), "--quiet", "--json"])  # the printed command
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 30 and json.loads(result.stdout)["epochs_run"] == 30
    assert not partial_dir(out).exists()
    events = [json.loads(line)["event"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert "resume" in events  # it continued the interrupted run rather than starting afresh


def test_ctrl_c_during_auto_s_comparison_is_one_line_and_leaves_nothing(tiny, tmp_path, monkeypatch):
    from graftune.strategies import auto

    def interrupted(cfg, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(auto, "resolve", interrupted)
    result = runner.invoke(app, train_args(tiny, tmp_path / "auto", "--method", "auto", "--budget", "30"))
    assert result.exit_code == 130 and "Traceback" not in result.output, result.output
    assert result.stderr.strip() == "interrupted before the first checkpoint; nothing was written", result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_resume_command_quotes_an_out_with_spaces(tiny, tmp_path, monkeypatch):
    """The printed command is pasted into a shell: a folder name with a space must stay one argument."""
    import shlex

    from graftune import runs

    out = tmp_path / "my runs" / "first try"

    def interrupted_after_a_checkpoint(cfg, **kwargs):
        checkpoint_file(partial_dir(out)).parent.mkdir(parents=True)
        checkpoint_file(partial_dir(out)).write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "train", interrupted_after_a_checkpoint)
    result = runner.invoke(app, train_args(tiny, out))
    assert result.exit_code == 130, result.output
    line = result.stderr.strip()
    assert line == f"interrupted; continue with: graftune train --resume --out {shlex.quote(str(out))}", line
    assert shlex.split(line.split(": ", 1)[1])[-1] == str(out)


@pytest.mark.parametrize("kind", ["file", "folder", "symlink"])
def test_something_else_where_the_run_is_assembled_is_refused_not_deleted(tiny, tmp_path, kind):
    out = tmp_path / "run"
    work = partial_dir(out)
    if kind == "file":
        work.write_text("a user's file")
    elif kind == "folder":
        work.mkdir()
        (work / "diary.txt").write_text("a user's folder")
    else:
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "keep.txt").write_text("x")
        work.symlink_to(tmp_path / "elsewhere")
    before = snapshot(tmp_path)
    text = one_line_error(runner.invoke(app, train_args(tiny, out)))
    assert "is in the way" in text and "nothing was changed" in text, text
    assert snapshot(tmp_path) == before


def test_an_abandoned_interrupted_run_is_replaced_by_a_fresh_start(tiny, tmp_path):
    out = tmp_path / "run"
    work = partial_dir(out)
    work.mkdir()
    (work / "run.yaml").write_text("epochs: 99\n")
    result = runner.invoke(app, train_args(tiny, out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and "epochs: 1" in (out / "run.yaml").read_text()


def test_a_refused_overwrite_of_a_run_leaves_the_earlier_run_intact(tiny, tmp_path):
    """--overwrite replaces the earlier run only once the new one is complete: a run that fails on its data
    leaves the earlier run as it was."""
    out = tmp_path / "run"
    assert runner.invoke(app, train_args(tiny, out)).exit_code == 0
    before = snapshot(tmp_path)
    text = one_line_error(runner.invoke(app, train_args(tiny, out, "--overwrite", "--label-column", "topic")))
    assert "label column 'topic'" in text, text
    assert snapshot(tmp_path) == before


def test_an_out_inside_a_file_is_one_line(tiny, tmp_path):
    (tmp_path / "report.txt").write_text("a user's file")
    before = snapshot(tmp_path)
    text = one_line_error(runner.invoke(app, train_args(tiny, tmp_path / "report.txt" / "run")))
    assert "cannot create the run directory there" in text, text
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("case", "shape", "flags", "message"), [
    ("one per class", (2, 1), [], "too few examples to hold one out for a test set; add examples or pass a separate"),
    ("test_size 0", (3, 8), ["--test-size", "0"], "test_size 0 leaves no test set"),
    ("test_size all", (3, 8), ["--test-size", "24"], "test_size asks for 24 of the 24 examples left"),
    ("val_size all", (3, 8), ["--val-size", "19"], "val_size asks for 19 of the 19 examples left"),
], ids=["one-per-class", "test-size-0", "test-size-all", "val-size-all"])
def test_splits_that_cannot_be_made_are_one_line_and_write_nothing(tiny, tmp_path, case, shape, flags, message):
    """Data too small for any test set, and sizes that leave nothing to train on: one line naming the fix (once a
    test set rounded to nothing and training crashed scoring it; once a count was silently shrunk)."""
    data = write_csv(tmp_path / "train.csv", class_rows(*shape))  # two examples: 20% of them rounds to none
    before = snapshot(tmp_path)
    text = one_line_error(runner.invoke(app, small_args(tiny, data, tmp_path / "run", "--quiet", *flags)))
    assert message in text, text
    no_sklearn_wording(text)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("method", [[], ["--method", "probe"]], ids=["default", "probe"])
def test_a_budget_no_method_reads_is_refused(tiny, tmp_path, method):
    # QA: `train --method probe --budget 5` ran and recorded auto_budget 5 in run.yaml, as if it meant something
    text = one_line_error(runner.invoke(app, train_args(tiny, tmp_path / "run", *method, "--budget", "5")))
    assert "--budget bounds --method auto's comparison" in text and not (tmp_path / "run").exists(), text
