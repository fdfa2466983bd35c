"""`graftune export --format onnx` of few-shot runs on a tiny BERT: the export (graph -> window embeddings, numpy
windows and head) gives `graftune predict`'s probabilities, long texts read as several windows included, `eval` of
the export gives the run's test accuracy, int8 reports its accuracy change, and a changed head file is refused in
one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from graftune.cli import app
from graftune.config import RunConfig
from graftune.io import onnx_format
from graftune.io.onnx_format import HEAD_FILE, MANIFEST_FILE, OnnxClassifier, OnnxFewShotRun
from graftune.recipes import fewshot
from graftune.runs import load_run, train
from tests.train_helpers import (
    bert_folder,
    check_export_eval_matches,
    export_onnx_cli,
    one_line_error,
    predict_json,
    topic_rows,
    train_args,
    write_csv,
)

runner = CliRunner()
#: windows of 16 tokens: the last text spans several of them, more than the 4 read (max_chunks)
MAX_LENGTH = 16
TEXTS = ["goal team match", "bank market share price", "chip phone code", "the cup",
         " ".join(["data cloud robot and the web"] * 14)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_fewshot")
    bert = bert_folder(root / "bert")
    rows = topic_rows(20)
    data = {"three": write_csv(root / "three.csv", rows),
            "two": write_csv(root / "two.csv", [r for r in rows if r["label"] != "tech"])}
    common = {"shots": 4, "max_length": MAX_LENGTH}
    configs = {
        "contrastive": ("three", {"method": "contrastive", "options": {"iterations": 2, "top_k_layers": 1}}),
        "binary": ("two", {"method": "contrastive", "options": {"iterations": 2, "top_k_layers": 1}}),
        "probe": ("three", {"method": "probe", "options": {"head": "prototype"}}),
    }
    for name, (csv, extra) in configs.items():
        args = train_args(bert, data[csv], root / name, **common, **extra)
        del args["epochs"], args["lr"], args["batch_size"]  # train()'s loop settings: few-shot runs take none
        train(RunConfig(**args), progress=False)
    return root



@pytest.mark.parametrize("name", ["contrastive", "binary", "probe"])
def test_the_export_gives_the_runs_probabilities(runs, tmp_path, name):
    out = tmp_path / "onnx"
    result = export_onnx_cli(runs / name, out)
    assert "check: probabilities within" in result.stdout, result.stdout
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == onnx_format.FORMAT_VERSION and manifest["outputs"] == ["embedding"]
    assert manifest["max_length"] == MAX_LENGTH and manifest["embedding"]["max_chunks"] == fewshot.DEFAULT_CHUNKS
    assert manifest["head"]["recipe"] == ("probe" if name == "probe" else "contrastive")
    assert manifest["merged"] == ([] if name == "probe" else [name])
    check = manifest["check"]
    assert check["passed"] and check["compared"] == "probabilities"
    assert check["max_abs_probability_diff"] <= onnx_format.TOLERANCE
    assert check["windows_matched"] > check["tokenizer_texts_matched"] + 1  # the long check text: several windows

    export = OnnxClassifier.load(out)
    assert isinstance(export, OnnxFewShotRun)
    run = load_run(runs / name).fewshot
    windows = export.windows(TEXTS)
    assert windows == fewshot.windows(run.tokenizer, TEXTS, MAX_LENGTH, run.max_chunks)
    assert windows[1].count(len(TEXTS) - 1) == run.max_chunks  # the long text: max_chunks windows of 16 tokens

    rows, expected = predict_json(out, TEXTS), predict_json(runs / name, TEXTS)
    assert [r["label"] for r in rows] == [r["label"] for r in expected]
    for r, e in zip(rows, expected):
        assert r["probabilities"] == pytest.approx(e["probabilities"], abs=onnx_format.TOLERANCE)
    for batch_size in (1, 32):  # other batches than the check's
        probs = export.probabilities(export.logits(TEXTS, batch_size=batch_size))
        assert np.abs(probs - export.probabilities(export.logits(TEXTS))).max() <= 1e-5


def test_eval_of_the_export_gives_the_runs_test_accuracy(runs, tmp_path):
    out = tmp_path / "onnx"
    export_onnx_cli(runs / "contrastive", out)
    check_export_eval_matches(out, runs / "contrastive", [])
    scored = json.loads(runner.invoke(app, ["eval", str(out), "--json"]).stdout)
    assert scored["accuracy"] == json.loads((runs / "contrastive" / "metrics.json").read_text())["accuracy"]
    assert "confusion matrix" in runner.invoke(app, ["eval", str(out)]).stdout


def test_int8_export_reports_the_accuracy_change(runs, tmp_path):
    out = tmp_path / "int8"
    result = export_onnx_cli(runs / "contrastive", out, "--quantize", "int8")
    q = json.loads((out / MANIFEST_FILE).read_text())["int8"]
    assert f"({q['accuracy_change_points']:+.2f} points)" in result.stdout
    m8 = json.loads(runner.invoke(app, ["eval", str(out), "--json"]).stdout)
    assert m8["quantize"] == "int8" and q["accuracy_int8"] == m8["accuracy"] and q["test_examples"] == m8["examples"]
    assert "max_abs_probability_diff_vs_pytorch" in q


def test_a_changed_head_file_is_refused_in_one_line(runs, tmp_path):
    out = tmp_path / "onnx"
    export_onnx_cli(runs / "contrastive", out)
    head = out / HEAD_FILE
    head.write_bytes(head.read_bytes()[:-4] + b"\0\0\0\0")
    text = one_line_error(runner.invoke(app, ["predict", str(out), "goal"]))
    assert str(head) in text and "sha256" in text
    assert "sha256" in one_line_error(runner.invoke(app, ["eval", str(out)]))


def test_a_failed_check_refuses_theexport_onnx_cli(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_format, "TOLERANCE", -1.0)  # no export can pass: the refusal path
    result = runner.invoke(app, ["export", str(runs / "contrastive"), "--format", "onnx", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1]  # after the progress lines
    assert last.startswith("error: ") and "the ONNX probabilities differ from PyTorch's" in last, last
    assert not (tmp_path / "o").exists()


def test_an_older_few_shot_export_still_loads_and_its_fields_are_checked(runs, tmp_path):
    """An export of format version 3 (only the graph and the head hashed) loads as before; its window settings
    are checked for range, and an edit of a version 4 manifest is refused."""
    out = tmp_path / "onnx"
    export_onnx_cli(runs / "probe", out)
    file = out / MANIFEST_FILE
    manifest = json.loads(file.read_text())
    expected = predict_json(out, TEXTS)
    file.write_text(json.dumps({**manifest, "label_names": ["sport", "tech", "money"]}))
    assert "manifest_sha256 does not match" in one_line_error(runner.invoke(app, ["predict", str(out), "goal"]))
    legacy = {k: v for k, v in manifest.items() if k not in ("files", "manifest_sha256")} | {"format_version": 3}
    file.write_text(json.dumps(legacy))
    assert predict_json(out, TEXTS) == expected
    for embedding in ({"max_chunks": 0, "special_tokens": 2}, {"max_chunks": 4, "special_tokens": MAX_LENGTH}):
        file.write_text(json.dumps({**legacy, "embedding": {**legacy["embedding"], **embedding}}))
        text = one_line_error(runner.invoke(app, ["predict", str(out), "goal"]))
        assert "embedding is" in text and "expected max_chunks of at least 1 and special_tokens below" in text, text
