"""strategies/label_check.py: out-of-fold predictions find planted label flips; refusals are one line."""

from __future__ import annotations

import numpy as np
import pytest

from graftune.data.checks import check_data, format_report
from graftune.data.sources import Dataset, example_places, load_data
from graftune.errors import DataError
from graftune.strategies.label_check import check_labels, find_suspects, out_of_fold_probabilities
from tests.train_helpers import TOPICS, bert_folder, topic_rows


def flip(labels: list[str], fraction: float, seed: int) -> tuple[list[str], set[int]]:
    """Labels with ``fraction`` of them moved to another class (chosen at random), and the flipped indices."""
    rng = np.random.RandomState(seed)
    names = sorted(set(labels))
    picked = rng.choice(len(labels), size=round(fraction * len(labels)), replace=False)
    out = list(labels)
    for i in picked:
        out[i] = rng.choice([n for n in names if n != labels[i]])
    return out, {int(i) for i in picked}


def blobs(n_per_class: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Three well-separated Gaussian clusters in 16 dimensions."""
    rng = np.random.RandomState(seed)
    centres = rng.normal(0, 3, (3, 16))
    x = np.concatenate([c + rng.normal(0, 1, (n_per_class, 16)) for c in centres])
    return x, [name for name in ("a", "b", "c") for _ in range(n_per_class)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finds_most_planted_flips_on_separable_embeddings(seed):
    x, clean = blobs(40, seed)
    noisy, flipped = flip(clean, 0.1, seed)
    found = find_suspects(x, noisy, seed=seed)
    suspects = {s["index"] for s in found["suspects"]}
    assert len(suspects & flipped) >= 0.8 * len(flipped)
    assert len(suspects - flipped) <= 0.1 * (len(clean) - len(flipped))
    top = {s["index"] for s in found["suspects"][:len(flipped)]}  # the ranking puts the flips first
    assert len(top & flipped) >= 0.8 * len(flipped)
    caught = [s for s in found["suspects"] if s["index"] in flipped]  # most suggest the label they really had
    assert sum(s["suggested"] == clean[s["index"]] for s in caught) >= 0.8 * len(caught)
    assert all(s["given"] == noisy[s["index"]] and 0 < s["score"] <= 1 and s["given_probability"] <= 0.5
               for s in found["suspects"])
    scores = [s["score"] for s in found["suspects"]]
    assert scores == sorted(scores, reverse=True)
    strict = find_suspects(x, noisy, seed=seed, min_score=0.5)["suspects"]
    assert strict == found["suspects"][:len(strict)]  # the same ranking, cut at the threshold (scores are rounded)
    assert all(s["score"] >= 0.5 for s in strict) and all(s["score"] <= 0.5 for s in found["suspects"][len(strict):])


def test_out_of_fold_probabilities_never_see_their_own_example():
    """A lone point placed inside another class's cluster: out of fold, nothing vouches for its label."""
    x, labels = blobs(10)
    x = np.concatenate([x, x[:1] + 0.01])
    labels = labels + ["b"]  # a copy of an "a" point labelled "b"
    probs, classes, k = out_of_fold_probabilities(x, labels)
    assert classes == ["a", "b", "c"] and k == 5 and np.allclose(probs.sum(axis=1), 1)
    assert probs[-1].argmax() == 0


def test_folds_adapt_to_the_smallest_class_and_single_examples_are_refused():
    x, labels = blobs(10)
    labels = ["a"] * 10 + ["b"] * 10 + ["c"] * 7 + ["d"] * 3
    assert out_of_fold_probabilities(x, labels)[2] == 3
    with pytest.raises(DataError, match=r"at least 2 examples per class; d has 1"):
        out_of_fold_probabilities(x, labels[:-3] + ["c", "c", "d"])


def test_check_labels_with_a_tiny_encoder_finds_flips_in_topic_texts(tmp_path):
    """End to end on texts: a tiny random BERT's embeddings of three word-topic classes, 10% of labels flipped.
    A random encoder separates the topics only to ~90% out of fold, so clean suspects are many; the flips must
    still be found and rank above them."""
    rows = topic_rows(30, seed=3)
    texts, clean = [r["text"] for r in rows], [r["label"] for r in rows]
    noisy, flipped = flip(clean, 0.1, seed=0)
    ds = Dataset(modality="text", inputs=texts, labels=noisy, label_names=sorted(TOPICS), origin="mem")
    report = check_labels(ds, model=str(bert_folder(tmp_path / "bert")), max_length=32, head_c=10.0)
    found = {s["index"] for s in report["suspects"]}
    assert len(found & flipped) >= 0.8 * len(flipped)
    assert len(found - flipped) <= 0.25 * (len(texts) - len(flipped))
    scores = {True: [], False: []}
    for s in report["suspects"]:
        scores[s["index"] in flipped].append(s["score"])
    assert np.median(scores[True]) > np.median(scores[False])
    first = report["suspects"][0]
    assert first["text"] == " ".join(texts[first["index"]].split()) and first["given"] == noisy[first["index"]]
    assert report["checked"] == len({" ".join(t.lower().split()) for t in texts}) and report["folds"] == 5


def test_duplicates_are_checked_once_and_other_modalities_refused():
    x, labels = blobs(8)
    texts = [f"text {i}" for i in range(len(labels))]
    ds = Dataset(modality="text", inputs=texts + ["TEXT 0"], labels=labels + ["b"], label_names=["a", "b", "c"])
    report = check_labels(ds, embeddings=np.concatenate([x, x[:1]]))
    assert report["checked"] == len(texts) and report["examples"] == len(texts) + 1
    image = Dataset(modality="image", inputs=[], labels=[], label_names=["a", "b"], origin="pics")
    with pytest.raises(DataError, match="text encoder; pics holds image examples"):
        check_labels(image)


def test_suspects_say_where_they_are_as_a_person_counts_them(tmp_path):
    """A suspect names its row as the file's editor shows it (``data.sources.example_places``: a CSV's line, the
    header being line 1), or 'example N' counting from 1; ``index`` stays the position in the data, from 0."""
    x, labels = blobs(8)
    labels[0] = "b"  # an "a" point labelled "b": the first example is the suspect
    texts = [f"text {i}" for i in range(len(labels))]
    ds = Dataset(modality="text", inputs=texts, labels=labels, label_names=["a", "b", "c"], origin="mem")
    first = check_labels(ds, embeddings=x)["suspects"][0]
    assert (first["index"], first["where"]) == (0, "example 1")
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in zip(texts, labels)))
    loaded = load_data(str(path), dedup=False)
    first = check_labels(loaded, embeddings=x, places=example_places(str(path), loaded))["suspects"][0]
    assert (first["index"], first["where"]) == (0, "line 2")
    lines = format_report({**check_data(loaded), "labels": check_labels(loaded, embeddings=x,
                                                                        places=example_places(str(path), loaded))})
    lines = lines.splitlines()
    at = next(i for i, line in enumerate(lines) if line.split()[:1] == ["where"])  # the suspects' table
    assert lines[at + 1].split()[:2] == ["line", "2"]


@pytest.mark.parametrize("fraction, weak", [(0.05, False), (0.2, False), (0.45, True)])
def test_many_suspects_are_said_to_be_the_encoders_mistakes(tmp_path, monkeypatch, fraction, weak):
    """A share of suspects far above the few percent of label errors curated data holds says the frozen encoder
    cannot separate the classes: the problem line says so instead of 'review them'."""
    from graftune.strategies import label_check

    path = tmp_path / "t.csv"
    path.write_text("text,label\n" + "".join(f"word{i} text,{'ab'[i % 2]}\n" for i in range(20)))
    monkeypatch.setattr(label_check, "load_base", lambda model, task: type("B", (), {"tokenizer": None})())
    monkeypatch.setattr(label_check, "check_labels", lambda ds, **kw: {
        "count": int(fraction * 20), "fraction": fraction, "out_of_fold_accuracy": 1 - fraction, "checked": 20,
        "method": "frozen encoder", "suspects": []})
    report = label_check.check_source(str(path), labels=True, model="minilm")
    problem = next(p for p in report["problems"] if "suspect labels" in p)
    assert ("does not tell these classes apart well" in problem and "--min-score 0.5" in problem) == weak
    assert ("review them, highest score first" in problem) == (not weak)
