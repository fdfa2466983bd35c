"""Run directories for the registry tests: a tiny BERT with the frozen-embedding probe (about a second each) on the
topic data, one trained on the true labels and one on shuffled labels, both scored on the same clean test file.

They are trained from inside their folder with relative paths (``model: bert``, ``data: train.csv``), as a user
typing ``graftune train --model bert --data train.csv`` would (run.yaml records them absolute; the registry tests
that need relative ones write them back)."""

from __future__ import annotations

import os
import random
from pathlib import Path

from tests.train_helpers import bert_folder, topic_rows, write_csv


def registry_runs(root: Path) -> dict:
    """{"root", "bert", "train", "shuffled", "test", "good", "good2", "bad"}: files and run directories."""
    from graftune.config import RunConfig
    from graftune.runs import train

    bert_folder(root / "bert")
    rows = topic_rows(40, seed=0)
    write_csv(root / "train.csv", rows)
    write_csv(root / "test.csv", topic_rows(30, seed=1))
    labels = [r["label"] for r in rows]
    random.Random(0).shuffle(labels)
    write_csv(root / "shuffled.csv", [{"text": r["text"], "label": lab} for r, lab in zip(rows, labels)])
    out = {"root": root, "bert": root / "bert", "train": root / "train.csv", "shuffled": root / "shuffled.csv",
           "test": root / "test.csv"}
    before = Path.cwd()
    os.chdir(root)
    try:
        for run, data, seed in (("good", "train.csv", 0), ("good2", "train.csv", 1), ("bad", "shuffled.csv", 0)):
            train(RunConfig(model="bert", data=data, test="test.csv", out=run, method="probe", seed=seed,
                            max_length=32, precision="fp32"), progress=False)
            out[run] = root / run
    finally:
        os.chdir(before)
    return out


def relabelled_run(runs: dict, out: str, relabel: dict) -> Path:
    """A probe run beside ``registry_runs``' ones, trained and tested on their data with labels renamed by
    ``relabel`` ({old: new}; a label split in two: {old: (old, new)}, every other row of it becoming ``new``)."""
    import csv

    from graftune.config import RunConfig
    from graftune.runs import train

    root = runs["root"]
    for split in ("train", "test"):
        rows = list(csv.DictReader(runs[split].open(encoding="utf-8")))
        seen: dict[str, int] = {}
        for r in rows:
            new = relabel.get(r["label"], r["label"])
            if isinstance(new, tuple):
                seen[r["label"]] = seen.get(r["label"], 0) + 1
                new = new[seen[r["label"]] % 2]
            r["label"] = new
        write_csv(root / f"{out}-{split}.csv", rows)
    train(RunConfig(model=str(runs["bert"]), data=str(root / f"{out}-train.csv"), test=str(root / f"{out}-test.csv"),
                    out=str(root / out), method="probe", seed=0, max_length=32, precision="fp32"), progress=False)
    return root / out
