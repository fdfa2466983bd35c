"""Data checks: can these examples be trusted before anything trains on them?

With 8 to a few hundred examples, one test text that is also a training text, or one text filed under two
labels, moves accuracy by whole points. ``check_data`` reports, as JSON-ready counts plus a few examples each:

- **exact duplicates**: texts equal after lower-casing and collapsing whitespace (images: equal pixels, by a
  sha256 of the pixel bytes and shape). ``load_data`` already drops whitespace-equal copies when loading, keeping
  the first, so a report on data loaded with ``dedup=False`` shows what a user's file really holds.
- **near-duplicates** (text only): pairs whose sets of character 5-grams have a Jaccard similarity of at least
  ``NEAR_THRESHOLD`` (0.8), found by MinHash with locality-sensitive hashing (Broder 1997; the 5-gram, 0.8
  setting of Lee et al. 2021, https://arxiv.org/abs/2107.06499). Each text gets ``MINHASH_PERMUTATIONS`` (64)
  minimum hashes; texts that agree on all ``LSH_ROWS`` (4) hashes of any of the 16 bands become candidates,
  and every candidate pair is verified with the exact Jaccard of its 5-gram sets, so reported pairs are never
  estimates. A pair at Jaccard 0.8 becomes a candidate with probability 1 - (1 - 0.8^4)^16 > 0.9998 (0.5:
  0.64). The cost is linear in the total text length plus the candidates: about a second for the 2,224 BBC
  articles or 15,000 short reviews on one core, where all-pairs cosine would be 225 million comparisons.
- **conflicting labels**: the same (normalized) text or image under different labels.
- **class balance**: examples per class, the smallest class, and the largest-to-smallest ratio.
- **lengths** (text only): empty texts, and texts longer than ``LONG_WORDS`` words (a 256-token encoder read in
  4 windows, as graftune's embeddings do, covers about 750 words; the rest of a longer text is never read).
  With the model's ``tokenizer``, also the texts over ``max_tokens`` tokens (truncated or windowed).
- with ``test``: test examples that are also training examples (exact or near), flagged loudly under
  ``problems``: their accuracy measures memory, not generalization.
- **vocabulary** (``vocabulary_fit``, text, given the model's tokenizer): does the model's vocabulary read these
  texts? A tokenizer of English leaves other scripts as unknown tokens (``[UNK]``) or spells them one character
  per token; the model then sees little of their meaning, whatever the method. ``graftune check --labels`` and every
  run's data card (a warning in the run's summary) report it.

Checks that do not apply are listed under ``not_applicable`` with the reason (images have no near-duplicate
or length checks; prompt/response pairs have no labels).

``split_checks`` is the cheap part (counts only) that the data card records for every run's splits.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from graftune.data.sources import Dataset

NEAR_THRESHOLD = 0.8
SHINGLE = 5
MINHASH_PERMUTATIONS = 64
LSH_ROWS = 4
LONG_WORDS = 1000
IMBALANCE_RATIO = 3.0
EXAMPLES = 3
PREVIEW = 120
#: candidate pairs verified at most (a corpus of near-identical templated texts would otherwise be quadratic)
MAX_CANDIDATES = 200_000
#: a tokenizer does not read the texts when more than this share of their tokens is unknown ([UNK]) ...
UNKNOWN_SHARE = 0.01
#: ... or when it spends at least this many tokens per character (whitespace left out). Measured with MiniLM's
#: WordPiece (bench/RESULTS.md, "Session 8"): English 0.26-0.35 on the built-in and held-out sets, German, French,
#: Spanish and Turkish 0.37-0.49, source code 0.61; Russian, Greek and Arabic 0.93-1.0 (spelled letter by letter),
#: Chinese and Japanese 1.0 with 29-67% unknown, Korean 1.78, Hindi 0.64 with 6% unknown.
TOKENS_PER_CHAR = 0.7
#: texts read by ``vocabulary_fit`` (the first ones), and characters of each: enough for a stable share
VOCABULARY_SAMPLE = 1000
VOCABULARY_CHARS = 2000


# --- keys ------------------------------------------------------------------------------------------------------
def normalize_text(text: str) -> str:
    """Lower-cased, whitespace collapsed: 'The  Cat' and 'the cat' are the same text."""
    return " ".join(text.lower().split())


#: the ``example_key`` of an empty text, and of a pair with both sides empty
BLANK_KEYS = {"text": "", "pairs": "\x1f"}


def example_key(modality: str, x: Any) -> str:
    """What makes two examples exact duplicates: the normalized text, both sides of a pair, or an image's pixels."""
    if modality == "text":
        return normalize_text(x)
    if modality == "pairs":
        return normalize_text(x[0]) + "\x1f" + normalize_text(x[1])
    array = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
    return hashlib.sha256(str(tuple(array.shape)).encode() + np.ascontiguousarray(array).tobytes()).hexdigest()


def _label_key(label: Any) -> str:
    return "|".join(label) if isinstance(label, (list, tuple)) else str(label)


def _preview(modality: str, x: Any) -> str:
    if modality == "text":
        flat = " ".join(x.split())
    elif modality == "pairs":
        flat = " ".join(x[0].split()) + " -> " + " ".join(x[1].split())
    else:
        return f"image {tuple(x.shape)}"
    return flat if len(flat) <= PREVIEW else flat[:PREVIEW - 3] + "..."


def _near_text(modality: str, x: Any) -> str | None:
    if modality == "text":
        return normalize_text(x)
    if modality == "pairs":
        return normalize_text(x[0] + " " + x[1])
    return None


# --- near-duplicates: MinHash LSH over character 5-grams ------------------------------------------------------
def shingles(text: str, k: int = SHINGLE) -> np.ndarray:
    """The sorted distinct 64-bit hashes of a text's character k-grams (of its UTF-8 bytes; the whole text when
    shorter than k). A polynomial rolling hash, vectorized: no Python loop over characters."""
    b = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint64)
    if len(b) == 0:
        return np.zeros(0, dtype=np.uint64)
    if len(b) < k:
        b = np.concatenate([b, np.zeros(k - len(b), dtype=np.uint64)])
    n = len(b) - k + 1
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):
            h = h * np.uint64(1_000_003) + b[j:j + n]
        h ^= h >> np.uint64(29)
        h *= np.uint64(0xBF58476D1CE4E5B9)  # splitmix64 finalizer: spread the bits before min-hashing
        h ^= h >> np.uint64(32)
    return np.unique(h)


def _signatures(sets: Sequence[np.ndarray], permutations: int, seed: int = 0) -> np.ndarray:
    """(len(sets), permutations) MinHash signatures: per permutation, the minimum of (a*h + c) mod 2^64 with an odd
    multiplier a. The order of such values is decided by their high bits, which the multiplication mixes well
    (the shingle hashes are already spread by a finalizer); seeded, so the same texts give the same pairs."""
    rng = np.random.RandomState(seed)
    a = rng.randint(1, 1 << 62, size=permutations, dtype=np.uint64) | np.uint64(1)
    c = rng.randint(0, 1 << 62, size=permutations, dtype=np.uint64)
    sig = np.full((len(sets), permutations), np.iinfo(np.uint64).max, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i, s in enumerate(sets):
            if len(s):
                sig[i] = (s[:, None] * a + c).min(axis=0)
    return sig


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    if not len(a) or not len(b):
        return 0.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def near_duplicate_pairs(texts: Sequence[str], *, threshold: float = NEAR_THRESHOLD) -> tuple[list[tuple], bool]:
    """Pairs (i, j, jaccard), i < j, of texts whose character 5-gram sets have Jaccard >= ``threshold``, and
    whether candidates were capped at ``MAX_CANDIDATES`` (some pairs may then be missing). Identical texts are
    pairs too (Jaccard 1): pass distinct texts to find only the near ones. Empty texts pair with nothing."""
    sets = [shingles(t) for t in texts]
    live = np.array([i for i, s in enumerate(sets) if len(s)], dtype=np.int64)
    if len(live) < 2:
        return [], False
    sig = _signatures([sets[i] for i in live], MINHASH_PERMUTATIONS)
    candidates = []
    for band in range(MINHASH_PERMUTATIONS // LSH_ROWS):
        rows = np.ascontiguousarray(sig[:, band * LSH_ROWS:(band + 1) * LSH_ROWS])
        _, group = np.unique(rows.view(np.dtype((np.void, rows.dtype.itemsize * LSH_ROWS))).ravel(),
                             return_inverse=True)
        order = np.argsort(group, kind="stable")
        bounds = np.flatnonzero(np.diff(group[order])) + 1
        for members in np.split(order, bounds):
            if len(members) > 1:
                m = live[members]
                left, right = np.triu_indices(len(m), k=1)
                candidates.append(m[left] * len(texts) + m[right])
    if not candidates:
        return [], False
    codes = np.unique(np.concatenate(candidates))
    capped = len(codes) > MAX_CANDIDATES
    pairs = []
    for code in codes[:MAX_CANDIDATES]:
        i, j = divmod(int(code), len(texts))
        sim = _jaccard(sets[i], sets[j])
        if sim >= threshold:
            pairs.append((i, j, round(sim, 4)))
    return pairs, capped


# --- the report --------------------------------------------------------------------------------------------------
def _groups(keys: Sequence[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        out[k].append(i)
    return out


def _lengths(texts: Sequence[str], long_words: int, tokenizer: Any, max_tokens: int) -> dict:
    chars = np.array([len(t) for t in texts])
    words = np.array([len(t.split()) for t in texts])

    def stats(v: np.ndarray) -> dict:
        return {"min": int(v.min()), "median": float(np.median(v)), "p95": float(np.percentile(v, 95)),
                "max": int(v.max())}

    empty = [i for i, t in enumerate(texts) if not t.strip()]
    long = [i for i, w in enumerate(words) if w > long_words]
    out = {"chars": stats(chars), "words": stats(words), "empty": {"count": len(empty), "indices": empty[:10]},
           "long": {"threshold_words": long_words, "count": len(long),
                    "examples": [{"index": i, "words": int(words[i])} for i in long[:EXAMPLES]]}}
    if tokenizer is not None:
        ids = tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]  # counts: no length warning
        tokens = np.array([len(row) for row in ids])
        over = [i for i, n in enumerate(tokens) if n > max_tokens]
        out["tokens"] = {**stats(tokens), "max_length": max_tokens, "over_max_length": len(over)}
    return out


def vocabulary_fit(tokenizer: Any, texts: Sequence[str]) -> dict | None:
    """How well ``tokenizer`` (a Hugging Face tokenizer) reads ``texts`` (the first ``VOCABULARY_SAMPLE``, up to
    ``VOCABULARY_CHARS`` characters each): ``unknown_share`` (unknown tokens among all tokens), ``tokens_per_char``
    (tokens per non-whitespace character) and ``reads`` (False past ``UNKNOWN_SHARE`` or ``TOKENS_PER_CHAR``).
    None when there is no text or no tokenizer to ask."""
    sample = [t[:VOCABULARY_CHARS] for t in list(texts)[:VOCABULARY_SAMPLE] if isinstance(t, str) and t.strip()]
    if tokenizer is None or not sample:
        return None
    ids = tokenizer(sample, add_special_tokens=False, verbose=False)["input_ids"]  # no "longer than max" warning
    tokens = sum(len(row) for row in ids)
    chars = sum(len("".join(t.split())) for t in sample)
    unk = getattr(tokenizer, "unk_token_id", None)
    unknown = sum(i == unk for row in ids for i in row) if unk is not None else 0
    share, per_char = unknown / max(tokens, 1), tokens / max(chars, 1)
    return {"texts": len(sample), "unknown_share": round(share, 4), "tokens_per_char": round(per_char, 3),
            "reads": share <= UNKNOWN_SHARE and per_char < TOKENS_PER_CHAR}


def vocabulary_problem(fit: dict | None) -> str | None:
    """``vocabulary_fit``'s finding in one sentence, when the vocabulary does not read the texts."""
    if not fit or fit["reads"]:
        return None
    found = []
    if fit["unknown_share"] > UNKNOWN_SHARE:
        found.append(f"{fit['unknown_share']:.0%} of their tokens are unknown to it")
    if fit["tokens_per_char"] >= TOKENS_PER_CHAR:
        found.append(f"it spells them at {fit['tokens_per_char']:.2f} tokens per character (English: about 0.3)")
    return (f"the model's tokenizer does not read these texts: {' and '.join(found)}, so their language or script is "
            "outside its vocabulary and every method sees little of their meaning; a base trained on that language "
            "will do better (--model FOLDER, a Hugging Face model folder)")


def _balance(ds: Dataset) -> dict:
    counts = ds.counts()
    smallest = min(counts, key=lambda k: counts[k])
    largest = max(counts, key=lambda k: counts[k])
    ratio = counts[largest] / counts[smallest] if counts[smallest] else None
    return {"counts": counts, "smallest": smallest, "smallest_count": counts[smallest], "largest": largest,
            "largest_count": counts[largest], "ratio": None if ratio is None else round(ratio, 3),
            "imbalanced": ratio is None or ratio >= IMBALANCE_RATIO}


def check_data(ds: Dataset, test: Dataset | None = None, *, near_threshold: float = NEAR_THRESHOLD,
               long_words: int = LONG_WORDS, tokenizer: Any = None, max_tokens: int = 256) -> dict:
    """A JSON-serializable report on ``ds`` (and on ``test`` against it): counts plus a few examples per check,
    ``problems`` (plain sentences, the worst first) and ``not_applicable`` (checks skipped, with the reason).

    Load ``ds`` with ``load_data(..., dedup=False)`` to see the duplicates a file really holds (by default
    loading drops whitespace-equal copies, keeping the first, whatever its label).

    Args:
        near_threshold: the Jaccard similarity of character 5-gram sets from which two texts are near-duplicates.
        long_words: texts with more words are reported as very long.
        tokenizer: optional, the model's (Hugging Face) tokenizer: reports the texts over ``max_tokens`` tokens
            and whether its vocabulary reads the texts (``vocabulary_fit``).
    """
    m = ds.modality
    labelled = m != "pairs"
    keys = [example_key(m, x) for x in ds.inputs]
    # empty texts (pairs) are reported as such (lengths), never as copies of each other, of a test example, or
    # under different labels: their key is left out of the groups every copy check reads
    blank = {i for i, k in enumerate(keys) if k == BLANK_KEYS.get(m)}
    groups = {k: ix for k, ix in _groups(keys).items() if k != BLANK_KEYS.get(m)}
    dup_groups = [ix for ix in groups.values() if len(ix) > 1]
    labels = ds.labels if labelled else [""] * len(ds)
    conflicts = [ix for ix in dup_groups if len({_label_key(labels[i]) for i in ix}) > 1]

    def group_example(ix: list[int]) -> dict:
        out = {"indices": ix[:10], "copies": len(ix), "text": _preview(m, ds.inputs[ix[0]])}
        if labelled:
            out["labels"] = sorted({_label_key(labels[i]) for i in ix})
        return out

    report: dict[str, Any] = {
        "modality": m, "origin": ds.origin, "examples": len(ds), "label_names": list(ds.label_names),
        "normalization": ("texts lower-cased, whitespace collapsed" if m != "image"
                          else "images compared by a sha256 of their pixels and shape"),
        "exact_duplicates": {"groups": len(dup_groups), "extra_copies": sum(len(ix) - 1 for ix in dup_groups),
                             "examples": [group_example(ix) for ix in dup_groups[:EXAMPLES]]},
        "not_applicable": {},
    }
    if m != "image":  # what `load_data` drops: copies equal up to whitespace (case kept)
        loose = len({" ".join(x.split()) if m == "text" else (" ".join(x[0].split()), " ".join(x[1].split()))
                     for i, x in enumerate(ds.inputs) if i not in blank})
        report["exact_duplicates"]["whitespace_equal_copies"] = len(ds) - len(blank) - loose
    problems: list[str] = []
    if labelled:
        report["conflicting_labels"] = {"groups": len(conflicts),
                                        "examples": [group_example(ix) for ix in conflicts[:EXAMPLES]]}
        report["class_balance"] = _balance(ds)
    else:
        report["not_applicable"]["conflicting_labels"] = "prompt/response pairs have no labels"
        report["not_applicable"]["class_balance"] = "prompt/response pairs have no labels"

    # near-duplicates over distinct texts (exact copies are counted above)
    first = {k: ix[0] for k, ix in groups.items()}
    if m == "image":
        report["not_applicable"]["near_duplicates"] = ("images are compared by exact pixels only; near-duplicate "
                                                       "images (resized, re-encoded) are not detected")
        report["not_applicable"]["lengths"] = "images have no length; empty and very long checks are for text"
    else:
        reps = list(first.values())
        pairs, capped = near_duplicate_pairs([_near_text(m, ds.inputs[i]) for i in reps], threshold=near_threshold)
        pairs = [(reps[a], reps[b], s) for a, b, s in pairs]
        differ = [p for p in pairs if labelled and _label_key(labels[p[0]]) != _label_key(labels[p[1]])]
        report["near_duplicates"] = {
            "method": f"MinHash LSH over character {SHINGLE}-grams ({MINHASH_PERMUTATIONS} hashes, "
                      f"{MINHASH_PERMUTATIONS // LSH_ROWS} bands of {LSH_ROWS}), verified by exact Jaccard",
            "threshold": near_threshold, "pairs": len(pairs), "capped": capped,
            "texts": len({i for p in pairs for i in p[:2]}), "with_different_labels": len(differ),
            "examples": [_pair_example(ds, ds, p, labelled) for p in (differ + pairs)[:EXAMPLES]]}
        texts = [x if m == "text" else x[0] + " " + x[1] for x in ds.inputs]
        report["lengths"] = _lengths(texts, long_words, tokenizer, max_tokens)
        if m == "text" and tokenizer is not None:
            report["vocabulary"] = vocabulary_fit(tokenizer, texts)

    if test is not None:
        report["test"] = _test_report(ds, test, keys, groups, near_threshold)
        problems += report["test"]["problems"]
    problems += _problems(report)
    report["problems"] = problems
    return report


def _pair_example(a_ds: Dataset, b_ds: Dataset, pair: tuple, labelled: bool) -> dict:
    i, j, sim = pair
    out = {"a": i, "b": j, "similarity": sim, "text_a": _preview(a_ds.modality, a_ds.inputs[i]),
           "text_b": _preview(b_ds.modality, b_ds.inputs[j])}
    if labelled:
        out["label_a"], out["label_b"] = _label_key(a_ds.labels[i]), _label_key(b_ds.labels[j])
    return out


def _test_report(ds: Dataset, test: Dataset, keys: list[str], groups: dict, near_threshold: float) -> dict:
    """Test examples that are training examples: exact (normalized) and near copies, and label disagreements."""
    m = ds.modality
    labelled = m != "pairs"
    test_keys = [example_key(m, x) for x in test.inputs]
    exact = [i for i, k in enumerate(test_keys) if k in groups]
    clash = [i for i in exact if labelled and _label_key(test.labels[i]) not in
             {_label_key(ds.labels[j]) for j in groups[test_keys[i]]}]
    out: dict[str, Any] = {
        "examples": len(test), "origin": test.origin,
        "exact_overlap": {"count": len(exact), "fraction": round(len(exact) / max(len(test), 1), 4),
                          "examples": [{"test_index": i, "train_indices": groups[test_keys[i]][:5],
                                        "text": _preview(m, test.inputs[i])} for i in exact[:EXAMPLES]]},
        "conflicting_labels": {"count": len(clash),
                               "examples": [{"test_index": i, "test_label": _label_key(test.labels[i]),
                                             "train_labels": sorted({_label_key(ds.labels[j])
                                                                     for j in groups[test_keys[i]]}),
                                             "text": _preview(m, test.inputs[i])} for i in clash[:EXAMPLES]]},
    }
    problems = []
    if exact:
        problems.append(f"TEST LEAK: {len(exact)} of {len(test)} test examples ({len(exact) / len(test):.1%}) are "
                        "also in the training data; their accuracy measures memory, not generalization. Remove "
                        "them from the test file")
    if clash:
        problems.append(f"{_n(len(clash), 'test example is a training text', 'test examples are training texts')} filed under another label")
    if m != "image":
        exact_set = set(exact)
        train_first = {k: ix[0] for k, ix in groups.items()}
        reps = list(train_first.values())
        test_only = [i for i in range(len(test)) if i not in exact_set]
        texts = [_near_text(m, ds.inputs[i]) for i in reps] + [_near_text(m, test.inputs[i]) for i in test_only]
        pairs, capped = near_duplicate_pairs(texts, threshold=near_threshold)
        cross = [(reps[a], test_only[b - len(reps)], s) for a, b, s in pairs if a < len(reps) <= b]
        # a near-copy under another label is no leak (it cannot make the test easier): counted apart
        leaks = [p for p in cross if not labelled or _label_key(ds.labels[p[0]]) == _label_key(test.labels[p[1]])]
        near_test = sorted({p[1] for p in leaks})
        out["near_overlap"] = {"count": len(near_test), "threshold": near_threshold, "pairs": len(leaks),
                               "other_label": len({p[1] for p in cross} - set(near_test)), "capped": capped,
                               "examples": [_pair_example(ds, test, p, labelled) for p in leaks[:EXAMPLES]]}
        if near_test:
            problems.append(f"TEST LEAK: {len(near_test)} more test examples are near-copies of training examples "
                            f"(Jaccard >= {near_threshold} on character {SHINGLE}-grams)")
    if labelled:
        unseen = sorted({_label_key(lab) for lab in test.labels} - {_label_key(lab) for lab in ds.labels})
        if unseen and not test.multi_label:
            out["unseen_labels"] = unseen
            problems.append(f"test labels never seen in training: {', '.join(unseen[:5])}")
    out["problems"] = problems
    return out


def _n(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _problems(report: dict) -> list[str]:
    """Plain sentences for what a user should act on, from the counts."""
    out = []
    dup = report["exact_duplicates"]
    if dup["extra_copies"] and report["modality"] == "image":
        out.append(f"{dup['extra_copies']} duplicate images ({dup['groups']} images appear more than once): "
                   "graftune drops pixel-equal copies when loading, keeping the first")
    elif dup["extra_copies"]:
        loose = dup.get("whitespace_equal_copies", 0)
        rest = dup["extra_copies"] - loose
        out.append(f"{dup['extra_copies']} exact duplicates ({_n(dup['groups'], 'text appears', 'texts appear')} more than once): {loose} "
                   "equal up to whitespace, which graftune drops when loading (keeping the first)"
                   + (f", {rest} differing only in case, which it keeps" if rest else "")
                   + "; deduplicate the file so your counts are what trains")
    conflict = report.get("conflicting_labels", {})
    if conflict.get("groups"):
        out.append(f"{_n(conflict['groups'], 'text appears', 'texts appear')} under different labels; loading keeps the first copy's label: "
                   "decide which label is right")
    near = report.get("near_duplicates", {})
    if near.get("pairs"):
        out.append(f"{near['pairs']} near-duplicate pairs (Jaccard >= {near['threshold']}); they can land on both "
                   f"sides of a split" + (f", {near['with_different_labels']} of them with different labels"
                                          if near.get("with_different_labels") else ""))
    balance = report.get("class_balance")
    if balance and balance["imbalanced"]:
        ratio = "no examples" if balance["ratio"] is None else f"{balance['ratio']:.1f}x fewer examples than"
        out.append(f"class imbalance: '{balance['smallest']}' ({balance['smallest_count']}) has {ratio} "
                   f"'{balance['largest']}' ({balance['largest_count']}); judge the model by macro-F1")
    lengths = report.get("lengths")
    if lengths:
        if lengths["empty"]["count"]:
            out.append(f"{_n(lengths['empty']['count'], 'empty text', 'empty texts')}: graftune drops them when "
                       "loading; fill them in or remove them")
        if lengths["long"]["count"]:
            out.append(f"{_n(lengths['long']['count'], 'text has', 'texts have')} more than {lengths['long']['threshold_words']} words; "
                       "an encoder reads only their beginning")
        tokens = lengths.get("tokens")
        if tokens and tokens["over_max_length"]:
            out.append(f"{_n(tokens['over_max_length'], 'text exceeds', 'texts exceed')} {tokens['max_length']} tokens (truncated, or read "
                       "in windows by the few-shot recipes)")
    vocabulary = vocabulary_problem(report.get("vocabulary"))
    if vocabulary:
        out.insert(0, vocabulary)
    return out


# --- the data card's summary -------------------------------------------------------------------------------------
def split_checks(train: Dataset, val: Dataset, test: Dataset, *, tokenizer: Any = None) -> dict:
    """Counts only, for the data card: duplicates inside each split, examples shared between splits (exact, and
    near for text: train vs test), texts shared under different labels, the training classes' balance, and with
    the model's ``tokenizer`` whether it reads the training texts (``vocabulary_fit``).
    A few milliseconds for few-shot splits; about a second for a 2,000-text train set."""
    m = train.modality
    parts = {"train": train, "val": val, "test": test}
    keys = {name: [example_key(m, x) for x in part.inputs] for name, part in parts.items()}
    sets = {name: set(k) for name, k in keys.items()}
    out: dict[str, Any] = {"test_examples": len(test),
                           "duplicates": {name: len(k) - len(sets[name]) for name, k in keys.items()},
                           "overlap": {f"{a}_{b}": sum(k in sets[a] for k in keys[b])
                                       for a, b in (("train", "test"), ("train", "val"), ("val", "test"))}}
    if m != "pairs":
        label_of = defaultdict(set)
        for name, part in parts.items():
            for k, lab in zip(keys[name], part.labels):
                label_of[k].add(_label_key(lab))
        out["conflicting_labels"] = sum(len(v) > 1 for v in label_of.values())
        if len(train):
            balance = _balance(train)
            out["train_imbalance_ratio"] = balance["ratio"]
    if m != "image" and len(train) and len(test):
        train_first = list({k: i for i, k in reversed(list(enumerate(keys["train"])))}.values())
        test_only = [i for i, k in enumerate(keys["test"]) if k not in sets["train"]]
        texts = [_near_text(m, train.inputs[i]) for i in train_first] + [_near_text(m, test.inputs[i])
                                                                          for i in test_only]
        pairs, _ = near_duplicate_pairs(texts)
        n = len(train_first)
        # a near-copy under another label is no leak: it cannot make the test easier
        out["near_overlap_train_test"] = len({b for a, b, _ in pairs if a < n <= b and (m == "pairs" or _label_key(
            train.labels[train_first[a]]) == _label_key(test.labels[test_only[b - n]]))})
        out["empty_texts"] = {name: sum(not (_near_text(m, x) or "").strip() for x in part.inputs)
                              for name, part in parts.items()}
    if m == "text" and tokenizer is not None:
        out["vocabulary"] = vocabulary_fit(tokenizer, train.inputs)
    return out


def empty_texts_removed(*sources: Dataset) -> dict:
    """{origin: {"count", "where"}} of the rows ``load_data`` dropped from each of ``sources`` for an empty text
    (``Dataset.empty_texts_removed``; ``where``: the first ``EXAMPLES``), for the data card and ``split_warnings``."""
    return {ds.origin: {"count": len(ds.empty_texts_removed), "where": list(ds.empty_texts_removed[:EXAMPLES])}
            for ds in sources if ds.empty_texts_removed}


def split_warnings(checks: dict) -> list[str]:
    """What in ``split_checks``' counts a person must hear about at once, in plain words: texts the model's
    vocabulary does not read, a test set that shares examples with training (its accuracy is not honest), rows
    dropped for an empty text (``empty_texts_removed``), and texts given different labels."""
    out = [line for line in (vocabulary_problem(checks.get("vocabulary")),) if line]
    for origin, dropped in (checks.get("empty_texts_removed") or {}).items():
        n = dropped["count"]
        where = ", ".join(dropped["where"]) + (", ..." if n > len(dropped["where"]) else "")
        out.append(f"{origin}: {_n(n, 'row', 'rows')} with an empty text {'was' if n == 1 else 'were'} dropped "
                   f"({where}); fill {'it' if n == 1 else 'them'} in or remove {'it' if n == 1 else 'them'}")
    shared = checks.get("overlap", {}).get("train_test", 0)
    near = checks.get("near_overlap_train_test", 0)
    if shared or near:
        size = checks.get("test_examples")  # each copy can add at most one right answer
        by = (f" by up to {100 * (shared + near) / size:.1f} points ({shared + near} of its {size} examples)"
              if size else "")
        out.append(f"the test set shares {shared} exact and {near} near-duplicate example(s) with training: its "
                   f"accuracy overstates the model{by}; run `graftune check DATA --test TEST` and remove them")
    if checks.get("conflicting_duplicates_removed"):
        n = checks["conflicting_duplicates_removed"]
        out.append(f"{n} repeated text{'s' if n > 1 else ''} had another label than {'their' if n > 1 else 'its'} "
                   "first copy and {} dropped with the duplicates (the first label was kept); `graftune check DATA` "
                   "lists them".format("were" if n > 1 else "was"))
    if checks.get("conflicting_labels"):
        out.append(f"{checks['conflicting_labels']} text(s) appear with different labels; `graftune check DATA` "
                   "lists them")
    return out


# --- in plain words ----------------------------------------------------------------------------------------------
def format_report(report: dict, *, top: int = 10) -> str:
    """The report as a person reads it: what was found, then the problems to act on (or that none were found),
    then the suspect labels when the report has them (``top`` at most)."""
    m = report["modality"]
    kind = {"text": "texts", "image": "images", "pairs": "prompt/response pairs"}[m]
    lines = [f"{report['origin']}: {report['examples']:,} {kind}"
             + (f", {len(report['label_names'])} classes" if report["label_names"] else "")]
    dup = report["exact_duplicates"]
    loose = dup.get("whitespace_equal_copies")
    lines.append(f"exact duplicates: {dup['extra_copies']} extra copies of {dup['groups']} "
                 + ("images" if m == "image" else "texts") + f" ({report['normalization']})"
                 + (f"; {loose} of them equal up to whitespace" if loose is not None else ""))
    near = report.get("near_duplicates")
    if near:
        lines.append(f"near-duplicates: {near['pairs']} pairs at Jaccard >= {near['threshold']} of character "
                     f"{SHINGLE}-grams ({near['with_different_labels']} with different labels)"
                     + (" [candidates capped: some pairs may be missing]" if near["capped"] else ""))
    if "conflicting_labels" in report:
        lines.append(f"same example, different labels: {report['conflicting_labels']['groups']}")
    balance = report.get("class_balance")
    if balance:
        counts = ", ".join(f"{k} {v}" for k, v in balance["counts"].items())
        ratio = "a class is empty" if balance["ratio"] is None else f"largest/smallest {balance['ratio']:.2f}"
        lines.append(f"classes: {counts} ({ratio})")
    lengths = report.get("lengths")
    if lengths:
        w = lengths["words"]
        tokens = lengths.get("tokens")
        lines.append(f"lengths: words median {w['median']:.0f}, 95% under {w['p95']:.0f}, longest {w['max']}; "
                     f"{lengths['empty']['count']} empty, {lengths['long']['count']} over "
                     f"{lengths['long']['threshold_words']} words"
                     + (f", {tokens['over_max_length']} over {tokens['max_length']} tokens" if tokens else ""))
    test = report.get("test")
    if test:
        near = test.get("near_overlap", {})
        lines.append(f"test set {test['origin']}: {test['examples']:,} examples, {test['exact_overlap']['count']} also "
                     "in the data" + ("" if "count" not in near else f", {near['count']} more near-copies")
                     + (f" (and {near['other_label']} under another label: no leak)" if near.get("other_label") else "")
                     + f", {test['conflicting_labels']['count']} under another label there")
    for check, why in report["not_applicable"].items():
        lines.append(f"not checked: {check.replace('_', ' ')}: {why}")
    lines.append("")
    if report["problems"]:
        lines.append("problems:")
        lines += [f"  - {p}" for p in report["problems"]]
    else:
        lines.append("no problems found")
    found = report.get("labels")
    if found:
        lines += ["", (f"suspect labels: {found['count']} of {found['checked']} examples ({found['method']}; "
                  f"out-of-fold accuracy {found['out_of_fold_accuracy']:.3f})")]
        if found["suspects"]:
            shown = found["suspects"][:top]
            width = max([len("where"), *(len(s["where"]) for s in shown)])  # 'line 12' as the file's editor counts
            lines.append(f"  {'where':<{width}}  {'given':<14} {'suggested':<14} {'score':>5}  text")
            for s in shown:
                lines.append(f"  {s['where']:<{width}}  {s['given'][:14]:<14} {s['suggested'][:14]:<14} "
                             f"{s['score']:>5.2f}  {s['text'][:70]}")
            if found["count"] > top:
                lines.append(f"  ... {found['count'] - top} more (--json lists them all)")
    return "\n".join(lines)
