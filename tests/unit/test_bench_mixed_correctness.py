"""The comparison behind `bench/issue13_serving_load.py --correctness`: a served answer against its run alone."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "issue13_serving_load", Path(__file__).resolve().parents[2] / "bench" / "issue13_serving_load.py")
load = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(load)


def _answer(**p: float) -> dict:
    return {"label": max(p, key=p.get), "probabilities": p}


def test_equal_answers_have_no_difference():
    alone = {"a": [_answer(x=0.7, y=0.3)], "b": [_answer(u=0.1, v=0.2, w=0.7)]}
    served = {("a", 0): _answer(x=0.7, y=0.3), ("b", 0): _answer(u=0.1, v=0.2, w=0.7)}
    d = load.differences(served, alone, 1e-4)
    assert (d["rows"], d["label_mismatches"], d["beyond_tolerance"], d["max_prob_diff"]) == (2, 0, 0, 0.0)


def test_a_flip_at_a_near_tie_is_told_apart_from_a_real_one():
    alone = {"a": [_answer(x=0.51, y=0.49), _answer(x=0.9, y=0.1)]}
    served = {("a", 0): _answer(x=0.49, y=0.51), ("a", 1): _answer(x=0.2, y=0.8)}
    d = load.differences(served, alone, 0.05)
    assert d["label_mismatches"] == 2 and d["of_them_near_ties"] == 1
    assert d["beyond_tolerance"] == 1 and d["max_prob_diff"] == pytest.approx(0.7)


def test_closest_other_adapter_compares_only_adapters_with_the_same_labels():
    alone = {"a": [_answer(x=0.7, y=0.3)], "b": [_answer(x=0.6, y=0.4)], "c": [_answer(u=0.7, v=0.3)],
             "d": [_answer(x=0.1, y=0.9)]}
    assert load.closest_other_adapter(alone) == pytest.approx(0.1)
