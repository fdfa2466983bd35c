"""Suspect labels: training examples whose given label the rest of the data contradicts (noise or poisoning).

Every text is embedded once with a frozen sentence encoder (``recipes.fewshot.embed``: mean-pooled, L2-
normalized, long texts read in up to 4 windows). A logistic regression is then fit k times, each time on all
folds but one of a stratified k-fold split, and predicts the held-out fold: every example gets probabilities
from a model that never saw it (out-of-fold). An example is a **suspect** when that out-of-fold prediction is
another label than the one it was given; its **score** is p(suggested) - p(given), in (0, 1], and suspects are
listed highest score first, so a user reads the most contradicted ones first; ``min_score`` keeps only those
scoring at least that (default 0: every disagreement; on TREC 0.2 halved the false positives for 4 points of
recall, bench/RESULTS.md). This is the simplest member of
the confident-learning family (Northcutt, Jiang & Chuang 2021, https://arxiv.org/abs/1911.00068): it flags more
than cleanlab's per-class thresholds would, which suits a short list a person reviews by hand.

``k`` is ``folds`` (5) lowered to the smallest class's count, so each fold holds every class at least once; a
class with a single example cannot be checked (it is always "contradicted": nothing else speaks for it), and is
refused. Exact duplicates (normalized text) are checked once, as the first copy: a copy in another fold would
vouch for its own label. Text only: the encoder is a text encoder (images: not applicable, said in the report).

What to expect (bench/issue15_trust.py, bench/RESULTS.md): on bbc-news with 10% of the labels flipped, most
flips are found at a false-positive rate of a few percent; with 8 examples per class the flips drown out the
evidence and recall falls.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from graftune.data.checks import check_data, example_key
from graftune.data.sources import Dataset, example_places, load_data
from graftune.errors import DataError
from graftune.recipes.fewshot import embed
from graftune.speed import precision
from graftune.zoo import load_base

FOLDS = 5
HEAD_C = 1.0
PREVIEW = 160
#: a share of suspects above this says more about the encoder than the labels: curated data sets hold a few percent
#: of label errors (Northcutt et al. 2021, https://arxiv.org/abs/2103.14749: 3.3% on average over 10 test sets)
WEAK_MODEL_SHARE = 0.2


def out_of_fold_probabilities(embeddings: np.ndarray, labels: Sequence[str], *, folds: int = FOLDS, seed: int = 0,
                              head_c: float = HEAD_C) -> tuple[np.ndarray, list[str], int]:
    """(n, classes) probabilities, each row from a logistic regression fit without that example; the class
    names (sorted); the number of folds used (``folds`` lowered to the smallest class's count)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(labels)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise DataError("the label check needs at least 2 classes; check --label-column")
    if counts.min() < 2:
        single = ", ".join(str(c) for c, n in zip(classes, counts) if n < 2)
        raise DataError(f"the label check needs at least 2 examples per class; {single} has 1: add examples or "
                        "drop the class")
    k = int(min(folds, counts.min()))
    probs = np.zeros((len(y), len(classes)))
    for fit_idx, held_idx in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(embeddings, y):
        head = LogisticRegression(C=head_c, max_iter=2000).fit(embeddings[fit_idx], y[fit_idx])
        cols = np.searchsorted(classes, head.classes_)
        probs[np.ix_(held_idx, cols)] = head.predict_proba(embeddings[held_idx])
    return probs, [str(c) for c in classes], k


def find_suspects(embeddings: np.ndarray, labels: Sequence[str], *, folds: int = FOLDS, seed: int = 0,
                  head_c: float = HEAD_C, min_score: float = 0.0) -> dict:
    """Suspects among ``labels`` given their examples' ``embeddings`` (rule in the module docstring): a dict with
    ``suspects`` (index, given, suggested, score, given_probability; highest score first), the folds used and
    the out-of-fold accuracy against the given labels. ``min_score`` keeps only suspects scoring at least that
    (0: every disagreement)."""
    probs, classes, k = out_of_fold_probabilities(np.asarray(embeddings, dtype=np.float64), labels, folds=folds,
                                                  seed=seed, head_c=head_c)
    given = np.searchsorted(classes, np.asarray(labels))
    predicted = probs.argmax(axis=1)
    rows = np.arange(len(given))
    score = probs[rows, predicted] - probs[rows, given]
    flagged = np.flatnonzero((predicted != given) & (score >= min_score))
    flagged = flagged[np.argsort(-score[flagged], kind="stable")]
    return {"folds": k, "out_of_fold_accuracy": round(float((predicted == given).mean()), 4),
            "suspects": [{"index": int(i), "given": classes[given[i]], "suggested": classes[predicted[i]],
                          "score": round(float(score[i]), 4), "given_probability": round(float(probs[i, given[i]]), 4)}
                         for i in flagged]}


def embed_texts(texts: Sequence[str], *, model: Any = "minilm", max_length: int = 256, max_chunks: int = 4,
                batch_size: int = 32) -> np.ndarray:
    """Frozen-encoder embeddings of ``texts`` (``model``: an alias, a folder, or a loaded zoo ``Base``), under the
    inference precision policy the probe recipe uses."""
    base = load_base(model, task="text-classification") if isinstance(model, str) else model
    policy = precision.choose("auto", inference=True)
    precision.apply(base.model, policy)
    with policy.autocast():
        emb = embed(base.model, base.tokenizer, list(texts), batch_size=batch_size, max_length=max_length,
                    pooling=base.pooling or "mean", max_chunks=max_chunks)
    return emb.float().numpy()


def check_labels(ds: Dataset, *, model: Any = "minilm", folds: int = FOLDS, seed: int = 0, head_c: float = HEAD_C,
                 max_length: int = 256, max_chunks: int = 4, embeddings: np.ndarray | None = None,
                 min_score: float = 0.0, places: Sequence[str] | None = None) -> dict:
    """The suspect-label report on a single-label text ``Dataset``: JSON-ready, each suspect with its index in
    ``ds`` (from 0), where it is (``where``: ``places[index]``, as ``data.sources.example_places`` names the rows of
    a file, the way a person finds it in an editor; without ``places``, 'example N' counting from 1), a preview of
    its text, the given and suggested labels and the score. ``embeddings`` (one row per example of ``ds``) skips
    the encoder (tests, or a caller that already embedded the texts)."""
    if ds.modality != "text":
        raise DataError(f"the label check reads texts with a text encoder; {ds.origin} holds {ds.modality} "
                        "examples (not applicable)")
    if ds.multi_label:
        raise DataError("the label check is for single-label data; multi-label labels are not checked")
    first: dict[str, int] = {}
    for i, x in enumerate(ds.inputs):
        first.setdefault(example_key("text", x), i)
    keep = np.array(sorted(first.values()))
    texts = [ds.inputs[i] for i in keep]
    labels = [ds.labels[i] for i in keep]
    started = time.perf_counter()
    if embeddings is None:
        emb = embed_texts(texts, model=model, max_length=max_length, max_chunks=max_chunks)
    else:
        emb = np.asarray(embeddings)[keep]
    embed_seconds = time.perf_counter() - started
    found = find_suspects(emb, labels, folds=folds, seed=seed, head_c=head_c, min_score=min_score)
    for s in found["suspects"]:
        s["index"] = int(keep[s["index"]])
        s["where"] = places[s["index"]] if places is not None else f"example {s['index'] + 1}"
        flat = " ".join(ds.inputs[s["index"]].split())
        s["text"] = flat if len(flat) <= PREVIEW else flat[:PREVIEW - 3] + "..."
    return {
        "method": (f"frozen {model if isinstance(model, str) else 'encoder'} embeddings, stratified "
                   f"{found['folds']}-fold logistic regression (C={head_c}), out-of-fold predictions"),
        "rule": "a suspect's out-of-fold prediction is another label; score = p(suggested) - p(given), "
                f"highest first; kept from score {min_score}",
        "examples": len(ds), "checked": len(keep), "folds": found["folds"],
        "out_of_fold_accuracy": found["out_of_fold_accuracy"], "count": len(found["suspects"]),
        "fraction": round(len(found["suspects"]) / len(keep), 4), "suspects": found["suspects"],
        "seconds": round(time.perf_counter() - started, 2), "embed_seconds": round(embed_seconds, 2),
    }


# --- what `graftune check` runs --------------------------------------------------------------------------------
def check_source(data: str, *, test: str | None = None, labels: bool = False, model: str = "minilm",
                 text_column: str = "text", label_column: str = "label", folds: int = FOLDS, seed: int = 0,
                 max_length: int = 256, min_score: float = 0.0) -> dict:
    """``data.checks.check_data`` on ``data`` as the file holds it (no duplicate or empty text dropped), against
    ``test`` when given; with ``labels``, the suspect-label report under ``labels``, and with ``model``'s tokenizer
    the texts over ``max_length`` tokens and whether its vocabulary reads them. Reads only; writes nothing."""
    as_is = {"text_column": text_column, "label_column": label_column, "dedup": False, "drop_empty": False}
    ds = load_data(data, **as_is)
    user_test = load_data(test, task=ds.modality, **as_is) if test else None
    if not labels:
        return check_data(ds, user_test)
    if ds.modality != "text":
        raise DataError(f"--labels reads texts with a text encoder; {data} holds {ds.modality} examples "
                        "(not applicable): drop --labels")
    base = load_base(model, task="text-classification")
    report = check_data(ds, user_test, tokenizer=base.tokenizer, max_tokens=max_length)
    report["labels"] = check_labels(ds, model=base, folds=folds, seed=seed, max_length=max_length,
                                    min_score=min_score, places=example_places(data, ds))
    report["labels"]["method"] = report["labels"]["method"].replace("frozen encoder", f"frozen {model}")
    found = report["labels"]
    if found["count"] and found["fraction"] > WEAK_MODEL_SHARE:
        # far more than label noise usually is: the frozen encoder cannot tell these classes apart well
        report["problems"].append(
            f"{found['count']} suspect labels ({found['fraction']:.1%} of the checked examples): far more than "
            f"mislabelled data usually holds (a few percent); with an out-of-fold accuracy of "
            f"{found['out_of_fold_accuracy']:.3f} the frozen {model} does not tell these classes apart well, so most "
            "of these are its own mistakes. Review only the highest scores (--min-score 0.5), or check with a "
            "--model that reads these texts")
    elif found["count"]:
        report["problems"].append(f"{found['count']} suspect labels ({found['fraction']:.1%} of the checked "
                                  "examples): the rest of the data says otherwise; review them, highest score first")
    return report
