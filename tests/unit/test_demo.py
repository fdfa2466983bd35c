"""The demo's frozen baseline (demo.probe_baseline) on a tiny random BERT: texts are embedded as compare's
linear-probe embeds them (fewshot.frozen_fit), on exactly the run's splits."""

from __future__ import annotations

import pytest

from graftune.demo import demo_config, probe_baseline
from tests.train_helpers import bert_folder, topic_csv


def test_probe_baseline_is_compares_linear_probe_on_the_runs_splits(tmp_path):
    import numpy as np

    from graftune.core.model import AdapterModel
    from graftune.data.sources import load_data
    from graftune.data.splits import make_splits
    from graftune.recipes.fewshot import frozen_fit
    from graftune.zoo import load_base

    bert, csv = bert_folder(tmp_path / "bert"), topic_csv(tmp_path / "t.csv", n_per_class=16)
    cfg = demo_config(tmp_path / "run", model=str(bert), data=str(csv), test_per_class=6, shots=4, max_length=32,
                      precision="fp32")
    got = probe_baseline(cfg)
    ds = load_data(str(csv))
    splits = make_splits(ds, **cfg.split_args())
    base = load_base(str(bert))
    fitted = frozen_fit(AdapterModel(base.model), base.tokenizer, splits.train.inputs, splits.train.labels,
                        max_length=32)
    accuracy = float(np.mean(np.asarray(fitted.predict(splits.test.inputs)) == np.asarray(splits.test.labels)))
    assert got["accuracy"] == pytest.approx(accuracy)
    assert got["trainable_params"] == 3 * 32 + 3  # three classes: coefficients + intercepts
    assert got["seconds"] > 0


def test_the_demo_table_shows_autos_evidence_pick_and_the_baseline():
    from graftune.demo import format_table

    record = {"training_examples": 48, "folds": 5, "method": "contrastive", "reason": "contrastive scored best.",
              "candidates": {"probe": {"macro_f1": 0.71, "macro_f1_se": 0.05, "folds": 5, "held_out": 48,
                                       "trainable_params": 2310, "seconds": 2.0},
                             "contrastive": {"macro_f1": 0.84, "macro_f1_se": 0.04, "folds": 3, "held_out": 29,
                                             "trainable_params": 40000, "seconds": 60.0}}}
    result = {"picked": {"accuracy": 0.86, "macro_f1": 0.85, "trainable_params": 40000, "examples": 300},
              "probe": {"accuracy": 0.72, "macro_f1": 0.70, "trainable_params": 2310}, "auto": record,
              "seconds": 150.0, "run_dir": "runs/demo", "config": {"seed": 0, "method": "contrastive"}}
    text = format_table(result)
    assert "5-fold cross-validation" in text and "probe        macro-F1 0.710 +- 0.050 on 48 held-out (5 fold(s))" in text
    assert "picked contrastive: contrastive scored best." in text
    assert "+14.0 points: ahead of the frozen baseline (one standard error: 2.6 points)" in text
    tie = format_table({**result, "picked": {**result["picked"], "accuracy": 0.73}})
    assert "+1.0 points: a tie within the test set's sampling noise" in tie
