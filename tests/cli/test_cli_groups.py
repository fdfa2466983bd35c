"""Trust after training, per group and under noise: ``eval --group-column`` and ``compare --group-column
--robustness`` on a tiny BERT and a topic csv with a region column (the groups travel with the examples through the
splits; the per-group numbers add up to the overall ones); bad input is one line and exit 2; where a check does not
apply to images, it says so in one line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from graftune.cli import app
from graftune.data.sources import load_data
from graftune.data.splits import make_splits
from graftune.strategies.robustness import PERTURBATIONS
from tests.train_helpers import bert_folder, image_folder, one_line_error, topic_rows, write_csv

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-groups")
    rows = topic_rows(12, seed=3)
    for i, r in enumerate(rows):
        r["region"] = "north" if i % 2 else "south"
    rows[0]["region"] = "west"  # a group of one example: noted, not an error
    bert = bert_folder(root / "bert")
    csv = write_csv(root / "regions.csv", rows)
    run = root / "run"
    trained = runner.invoke(app, ["train", "--model", str(bert), "--data", str(csv), "--out", str(run), "--method",
                                  "probe", "--shots", "4", "--max-length", "32", "--precision", "fp32", "--quiet"])
    assert trained.exit_code == 0, trained.output
    return {"root": root, "bert": str(bert), "csv": str(csv), "run": str(run), "rows": rows,
            "images": str(image_folder(root / "images", n_per_class=4))}


def weighted_accuracy(groups: dict) -> float:
    total = sum(g["examples"] for g in groups.values())
    return sum(g["accuracy"] * g["examples"] for g in groups.values()) / total


def test_groups_travel_with_their_examples_through_dedup_and_splits(tiny):
    first = {}
    for r in tiny["rows"]:  # loading keeps the first of equal texts, with its group
        first.setdefault(" ".join(r["text"].split()), r["region"])
    ds = load_data(tiny["csv"], group_column="region")
    test = make_splits(ds, seed=1, test_size=0.3).test
    assert len(test.groups) == len(test) > 0
    assert [first[" ".join(t.split())] for t in test.inputs] == test.groups


def test_eval_group_column_on_the_runs_test_split_and_on_a_file(tiny):
    result = runner.invoke(app, ["eval", tiny["run"], "--group-column", "region", "--json"])
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    groups = m["groups"]
    assert groups["column"] == "region" and set(groups["groups"]) <= {"north", "south", "west"}
    assert sum(g["examples"] for g in groups["groups"].values()) == m["examples"]
    assert weighted_accuracy(groups["groups"]) == pytest.approx(m["accuracy"], abs=1e-3)
    gap = groups["accuracy_gap"]
    assert gap["gap"] == pytest.approx(groups["groups"][gap["best"]]["accuracy"]
                                       - groups["groups"][gap["worst"]]["accuracy"])
    text = runner.invoke(app, ["eval", tiny["run"], "--data", tiny["csv"], "--group-column", "region"])
    assert text.exit_code == 0, text.output
    out = text.stdout
    assert "per group (region)" in out and "largest gap: accuracy" in out
    assert "note: group 'west' has 1 example: one example moves its accuracy by 100 points" in out
    assert next(line for line in out.splitlines() if line.startswith("west")).split()[1] == "1"


@pytest.mark.parametrize("args, message", [
    (["eval", "{run}", "--group-column", "country"],
     "no group column 'country'; columns found: text, label, region. Use --group-column NAME"),
    (["compare", "--model", "{bert}", "--data", "trec", "--out", "{root}/c1", "--group-column", "region"],
     "trec is a built-in alias: it has no columns, so no group column 'region'"),
    (["compare", "--model", "{bert}", "--data", "{images}", "--out", "{root}/c2", "--group-column", "region"],
     "a folder of class subfolders has no columns, so no group column 'region'"),
    (["compare", "--model", "{bert}", "--data", "{images}", "--out", "{root}/c3", "--robustness"],
     "--robustness: the perturbations and the attack edit text; not applicable to image data"),
    (["compare", "--model", "{bert}", "--data", "{csv}", "--out", "{root}/c4", "--robustness",
      "--robustness-sample", "0"], "robustness sample 0"),
], ids=["missing-column", "alias", "class-folder", "robustness-images", "bad-sample"])
def test_bad_input_is_one_line(tiny, args, message):
    args = [a.format(**tiny) for a in args]
    assert message in one_line_error(runner.invoke(app, args))
    assert not any(p.name.startswith("c") and p.is_dir() for p in tiny["root"].iterdir())  # nothing written


def test_robustness_refuses_an_image_run_in_one_line(tmp_path, monkeypatch):
    from graftune.config import RunConfig
    from graftune.runs import train
    from tests.train_helpers import use_tiny_cnn

    use_tiny_cnn(monkeypatch)
    image_folder(tmp_path / "imgs", n_per_class=6)
    out = tmp_path / "img"
    train(RunConfig(model="tiny-cnn", data=str(tmp_path / "imgs"), method="lora", out=str(out), epochs=1,
                    batch_size=4, precision="fp32", val_size=0, test_size=0.3), progress=False)
    refused = one_line_error(runner.invoke(app, ["robustness", str(out)]))
    assert "is an image run" in refused and "not applicable to image" in refused


def test_compare_with_groups_and_robustness_fills_results_and_report(tiny, tmp_path):
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", "--model", tiny["bert"], "--data", tiny["csv"], "--out", str(out),
                                 "--seeds", "1", "--shots", "3", "--strategies", "linear-probe,lora", "--augment",
                                 "off", "--set", "max_length=32", "--set", "epochs=1", "--set", "precision=fp32",
                                 "--group-column", "region", "--robustness", "--robustness-sample", "12",
                                 "--attack-sample", "3"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    probe, lora = saved["rows"]
    assert "lora shots=3 seed=0 aug=False: accuracy" in result.stdout and "group gap" in result.stdout
    # the lora run was loaded back and scored again: its groups add up to the accuracy compare measured
    groups = lora["groups"]["groups"]
    assert sum(g["examples"] for g in groups.values()) == lora["test_examples"]
    assert weighted_accuracy(groups) == pytest.approx(lora["accuracy"], abs=1e-3)
    robust = lora["robustness"]
    assert robust["examples"] == 12 and set(robust["accuracy"]) == set(PERTURBATIONS)
    assert robust["attack"] is None or robust["attack"]["attacked"] <= 3
    # the features strategy is measured through the model its runner hands back, on the same sampled texts
    assert weighted_accuracy(probe["groups"]["groups"]) == pytest.approx(probe["accuracy"], abs=1e-3)
    assert probe["robustness"]["examples"] == 12 and "trust_error" not in probe
    trust = saved["meta"]["trust"]
    assert trust["group_column"] == "region" and trust["robustness"]["sample"] == 12
    page = (out / "report.html").read_text()
    assert 'id="groups"' in page and "north (n=" in page and "accuracy gap" in page
    assert 'id="robustness"' in page and 'id="plot-char_noise"' in page and "attack success" in page
    assert 'id="attack"' in page and "budget 10 edits per text" in page
    assert "Not measured for" not in page


def _robust(clean: float, noise: float, flipped: int, success_at: dict) -> dict:
    """A row's ``robustness`` as ``measure`` writes it: word_swap and case flat, char_noise and word_drop falling,
    20 texts attacked."""
    curves = {"char_noise": {"0.05": clean, "0.1": clean - noise / 2, "0.2": clean - noise},
              "word_drop": {"0.05": clean, "0.1": clean, "0.2": clean - noise / 5},
              **{p: {"0.05": clean, "0.1": clean, "0.2": clean} for p in ("word_swap", "case")}}
    rate = {str(b): success_at.get(b, 0.0) for b in range(1, 11)}
    return {"examples": 100, "seed": 0, "clean_accuracy": clean, "strengths": [0.05, 0.1, 0.2], "accuracy": curves,
            "attack": {"attacked": 20, "success_rate": flipped / 20, "success_at": rate,
                       "mean_edits_when_successful": 4.0 if flipped else None, "budget": 10}}


def test_report_shows_every_strategy_side_by_side_and_says_what_the_attack_is():
    """The robustness part of report.html (from BBC's run, issue 15): two tables of at most 11 columns (they fit the
    page), every strategy in both and in every plot's legend; strategies with equal values (lora and contrastive:
    clean 0.94, case flat) drawn at distinct x, so none hides another; the attack and its budget said in words, with
    the counts (flipped of attacked) and the sampling noise of one text."""
    import re
    import xml.etree.ElementTree as ET

    from graftune.strategies.report import render_report

    base = {"shots": 8, "seed": 0, "augment": False, "test_examples": 500, "macro_f1": 0.9, "trainable_params": 1,
            "train_seconds": 1.0, "peak_rss_mb": 900}
    rows = [{**base, "strategy": "linear-probe", "accuracy": 0.93, "robustness": _robust(0.93, 0.15, 2, {10: 0.1})},
            {**base, "strategy": "contrastive", "accuracy": 0.96, "robustness": _robust(0.94, 0.08, 0, {})},
            {**base, "strategy": "lora", "accuracy": 0.9,
             "robustness": _robust(0.94, 0.13, 2, {b: 0.05 if b < 7 else 0.1 for b in range(1, 11)})}]
    how = {"sample": 100, "attack_sample": 20, "budget": 10, "strengths": [0.05, 0.1, 0.2], "seed": 0}
    page = render_report(rows, {"model": "minilm", "data": "bbc-news", "test_examples": 500, "settings": {},
                                "trust": {"group_column": None, "robustness": how}})
    for table in ("robustness", "attack"):
        html = re.search(rf'<table id="{table}">.*?</table>', page, flags=re.DOTALL).group(0)
        first = re.search(r"<tr>.*?</tr>", html, flags=re.DOTALL).group(0)
        assert first.count("<th>") <= 11, table
        names = re.findall(r"<tr><td>([^<]+)</td>", html)
        assert names == ["linear-probe", "contrastive", "lora"], (table, names)
    assert "<td>20</td><td>2</td>" in page and "<td>20</td><td>0</td>" in page  # texts attacked, flipped
    assert "budget 10 edits per text" in page and "until the predicted label changes or 10 edits are spent" in page
    assert "One text is 1.0 points" in page and "One text is 5.0 points" in page
    assert "Under word_swap and case every run scored its clean accuracy at every strength (case: an uncased" in page
    ns = "{http://www.w3.org/2000/svg}"
    figures = dict(re.findall(r'<figure id="plot-([a-z_]+)">(<svg.*?</svg>)', page, flags=re.DOTALL))
    assert set(figures) == {"shots", "params", "time", *PERTURBATIONS, "attack"}
    for name in (*PERTURBATIONS, "attack"):
        svg = ET.fromstring(figures[name])
        legend = [t.text for g in svg.iter(f"{ns}g") if g.get("class") == "legend" for t in g.iter(f"{ns}text")]
        assert legend == ["linear-probe", "contrastive", "lora"], (name, legend)
        area = svg.find(f"{ns}rect[@class='plot-area']")
        x0, y0 = float(area.get("x")), float(area.get("y"))
        x1, y1 = x0 + float(area.get("width")), y0 + float(area.get("height"))
        in_legend = {id(c) for g in svg.iter(f"{ns}g") for c in g.iter()}
        marks = [(float(c.get("cx")), float(c.get("cy"))) for c in svg.iter(f"{ns}circle") if id(c) not in in_legend]
        assert len(marks) == len(set(marks)) == 3 * (4 if name != "attack" else 11), name  # no marker hidden
        assert all(x0 + 3.5 <= x <= x1 - 3.5 and y0 + 3.5 <= y <= y1 - 3.5 for x, y in marks), name
