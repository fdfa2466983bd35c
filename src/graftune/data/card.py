"""The data card: where the data came from and exactly which examples each split holds (data_card.json).

Each split is identified by its ``data.splits.fingerprint``; ``data.splits.run_splits`` checks the splits it rebuilds
for a run against them."""

from __future__ import annotations

from typing import Any

from graftune.data.checks import empty_texts_removed, split_checks
from graftune.data.sources import Dataset
from graftune.data.splits import Splits, fingerprint


def data_card(splits: Splits, *, source: Dataset, tokenizer: Any = None) -> dict:
    """A JSON-ready record of the source, the seeds and shots, and each split's size, class counts and fingerprint.

    A test set the user brought (not carved from `source`) is described under `test_source`. `checks` counts what
    would make the scores untrustworthy (duplicates, examples shared between splits, texts under two labels,
    the training classes' balance; with the model's `tokenizer`, whether it reads the texts;
    `data.checks.split_checks`), and the rows loading dropped (duplicates under another label; empty texts, from
    the source and a user test file); `graftune check DATA` explains them.
    """
    user_test = (splits.test.origin, splits.test.sha256) != (source.origin, source.sha256)
    return {
        "origin": source.origin,
        "license": source.license,
        "sha256": source.sha256,
        "modality": source.modality,
        "multi_label": source.multi_label,
        "label_names": list(source.label_names),
        "examples": len(source),
        "duplicates_removed": source.duplicates_removed,
        "seed": splits.seed,
        "shots": splits.shots,
        "shot_seed": splits.shot_seed,
        "test_source": (
            {"origin": splits.test.origin, "license": splits.test.license, "sha256": splits.test.sha256}
            if user_test
            else None
        ),
        "splits": {
            name: {"examples": len(part), "counts": part.counts(), "fingerprint": fingerprint(part)}
            for name, part in (("train", splits.train), ("val", splits.val), ("test", splits.test))
        },
        "checks": {**split_checks(splits.train, splits.val, splits.test, tokenizer=tokenizer),
                   "conflicting_duplicates_removed": source.conflicts_removed,
                   "empty_texts_removed": empty_texts_removed(source, *([splits.test] if user_test else []))},
    }
