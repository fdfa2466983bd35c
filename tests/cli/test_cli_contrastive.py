"""``graftune train --method contrastive`` and ``eval`` / ``predict`` / ``export`` on its run, on a tiny BERT; bad
inputs give one line, exit 2 and no run directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from graftune.cli import app
from graftune.train import partial_dir
from tests.train_helpers import bert_folder, image_folder, pairs_jsonl, topic_csv, topic_rows, write_csv

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-contrastive")
    multi = [{"text": r["text"], "label": f"{r['label']}|news"} for r in topic_rows(6)]
    return {"bert": bert_folder(root / "bert"), "csv": topic_csv(root / "topics.csv"), "root": root,
            "pairs": pairs_jsonl(root / "pairs.jsonl"), "images": image_folder(root / "images"),
            "multi": write_csv(root / "multi.csv", multi)}


def train_args(tiny, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--out", str(out), "--method",
            "contrastive", "--shots", "4", "--set", "iterations=2", "--batch-size", "8", "--max-length", "32",
            "--precision", "fp32", "--quiet", *extra]


@pytest.fixture(scope="module")
def run_dir(tiny):
    out = tiny["root"] / "run"
    result = runner.invoke(app, train_args(tiny, out, "--set", "epochs=2", "--set", "r=4"))
    assert result.exit_code == 0, result.output
    assert "test: accuracy" in result.stdout and f"run written to {out}/" in result.stdout
    return out


def test_train_writes_a_contrastive_run(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "contrastive" and metrics["epochs_run"] == 2
    assert metrics["steps"] == 2 * (2 * 2 * 12 // 8)  # 2 epochs of 48 pairs, 8 per step
    adapter = json.loads((run_dir / "adapter" / "adapter.json").read_text())
    assert adapter["method"] == "lora" and adapter["config"]["r"] == 4
    assert (run_dir / "head" / "head.safetensors").is_file()


def test_eval_predict_and_export(run_dir, tmp_path):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result = runner.invoke(app, ["eval", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    assert scored == {k: metrics[k] for k in scored} and "per_class" in scored
    text = runner.invoke(app, ["eval", str(run_dir)])
    assert text.exit_code == 0 and "macro-F1" in text.stdout and "confusion matrix" in text.stdout

    from graftune.evaluate import load_run, predict

    texts = ["goal match team", "bank share price", "chip phone data"]
    result = runner.invoke(app, ["predict", str(run_dir), *texts, "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows == predict(load_run(run_dir), texts)
    assert all(set(r["probabilities"]) == {"money", "sport", "tech"} for r in rows)

    result = runner.invoke(app, ["export", str(run_dir), "--format", "peft", "--out", str(tmp_path / "peft")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 4


def test_run_yaml_repeats_the_run(run_dir, tiny):
    out = tiny["root"] / "again"
    result = runner.invoke(app, ["train", "--config", str(run_dir / "run.yaml"), "--out", str(out), "--quiet",
                                 "--json"])
    assert result.exit_code == 0, result.output
    first, again = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, out))
    assert again["loss"] == first["loss"] and again["per_class"] == first["per_class"]
    from safetensors.torch import load_file

    heads = [load_file(d / "head" / "head.safetensors") for d in (run_dir, out)]
    assert all(heads[0][k].equal(heads[1][k]) for k in ("coef", "intercept"))


def one_line_error(result) -> str:
    text = result.output.strip()
    assert result.exit_code == 2, text
    assert "Traceback" not in text and len(text.splitlines()) == 1 and text.startswith("error: "), text
    return text


@pytest.mark.parametrize("case, flags, message", [
    ("images", ["--data", "IMAGES"], "image data; --method contrastive trains text classifiers"),
    ("multi-label", ["--data", "MULTI"], "multi-label data; --method contrastive"),
    ("prompt/response pairs", ["--data", "PAIRS"], "pairs data; --method contrastive"),
    ("causal-lm task", ["--task", "causal-lm"], "task: got causal-lm"),
    ("warm start", ["--init-from", "RUN"], "init_from: --method contrastive"),
    ("stacking", ["--stack-under", "RUN"], "stack_under: --method contrastive"),
    ("unknown option", ["--set", "rank=4"], "unknown option(s) rank; use iterations"),
    ("bad option value", ["--set", "loss=triplet"], "loss: got 'triplet'"),
    ("train() epochs", ["--epochs", "3"], "--set epochs=N"),
    ("train() schedule", ["--schedule", "cosine"], "schedule: steers train()'s epoch loop"),
])
def test_bad_inputs_are_one_line_and_leave_nothing(tiny, run_dir, tmp_path, case, flags, message):
    out = tmp_path / "bad"
    args = train_args(tiny, out)
    places = {"IMAGES": tiny["images"], "MULTI": tiny["multi"], "PAIRS": tiny["pairs"], "RUN": run_dir}
    for flag, value in zip(flags[::2], flags[1::2]):
        value = str(places.get(value, value))
        if flag in args and flag != "--set":
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    text = one_line_error(runner.invoke(app, args))
    assert message in text, text
    assert not out.exists() and not partial_dir(out).exists()


def test_quantize_and_a_corrupt_head_are_one_line(run_dir, tmp_path):
    for cmd in (["eval", str(run_dir), "--quantize", "int8"], ["predict", str(run_dir), "goal", "--quantize", "int8"]):
        assert "quantize int8: a contrastive run" in one_line_error(runner.invoke(app, cmd))
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "head" / "head.safetensors").write_bytes(b"not safetensors at all")
    for cmd in (["eval", str(copy)], ["predict", str(copy), "goal"]):
        assert "head.safetensors: not a valid safetensors file" in one_line_error(runner.invoke(app, cmd))
