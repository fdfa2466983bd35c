"""``graftune train --method probe`` and ``eval`` / ``predict`` on its run, on a tiny BERT; bad inputs give one line,
exit 2 and no run directory."""

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
    return fewshot_cli_data(tmp_path_factory.mktemp("cli-probe"))


def train_args(tiny, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--out", str(out), "--method",
            "probe", "--shots", "4", "--max-length", "32", "--precision", "fp32", "--quiet", *extra]


@pytest.fixture(scope="module")
def run_dirs(tiny):
    """{head: run dir}, trained by the CLI."""
    out = {}
    for head, flags in (("logistic", ["--set", "head_c=0.5"]), ("prototype", ["--set", "head=prototype"])):
        run_dir = tiny["root"] / head
        result = runner.invoke(app, train_args(tiny, run_dir, "--set", "max_chunks=2", *flags))
        assert result.exit_code == 0, result.output
        assert "test: accuracy" in result.stdout and f"run written to {run_dir}/" in result.stdout
        out[head] = run_dir
    return out


def test_train_writes_a_probe_run(run_dirs):
    for head, run_dir in run_dirs.items():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["method"] == "probe" and metrics["probe"]["head"] == head
        assert metrics["probe"]["max_chunks"] == 2 and metrics["probe"]["head_c"] == (0.5 if head == "logistic"
                                                                                       else None)
        assert not (run_dir / "adapter").exists() and (run_dir / "head" / "head.safetensors").is_file()
        meta = json.loads((run_dir / "head" / "head.json").read_text())
        assert meta["kind"] == head and meta["embedding"]["max_chunks"] == 2 and meta["embedding"]["adapter"] is None
        assert meta.get("C") == (0.5 if head == "logistic" else None)


@pytest.mark.parametrize("head", ["logistic", "prototype"])
def test_eval_and_predict(run_dirs, head):
    from graftune.evaluate import load_run

    run_dir = run_dirs[head]
    texts = ["goal match team", "bank share price", "chip phone data"]
    rows = check_eval_and_predict(run_dir, texts)
    assert [r["label"] for r in rows] == [str(p) for p in load_run(run_dir).fewshot.predict(texts)]


def test_run_yaml_repeats_the_run(run_dirs, tiny):
    out = tiny["root"] / "again"
    result = runner.invoke(app, ["train", "--config", str(run_dirs["prototype"] / "run.yaml"), "--out", str(out),
                                 "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    first, again = (json.loads((d / "metrics.json").read_text()) for d in (run_dirs["prototype"], out))
    assert again["loss"] == first["loss"] and again["per_class"] == first["per_class"]
    from safetensors.torch import load_file

    heads = [load_file(d / "head" / "head.safetensors") for d in (run_dirs["prototype"], out)]
    assert heads[0]["prototypes"].equal(heads[1]["prototypes"])


@pytest.mark.parametrize("case, flags, message", [
    ("images", ["--data", "IMAGES"], "image data; --method probe trains text classifiers"),
    ("multi-label", ["--data", "MULTI"], "multi-label data; --method probe fits a single-label head"),
    ("prompt/response pairs", ["--data", "PAIRS"], "pairs data; --method probe"),
    ("causal-lm task", ["--task", "causal-lm"], "task: got causal-lm"),
    ("warm start", ["--init-from", "RUN"], "init_from: --method probe"),
    ("stacking", ["--stack-under", "RUN"], "stack_under: --method probe"),
    ("unknown option", ["--set", "r=4"], "unknown option(s) r; use head, head_c, max_chunks"),
    ("bad head", ["--set", "head=svm"], "head: got 'svm'"),
    ("train() epochs", ["--epochs", "3"], "epochs: --method probe trains nothing by gradient"),
    ("train() lr", ["--lr", "0.01"], "drop --lr"),
    ("train() batch size", ["--batch-size", "8"], "drop --batch-size"),
    ("train() schedule", ["--schedule", "cosine"], "schedule: steers train()'s epoch loop"),
])
def test_bad_inputs_are_one_line_and_leave_nothing(tiny, run_dirs, tmp_path, case, flags, message):
    out = tmp_path / "bad"
    args = train_args(tiny, out)
    places = {"IMAGES": tiny["images"], "MULTI": tiny["multi"], "PAIRS": tiny["pairs"], "RUN": run_dirs["logistic"]}
    text = one_line_error(runner.invoke(app, with_flags(args, flags, places)))
    assert message in text, text
    assert not out.exists() and not partial_dir(out).exists()


def test_quantize_export_and_a_corrupt_head_are_one_line(run_dirs, tmp_path):
    run_dir = run_dirs["prototype"]
    for cmd in (["eval", str(run_dir), "--quantize", "int8"], ["predict", str(run_dir), "goal", "--quantize", "int8"]):
        assert "quantize int8: a probe run" in one_line_error(runner.invoke(app, cmd))
    # a probe has no adapter to export
    assert "a probe run (the frozen base + a fitted head) has no adapter to export" in one_line_error(
        runner.invoke(app, ["export", str(run_dir), "--format", "peft", "--out", str(tmp_path / "p")]))
    assert not (tmp_path / "p").exists()
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "head" / "head.safetensors").write_bytes(b"not safetensors at all")
    for cmd in (["eval", str(copy)], ["predict", str(copy), "goal"]):
        assert "head.safetensors: not a valid safetensors file" in one_line_error(runner.invoke(app, cmd))


def test_a_probe_run_as_a_warm_start_source_says_it_has_no_adapter(tiny, run_dirs, tmp_path):
    # it said "not a run directory", though it is one: a probe run's model is the frozen base and a head
    out = tmp_path / "warm"
    for flag in ("--init-from", "--stack-under"):
        args = ["train", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--out", str(out), "--epochs", "1",
                "--max-length", "32", "--precision", "fp32", "--quiet", flag, str(run_dirs["logistic"])]
        text = one_line_error(runner.invoke(app, args))
        assert "a probe run, the frozen base and a fitted head/, has no adapter to start from" in text, text
        assert "not a run directory" not in text and not out.exists()


def test_a_folder_that_is_no_run_names_what_every_run_kind_holds(tmp_path):
    text = one_line_error(runner.invoke(app, ["predict", str(tmp_path / "nothere"), "goal"]))
    assert "not a run directory" in text and "head/ (probe)" in text and "in_context/ (in-context)" in text, text
