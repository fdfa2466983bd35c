"""Train/val/test splits and k-shot sampling, deterministic given the seed on any machine.

Rules:
- Randomness comes only from `numpy.random.RandomState(seed)` (legacy stream, stable across numpy versions)
  and sklearn's `train_test_split(random_state=seed)`, applied to examples in source order (sources sort their
  files), so nothing depends on hash randomization or the filesystem.
- Single-label classification is stratified. Multi-label data cannot be stratified on one label, and pairs
  have none: both fall back to a seeded random split.
- The test set is carved out first (`test_per_class`, or `test_size`), unless the caller brings one (`test`).
- Without `shots`, val is split from what remains (`val_size`), stratified, and the rest is train.
- Small data is not an error: a stratified carve (test or val) holds at least one example per class, and leaves
  at least one per class. When the data is too small for that, val is left out (`Splits.notes` says so, and
  training runs its fixed number of epochs); a test set that cannot be carved asks for `--test` in one line.
- With `shots=K`, train is K examples per class from the remaining pool (`sample_shots`), and val comes from
  the pool's examples not taken as shots: the next `max(K, 8)` per class of the same seeded order (fewer
  where a class runs out). `val_size` then only switches val off when it is 0. A seeded order per class makes
  shots nest: for one seed, the 8 shots are among the 16 shots.
- Multi-label shots are greedy: going through the pool in seeded order, an example is taken when one of its
  labels still has fewer than K, so every label gets at least K (a few get more, through co-occurrence).
  Val is the next `max(K, 8) * number of labels` examples of that order.
- Pairs shots are the first K pairs of the pool in seeded order; val the next `max(K, 8)`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from graftune.data.sources import Dataset, count_of, load_data
from graftune.errors import DataError

MIN_VAL_PER_CLASS = 8
#: where a run directory records its data (``data.card.data_card``), split fingerprints included
CARD_FILE = "data_card.json"
#: classes named in a message before "... and N more"
LISTED_CLASSES = 10
#: a label column with more classes than this, nearly one per example, is likely a text or id column
UNIQUE_LABELS_FROM = 10


@dataclass
class Splits:
    """Three datasets, and the seeds and shots that made them (the data card records them)."""

    train: Dataset
    val: Dataset
    test: Dataset
    seed: int = 0
    shots: int | None = None
    shot_seed: int | None = None
    #: plain-words notes on how the data was split (for example why there is no val part)
    notes: list[str] = field(default_factory=list)


def make_splits(
    ds: Dataset,
    *,
    seed: int = 0,
    test_size: float = 0.2,
    val_size: float = 0.1,
    shots: int | None = None,
    test: Dataset | None = None,
    test_per_class: int | None = None,
    shot_seed: int | None = None,
) -> Splits:
    """Split `ds` into train/val/test (rules in the module docstring).

    Args:
        ds: the source dataset (already deduplicated by `load_data`).
        seed: seeds the test and val carving, and the shots unless `shot_seed` is given.
        test_size: a fraction of `len(ds)` in [0, 1), or a count. Ignored when `test` or `test_per_class` is given.
        val_size: a fraction of `len(ds)` in [0, 1), or a count; 0 means no val. With `shots`, only 0 matters.
        shots: K examples per class for train, drawn from what the test (and nothing else) left.
        test: a user test set, used as is; nothing is carved from `ds` for test.
        test_per_class: exactly N test examples per class (single-label only).
        shot_seed: seeds the shots (and their val) apart from the test set: one fixed test set (`seed`), many
            shot draws. Defaults to `seed`.
    """
    _check_int("seed", seed, minimum=0)
    if shots is not None:
        _check_int("shots", shots, minimum=1)
    if test_per_class is not None:
        _check_int("test_per_class", test_per_class, minimum=1)
    if test is not None and test_per_class is not None:
        raise DataError("pass either a test set or test_per_class, not both")
    if len(ds) == 0:
        raise DataError(f"{ds.origin or 'dataset'}: no examples to split")
    shot_seed = seed if shot_seed is None else shot_seed
    _check_int("shot_seed", shot_seed, minimum=0)
    stratified = _is_single_label(ds)
    everything = np.arange(len(ds))
    notes: list[str] = []

    if test is not None:
        _check_compatible(ds, test)
        test_idx, pool = np.array([], dtype=int), everything
    elif test_per_class is not None:
        if not stratified:
            raise DataError(f"{ds.origin}: test_per_class needs single-label classification data; use test_size")
        order = _order_per_class(ds, everything, seed)
        short = {c: len(ix) for c, ix in order.items() if len(ix) <= test_per_class}
        if short:
            raise _unique_labels(ds) or DataError(
                f"{ds.origin}: test_per_class={test_per_class} leaves no training examples for "
                f"{_listing(short)}; lower test_per_class"
            )
        test_idx = np.concatenate([ix[:test_per_class] for ix in order.values()])
        pool = np.concatenate([ix[test_per_class:] for ix in order.values()])
    else:
        n_test = _size("test_size", test_size, len(ds))
        if n_test == 0:
            if not test_size:
                raise DataError(f"{ds.origin}: test_size 0 leaves no test set to score the run on; pass a separate "
                                "--test FILE or a test_size above 0")
            n_test = 1  # a fraction of a few examples rounds to none: carve the least there is (one per class)
        pool, test_idx = _split(ds, everything, n_test, seed, stratified, "test_size", notes)

    if shots is not None:
        train_idx, rest = _shots_and_rest(ds, pool, shots, shot_seed)
        val_idx = np.array([], dtype=int) if _size("val_size", val_size, len(ds)) == 0 else rest
    else:
        n_val = _size("val_size", val_size, len(ds))
        train_idx, val_idx = _split(ds, pool, n_val, seed, stratified, "val_size", notes)

    splits = Splits(
        train=ds.subset(np.sort(train_idx)),
        val=ds.subset(np.sort(val_idx)),
        test=test if test is not None else ds.subset(np.sort(test_idx)),
        seed=seed,
        shots=shots,
        shot_seed=shot_seed if shots is not None else None,
        notes=notes,
    )
    check_labels(splits.train, splits.test)
    check_labels(splits.train, splits.val)
    return splits


def sample_shots(ds: Dataset, shots: int, seed: int) -> Dataset:
    """Exactly `shots` examples per class of `ds` (at least that many per label for multi-label; the first
    `shots` pairs in seeded order for pairs), seeded. Raises DataError naming the classes that have fewer."""
    _check_int("shots", shots, minimum=1)
    train_idx, _ = _shots_and_rest(ds, np.arange(len(ds)), shots, seed)
    return ds.subset(np.sort(train_idx))


def check_labels(train: Dataset, other: Dataset) -> None:
    """Raise DataError when `other` (val, test, or data to evaluate) has labels `train` never had."""
    if train.modality == "pairs" or other.modality == "pairs":
        return
    seen = set(_flat_labels(train))
    unseen: dict[str, int] = {}
    for name in _flat_labels(other):
        if name not in seen:
            unseen[name] = unseen.get(name, 0) + 1
    if unseen:
        raise DataError(
            f"{other.origin or 'evaluation data'}: labels never seen in training: {_listing(unseen)}; "
            "remove those examples or add training examples of them"
        )


# ---------------------------------------------------------------------------------------------------------------


def _is_single_label(ds: Dataset) -> bool:
    return ds.modality != "pairs" and not ds.multi_label


def _flat_labels(ds: Dataset) -> list[str]:
    return [n for lab in ds.labels for n in lab] if ds.multi_label else list(ds.labels)


def _listing(counts: dict[str, int]) -> str:
    """'a (3), b (1)': classes and their example counts, the first LISTED_CLASSES only, long names cut (with a
    wrong label column every text is a class, and the message would print the whole file on one line)."""
    items = sorted(counts.items())
    shown = ", ".join(f"{_short(name)} ({n})" for name, n in items[:LISTED_CLASSES])
    return shown + (f" ... and {len(items) - LISTED_CLASSES} more" if len(items) > LISTED_CLASSES else "")


def _short(name: str, limit: int = 40) -> str:
    return name if len(name) <= limit else name[: limit - 3] + "..."


def _unique_labels(ds: Dataset) -> DataError | None:
    """The error to raise instead of "too few examples" when nearly every example is a class of its own: a text
    or id column was read as the labels, and more examples would not help."""
    classes, n = len(ds.label_names), len(ds)
    if classes <= UNIQUE_LABELS_FROM or classes < 0.8 * n:
        return None
    some = ", ".join(repr(_short(name)) for name in ds.label_names[:3])
    return DataError(f"{ds.origin}: nearly every label is unique ({classes} classes in {count_of(n, 'example')}: "
                     f"{some} ...); is that the label column? Pick the right one with --label-column NAME")


def _check_int(field: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{field} must be an integer >= {minimum}, got {value!r}")


def _size(field: str, value: float, n: int) -> int:
    """A fraction of n (float in [0, 1)) or a count (int >= 0) -> a count."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise DataError(f"{field} must be a fraction in [0, 1) or a count, got {value!r}")
    if isinstance(value, (float, np.floating)):
        if not 0.0 <= value < 1.0:
            raise DataError(f"{field} must be a fraction in [0, 1) or a whole count, got {value!r}")
        return round(value * n)
    if value < 0:
        raise DataError(f"{field} must be >= 0, got {value}")
    return int(value)


def _check_compatible(ds: Dataset, test: Dataset) -> None:
    def kind(d: Dataset) -> str:
        return f"{'multi-label ' if d.multi_label else ''}{d.modality}"

    if kind(test) != kind(ds):
        raise DataError(
            f"{test.origin or 'test set'}: is {kind(test)} data but the training data is {kind(ds)}; "
            "use a test set of the same kind"
        )


def _split(
    ds: Dataset, idx: np.ndarray, n_out: int, seed: int, stratified: bool, field: str, notes: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, carved out) with about `n_out` carved out of `idx`, stratified on the labels when `stratified`:
    then at least one example of every class is carved out and at least one kept. A val part too small for that
    is left out (with a note); a test part asks for a separate test file."""
    if n_out == 0:
        return idx, np.array([], dtype=int)
    what = "a test set" if field == "test_size" else "a validation part"
    if stratified:
        labels = [ds.labels[i] for i in idx]
        counts = {c: labels.count(c) for c in dict.fromkeys(labels)}
        if min(counts.values()) < 2 or len(idx) < 2 * len(counts):
            small = {c: n for c, n in counts.items() if n < 2}
            if field == "val_size":
                notes.append(f"no validation part: too few examples to hold one per class out ({_listing(small)}); "
                             "every training epoch runs (no early stopping)")
                return idx, np.array([], dtype=int)
            verb = "has" if len(small) == 1 else "have"
            raise _unique_labels(ds) or DataError(
                f"{ds.origin}: {_listing(small)} {verb} too few examples to hold one out for {what}; add examples "
                "or pass a separate --test FILE"
            )
        if n_out > len(idx) - len(counts):
            raise DataError(f"{ds.origin}: {field} asks for {n_out} of the {count_of(len(idx), 'example')} left, "
                            f"leaving too few to train on (one per class at least); lower {field}")
        return _per_class_carve(ds, idx, max(n_out, len(counts)), seed)
    if n_out >= len(idx):
        raise DataError(
            f"{ds.origin}: {field} asks for {n_out} of the {count_of(len(idx), 'example')} left, leaving none to "
            f"train on; lower {field}"
        )
    kept, out = train_test_split(idx, test_size=n_out, random_state=seed, shuffle=True)
    return np.asarray(kept), np.asarray(out)


def _per_class_carve(ds: Dataset, idx: np.ndarray, n_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified carve of `n_out` examples from `idx` with every class on both sides: scikit-learn's
    stratified split where it guarantees that (large enough classes), else each class's share rounded, at least
    one carved and one kept per class, from a seeded per-class order."""
    labels = [ds.labels[i] for i in idx]
    counts = {c: labels.count(c) for c in dict.fromkeys(labels)}
    if n_out <= len(idx) - len(counts):
        kept, out = train_test_split(idx, test_size=n_out, random_state=seed, shuffle=True, stratify=labels)
        if {ds.labels[i] for i in out} == set(counts) == {ds.labels[i] for i in kept}:
            return np.asarray(kept), np.asarray(out)
    order = _order_per_class(ds, idx, seed)
    share = {c: min(max(1, round(n_out * counts[c] / len(idx))), counts[c] - 1) for c in counts}
    out = np.concatenate([order[c][:share[c]] for c in counts])
    kept = np.concatenate([order[c][share[c]:] for c in counts])
    return kept, out


def _order_per_class(ds: Dataset, idx: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Each class's indices (from `idx`) in a seeded random order, classes in sorted order."""
    rng = np.random.RandomState(seed)
    labels = np.array([ds.labels[i] for i in idx], dtype=object)
    return {name: rng.permutation(idx[labels == name]) for name in ds.label_names}


def _shots_and_rest(ds: Dataset, pool: np.ndarray, shots: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(shots, val candidates) from `pool`; see the module docstring for each modality."""
    val_per_class = max(shots, MIN_VAL_PER_CLASS)
    if _is_single_label(ds):
        order = _order_per_class(ds, pool, seed)
        short = {c: len(ix) for c, ix in order.items() if len(ix) < shots}
        if short:
            raise _unique_labels(ds) or DataError(
                f"{ds.origin}: fewer than shots={shots} training examples for {_listing(short)}; "
                "lower --shots or add examples"
            )
        take = np.concatenate([ix[:shots] for ix in order.values()])
        rest = np.concatenate([ix[shots : shots + val_per_class] for ix in order.values()])
        return take, rest

    order = np.random.RandomState(seed).permutation(pool)
    if ds.modality == "pairs":
        if len(order) < shots:
            raise DataError(f"{ds.origin}: shots={shots} but only {len(order)} training pairs; lower --shots")
        return order[:shots], order[shots : shots + val_per_class]

    have = {name: 0 for name in ds.label_names}
    for i in order:
        for name in ds.labels[i]:
            have[name] += 1
    short = {c: n for c, n in have.items() if n < shots}
    if short:
        raise _unique_labels(ds) or DataError(
            f"{ds.origin}: fewer than shots={shots} training examples for {_listing(short)}; "
            "lower --shots or add examples"
        )
    got = dict.fromkeys(ds.label_names, 0)
    take, rest = [], []
    for i in order:
        if any(got[name] < shots for name in ds.labels[i]):
            take.append(i)
            for name in ds.labels[i]:
                got[name] += 1
        else:
            rest.append(i)
    n_val = val_per_class * len(ds.label_names)
    return np.array(take, dtype=int), np.array(rest[:n_val], dtype=int)


def run_splits(cfg: Any, kind: str | None = None, *, run_dir: str | Path | None = None,
               parts: Sequence[str] = ("train", "val", "test"), group_column: str | None = None,
               fix: str = "restore the file the run was trained on (or retrain)") -> Splits:
    """A run's splits rebuilt from its config (``RunConfig``: data, test file, columns, seeds, carve) as its recipe
    made them at training time. ``kind``: the task the data is read as (None: from the data).

    ``run_dir``: the run's directory; the splits named in ``parts`` (those the caller will use) are then checked
    against the fingerprints its ``data_card.json`` recorded at training time. The config names a file, not its
    contents: a file edited since (rows reordered, added or relabelled) splits differently, and a test split
    rebuilt from it may hold the run's training examples, so a score on it would be silently wrong. Harmless
    edits (line endings, an added column) keep the fingerprints. A card without fingerprints (runs from before
    they were recorded) is not checked. ``fix``: what the refusal tells the user to do (a command with ``--data``
    says to pass one).

    ``group_column``: read into ``Dataset.groups`` from the file the test examples come from (the test file, or
    the data file when the test split is carved from it)."""
    card = _read_card(Path(run_dir)) if run_dir is not None else {}
    # a card from before empty texts were dropped on loading (no "empty_texts_removed" among its checks): that run
    # trained with them, so its splits are rebuilt with them
    checks = card.get("checks") if isinstance(card.get("checks"), dict) else {}
    drop_empty = not card or "empty_texts_removed" in checks
    ds = load_data(cfg.data, task=kind, group_column=None if cfg.test else group_column, drop_empty=drop_empty,
                   **cfg.columns())
    test = (load_data(cfg.test, task=kind or ds.modality, group_column=group_column, min_classes=1,
                      drop_empty=drop_empty, **cfg.columns())
            if cfg.test else None)
    splits = make_splits(ds, test=test, **cfg.split_args())
    if run_dir is not None:
        _check_recorded(splits, _recorded_fingerprints(card), cfg, parts, fix)
    return splits


def fingerprint(ds: Dataset) -> str:
    """sha256 of a dataset's examples and labels in order: two runs on equal fingerprints saw the same data."""
    digest = hashlib.sha256()
    for i, x in enumerate(ds.inputs):
        if ds.modality == "text":
            digest.update(x.encode("utf-8"))
        elif ds.modality == "pairs":
            digest.update(x[0].encode("utf-8") + b"\0" + x[1].encode("utf-8"))
        else:
            digest.update(str(tuple(x.shape)).encode() + x.numpy().tobytes())
        label = ds.labels[i] if ds.labels else ""
        digest.update(b"\x1f" + ("|".join(label) if ds.multi_label else label).encode("utf-8") + b"\x1e")
    return digest.hexdigest()


def _read_card(run_dir: Path) -> dict:
    """The run's data card; empty when there is none or it is not a JSON object."""
    try:
        card = json.loads((run_dir / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return card if isinstance(card, dict) else {}


def _recorded_fingerprints(card: dict) -> dict[str, str]:
    """{split name: fingerprint} as the run's data card recorded them; empty when it recorded none (no card, or
    a card from before fingerprints, or one that is not JSON: nothing to check against)."""
    parts = card.get("splits")
    if not isinstance(parts, dict):
        return {}
    return {name: part["fingerprint"] for name, part in parts.items()
            if isinstance(part, dict) and isinstance(part.get("fingerprint"), str) and part["fingerprint"]}


def _check_recorded(splits: Splits, recorded: dict[str, str], cfg: Any, parts: Sequence[str], fix: str) -> None:
    """Refuse rebuilt splits that are not the ones the run was trained and tested on (``run_splits``)."""
    for name in parts:
        if name in recorded and fingerprint(getattr(splits, name)) != recorded[name]:
            source = (cfg.test or cfg.data) if name == "test" else cfg.data
            raise DataError(f"{source} changed since the run was trained: its {name} split is not the run's; {fix}")
