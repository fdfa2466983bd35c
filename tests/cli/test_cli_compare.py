"""`graftune compare` and `graftune train --method auto` on a tiny random BERT and a synthetic 3-topic csv: the
progress lines, the summary, the recommendation, the files, the pick and its evidence; bad input is one line and
exit 2 (also in a real process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from graftune.cli import app
from graftune.config import RunConfig
from graftune.errors import ConfigError
from graftune.strategies import auto, catalog, summary
from tests.train_helpers import (
    bert_folder,
    foreign_csv,
    scripted_predictions,
    topic_csv,
    topic_rows,
    train_args,
    write_csv,
)

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-compare")
    return {"bert": str(bert_folder(root / "bert")), "csv": str(topic_csv(root / "topics.csv", n_per_class=24)),
            "root": root}


def compare_args(tiny, out, *extra):
    return ["compare", "--model", tiny["bert"], "--data", tiny["csv"], "--out", str(out), "--seeds", "1",
            "--set", "max_length=32", "--set", "epochs=1", "--set", "precision=fp32", *extra]


def test_compare_prints_progress_summary_recommendation_and_paths(tiny, tmp_path):
    out = tmp_path / "cmp"
    result = runner.invoke(app, compare_args(tiny, out, "--shots", "2,4", "--strategies",
                                             "linear-probe,prototypes,ia3", "--augment", "both"))
    assert result.exit_code == 0, result.output
    text = result.stdout
    # one progress line per run, as it ends
    for name in ("linear-probe", "prototypes", "ia3"):
        for k in (2, 4):
            for aug in (False, True):
                assert f"[compare] {name} shots={k} seed=0 aug={aug}: accuracy " in text
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["rows"]) == 3 * 2 * 2 and all("accuracy" in r for r in saved["rows"])
    # the summary table shows every (shots, strategy, augment) with the numbers of results.json
    assert "shots  strategy" in text and "ia3 + aug" in text
    ia3 = next(r for r in saved["rows"] if (r["strategy"], r["shots"], r["augment"]) == ("ia3", 4, False))
    assert any(line.split()[:2] == ["4", "ia3"] and f"{ia3['accuracy']:.3f}" in line for line in text.splitlines())
    assert "With 2 examples per class" in text and "With 4 examples per class" in text
    # every accuracy claim carries the test set's size, and says it rests on one seed (--seeds 1)
    n_test = saved["rows"][0]["test_examples"]
    assert f"accuracy and macro-F1 on {n_test} test examples: one example is {100 / n_test:.1f} points" in text
    claims = [line for line in text.splitlines() if line.startswith("With ")]
    assert len(claims) == 2
    for line in claims:
        assert f"of {n_test} test examples" in line or f"on {n_test} test examples" in line, line
        assert ", on a single seed" in line, line
    assert f"results: {out / 'results.json'}" in text and f"report:  {out / 'report.html'}" in text
    assert (out / "report.html").is_file()


def test_compare_budget_skips_and_says_so(tiny, tmp_path):
    result = runner.invoke(app, compare_args(tiny, tmp_path / "b", "--shots", "2", "--seeds", "3", "--strategies",
                                             "prototypes", "--augment", "off", "--budget", "0.001"))
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "b" / "results.json").read_text())["rows"]
    assert "accuracy" in rows[0] and all("skipped" in r for r in rows[1:])  # the first run is the measurement
    assert "would exceed budget" in result.stdout
    assert "2 run(s) skipped for the budget: prototypes shots=2 seed=1, prototypes shots=2 seed=2" in result.stdout


@pytest.mark.parametrize("case, changes, message", [
    ("unknown strategy", ["--strategies", "lora,magic"], "strategies: unknown magic"),
    ("bad shots list", ["--shots", "8,x"], "--shots '8,x'"),
    ("zero shots", ["--shots", "0"], "--shots '0'"),
    ("no seeds", ["--seeds", "0"], "seeds: use at least one seed"),
    ("bad augment", ["--augment", "sometimes"], "--augment 'sometimes'"),
    ("missing data", ["--data", "nope/missing.csv"], "no such file"),
    ("unknown setting", ["--set", "rank=4"], "--set rank: not a setting of a comparison's strategies; use some"),
    # causal-LM settings no strategy of a comparison uses are not offered, nor taken
    ("generation setting", ["--set", "max_new_tokens=8"], "--set max_new_tokens: not a setting"),
    ("bad setting value", ["--set", "epochs=0"], "epochs"),
    ("zero budget", ["--budget", "0"], "--budget 0: use a positive number of seconds"),
    ("negative budget", ["--budget", "-5"], "--budget -5: use a positive number of seconds"),
    ("too few examples for the shots and the test set", ["--test-per-class", "20", "--shots", "8"],
     "fewer than shots=8 training examples"),
])
def test_compare_bad_input_is_one_line(tiny, tmp_path, case, changes, message):
    out = tmp_path / "bad"
    args = compare_args(tiny, out, "--shots", "2")
    for flag, value in zip(changes[::2], changes[1::2]):
        if flag in args and flag != "--set":
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert text.startswith("error: ") and len(text.splitlines()) == 1 and "Traceback" not in text, text
    assert message in text, text
    assert not out.exists()


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_compare_refuses_an_existing_folder_and_overwrite_replaces_only_a_comparison(tiny, tmp_path, monkeypatch):
    args = ["--shots", "2", "--strategies", "prototypes", "--augment", "off", "--quiet"]
    # a folder that exists: refused without --overwrite, nothing touched
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    result = runner.invoke(app, compare_args(tiny, taken, *args))
    assert result.exit_code == 2 and "already exists; choose another --out" in result.output
    assert "which --overwrite would not replace either" in result.output  # not advised: it would be refused
    # --overwrite never replaces a folder compare did not write: a train run directory, any other folder
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.yaml").write_text("model: x\n")
    plain_file = tmp_path / "file.txt"
    plain_file.write_text("keep")
    before = _tree(tmp_path)
    for out, message in ((taken, "is not a graftune comparison folder"), (run_dir, "is not a graftune comparison"),
                         (plain_file, "is a file, not a folder")):
        result = runner.invoke(app, compare_args(tiny, out, *args, "--overwrite"))
        assert result.exit_code == 2, result.output
        text = result.output.strip()
        assert text.startswith("error: ") and len(text.splitlines()) == 1 and message in text, text
    # nor the current directory or a folder above it
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for out in (".", "..", str(tmp_path)):
        result = runner.invoke(app, compare_args(tiny, out, *args, "--overwrite"))
        assert result.exit_code == 2 and "cannot be the comparison folder" in result.output, result.output
    monkeypatch.chdir(tmp_path)
    assert _tree(tmp_path) == {**before, "a": None, "a/b": None}  # nothing written, nothing deleted

    # an earlier comparison is replaced with --overwrite (and only then); an empty folder is fine too
    cmp = tmp_path / "cmp"
    assert runner.invoke(app, compare_args(tiny, cmp, *args)).exit_code == 0
    first = json.loads((cmp / "results.json").read_text())
    assert runner.invoke(app, compare_args(tiny, cmp, *args)).exit_code == 2
    result = runner.invoke(app, compare_args(tiny, cmp, "--shots", "4", *args[2:], "--overwrite"))
    assert result.exit_code == 0, result.output
    second = json.loads((cmp / "results.json").read_text())
    assert [r["shots"] for r in first["rows"]] == [2] and [r["shots"] for r in second["rows"]] == [4]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert runner.invoke(app, compare_args(tiny, empty, *args, "--overwrite")).exit_code == 0
    assert (empty / "report.html").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no assembly left behind


def test_compare_bad_input_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "graftune", "compare", "--model", "minilm", "--data",
                           str(tmp_path / "missing.csv"), "--shots", "8,16", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "missing.csv" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


# --- train --method auto ------------------------------------------------------------------------------------------
def test_train_method_auto_picks_says_why_records_and_trains_it(tiny, tmp_path):
    out = tmp_path / "auto"
    result = runner.invoke(app, ["train", "--model", tiny["bert"], "--data", tiny["csv"], "--out", str(out),
                                 "--method", "auto", "--budget", "120", "--shots", "4", "--epochs", "1",
                                 "--max-length", "32", "--precision", "fp32", "--quiet"])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "run.yaml").read_text())
    record = saved["auto"]
    picked = saved["method"]
    assert picked == record["method"] and picked in ("head", "lora")
    # says which and why, with the evidence numbers of every candidate that ran; contrastive would not honour
    # --epochs, nor would a probe run: so the frozen baseline is the task head, prototypes and contrastive are
    # left out, and the reason says so
    assert f"--method auto picked {picked}." in result.stdout
    assert set(record["candidates"]) == {"head", "lora"}
    assert "contrastive (your --epochs would not apply to it)" in result.stdout
    for name, c in record["candidates"].items():
        assert f"{name} {c['macro_f1']:.3f}" in result.stdout
    best = max(c["macro_f1"] for c in record["candidates"].values())
    assert record["candidates"][picked]["macro_f1"] >= best - summary.WITHIN - 1e-9
    assert record["training_examples"] == 12 and record["held_out_per_fold"] == 3  # 4 folds of 12
    # trained that method; metrics.json carries the record too
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    assert meta["method"] == picked
    assert json.loads((out / "metrics.json").read_text())["auto"] == record
    # run.yaml repeats the run with the picked method (no new comparison)
    assert RunConfig(**saved).method == picked


class Scripted:
    """A fake train(): the share of held-out examples each method gets right is given; nothing else decides."""

    def __init__(self, scores):
        self.scores = scores

    def __call__(self, cfg, *, progress=True, splits=None):
        rate = self.scores[cfg.method]
        return {"accuracy": rate, "macro_f1": rate, "trainable_params": 100, "train_seconds": 0.0,
                "predicted": scripted_predictions(splits.test.labels, splits.test.label_names, rate)}


def scripted_contrastive(rate):
    """A fake contrastive candidate, right on the share ``rate`` of its held-out examples."""
    def run(strategy, model, splits, seed, settings):
        return {"accuracy": rate, "macro_f1": rate, "trainable_params": 100, "train_seconds": 0.0,
                "predicted": scripted_predictions(splits.test.labels, splits.test.label_names, rate)}
    return run


def low_frozen_scores(x, labels, fit, val, label_names, head):
    """The frozen candidates' folds, scripted low (right on none): the trained candidates' evidence decides."""
    return {"accuracy": 0.0, "macro_f1": 0.0, "trainable_params": 0 if head == "prototype" else 99, "seconds": 0.0,
            "predicted": scripted_predictions(list(labels[val]), label_names, 0.0)}


@pytest.mark.parametrize("scores, expected", [({"lora": 1.0, "contrastive": 0.0}, "lora"),
                                              ({"lora": 0.0, "contrastive": 1.0}, "contrastive")])
def test_auto_follows_the_measured_evidence(tiny, tmp_path, monkeypatch, scores, expected):
    monkeypatch.setattr(auto, "run_contrastive", scripted_contrastive(scores["contrastive"]))
    monkeypatch.setattr(auto, "fit_head", low_frozen_scores)
    args = train_args(tiny["bert"], tiny["csv"], tmp_path / "r", method="auto", shots=8)
    args.pop("epochs", None)  # a loop setting would leave contrastive out (its own test below)
    cfg = RunConfig(**args)
    resolved = auto.resolve(cfg, progress=False, train_fn=Scripted(scores))
    assert resolved.method == expected and resolved.auto["method"] == expected
    assert resolved.auto["candidates"][expected]["accuracy"] == pytest.approx(scores[expected])
    if expected == "contrastive":  # trained with its own defaults, as it was scored; the config is valid
        assert resolved.options == {} and resolved.lr == 5e-3
        return
    assert resolved.options == catalog.STRATEGIES[expected].options
    # a learning rate set away from the default is the user's and is kept; the others are the scored ones
    assert resolved.lr == 5e-3
    assert resolved.head_lr == catalog.TRAIN_DEFAULTS["head_lr"]


def test_auto_can_pick_and_train_contrastive_end_to_end(tiny, tmp_path, monkeypatch):
    """When contrastive scores best, `train --method auto` trains a real contrastive run (head/ saved, the auto
    record in metrics.json), with no loop settings of its own."""
    monkeypatch.setattr(auto, "run_contrastive", scripted_contrastive(1.0))
    monkeypatch.setattr(auto, "fit_head", low_frozen_scores)  # the frozen candidates cannot tie at 1.0
    out = tmp_path / "auto-c"
    result = runner.invoke(app, ["train", "--model", tiny["bert"], "--data", tiny["csv"], "--out", str(out),
                                 "--method", "auto", "--budget", "120", "--shots", "4", "--max-length", "32",
                                 "--precision", "fp32", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "--method auto picked contrastive." in result.stdout
    saved = yaml.safe_load((out / "run.yaml").read_text())
    assert saved["method"] == "contrastive" and saved["auto"]["method"] == "contrastive"
    assert (out / "head" / "head.safetensors").is_file()
    assert json.loads((out / "metrics.json").read_text())["auto"] == saved["auto"]


def test_auto_refuses_what_it_cannot_honour(tiny, tmp_path):
    base = train_args(tiny["bert"], tiny["csv"], tmp_path / "r", method="auto")
    with pytest.raises(ConfigError, match="need a named method"):
        RunConfig(**base, options={"r": 4})
    with pytest.raises(ConfigError, match="name the method"):
        RunConfig(**base, init_from=str(tmp_path))
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="already exists"):  # before spending the budget
        auto.resolve(RunConfig(**{**base, "out": str(tmp_path / "taken")}), progress=False)


def test_auto_scores_text_baseline_as_a_probe_run_and_can_pick_it(tiny, tmp_path, monkeypatch):
    """For text with no settings a probe run would ignore, auto's baseline candidate is `probe` (whole-text
    embeddings + logistic regression, compare's linear-probe), and a picked probe resolves to a valid probe
    config; with such a setting (--lr) it stays `head`."""
    monkeypatch.setattr(auto, "run_contrastive", scripted_contrastive(0.0))
    args = train_args(tiny["bert"], tiny["csv"], tmp_path / "r", method="auto", shots=8)
    for key in ("epochs", "lr", "batch_size"):
        args.pop(key)
    resolved = auto.resolve(RunConfig(**args), progress=False, train_fn=Scripted({"lora": 0.0}))
    assert set(resolved.auto["candidates"]) == {"probe", "prototypes", "lora", "contrastive"}
    # a picked probe or prototypes is a valid probe run config (prototypes: the class-mean head)
    assert resolved.method == "probe" and resolved.options in ({}, {"head": "prototype"})
    with_lr = auto.resolve(RunConfig(**args, lr=5e-3), progress=False, train_fn=Scripted({"lora": 0.0}))
    assert "head" in with_lr.auto["candidates"] and "probe" not in with_lr.auto["candidates"]
    assert "prototypes (a probe run would not honour your settings)" in with_lr.auto["reason"]


def test_compare_warns_first_when_the_models_vocabulary_does_not_read_the_texts(tiny, tmp_path):
    # two words per text that the tiny word-level vocabulary lacks: the comparison runs, its first line is the
    # warning, results.json and the report carry it; the same data without them has no warning
    data = foreign_csv(tiny["csv"], tmp_path / "foreign.csv")
    out = tmp_path / "foreign"
    args = compare_args(tiny, out, "--shots", "2", "--strategies", "prototypes", "--augment", "off", "--quiet")
    args[args.index("--data") + 1] = str(data)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("WARNING: the model's tokenizer does not read these texts")
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["warnings"][0].startswith("the model's tokenizer does not read these texts")
    assert "WARNING: the model&#x27;s tokenizer does not read these texts" in (out / "report.html").read_text()
    clean = tmp_path / "clean"
    result = runner.invoke(app, compare_args(tiny, clean, "--shots", "2", "--strategies", "prototypes", "--augment",
                                             "off", "--quiet"))
    assert result.exit_code == 0 and "WARNING" not in result.stdout
    assert "warnings" not in json.loads((clean / "results.json").read_text())["meta"]


def test_compare_without_shots_keeps_the_counts_the_data_has_room_for(tiny, tmp_path):
    """A file of 12 examples a class: the default 8, 16, 64 become 8 (16 and 64 would leave no test set), said in a
    note line; 8 a class (room for 6 beside a test set of 2) still gets a comparison, at 6."""
    small = topic_csv(tmp_path / "small.csv", n_per_class=12)
    args = ["compare", "--model", tiny["bert"], "--data", str(small), "--seeds", "1", "--augment", "off",
            "--strategies", "linear-probe", "--set", "max_length=32", "--quiet"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "note: shots 16, 64 skipped: the smallest class (" in result.stdout and "12 examples" in result.stdout
    rows = json.loads((tmp_path / "a" / "results.json").read_text())["rows"]
    assert {r["shots"] for r in rows} == {8}
    tiny8 = topic_csv(tmp_path / "tiny8.csv", n_per_class=8)
    args[args.index(str(small))] = str(tiny8)
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "comparing at 6 (--shots to choose)" in result.stdout
    assert {r["shots"] for r in json.loads((tmp_path / "b" / "results.json").read_text())["rows"]} == {6}


def test_compare_runs_on_a_class_of_two_examples_as_train_does_and_warns(tiny, tmp_path):
    """8, 8 and 2 examples a class: train splits the small class 1 to train on, 1 to test; compare does the same
    (1 shot, a test set of 1 a class: every class gets the same) instead of refusing, and says so in one line."""
    rows = [r for r in topic_rows(8) if r["label"] != "money"] + [r for r in topic_rows(8) if r["label"] == "money"][:2]
    small = write_csv(tmp_path / "two.csv", rows)
    args = ["compare", "--model", tiny["bert"], "--data", str(small), "--seeds", "1", "--augment", "off",
            "--strategies", "linear-probe", "--set", "max_length=32", "--quiet", "--out", str(tmp_path / "c")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    warning = ("WARNING: the test set holds 1 example a class (3 in all): the smallest class (money, 2 examples) has "
               "room for no more beside 1 training example; 3 test examples cannot tell strategies apart: add "
               "examples or pass --test FILE")
    assert warning in result.stdout.splitlines()
    saved = json.loads((tmp_path / "c" / "results.json").read_text())
    assert [(r["shots"], r["test_examples"]) for r in saved["rows"]] == [(1, 3)] and "accuracy" in saved["rows"][0]
    assert saved["meta"]["warnings"] == [warning.removeprefix("WARNING: ")]
    # a shot count the small class has no room for is still refused in one line
    refused = runner.invoke(app, [*args[:-2], "--shots", "2", "--out", str(tmp_path / "d")])
    assert refused.exit_code == 2 and "the smallest class has 2 examples, too few for 2 shots" in refused.output


def test_fitting_shots_reserves_the_test_set_or_nothing_with_a_test_file():
    class Data:
        origin = "d.csv"

        def __init__(self, counts):
            self._counts = counts

        def counts(self):
            return self._counts

    assert catalog.fitting_shots(Data({"a": 200, "b": 90}), [8, 16, 64]) == ([8, 16, 64], None)
    kept, note = catalog.fitting_shots(Data({"a": 30, "b": 20}), [8, 16, 64], reserve=4)
    assert kept == [8, 16] and note.startswith("shots 64 skipped: the smallest class (b, 20 examples) leaves room "
                                               "for at most 16 a class beside a test set")
    assert catalog.fitting_shots(Data({"a": 20, "b": 20}), [8, 16, 64], reserve=0)[0] == [8, 16]
    # a class of 2: 1 shot beside a test set of 1 a class (train's carve holds one out too); of 1: nothing fits
    assert catalog.fitting_shots(Data({"a": 2, "b": 20}), [8, 16, 64])[0] == [1]
    assert catalog.test_per_class_for(Data({"a": 2, "b": 20}), [1]) == 1
    with pytest.raises(catalog.DataError, match="too few for training examples plus a test set"):
        catalog.fitting_shots(Data({"a": 1, "b": 20}), [8, 16, 64])


def test_compare_drops_empty_texts_and_says_where_as_train_does(tiny, tmp_path):
    rows = topic_rows(8)
    rows.insert(3, {"text": " ", "label": rows[0]["label"]})  # line 5 (the header is line 1)
    gaps = write_csv(tmp_path / "gaps.csv", rows)
    args = ["compare", "--model", tiny["bert"], "--data", str(gaps), "--seeds", "1", "--augment", "off",
            "--strategies", "linear-probe", "--shots", "2", "--set", "max_length=32", "--quiet",
            "--out", str(tmp_path / "c")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    said = f"{gaps}: 1 row with an empty text was dropped (line 5); fill it in or remove it"
    assert f"WARNING: {said}" in result.stdout.splitlines()
    assert json.loads((tmp_path / "c" / "results.json").read_text())["meta"]["examples"] == len(rows) - 1


def test_a_prototypes_pick_is_named_with_how_it_trains(tiny, tmp_path, monkeypatch):
    """auto's prototypes candidate trains as the probe recipe with class means: the line names the pick, then the
    flags that train it (it said "picked probe" while the reason said prototypes won)."""
    monkeypatch.setattr(auto, "auto_pick", lambda *a, **kw: {"method": "prototypes", "reason": "prototypes won.",
                                                            "candidates": {}, "skipped": []})
    out = tmp_path / "auto"
    result = runner.invoke(app, ["train", "--model", tiny["bert"], "--data", tiny["csv"], "--out", str(out),
                                 "--method", "auto", "--shots", "4", "--max-length", "32", "--quiet"])
    assert result.exit_code == 0, result.output
    assert ("--method auto picked prototypes (trained as --method probe --set head=prototype). prototypes won."
            in result.stdout)
    assert yaml.safe_load((out / "run.yaml").read_text())["options"] == {"head": "prototype"}
