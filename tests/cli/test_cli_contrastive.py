"""``graftune train --method contrastive`` and ``eval`` / ``predict`` / ``export`` on its run, on a tiny BERT; bad
inputs give one line, exit 2 and no run directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from graftune.cli import app
from graftune.run.rundir import partial_dir
from tests.train_helpers import check_eval_and_predict, fewshot_cli_data, one_line_error, with_flags

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return fewshot_cli_data(tmp_path_factory.mktemp("cli-contrastive"))


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
    check_eval_and_predict(run_dir, ["goal match team", "bank share price", "chip phone data"])

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
    text = one_line_error(runner.invoke(app, with_flags(args, flags, places)))
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


@pytest.mark.parametrize("method, message", [
    ("contrastive", "resume: a contrastive run writes no checkpoints to resume; start it again without --resume"),
    ("probe", "resume: a probe run writes no checkpoints to resume"),
    ("in-context", "resume: --method in-context trains nothing"),
])
def test_resume_is_refused_up_front_for_a_method_without_checkpoints(tiny, tmp_path, method, message):
    # it said "there is no interrupted run to continue", as if one could be
    text = one_line_error(runner.invoke(app, ["train", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]),
                                              "--method", method, "--resume", "--out", str(tmp_path / "r")]))
    assert message in text, text
    assert "no interrupted run" not in text
