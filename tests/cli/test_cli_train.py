"""The train/eval/predict/generate/models/export commands on tiny models, and their error paths: one line,
non-zero exit, no traceback, no run directory left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from graftune.cli import app
from graftune.run.rundir import partial_dir
from tests.train_helpers import bert_folder, foreign_csv, llama_folder, pairs_jsonl, topic_csv

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {"bert": bert_folder(root / "bert"), "llama": llama_folder(root / "llama"),
            "csv": topic_csv(root / "topics.csv"), "pairs": pairs_jsonl(root / "pairs.jsonl"), "root": root}


def base_args(tiny, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(tiny["bert"]), "--data", str(tiny["csv"]), "--out", str(out), "--epochs", "2",
            "--batch-size", "8", "--max-length", "32", "--precision", "fp32", "--quiet", *extra]


@pytest.fixture(scope="module")
def run_dir(tiny):
    out = tiny["root"] / "run"
    result = runner.invoke(app, base_args(tiny, out, "--method", "lora", "--set", "r=4", "--set", "alpha=8"))
    assert result.exit_code == 0, result.output
    assert "test: accuracy" in result.stdout and "(95% interval " in result.stdout
    return out


def test_train_writes_the_run_and_set_reaches_the_method(run_dir):
    meta = json.loads((run_dir / "adapter" / "adapter.json").read_text())
    assert meta["method"] == "lora" and meta["config"]["r"] == 4 and meta["config"]["alpha"] == 8


def test_config_file_reproduces_with_flags_winning(run_dir, tiny):
    out = tiny["root"] / "again"
    result = runner.invoke(app, ["train", "--config", str(run_dir / "run.yaml"), "--out", str(out), "--quiet",
                                 "--json"])
    assert result.exit_code == 0, result.output
    first = json.loads((run_dir / "metrics.json").read_text())
    again = json.loads(result.stdout)
    assert again["accuracy"] == first["accuracy"] and again["loss"] == pytest.approx(first["loss"])
    flag = runner.invoke(app, ["train", "--config", str(run_dir / "run.yaml"), "--out", str(tiny["root"] / "e1"),
                               "--epochs", "1", "--quiet", "--json"])
    assert json.loads(flag.stdout)["epochs_run"] == 1


def test_eval_predict_export(run_dir, tmp_path):
    result = runner.invoke(app, ["eval", str(run_dir)])
    assert result.exit_code == 0 and "macro-F1" in result.stdout and "confusion matrix" in result.stdout
    assert "(95% interval " in result.stdout
    as_json = json.loads(runner.invoke(app, ["eval", str(run_dir), "--json"]).stdout)
    assert {"accuracy", "macro_f1", "per_class", "confusion_matrix"} <= set(as_json)

    result = runner.invoke(app, ["predict", str(run_dir), "goal match team", "bank share price", "--json"])
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2 and all(set(r["probabilities"]) == {"money", "sport", "tech"} for r in rows)

    texts = tmp_path / "in.txt"
    texts.write_text("goal match\n\nchip phone\n")
    result = runner.invoke(app, ["predict", str(run_dir), "--input", str(texts)])
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 2

    result = runner.invoke(app, ["export", str(run_dir), "--format", "peft", "--out", str(tmp_path / "peft")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "peft" / "adapter_config.json").is_file()


def test_generate_on_a_causal_lm_run(tiny):
    out = tiny["root"] / "lm"
    result = runner.invoke(app, ["train", "--model", str(tiny["llama"]), "--data", str(tiny["pairs"]), "--out",
                                 str(out), "--epochs", "1", "--max-new-tokens", "3", "--precision", "fp32", "--quiet"])
    # the tiny llama has 128 positions: the default --max-length 256 is refused before anything is written
    assert result.exit_code == 2 and "reads at most 128 tokens" in result.output and not out.exists()
    result = runner.invoke(app, ["train", "--model", str(tiny["llama"]), "--data", str(tiny["pairs"]), "--out",
                                 str(out), "--epochs", "1", "--max-new-tokens", "3", "--precision", "fp32", "--quiet",
                                 "--max-length", "128"])
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.stdout
    result = runner.invoke(app, ["generate", str(out), "goal match", "--json", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompt"] == "goal match"
    # a prompt that leaves its answer no room in the run's 128 tokens is refused, as the server refuses it
    result = runner.invoke(app, ["generate", str(out), "goal match", " ".join(["goal"] * 400)])
    assert result.exit_code == 2 and "prompt 2 is" in result.output and "takes at most 125" in result.output
    assert "shorten it below 128 tokens" in result.output  # fewer new tokens cannot help a prompt this long
    result = runner.invoke(app, ["generate", str(out), "  "])
    assert result.exit_code == 2 and "prompt 1 is empty" in result.output


def test_models_lists_the_aliases():
    result = runner.invoke(app, ["models", "--json"])
    aliases = {m["alias"] for m in json.loads(result.stdout)}
    assert {"minilm", "smollm2", "efficientnet-lite0"} <= aliases
    assert "license" in json.loads(result.stdout)[0]


def _bad(tiny, tmp_path, *args: str) -> tuple[str, Path]:
    out = tmp_path / "bad"
    result = runner.invoke(app, [*args[:1], *(a.replace("OUT", str(out)) for a in args[1:])])
    assert result.exit_code != 0
    text = result.output.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert text.startswith("error: ")
    assert not out.exists() and not partial_dir(out).exists()
    return text, out


@pytest.mark.parametrize("case, changes, message", [
    ("missing data file", ["--data", "nope/missing.csv"], "no such file"),
    ("bad label column", ["--label-column", "topic"], "label column 'topic'"),
    ("bad method option", ["--set", "r=-1"], "r: got -1"),
    ("unknown method option", ["--set", "rank=4"], "unknown option"),
    ("unknown method", ["--method", "magic"], "unknown method"),
    ("bad schedule", ["--schedule", "step"], "schedule"),
    ("bad --set syntax", ["--set", "r"], "key=value"),
    ("missing model folder", ["--model", "./no/such/model"], "no such folder"),
    ("too many shots", ["--shots", "500"], "shots"),
])
def test_train_errors_are_one_line(tiny, tmp_path, case, changes, message):
    args = base_args(tiny, tmp_path / "bad")
    for flag, value in zip(changes[::2], changes[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    text, _ = _bad(tiny, tmp_path, *args)
    assert message in text, text


def test_bad_config_file_is_one_line(tiny, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: x\ndata: y\nepochs: many\n")
    text, _ = _bad(tiny, tmp_path, "train", "--config", str(cfg), "--out", "OUT")
    assert "epochs" in text


def test_existing_out_and_missing_run_dir(run_dir, tiny, tmp_path):
    result = runner.invoke(app, base_args(tiny, run_dir))
    assert result.exit_code != 0 and "already exists" in result.output
    for cmd in (["eval", str(tmp_path / "none")], ["predict", str(tmp_path / "none"), "x"],
                ["generate", str(run_dir), "hi"], ["predict", str(run_dir)],
                ["predict", str(run_dir), "--input", str(tmp_path / "missing.txt")],
                ["export", str(run_dir), "--format", "tflite", "--out", str(tmp_path / "x")]):
        result = runner.invoke(app, cmd)
        assert result.exit_code != 0 and "Traceback" not in result.output, cmd
        assert len(result.output.strip().splitlines()) == 1, (cmd, repr(result.output))


def test_a_real_process_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "graftune", "train", "--model", "minilm", "--data",
                           str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_a_test_file_that_overlaps_training_is_flagged_loudly(tiny, tmp_path):
    # the test file repeats three of the training texts: the run still trains, and its summary says so in capitals
    import csv

    with open(tiny["csv"], encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    test = tmp_path / "test.csv"
    with test.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows[:3] + [{"text": "chip phone software data", "label": rows[0]["label"]}])
    out = tmp_path / "leaky"
    result = runner.invoke(app, base_args(tiny, out, "--test", str(test)))
    assert result.exit_code == 0, result.output
    assert "WARNING: the test set shares 3 exact" in result.stdout
    assert json.loads((out / "metrics.json").read_text())["warnings"][0].startswith("the test set shares 3 exact")


def test_texts_the_models_vocabulary_cannot_read_get_a_warning_and_the_run_still_trains(tiny, tmp_path):
    # every text gets two words the tiny word-level vocabulary lacks (as an English model meets Chinese or Russian):
    # the run trains, and its summary says in capitals that the model does not read these texts; the known-word
    # runs of this file have no such line (run_dir's metrics are checked below)
    data = foreign_csv(tiny["csv"], tmp_path / "foreign.csv")
    out = tmp_path / "foreign"
    args = base_args(tiny, out, "--method", "lora", "--set", "r=4")
    args[args.index("--data") + 1] = str(data)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "WARNING: the model's tokenizer does not read these texts" in result.stdout
    checks = json.loads((out / "data_card.json").read_text())["checks"]["vocabulary"]
    assert checks["reads"] is False and checks["unknown_share"] > 0.2


def test_a_run_on_texts_the_model_reads_has_no_vocabulary_warning(run_dir):
    assert json.loads((run_dir / "data_card.json").read_text())["checks"]["vocabulary"]["reads"] is True
    assert "warnings" not in json.loads((run_dir / "metrics.json").read_text())


def test_empty_texts_are_dropped_with_a_counted_warning_by_train_and_eval(tiny, run_dir, tmp_path):
    # two rows with no text (empty, and spaces only): nothing to learn or score; train and eval drop them and say
    # how many and on which lines, check still reads the file as it is
    import csv

    with open(tiny["csv"], encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rows.insert(1, {"text": "", "label": rows[0]["label"]})  # line 3 (the header is line 1)
    rows.insert(6, {"text": "   ", "label": rows[0]["label"]})  # line 8
    gaps = tmp_path / "gaps.csv"
    with gaps.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    said = f"{gaps}: 2 rows with an empty text were dropped (line 3, line 8); fill them in or remove them"
    out = tmp_path / "gaps"
    args = base_args(tiny, out, "--method", "lora", "--set", "r=4")
    args[args.index("--data") + 1] = str(gaps)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"WARNING: {said}" in result.stdout.splitlines()
    assert said in json.loads((out / "metrics.json").read_text())["warnings"]
    scored = runner.invoke(app, ["eval", str(run_dir), "--data", str(gaps)])
    assert scored.exit_code == 0, scored.output
    assert f"WARNING: {said}" in scored.stdout.splitlines() and f"({len(rows) - 2} examples)" in scored.stdout
    checked = runner.invoke(app, ["check", str(gaps)])
    assert "2 empty texts: graftune drops them when loading; fill them in or remove them" in checked.stdout


def test_the_confusion_matrix_heads_each_column_with_its_class_name():
    # it cut every name to 7 characters ("busines", "enterta"): two classes could read the same
    from graftune.cli import _metrics_text

    names = ["business", "entertainment", "tech"]
    m = {"label_names": names, "accuracy": 0.9, "macro_f1": 0.9, "examples": 1200,
         "per_class": {n: {"precision": 0.9, "recall": 0.9, "f1": 0.9, "support": 400} for n in names},
         "confusion_matrix": [[390, 10, 0], [5, 395, 0], [0, 0, 400]]}
    text = _metrics_text(m)
    header, *rows = text.split("confusion matrix (rows: true, columns: predicted)\n")[1].splitlines()
    assert header.split() == ["business", "entertainmen", "tech"]
    assert rows[0].split() == ["business", "390", "10", "0"] and rows[2].split() == ["tech", "0", "0", "400"]
    assert len({len(line) for line in [header, *rows]}) == 1  # the columns line up


def test_the_summary_gives_a_small_head_in_kilobytes():
    from graftune.cli import _summary

    m = {"accuracy": 0.9, "examples": 10, "trainable_params": 10, "total_params": 100, "train_seconds": 1.0,
         "adapter_bytes": 196_000, "head_bytes": 4_700}
    assert "adapter 0.20 MB, head 4.7 kB" in _summary(m)  # it read "head 0.00 MB"



def test_class_names_alike_in_12_characters_head_the_columns_by_number():
    from graftune.cli import _metrics_text

    names = ["entertainment_news", "entertainment_film"]
    m = {"label_names": names, "accuracy": 0.9, "macro_f1": 0.9, "examples": 20,
         "per_class": {n: {"precision": 0.9, "recall": 0.9, "f1": 0.9, "support": 10} for n in names},
         "confusion_matrix": [[9, 1], [1, 9]]}
    header, *rows = _metrics_text(m).split("columns: predicted)\n")[1].splitlines()
    assert header.split() == ["1", "2"] and rows[1].split() == ["2", "entertainment_film", "1", "9"]
