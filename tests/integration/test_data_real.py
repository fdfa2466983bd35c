"""The built-in data aliases on the real shipped files (offline)."""

from __future__ import annotations

import pytest

from graftune.data.card import data_card
from graftune.data.sources import load_data
from graftune.data.splits import make_splits

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bbc():
    return load_data("bbc-news")


def test_bbc_news_is_deduplicated(bbc):
    assert bbc.modality == "text" and not bbc.multi_label
    assert len(bbc) == 2124 and bbc.duplicates_removed == 100
    assert bbc.label_names == ["business", "entertainment", "politics", "sport", "tech"]
    assert len({" ".join(t.split()) for t in bbc.inputs}) == 2124
    assert bbc.license.startswith("articles (c) BBC") and len(bbc.sha256) == 64


def test_bbc_anchor_split(bbc):
    s = make_splits(bbc, seed=0, test_per_class=100, shots=16)
    assert len(s.train) == 80 and len(s.test) == 500
    assert set(s.test.counts().values()) == {100} and set(s.train.counts().values()) == {16}
    assert not set(s.train.inputs) & set(s.test.inputs)
    assert not set(s.val.inputs) & (set(s.train.inputs) | set(s.test.inputs))
    again = make_splits(bbc, seed=0, test_per_class=100, shots=16)
    assert data_card(again, source=bbc) == data_card(s, source=bbc)


def test_mnist_5k():
    ds = load_data("mnist-5k")
    assert ds.modality == "image" and len(ds) == 5000
    assert tuple(ds.inputs[0].shape) == (1, 28, 28) and str(ds.inputs[0].dtype) == "torch.float32"
    assert 0.0 <= float(min(x.min() for x in ds.inputs)) and float(max(x.max() for x in ds.inputs)) == 1.0
    assert ds.label_names == [str(d) for d in range(10)] and set(ds.counts().values()) == {500}
