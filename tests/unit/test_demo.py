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
