"""What ``graftune train`` trains when nobody names a method (``runs.default_method``): ``--method auto`` for
single-label text with few examples per class (the contrastive recipe when a class has one), LoRA otherwise, and
LoRA whenever a LoRA setting is given."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from graftune.cli import app
from graftune.config import RunConfig
from graftune.runs import FEW_PER_CLASS, default_method
from tests.train_helpers import bert_folder, pairs_jsonl, topic_csv, topic_rows, write_csv

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("default-method")
    # 20 a class: 16 after the default test carve (20%), 14 after the validation carve (10%)
    return {"bert": bert_folder(root / "bert"), "small": topic_csv(root / "small.csv"),
            "large": topic_csv(root / "large.csv", n_per_class=100), "root": root}


def config(tiny, data: str = "small", **fields) -> RunConfig:
    return RunConfig(model=str(tiny["bert"]), data=str(tiny[data]), out=str(tiny["root"] / "out"), **fields)


def test_few_examples_per_class_of_text_are_auto_and_say_why(tiny):
    cfg, why = default_method(config(tiny))
    assert cfg.method == "auto"
    assert why.startswith("no --method given: --method auto,")
    assert (f"at most {FEW_PER_CLASS} training examples per class on average (here 48 in 3 classes, 16 on "
            "average)") in why, why
    assert "frozen probe" in why and "--method contrastive" in why


def test_a_class_of_one_example_trains_contrastive_as_auto_cannot_cross_validate(tiny, tmp_path):
    rows = topic_rows(12) + [{"text": "a lone note about the weather", "label": "weather"}]
    data = write_csv(tmp_path / "lone.csv", rows)
    test = write_csv(tmp_path / "lone-test.csv", topic_rows(4, seed=5))
    cfg, why = default_method(RunConfig(model=str(tiny["bert"]), data=str(data), test=str(test),
                                        out=str(tmp_path / "out")))
    assert cfg.method == "contrastive", why
    assert why.startswith("no --method given: training contrastive"), why
    assert "class weather has a single training example" in why and "needs 2 a class" in why
    cfg, why = default_method(config(tiny, shots=1))
    assert cfg.method == "contrastive" and "every class has a single training example" in why


def test_the_reason_says_the_rule_compares_the_mean_over_classes(tiny, tmp_path):
    # uneven classes: it said "(here 8.33)", a fraction of an example with nothing to say it was a mean
    extra = [r for r in topic_rows(20, seed=3) if r["label"] == "sport"][:5]
    data = write_csv(tmp_path / "uneven.csv", topic_rows(11) + extra)
    cfg, why = default_method(RunConfig(model=str(tiny["bert"]), data=str(data), out=str(tmp_path / "out")))
    found = re.search(r"per class on average \(here (\d+) in 3 classes, ([\d.]+) on average\)", why)
    assert cfg.method == "auto" and found, why
    assert found[0].endswith("(here 30 in 3 classes, 10 on average)")


def test_more_examples_per_class_keep_lora(tiny):
    cfg, why = default_method(config(tiny, "large"))  # 80 a class after the test carve (no validation part)
    assert 80 > FEW_PER_CLASS and cfg.method == "lora" and why is None
    cfg, why = default_method(config(tiny, "large", shots=8))  # --shots 8 on the same file: few again
    assert cfg.method == "auto" and "(here 24 in 3 classes, 8 on average)" in why


@pytest.mark.parametrize(("fields", "said"), [({"epochs": 3}, "as --epochs is LoRA's"),
                                              ({"options": {"r": 4}}, "as --set r is LoRA's"),
                                              ({"patience": 2, "epochs": 3}, "as --epochs and --patience are LoRA's"),
                                              ({"resume": True}, None), ({"method": "ia3"}, None)])
def test_a_lora_setting_or_another_method_keeps_the_config(tiny, fields, said):
    """--epochs, a --set option, early-stopping patience are the adapter loop's: the user is configuring LoRA, and
    is told that without them these few examples would be auto's."""
    given = config(tiny, **fields)
    cfg, why = default_method(given)
    assert cfg == given
    assert why is None if said is None else (why.startswith("no --method given: training LoRA") and said in why)


def test_a_data_parallel_launch_keeps_lora(tiny, monkeypatch):
    """Under torchrun every process would switch, and the contrastive recipe refuses to train in several."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg, why = default_method(config(tiny))
    assert cfg.method == "lora" and why is None


def test_multi_label_causal_lm_and_broken_data_keep_lora(tiny):
    rows = [{**r, "label": r["label"] + ("|urgent" if i % 2 else "")} for i, r in enumerate(topic_rows(12))]
    multi = write_csv(tiny["root"] / "multi.csv", rows)
    pairs = pairs_jsonl(tiny["root"] / "pairs.jsonl")
    for cfg in (config(tiny, data="small", label_column="missing"),
                RunConfig(model=str(tiny["bert"]), data=str(multi), out=str(tiny["root"] / "o")),
                RunConfig(model=str(tiny["bert"]), data=str(pairs), out=str(tiny["root"] / "o"))):
        got, why = default_method(cfg)
        assert got.method == "lora" and why is None


def test_cli_without_method_runs_auto_and_records_its_pick(tiny):
    out = tiny["root"] / "cli-run"
    result = runner.invoke(app, ["train", "--model", str(tiny["bert"]), "--data", str(tiny["small"]), "--out",
                                 str(out), "--max-length", "32", "--precision", "fp32", "--set", "r=4",
                                 "--quiet"])
    # a --set option configures LoRA (the default method), so LoRA trains
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("no --method given: training LoRA, as --set r is LoRA's")
    assert "method: lora" in (out / "run.yaml").read_text()

    out = tiny["root"] / "cli-default"
    result = runner.invoke(app, ["train", "--model", str(tiny["bert"]), "--data", str(tiny["small"]), "--out",
                                 str(out), "--max-length", "32", "--precision", "fp32", "--quiet", "--budget", "600"])
    assert result.exit_code == 0, result.output  # --budget reaches the default's comparison
    assert result.stdout.startswith("--method auto (the default here: no --method given) picked "), result.stdout
    assert "no --method given: --method auto," in result.stdout and "test: accuracy" in result.stdout
    record = json.loads((out / "metrics.json").read_text())["auto"]
    assert record["budget_s"] == 600 and f"given) picked {record['method']}" in result.stdout
    assert f"after auto's {record['seconds']:.1f} s comparison" in result.stdout
    assert "method: auto" not in (out / "run.yaml").read_text()  # the pick is recorded, to repeat as it trained
    # the run.yaml repeats it as it ran, and --method lora is honoured as given
    again = runner.invoke(app, ["train", "--config", str(out / "run.yaml"), "--out", str(tiny["root"] / "again"),
                                "--quiet", "--json"])
    assert again.exit_code == 0 and "no --method given" not in again.output
    plain = runner.invoke(app, ["train", "--config", str(out / "run.yaml"), "--out", str(tiny["root"] / "plain"),
                                "--quiet"])
    # run.yaml keeps auto's record, but nothing was compared this time
    assert plain.exit_code == 0 and "test: accuracy" in plain.stdout and "comparison" not in plain.stdout
    assert json.loads(again.stdout)["accuracy"] == json.loads((out / "metrics.json").read_text())["accuracy"]


def test_budget_without_a_comparison_is_refused_in_one_line(tiny):
    """--budget is read when the default is auto (above); where the default trains LoRA it would be ignored."""
    result = runner.invoke(app, ["train", "--model", str(tiny["bert"]), "--data", str(tiny["large"]), "--out",
                                 str(tiny["root"] / "budget-lora"), "--budget", "60"])
    said = ("--budget bounds --method auto's comparison; without --method this run trains lora (the data is not "
            f"single-label text with at most {FEW_PER_CLASS}")
    assert result.exit_code == 2 and said in result.output
    assert not (tiny["root"] / "budget-lora").exists()
