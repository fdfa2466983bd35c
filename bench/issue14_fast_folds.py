"""Could auto's contrastive fold runs use the faster setting (cosine pairs, 64 a step, lr 3e-3: 0.32x the training
time, -0.3 points on average as a final model; bench/RESULTS.md, session 8) while the pick still trains the shipped
recipe? (issue 14: auto's time). The folds are evidence, not the model: what matters is whether auto's choice
changes.

For every record of ``bench/issue14_auto_rules.py`` (the same splits and folds, every candidate's held-out
predictions), the contrastive recipe runs again on each fold with the fast setting; its held-out predictions are
stored beside the record's under ``contrastive-fast``. The replay then gives auto's rule the fast folds instead of
the shipped ones (the pick's test accuracy stays the shipped recipe's, as auto would train it) and counts the picks
that change, and, as in the futility replay, whether a more sensitive rule (z = 1) still sees what it saw.

    PYTHONPATH=src:bench OMP_NUM_THREADS=1 .venv/bin/python bench/issue14_fast_folds.py \
        --records bench/out/auto-oof --out bench/out/fast-folds
    PYTHONPATH=src:bench .venv/bin/python bench/issue14_fast_folds.py --replay bench/out/fast-folds
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
from issue14_auto_rules import rule_auto, rule_z
from sklearn.model_selection import StratifiedKFold

from graftune.data.sources import ALIASES
from graftune.recipes.contrastive import PAIR_MAX_LENGTH
from graftune.recipes.fewshot import contrastive_fit
from graftune.recipes.fewshot_run import predict_rows
from graftune.strategies.catalog import load_compare_data, make_compare_splits, test_per_class_for
from graftune.zoo import load_base

#: the fast setting of bench/issue14_contrastive_steps.py ("cosine-64-lr3")
FAST = {"batch_size": 64, "lr": 3e-3}
HELDOUT = Path("/tmp/heldout")  # bench/heldout_data.py


def measure(record: dict) -> dict:
    data = record["data"] if record["data"] in ALIASES else str(HELDOUT / f"{record['data']}.csv")
    ds, _ = load_compare_data(data, None, "text", "label")
    splits = make_compare_splits(ds, shots=record["shots"], seed=record["seed"],
                                 test_per_class=test_per_class_for(ds, [8, 16]))
    train = splits.train
    labels = np.asarray(train.labels)
    assert [str(v) for v in labels] == record["labels"], "not the record's training examples"
    folds = list(StratifiedKFold(n_splits=record["k"], shuffle=True, random_state=record["seed"]).split(
        np.zeros(len(labels)), labels))
    oof, t0 = [], time.perf_counter()
    for fit, val in folds:
        base = load_base("minilm", task="text-classification")
        fitted = contrastive_fit(base, None, [train.inputs[i] for i in fit], labels[fit].tolist(),
                                 seed=record["seed"], embed_max_length=256, max_length=PAIR_MAX_LENGTH, **FAST)
        rows = predict_rows(fitted, [train.inputs[i] for i in val], train.label_names)
        oof.append([[int(i) for i in val], [r["label"] for r in rows]])
    out = copy.deepcopy(record)
    out["oof"]["contrastive-fast"] = oof
    out["seconds"]["contrastive_fast_per_fold"] = round((time.perf_counter() - t0) / record["k"], 1)
    return out


def replay(records: list[dict]) -> str:
    changed, seen_z1, kept_z1, new_z1, ratio = [], 0, 0, 0, []
    for r in records:
        fast = copy.deepcopy(r)
        fast["oof"]["contrastive"] = r["oof"]["contrastive-fast"]
        shipped, pick = rule_auto(r, r["k"]), rule_auto(fast, r["k"])
        if pick != shipped:
            changed.append(f"{r['data']} seed {r['seed']}: {shipped} -> {pick}")
        shipped_z1, fast_z1 = rule_z(r, 1.0) != "contrastive", rule_z(fast, 1.0) != "contrastive"
        seen_z1 += shipped_z1
        kept_z1 += shipped_z1 and fast_z1
        new_z1 += fast_z1 and not shipped_z1
        ratio.append(r["seconds"]["contrastive_fast_per_fold"] / r["seconds"]["contrastive_per_fold"])
    first = f"{len(records)} splits: {len(changed)} picks changed by the fast folds"
    sensitive = (f"splits where a z = 1 rule overrules the preference on the shipped folds: {seen_z1}; on the fast "
                 f"folds it still does on {kept_z1}, and on {new_z1} more")
    lines = [first + (f" ({'; '.join(changed)})" if changed else ""), sensitive,
             f"fold time, fast / shipped (each measured in its own run): median {np.median(ratio):.2f}"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=Path, help="bench/issue14_auto_rules.py's records")
    p.add_argument("--out", type=Path)
    p.add_argument("--only", default="", help="comma-separated record names (stems) to run, default all")
    p.add_argument("--replay", type=Path)
    a = p.parse_args()
    if a.replay:
        print(replay([json.loads(f.read_text()) for f in sorted(a.replay.glob("*.json"))]))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    only = {s for s in a.only.split(",") if s}
    for f in sorted(a.records.glob("*.json")):
        target = a.out / f.name
        if target.exists() or (only and f.stem not in only):
            continue
        target.write_text(json.dumps(measure(json.loads(f.read_text()))))
        print(f"{f.stem}: done", flush=True)


if __name__ == "__main__":
    main()
