"""data/checks.py: duplicates (exact, near), conflicting labels, balance, lengths, test leakage; the card's summary."""

from __future__ import annotations

import json
import random

import numpy as np
import torch

from graftune.data.card import data_card
from graftune.data.checks import (
    _jaccard,
    check_data,
    format_report,
    near_duplicate_pairs,
    shingles,
    split_checks,
    split_warnings,
    vocabulary_fit,
)
from graftune.data.sources import Dataset
from graftune.data.splits import make_splits
from tests.train_helpers import COMMON, TOPICS, write_tokenizer

WORDS = ["market", "bank", "share", "price", "profit", "goal", "match", "team", "player", "coach", "chip", "phone",
         "software", "data", "cloud", "robot", "river", "mountain", "city", "road", "garden", "window", "kitchen",
         "summer", "winter", "music", "film", "actor", "stage", "crowd"]


def sentence(rng: random.Random, n: int = 30) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def text_ds(texts, labels) -> Dataset:
    return Dataset(modality="text", inputs=list(texts), labels=list(labels), label_names=sorted(set(labels)),
                   origin="mem")


def edit(text: str, rng: random.Random, edits: int) -> str:
    chars = list(text)
    for _ in range(edits):
        chars[rng.randrange(len(chars))] = rng.choice("xyz")
    return "".join(chars)


def test_exact_duplicates_ignore_case_and_whitespace_and_conflicts_are_found():
    rng = random.Random(0)
    base = [sentence(rng) for _ in range(20)]
    texts = base + [base[0].upper(), "  " + base[1].replace(" ", "   ") + "\n", base[2]]
    labels = ["a", "b"] * 10 + ["a", "b", "b"]  # base[2] was "a": the copy under "b" is a conflict
    report = check_data(text_ds(texts, labels))
    dup = report["exact_duplicates"]
    assert (dup["groups"], dup["extra_copies"], dup["whitespace_equal_copies"]) == (3, 3, 2)
    assert report["conflicting_labels"]["groups"] == 1
    assert report["conflicting_labels"]["examples"][0]["labels"] == ["a", "b"]
    assert sorted(report["conflicting_labels"]["examples"][0]["indices"]) == [2, 22]
    assert any("3 exact duplicates" in p and "1 differing only in case" in p for p in report["problems"])
    assert any("different labels" in p for p in report["problems"])
    json.dumps(report)  # JSON-serializable as returned


def test_near_duplicates_match_brute_force_jaccard():
    """Every pair at Jaccard >= 0.8 (by the exact all-pairs computation) is reported, and nothing below it."""
    rng = random.Random(1)
    texts = [sentence(rng, 25) for _ in range(150)]
    for k in range(10):  # planted near-copies: a few characters changed
        texts.append(edit(texts[k], rng, edits=2 + k // 3))
    sets = [shingles(t) for t in texts]
    truth = {(i, j) for i in range(len(texts)) for j in range(i + 1, len(texts)) if _jaccard(sets[i], sets[j]) >= 0.8}
    pairs, capped = near_duplicate_pairs(texts)
    assert not capped and len(truth) >= 6  # most planted edits are near-duplicates (5 edits fall below)
    assert {(i, j) for i, j, _ in pairs} == truth
    assert all(s >= 0.8 for *_, s in pairs)


def test_near_duplicates_in_the_report_flag_different_labels():
    rng = random.Random(2)
    texts = [sentence(rng, 40) for _ in range(30)]
    texts.append(edit(texts[3], rng, 2))
    labels = ["a", "b", "c"] * 10 + ["c"]  # texts[3] is "a": its near-copy says "c"
    near = check_data(text_ds(texts, labels))["near_duplicates"]
    assert (near["pairs"], near["texts"], near["with_different_labels"]) == (1, 2, 1)
    ex = near["examples"][0]
    assert (ex["a"], ex["b"], ex["label_a"], ex["label_b"]) == (3, 30, "a", "c") and ex["similarity"] >= 0.8


def test_balance_empty_and_long_texts_and_token_counts(tmp_path):
    rng = random.Random(3)
    texts = [sentence(rng, 10) for _ in range(40)] + ["   ", "", " ".join(["word"] * 1200)]
    labels = ["big"] * 36 + ["small"] * 4 + ["big", "small", "big"]
    # a word-level tokenizer: one token per word, plus [CLS] and [SEP]
    report = check_data(text_ds(texts, labels), tokenizer=write_tokenizer(tmp_path), max_tokens=20)
    balance = report["class_balance"]
    assert (balance["smallest"], balance["smallest_count"], balance["largest_count"]) == ("small", 5, 38)
    assert balance["ratio"] == round(38 / 5, 3) and balance["imbalanced"]
    lengths = report["lengths"]
    assert lengths["empty"] == {"count": 2, "indices": [40, 41]}
    assert lengths["long"]["count"] == 1 and lengths["long"]["examples"][0] == {"index": 42, "words": 1200}
    assert lengths["tokens"]["over_max_length"] == 1 and lengths["words"]["max"] == 1200
    problems = " ".join(report["problems"])
    assert "class imbalance: 'small' (5)" in problems and "2 empty texts" in problems and "1 text has more" in problems
    # the two empty texts ("   " under small, "" under big) are empty, not copies of each other with two labels
    assert report["exact_duplicates"]["groups"] == 0 and report["exact_duplicates"]["whitespace_equal_copies"] == 0
    assert report["conflicting_labels"]["groups"] == 0 and "under different labels" not in problems
    # ... nor a blank test text a copy of a blank training text (a "test leak" under another label)
    test = check_data(text_ds(texts, labels), text_ds(["", "a new text about nothing"], ["big", "small"]))["test"]
    assert test["exact_overlap"]["count"] == 0 and test["conflicting_labels"]["count"] == 0
    assert not any("LEAK" in p for p in test["problems"])


def test_a_clean_dataset_has_no_problems():
    rng = random.Random(4)
    texts = [sentence(rng, 20) for _ in range(30)]
    report = check_data(text_ds(texts, ["a", "b", "c"] * 10))
    assert report["problems"] == [] and report["near_duplicates"]["pairs"] == 0


def test_a_test_set_that_overlaps_training_is_flagged_loudly():
    rng = random.Random(5)
    train_texts = [sentence(rng, 30) for _ in range(40)]
    labels = ["a", "b"] * 20
    test_texts = [train_texts[0], train_texts[1].upper(), edit(train_texts[2], rng, 2), train_texts[3]]
    test_texts += [sentence(rng, 30) for _ in range(6)]
    test_labels = ["a", "b", "a", "a"] + ["a", "b"] * 3  # train_texts[3] is "b" in training
    report = check_data(text_ds(train_texts, labels), text_ds(test_texts, test_labels))
    t = report["test"]
    assert t["exact_overlap"]["count"] == 3 and t["exact_overlap"]["fraction"] == 0.3
    assert t["conflicting_labels"]["count"] == 1 and t["conflicting_labels"]["examples"][0]["test_index"] == 3
    assert t["near_overlap"]["count"] == 1 and t["near_overlap"]["examples"][0]["b"] == 2
    assert report["problems"][0].startswith("TEST LEAK: 3 of 10 test examples (30.0%)")
    assert any(p.startswith("TEST LEAK: 1 more") for p in report["problems"])
    # a near-copy under another label is no leak (it cannot make the test easier): counted apart, not a problem
    other = check_data(text_ds(train_texts, labels), text_ds([edit(train_texts[2], rng, 2)], ["b"]))["test"]
    assert other["near_overlap"]["count"] == 0 and other["near_overlap"]["other_label"] == 1
    assert other["problems"] == []
    assert "(and 1 under another label: no leak)" in format_report(check_data(
        text_ds(train_texts, labels), text_ds([edit(train_texts[2], rng, 2)], ["b"])))


def test_images_exact_duplicates_by_pixels_and_the_checks_that_do_not_apply():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 8, 8, generator=g) for _ in range(6)]
    inputs = images + [images[0].clone(), images[1] + 1e-3]  # a true copy, and a nearly-equal image
    labels = ["x", "y"] * 3 + ["y", "y"]  # images[0] is "x", its copy "y"
    ds = Dataset(modality="image", inputs=inputs, labels=labels, label_names=["x", "y"], origin="mem")
    report = check_data(ds)
    assert report["exact_duplicates"]["extra_copies"] == 1  # the nearly-equal image is not a copy
    assert report["conflicting_labels"]["groups"] == 1
    assert set(report["not_applicable"]) == {"near_duplicates", "lengths"}
    assert "near_duplicates" not in report and "lengths" not in report
    json.dumps(report)


def test_pairs_have_no_label_checks():
    pairs = [("q one", "a one"), ("Q  one", "a one"), ("q two", "a two")]
    ds = Dataset(modality="pairs", inputs=pairs, labels=[], label_names=[], origin="mem")
    report = check_data(ds)
    assert report["exact_duplicates"]["extra_copies"] == 1
    assert {"conflicting_labels", "class_balance"} <= set(report["not_applicable"])


def test_the_data_card_counts_overlap_between_splits(tmp_path):
    rng = random.Random(6)
    texts = [sentence(rng, 30) for _ in range(60)]
    labels = ["a", "b", "c"] * 20
    ds = text_ds(texts, labels)
    clean = data_card(make_splits(ds, seed=0, shots=4), source=ds)["checks"]
    assert clean["overlap"] == {"train_test": 0, "train_val": 0, "val_test": 0}
    assert clean["near_overlap_train_test"] == 0 and clean["conflicting_labels"] == 0
    assert clean["train_imbalance_ratio"] == 1.0
    user_test = text_ds(texts[:5] + [edit(texts[5], rng, 2)] + [sentence(rng, 30)], labels[:7])
    checks = data_card(make_splits(ds, seed=0, test=user_test, val_size=0), source=ds)["checks"]
    assert checks["overlap"]["train_test"] == 5 and checks["near_overlap_train_test"] == 1
    relabelled = text_ds(user_test.inputs, labels[:5] + ["b", "a"])  # the near-copy under another label: no leak
    checks = data_card(make_splits(ds, seed=0, test=relabelled, val_size=0), source=ds)["checks"]
    assert checks["near_overlap_train_test"] == 0
    assert checks["duplicates"] == {"train": 0, "val": 0, "test": 0}


def test_split_checks_count_duplicates_and_label_clashes_inside_splits():
    train = text_ds(["one two three four", "One two three  four", "five six seven"], ["a", "b", "a"])
    empty = text_ds([], [])
    empty.label_names = ["a", "b"]
    out = split_checks(train, empty, text_ds(["", "eight nine ten"], ["a", "b"]))
    assert out["duplicates"]["train"] == 1 and out["conflicting_labels"] == 1
    assert out["empty_texts"] == {"train": 0, "val": 0, "test": 1}
    assert np.isclose(out["train_imbalance_ratio"], 2.0)


def test_split_warnings_say_loudly_when_the_test_set_overlaps_training():
    assert split_warnings({"overlap": {"train_test": 0}, "near_overlap_train_test": 0, "conflicting_labels": 0}) == []
    loud = split_warnings({"overlap": {"train_test": 3}, "near_overlap_train_test": 1, "conflicting_labels": 2})
    assert "shares 3 exact and 1 near-duplicate example(s) with training" in loud[0]
    assert "2 text(s) appear with different labels" in loud[1]
    # with the test set's size, how much those copies can move its accuracy at most
    sized = split_warnings({"overlap": {"train_test": 0}, "near_overlap_train_test": 2, "test_examples": 772})
    assert "overstates the model by up to 0.3 points (2 of its 772 examples)" in sized[0]


def letter_tokenizer(folder):
    """A WordPiece vocabulary of single letters only: every word is spelled one letter per token, as an English
    vocabulary spells Cyrillic or Greek."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{c}" for c in letters)])
                     + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab=str(vocab), do_lower_case=True)


def test_the_vocabulary_check_tells_texts_the_model_reads_from_texts_it_cannot(tmp_path):
    words = tmp_path / "words"
    known = [" ".join(TOPICS["sport"][i:i + 4] + COMMON[i:i + 3]) for i in range(6)]
    read = vocabulary_fit(write_tokenizer(words), known)
    assert read["reads"] and read["unknown_share"] == 0 and 0.1 < read["tokens_per_char"] < 0.3
    # words outside the vocabulary become [UNK] (文字 is two: CJK characters are split): 4 of 8 tokens per text
    foreign = [" ".join(TOPICS["sport"][i:i + 4] + ["слово", "文字", "λέξη"]) for i in range(6)]
    unread = vocabulary_fit(write_tokenizer(words), foreign)
    assert not unread["reads"] and unread["unknown_share"] == 0.5
    # nothing unknown, but spelled letter by letter: one token per character
    spelled = vocabulary_fit(letter_tokenizer(tmp_path / "letters"), known)
    assert spelled["unknown_share"] == 0 and spelled["tokens_per_char"] == 1.0 and not spelled["reads"]
    assert vocabulary_fit(write_tokenizer(words), ["", "  "]) is None and vocabulary_fit(None, known) is None


def test_texts_the_model_cannot_read_are_a_problem_a_card_check_and_a_warning(tmp_path):
    tok = write_tokenizer(tmp_path)
    foreign = text_ds([f"{w} {v} слово 文字 λέξη" for w in TOPICS["money"][:4] for v in TOPICS["money"][4:9]],
                      ["a", "b"] * 10)
    report = check_data(foreign, tokenizer=tok)
    assert report["problems"][0].startswith("the model's tokenizer does not read these texts: 67% of their tokens")
    checks = data_card(make_splits(foreign, seed=0, shots=4), source=foreign, tokenizer=tok)["checks"]
    assert checks["vocabulary"]["reads"] is False
    assert split_warnings(checks)[0].startswith("the model's tokenizer does not read these texts")
    money = TOPICS["money"]
    english = text_ds([f"{w} {v} of the market" for w in money[:4] for v in money[4:9]], ["a", "b"] * 10)
    checks = data_card(make_splits(english, seed=0, shots=4), source=english, tokenizer=tok)["checks"]
    assert checks["vocabulary"]["reads"] and split_warnings(checks) == []
    assert "vocabulary" not in check_data(english)  # no tokenizer, no claim


def test_empty_pairs_are_not_copies_of_each_other():
    ds = Dataset("pairs", [("", ""), (" ", "  "), ("q", "a"), ("Q", "a ")], [], [], origin="mem")
    report = check_data(ds)
    assert report["exact_duplicates"]["groups"] == 1  # the two ("q", "a"), not the two empty pairs
    assert report["exact_duplicates"]["whitespace_equal_copies"] == 0 and report["lengths"]["empty"]["count"] == 2
