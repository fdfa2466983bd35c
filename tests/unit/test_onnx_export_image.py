"""`graftune export --format onnx` on image runs (a tiny random EfficientNet, 32 px): the numpy preprocessing is the
torch transform's, the graph gives PyTorch's logits with the adapters merged (LoRA on convolutions, BitFit, a head),
`predict`/`eval` of the export give the run's labels and metrics on image files, folders and the `digits` alias,
static int8 works and reports its accuracy change, and what cannot be exported is refused in one line.

Every test here runs with `zoo.load_base` replaced by the tiny CNN (kept apart from the text tests, whose tiny BERT
is loaded by the same function)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import graftune.onnx_export  # noqa: F401 (imported before use_tiny_cnn, so its load_base is replaced too)
from graftune.cli import app
from graftune.config import RunConfig
from graftune.evaluate import load_run, logits_of, read_image
from graftune.io import onnx_format
from graftune.io.image_preprocess import ImagePreprocess, resize_weights
from graftune.io.onnx_format import MANIFEST_FILE, MODEL_FILE, OnnxClassifier, OnnxImageRun, file_sha256
from graftune.runs import train
from graftune.zoo import image_transform
from tests.train_helpers import check_export_eval_matches, export_onnx_cli, image_folder, one_line_error, use_tiny_cnn

runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny-CNN runs on noisy grey squares (20 x 20 PNGs), one per method, and a folder of images of other sizes
    and modes (RGB, grayscale, larger and smaller than the model's 32 px) to predict and score."""
    from PIL import Image

    root = tmp_path_factory.mktemp("onnx-image")
    image_folder(root / "imgs", n_per_class=10)
    rng = np.random.RandomState(3)
    for label, value in (("dark", 40), ("light", 210)):
        (root / "mixed" / label).mkdir(parents=True)
        for i, (h, w, mode) in enumerate([(64, 40, "RGB"), (17, 23, "L"), (100, 100, "RGB"), (32, 45, "L")]):
            shape = (h, w, 3) if mode == "RGB" else (h, w)
            Image.fromarray(np.clip(rng.normal(value, 25, shape), 0, 255).astype("uint8"), mode).save(
                root / "mixed" / label / f"{i}.png")
    with pytest.MonkeyPatch.context() as mp:
        use_tiny_cnn(mp)
        for method in ("lora", "bitfit", "head", "bottleneck"):
            train(RunConfig(model="tiny-cnn", data=str(root / "imgs"), method=method, out=str(root / method),
                            epochs=3, batch_size=4, lr=5e-2, precision="fp32", val_size=0, test_size=0.3),
                  progress=False)
        yield root


def _export(runs, method: str, out, *extra: str):
    return export_onnx_cli(runs / method, out, *extra)


def _images(runs) -> list:
    return [read_image(p) for p in sorted((runs / "mixed").rglob("*.png"))]


def test_numpy_preprocessing_is_the_torch_transform():
    """Up- and downscaling, odd sizes, uint8 HWC / HW arrays and float CHW tensors (0..1 and 0..255)."""
    rng = np.random.default_rng(0)
    for size in (32, 224):
        transform = image_transform(size)
        numpy_side = ImagePreprocess(transform.size, transform.crop)
        for shape in [(20, 20), (8, 8), (28, 28), (100, 60), (300, 401), (256, 256), (37, 50)]:
            for image in (rng.integers(0, 256, (*shape, 3), dtype=np.uint8), rng.integers(0, 256, shape, np.uint8),
                          torch.rand(1, *shape), torch.rand(3, *shape), torch.rand(3, *shape) * 255):
                assert np.abs(numpy_side([image])[0] - transform(image).numpy()).max() < 1e-5, (size, shape)
    weights = resize_weights(300, 37)
    assert weights.shape == (37, 300) and np.allclose(weights.sum(1), 1.0, atol=1e-6)
    assert ImagePreprocess.from_dict(ImagePreprocess(32).to_dict()) == ImagePreprocess(32)


@pytest.mark.parametrize("method", ["lora", "bitfit", "head"])
def test_image_export_gives_pytorch_logits(runs, tmp_path, method):
    out = tmp_path / "onnx"
    result = _export(runs, method, out)
    assert "on 6 test images; preprocessing within" in result.stdout
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["task"] == "image" and manifest["format_version"] == onnx_format.FORMAT_VERSION
    assert manifest["inputs"] == ["pixels"] and sorted(manifest["files"]) == ["data_card.json", MODEL_FILE, "source_run.yaml"]
    assert manifest["preprocess"]["size"] == 32 and manifest["preprocess"]["resize_short_side"] == 37
    assert manifest["check"]["passed"] and manifest["check"]["max_abs_pixel_diff"] <= 1e-5
    assert manifest["sha256"] == file_sha256(out / MODEL_FILE) and "tokenizer.json" not in {p.name for p in
                                                                                            out.iterdir()}
    run = load_run(runs / method)  # as graftune eval loads it: merged where it merges
    images = _images(runs)
    expected = logits_of(run.task, run.model, run.head, images).numpy()
    onnx_run = OnnxClassifier.load(out)
    assert isinstance(onnx_run, OnnxImageRun) and onnx_run.kind == "image"
    for batch_size in (1, 3, 32):  # other batch sizes than the trace's two
        got = onnx_run.logits(images, batch_size=batch_size)
        assert got.shape == expected.shape and np.abs(got - expected).max() <= onnx_format.TOLERANCE
    if method != "head":  # the adapter matters, so the graph holds it merged, not the bare base
        unmerged = load_run(runs / method, merge=False)
        with unmerged.model.disabled():
            bare = logits_of(unmerged.task, unmerged.model, unmerged.head, images).numpy()
        assert np.abs(bare - expected).max() > 100 * np.abs(got - expected).max()


def test_predict_and_eval_of_an_image_export_match_the_run(runs, tmp_path):
    out = tmp_path / "onnx"
    _export(runs, "lora", out)
    files = [str(p) for p in sorted((runs / "mixed").rglob("*.png"))]
    for args in (files[:3], ["--input", str(runs / "mixed" / "dark")]):
        got = runner.invoke(app, ["predict", str(out), *args, "--json"])
        ref = runner.invoke(app, ["predict", str(runs / "lora"), *args, "--json"])
        assert got.exit_code == 0 and ref.exit_code == 0, got.output + ref.output
        rows, expected = ([json.loads(line) for line in r.stdout.splitlines()] for r in (got, ref))
        assert [r.get("file") for r in rows] == [e.get("file") for e in expected] and rows[0]["file"]
        assert [r["label"] for r in rows] == [e["label"] for e in expected]
        for r, e in zip(rows, expected):
            assert r["probabilities"] == pytest.approx(e["probabilities"], abs=1e-4)
    text = runner.invoke(app, ["predict", str(out), files[0]])
    assert text.exit_code == 0 and text.stdout == runner.invoke(app, ["predict", str(runs / "lora"), files[0]]).stdout
    for extra in ([], ["--data", str(runs / "mixed")]):  # the source run's test split, then an image folder
        check_export_eval_matches(out, runs / "lora", extra)


def test_int8_image_export_is_static_and_reports_the_accuracy_change(runs, tmp_path):
    import onnx

    int8 = tmp_path / "int8"
    result = _export(runs, "lora", int8, "--quantize", "int8")
    manifest = json.loads((int8 / MANIFEST_FILE).read_text())
    q = manifest["int8"]
    assert manifest["quantize"] == "int8" and q["method"] == "static" and q["calibration_images"] == 14
    assert f"({q['accuracy_change_points']:+.2f} points)" in result.stdout and "calibrated on 14" in result.stdout
    ops = {n.op_type for n in onnx.load(str(int8 / MODEL_FILE)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    m8 = json.loads(runner.invoke(app, ["eval", str(int8), "--json"]).stdout)
    assert m8["quantize"] == "int8" and m8["accuracy"] == q["accuracy_int8"] and m8["examples"] == q["test_examples"]


def test_an_export_of_digits_scores_the_alias_as_the_run_does(tmp_path):
    """`eval EXPORT --data digits`: the 8 x 8 grayscale alias, upscaled by the recorded preprocessing."""
    with pytest.MonkeyPatch.context() as mp:
        use_tiny_cnn(mp)
        run = tmp_path / "digits"
        train(RunConfig(model="tiny-cnn", data="digits", method="lora", out=str(run), shots=4, epochs=1,
                        batch_size=8, precision="fp32", val_size=0, test_per_class=5), progress=False)
        _export(tmp_path, "digits", tmp_path / "onnx")
        for extra in ([], ["--data", "digits"]):
            m = json.loads(runner.invoke(app, ["eval", str(tmp_path / "onnx"), "--json", *extra]).stdout)
            m_ref = json.loads(runner.invoke(app, ["eval", str(run), "--json", *extra]).stdout)
            assert m["examples"] == m_ref["examples"] and m["confusion_matrix"] == m_ref["confusion_matrix"]
        assert m["examples"] == 1797


def test_what_cannot_be_exported_or_read_is_one_line(runs, tmp_path):
    text = one_line_error(runner.invoke(app, ["export", str(runs / "bottleneck"), "--format", "onnx", "--out",
                                              str(tmp_path / "o")]))
    assert "bottleneck run, whose adapter does not merge" in text and "lora" in text
    assert not (tmp_path / "o").exists()
    out = tmp_path / "onnx"
    _export(runs, "head", out)
    (tmp_path / "texts.txt").write_text("a dark square\n")
    for args, part in ((["predict", str(out), "--input", str(tmp_path / "texts.txt")], "classifies images"),
                       (["predict", str(out), str(tmp_path / "texts.txt")], "not a readable image"),
                       (["predict", str(out), str(runs / "mixed" / "dark" / "0.png"), "--quantize", "int8"],
                        "--quantize")):
        assert part in one_line_error(runner.invoke(app, args))


def test_an_edited_manifest_is_refused_and_an_older_export_checked(runs, tmp_path):
    """Since format version 4 the manifest's content is hashed: relabelling the classes is refused. An export of
    version 2 (no such hash) still loads, its label names checked against the graph's logits."""
    out = tmp_path / "onnx"
    _export(runs, "head", out)
    file = out / MANIFEST_FILE
    manifest = json.loads(file.read_text())
    file.write_text(json.dumps({**manifest, "label_names": ["light", "dark"]}))
    text = one_line_error(runner.invoke(app, ["predict", str(out), str(next((runs / "mixed").rglob("*.png")))]))
    assert "manifest_sha256 does not match" in text, text
    legacy = {k: v for k, v in manifest.items() if k not in ("files", "manifest_sha256")} | {"format_version": 2}
    file.write_text(json.dumps(legacy))
    assert OnnxClassifier.load(out).predict(_images(runs)[:2])
    file.write_text(json.dumps({**legacy, "label_names": ["dark", "light", "grey"]}))
    text = one_line_error(runner.invoke(app, ["eval", str(out)]))
    assert "the graph's logits has 2 columns, but there are 3 label names" in text, text
