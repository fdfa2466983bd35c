"""`graftune export --format onnx` on tiny BERT runs: the graph gives PyTorch's logits, `predict`/`eval` of the
export give the run's labels and metrics, int8 works and reports its accuracy change, and bad inputs give one line,
exit 2 and write nothing."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from graftune import onnx_export
from graftune.cli import app
from graftune.evaluate import load_run, logits_of
from graftune.io import onnx_format, peft_format
from graftune.io.onnx_format import (
    MANIFEST_FILE,
    MODEL_FILE,
    SOURCE_RUN_FILE,
    TOKENIZER_FILE,
    OnnxRun,
    file_sha256,
    is_onnx_export,
)
from graftune.onnx_export import supported_methods
from tests.train_helpers import (
    bert_folder,
    check_export_eval_matches,
    export_onnx_cli,
    one_line_error,
    predict_json,
    topic_csv,
    topic_rows,
    write_csv,
)

runner = CliRunner()
# the last one is longer than the runs' max_length (32 tokens): truncation must match too
TEXTS = ["goal team match", "bank market share price", "chip phone code", "the cup",
         " ".join(["data cloud robot and the web"] * 12)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    bert, data = bert_folder(root / "bert"), topic_csv(root / "topics.csv")
    for method in ("lora", "ia3", "head", "bottleneck"):  # through the CLI: what a user's run directory is
        result = runner.invoke(app, ["train", "--model", str(bert), "--data", str(data), "--method", method,
                                     "--epochs", "1", "--batch-size", "8", "--lr", "5e-3", "--max-length", "32",
                                     "--precision", "fp32", "--val-size", "0", "--quiet", "--out", str(root / method)])
        assert result.exit_code == 0, result.output
    write_csv(root / "other.csv", topic_rows(5, seed=7))
    return root


def _export(runs, method: str, out, *extra: str):
    return export_onnx_cli(runs / method, out, *extra)



@pytest.mark.parametrize("method", ["lora", "ia3", "head"])
def test_export_gives_pytorch_logits(runs, tmp_path, method):
    out = tmp_path / "onnx"
    result = _export(runs, method, out)
    assert "ONNX model written" in result.stdout and "check: logits within" in result.stdout
    assert f"ONNX model written to {out}/ (float32, opset {onnx_format.OPSET}," in result.stdout  # it said "none"
    # docs/deploy.md's table of what the folder holds names every file written (QA: data_card.json was left out)
    doc = (Path(__file__).parents[2] / "docs" / "deploy.md").read_text(encoding="utf-8")
    table = doc.split("What the folder holds (for a text run")[1].split("What is checked before")[0]
    assert [f.name for f in sorted(out.iterdir()) if f"`{f.name}`" not in table] == []
    assert is_onnx_export(out) and not is_onnx_export(runs / method)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["sha256"] == file_sha256(out / MODEL_FILE) and manifest["opset"] == onnx_format.OPSET
    assert manifest["check"]["passed"] and manifest["check"]["max_abs_logit_diff"] <= onnx_format.TOLERANCE
    assert manifest["source_run"] == str((runs / method).resolve()) and manifest["quantize"] == "none"
    run = load_run(runs / method)  # as graftune eval loads it: merged where it merges
    assert manifest["label_names"] == run.label_names and manifest["max_length"] == run.task.max_length
    expected = logits_of(run.task, run.model, run.head, TEXTS).numpy()
    onnx_run = OnnxRun.load(out)
    for batch_size in (1, 2, 32):  # other batch sizes and sequence lengths than the trace's
        got = onnx_run.logits(TEXTS, batch_size=batch_size)
        assert got.shape == expected.shape and np.abs(got - expected).max() <= onnx_format.TOLERANCE
    assert onnx_run.encode(TEXTS) == [e["input_ids"] for e in run.task.encode(TEXTS)]


def test_the_text_graph_is_fused_and_keeps_any_mask(runs, tmp_path):
    """ONNX Runtime's BERT optimizer fuses every layer's attention, layer norms and GELU; the fused attention keeps
    the raw mask, so rows padded on the left or with holes in their mask give PyTorch's logits too (the optimizer's
    default, one end position per row, would not)."""
    import onnx
    import onnxruntime as ort
    import torch

    out = tmp_path / "onnx"
    _export(runs, "lora", out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    layers = 2  # bert_folder's
    assert manifest["fused"] == {"EmbedLayerNormalization": 1, "Attention": layers, "SkipLayerNormalization":
                                 2 * layers, "BiasGelu": layers}
    ops = {n.op_type for n in onnx.load(str(out / MODEL_FILE)).graph.node}
    assert {"Attention", "EmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu", "MatMul"} <= ops
    assert not ops & {"Softmax", "IsNaN", "LayerNormalization"}
    run = load_run(runs / "lora")
    ids = torch.tensor([e["input_ids"][:8] for e in run.task.encode([TEXTS[-1]] * 3)])
    mask = torch.ones_like(ids)
    mask[0, 5:], mask[1, :3], mask[2, 2:4] = 0, 0, 0  # right-padded, left-padded, a hole
    with torch.no_grad():
        expected = run.task.forward(run.model, run.head, {"input_ids": ids, "attention_mask": mask}).numpy()
    session = ort.InferenceSession(str(out / MODEL_FILE), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    assert np.abs(got - expected).max() <= onnx_format.TOLERANCE


def test_predict_and_eval_of_an_export_match_the_run(runs, tmp_path):
    out = tmp_path / "onnx"
    _export(runs, "lora", out)
    rows, expected = predict_json(out, TEXTS), predict_json(runs / "lora", TEXTS)
    assert [r["label"] for r in rows] == [r["label"] for r in expected]
    for r, e in zip(rows, expected):
        assert r["probabilities"] == pytest.approx(e["probabilities"], abs=1e-4)
    text = runner.invoke(app, ["predict", str(out), TEXTS[0]])
    assert text.exit_code == 0 and text.stdout.split("\t")[1] == expected[0]["label"], text.output
    for extra in ([], ["--data", str(runs / "other.csv")]):  # the source run's test split, then a file
        check_export_eval_matches(out, runs / "lora", extra)
    assert "confusion matrix" in runner.invoke(app, ["eval", str(out)]).stdout


def test_int8_export_reports_the_accuracy_change(runs, tmp_path):
    import onnx

    fp32, int8 = tmp_path / "fp32", tmp_path / "int8"
    _export(runs, "lora", fp32)
    result = _export(runs, "lora", int8, "--quantize", "int8")
    manifest = json.loads((int8 / MANIFEST_FILE).read_text())
    q = manifest["int8"]
    assert manifest["quantize"] == "int8" and manifest["sha256"] == file_sha256(int8 / MODEL_FILE)
    assert f"({q['accuracy_change_points']:+.2f} points)" in result.stdout
    m8 = json.loads(runner.invoke(app, ["eval", str(int8), "--json"]).stdout)
    m32 = json.loads(runner.invoke(app, ["eval", str(fp32), "--json"]).stdout)
    assert m8["quantize"] == "int8" and "quantize" not in m32
    assert q["accuracy_int8"] == m8["accuracy"] and q["accuracy_fp32"] == m32["accuracy"]
    assert q["test_examples"] == m8["examples"]
    assert q["accuracy_change_points"] == pytest.approx(100 * (m8["accuracy"] - m32["accuracy"]), abs=0.01)
    graph = onnx.load(str(int8 / MODEL_FILE)).graph
    ops = {n.op_type for n in graph.node}
    assert "QAttention" in ops and ops & {"MatMulInteger", "DynamicQuantizeMatMul"} and "Attention" not in ops, ops
    rows = [r["label"] for r in predict_json(int8, TEXTS[:3])]
    assert rows == [r["label"] for r in predict_json(fp32, TEXTS[:3])]  # clear-cut texts keep their label


def _nothing_written(parent, name) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp")]


def test_bad_inputs_are_one_line_and_write_nothing(runs, tmp_path):
    out = tmp_path / "out"
    for args, parts in [
        (["export", str(tmp_path), "--format", "onnx", "--out", str(out)], ["not a run directory"]),
        (["export", str(runs / "bottleneck"), "--format", "onnx", "--out", str(out)],  # every method that exports
         ["bottleneck", "lora", "ia3", "bitfit", "head", "contrastive", "probe", *supported_methods()]),
        (["export", str(runs / "lora"), "--format", "onnx", "--out", str(out), "--quantize", "int4"], ["int4"]),
        (["export", str(runs / "lora"), "--format", "tflite", "--out", str(out)], ["peft and onnx"]),
    ]:
        text = one_line_error(runner.invoke(app, args))
        assert all(p in text for p in parts), text
        _nothing_written(tmp_path, "out")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):  # a user's folder is never replaced, --overwrite or not
        text = one_line_error(runner.invoke(app, ["export", str(runs / "lora"), "--format", "onnx", "--out",
                                                  str(mine), *extra]))
        assert str(mine) in text
        assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"


def test_an_earlier_export_is_replaced_only_with_overwrite(runs, tmp_path):
    out = tmp_path / "onnx"
    _export(runs, "lora", out)
    before = (out / MANIFEST_FILE).read_text()
    text = one_line_error(runner.invoke(app, ["export", str(runs / "ia3"), "--format", "onnx", "--out", str(out)]))
    assert "--overwrite" in text and (out / MANIFEST_FILE).read_text() == before
    _export(runs, "ia3", out, "--overwrite")
    assert json.loads((out / MANIFEST_FILE).read_text())["method"] == "ia3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]  # no temp or old folders left


def test_a_failed_check_refuses_the_export(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_format, "TOLERANCE", -1.0)  # no graph can pass: the refusal path
    result = runner.invoke(app, ["export", str(runs / "lora"), "--format", "onnx", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "differ from PyTorch's" in last and "not exported" in last
    _nothing_written(tmp_path, "o")


def test_a_changed_model_file_is_refused(runs, tmp_path):
    out = tmp_path / "onnx"
    _export(runs, "lora", out)
    with open(out / MODEL_FILE, "ab") as f:
        f.write(b"\0")
    text = one_line_error(runner.invoke(app, ["predict", str(out), "goal"]))
    assert "sha256" in text
    text = one_line_error(runner.invoke(app, ["predict", str(out)]))
    assert "nothing to predict" in text


def test_a_bf16_base_is_exported_with_its_float32_weights(runs, tmp_path, monkeypatch):
    """On CPUs with native bf16, load_run stores the frozen base in bf16; the export must carry the original
    float32 weights, not bf16-rounded ones."""
    import torch

    from graftune.speed import precision

    run = load_run(runs / "lora")
    expected = logits_of(run.task, run.model, run.head, TEXTS).numpy()
    bf16 = precision.Precision("bf16", torch.bfloat16, torch.bfloat16, "cpu")
    monkeypatch.setattr(precision, "choose", lambda *a, **k: bf16)
    assert load_run(runs / "lora", merge=False).model.base.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    _export(runs, "lora", tmp_path / "onnx")
    assert np.abs(OnnxRun.load(tmp_path / "onnx").logits(TEXTS) - expected).max() <= 1e-4


# --- destinations that cannot be created, leftovers of killed exports -------------------------------------------
@pytest.mark.parametrize(("fmt", "sub"), [("onnx", "sub"), ("peft", "sub"), ("onnx", "a/b")])
def test_an_out_under_a_file_is_refused_in_one_line_before_any_work(runs, tmp_path, monkeypatch, fmt, sub):
    """QA: `--out userfile.txt/sub` ran the whole export and its check, then a FileExistsError traceback."""
    (tmp_path / "userfile.txt").write_text("a user's file")

    def no_work(*_args, **_kwargs):
        raise AssertionError("the export started before its --out was checked")

    monkeypatch.setattr(onnx_export, "_inspect", no_work)
    monkeypatch.setattr(peft_format, "read_meta", no_work)
    out = tmp_path / "userfile.txt" / sub
    text = one_line_error(runner.invoke(app, ["export", str(runs / "lora"), "--format", fmt, "--out", str(out)]))
    assert f"--out {out}: cannot create the " in text and "(Not a directory); choose another --out" in text, text
    assert [p.name for p in tmp_path.iterdir()] == ["userfile.txt"]
    assert (tmp_path / "userfile.txt").read_text() == "a user's file"


def test_the_temporary_folder_of_a_killed_export_is_removed_by_the_next(runs, tmp_path):
    """QA: a SIGKILLed export left `.NAME.tmp-XXXXXXXX` (tens of MB) beside --out for good. The next export to the
    same --out removes it; names of other destinations, or not of the exact pattern, are never touched."""
    stale = tmp_path / ".onnx.tmp-k1ll3d_x"
    keep = [tmp_path / n for n in (".onnx.tmp-short", ".onnx.tmp-k1ll3d_xy", ".other.tmp-k1ll3d_x", "onnx.tmp-k1ll3d_x",
                                   ".onnx.old-k1ll3d_x")]
    for folder in [stale, *keep]:
        folder.mkdir()
        (folder / MODEL_FILE).write_bytes(b"half a graph")
        old = time.time() - 3600
        os.utime(folder, (old, old))
    _export(runs, "lora", tmp_path / "onnx")
    assert not stale.exists()
    assert all((folder / MODEL_FILE).read_bytes() == b"half a graph" for folder in keep)
    assert is_onnx_export(tmp_path / "onnx")


# --- tampered exports --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "onnx"
    _export(runs, "lora", out)
    return out


def _copy(exported, tmp_path, *, legacy: bool = False, **fields):
    """A copy of the export with manifest ``fields`` set; ``legacy``: as graftune before format version 4 wrote it
    (no ``files``, no ``manifest_sha256``)."""
    out = tmp_path / "copy"
    shutil.copytree(exported, out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    if legacy:
        del manifest["files"], manifest["manifest_sha256"]
        manifest["format_version"] = 1
    manifest.update(fields)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return out


def _swap_words(folder, a: str, b: str) -> None:
    tokenizer = json.loads((folder / TOKENIZER_FILE).read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / TOKENIZER_FILE).write_text(json.dumps(tokenizer))


def test_every_file_and_the_manifest_are_hashed(exported):
    manifest = json.loads((exported / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == onnx_format.FORMAT_VERSION
    on_disk = sorted(p.name for p in exported.iterdir() if p.name != MANIFEST_FILE)
    assert sorted(manifest["files"]) == on_disk and {MODEL_FILE, TOKENIZER_FILE, SOURCE_RUN_FILE} <= set(on_disk)
    assert all(manifest["files"][n] == file_sha256(exported / n) for n in on_disk)
    assert manifest["manifest_sha256"] == onnx_format.manifest_sha256(manifest)


@pytest.mark.parametrize(("case", "fields", "expected"), [
    ("two label names", {"label_names": ["money", "sport"]}, "manifest_sha256 does not match"),
    ("renamed labels", {"label_names": ["a", "b", "c"]}, "manifest_sha256 does not match"),
    ("max_length abc", {"max_length": "abc"}, "manifest_sha256 does not match"),
    ("pad_id out of range", {"pad_id": 99999999}, "manifest_sha256 does not match"),
    ("a file's hash", {"files": {MODEL_FILE: "0" * 64}}, "manifest_sha256 does not match"),
])
def test_an_edited_manifest_is_refused_in_one_line(exported, tmp_path, case, fields, expected):
    """QA: these edits gave an IndexError, a ValueError, an onnxruntime traceback or silently other labels."""
    out = _copy(exported, tmp_path, **fields)
    for args in (["predict", str(out), "goal team", "the cup and the bank rate"], ["eval", str(out)]):
        text = one_line_error(runner.invoke(app, args))
        assert str(out / MANIFEST_FILE) in text and expected in text and "export the run again" in text, text


def test_a_reformatted_manifest_still_loads(exported, tmp_path):
    """The manifest's hash is over its content (canonical JSON), not its bytes."""
    out = _copy(exported, tmp_path)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    (out / MANIFEST_FILE).write_text(json.dumps(dict(reversed(manifest.items()))))
    assert predict_json(out, TEXTS) == predict_json(exported, TEXTS)


@pytest.mark.parametrize("case", ["tokenizer words swapped", "source run edited", "tokenizer config edited",
                                  "tokenizer missing"])
def test_a_changed_tokenizer_or_source_run_is_refused(exported, tmp_path, case):
    """QA: 'who'/'what' swapped in tokenizer.json silently changed the predictions."""
    out = _copy(exported, tmp_path)
    if case == "tokenizer words swapped":
        _swap_words(out, "goal", "bank")
        changed = TOKENIZER_FILE
    elif case == "source run edited":
        with open(out / SOURCE_RUN_FILE, "a") as f:
            f.write("test_size: 0.5\n")
        changed = SOURCE_RUN_FILE
    elif case == "tokenizer config edited":
        changed = "tokenizer_config.json"
        (out / changed).write_text((out / changed).read_text().replace("true", "false", 1))
    else:
        (out / TOKENIZER_FILE).unlink()
        text = one_line_error(runner.invoke(app, ["predict", str(out), "goal"]))
        assert f"{TOKENIZER_FILE} is missing" in text, text
        return
    for args in (["predict", str(out), "goal team"], ["eval", str(out)]):
        text = one_line_error(runner.invoke(app, args))
        assert str(out / changed) in text and "sha256" in text, text


def test_an_export_before_format_version_4_still_loads(exported, tmp_path):
    """Exports written before every file was hashed load as before (only the graph is hashed in them)."""
    out = _copy(exported, tmp_path, legacy=True)
    assert predict_json(out, TEXTS) == predict_json(exported, TEXTS)


@pytest.mark.parametrize(("case", "fields", "expected"), [
    ("two label names", {"label_names": ["money", "sport"]}, "the graph's logits has 3 columns, but there are 2 label"),
    ("repeated label", {"label_names": ["money", "money", "tech"]}, "expected distinct label names"),
    ("not a list", {"label_names": "money"}, "label_names is 'money'; expected a non-empty list"),
    ("max_length abc", {"max_length": "abc"}, "max_length is 'abc'; expected an integer of at least 1"),
    ("max_length 0", {"max_length": 0}, "max_length is 0; expected an integer of at least 1"),
    ("pad_id negative", {"pad_id": -1}, "pad_id is -1; expected an integer of at least 0"),
    ("pad_id out of range", {"pad_id": 99999999}, "pad_id 99999999 is not one of its"),
    ("model outside", {"model_file": "../model.onnx"}, "model_file is '../model.onnx'; expected a file name inside"),
    ("multi_label", {"multi_label": "yes"}, "multi_label is 'yes'; expected true or false"),
    ("version", {"format_version": "1"}, "format_version is '1', not a version number"),
])
def test_a_bad_field_of_an_older_export_is_refused_in_one_line(exported, tmp_path, case, fields, expected):
    """Without the manifest's hash (an export before format version 4), its fields are checked for type and range:
    one line each, never a traceback or a wrong answer."""
    out = _copy(exported, tmp_path, legacy=True, **fields)
    text = one_line_error(runner.invoke(app, ["predict", str(out), "goal team", "the cup and the bank rate"]))
    assert expected in text and "export the run again" in text, text


def test_eval_of_an_export_refuses_a_data_file_changed_since_training(runs, tmp_path):
    # review: eval on a run refused a changed data file, eval on its export scored the rebuilt split anyway
    data = tmp_path / "topics.csv"
    shutil.copyfile(runs / "topics.csv", data)
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--model", str(runs / "bert"), "--data", str(data), "--method", "head",
                                 "--epochs", "1", "--max-length", "32", "--precision", "fp32", "--quiet", "--out",
                                 str(run)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "onnx"
    _export(tmp_path, "run", out)
    assert (out / "data_card.json").is_file() and runner.invoke(app, ["eval", str(out)]).exit_code == 0
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    result = runner.invoke(app, ["eval", str(out)])
    assert result.exit_code == 2 and "changed since the run was trained" in result.output, result.output
