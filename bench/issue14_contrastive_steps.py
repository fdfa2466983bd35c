"""Can the contrastive recipe train in fewer steps without losing accuracy? (issue 14: auto's time)

The contrastive candidate is auto's pick on almost every split, and its training is most of auto's time (5 fold runs
and the final run: 116 of 150 profiled seconds on TREC, 8 shots). Its cost is the number of steps times the texts
each step embeds. SetFit's recipe draws 2 x ``iterations`` pairs per example and trains ``batch_size`` pairs a step
(20 and 16: 120 steps of ~30 texts at 48 examples). A supervised contrastive loss (``loss="supcon"``) uses every
pair of texts in the step, so large steps and few of them may carry the same signal.

Per (data set, seed), on the bench's splits (``catalog.make_compare_splits``, 8 shots), every variant trains on the
same training examples and is scored on the same test examples (at most ``--test-max``, a seeded subset), one
after another in one process, so the seconds are side by side.

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python bench/issue14_contrastive_steps.py \
        --data trec,sms-spam --seeds 0,1,2 --out bench/out/contrastive-steps
    PYTHONPATH=src .venv/bin/python bench/issue14_contrastive_steps.py --summary bench/out/contrastive-steps
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from graftune.recipes.contrastive import PAIR_MAX_LENGTH
from graftune.recipes.fewshot import contrastive_fit
from graftune.recipes.fewshot_run import score
from graftune.strategies.catalog import load_compare_data, make_compare_splits, test_per_class_for
from graftune.zoo import load_base

#: name -> contrastive_fit options; "setfit" is SetFit's step (graftune's recipe until session 11), "shipped" the
#: recipe as it ships now (since session 11: 64 pairs a step at 3e-3, what "cosine-64-lr3" measured)
VARIANTS = {
    "setfit": {"batch_size": 16, "lr": 1e-3},
    "shipped": {},
    "supcon-128": {"loss": "supcon", "batch_size": 128},
    "supcon-128-lr3": {"loss": "supcon", "batch_size": 128, "lr": 3e-3},
    "supcon-64-it10-lr3": {"loss": "supcon", "batch_size": 64, "iterations": 10, "lr": 3e-3},
    "cosine-64-lr3": {"batch_size": 64, "lr": 3e-3},
    # pairs read 256 tokens instead of the first 128 (long texts: the probe reads up to 4 windows of 256)
    "pairs-256": {"max_length": 256},
    # a step's texts in one batch padded to its longest (the recipe until session 12), not in groups by length
    "one-batch": {"group_rows": 1_000_000},
    # the frozen base without its dropout while the adapter trains, as train()'s adapter loop runs it
    "no-base-dropout": {"base_dropout": False},
}


def measure(data: str, seed: int, shots: int, test_max: int, variants: list[str]) -> dict:
    ds, _ = load_compare_data(data, None, "text", "label")
    splits = make_compare_splits(ds, shots=shots, seed=seed, test_per_class=test_per_class_for(ds, [8, 16]))
    test = splits.test
    if len(test) > test_max:
        test = test.subset(sorted(np.random.default_rng(seed).permutation(len(test))[:test_max].tolist()))
    out = {"data": Path(data).stem if "/" in data else data, "seed": seed, "shots": shots,
           "train": len(splits.train), "test": len(test), "variants": {}}
    for name in variants:
        base = load_base("minilm", task="text-classification")
        options = {"embed_max_length": 256, "max_length": PAIR_MAX_LENGTH, **VARIANTS[name]}
        fitted = contrastive_fit(base, None, splits.train.inputs, splits.train.labels, seed=seed, **options)
        m = score(fitted, test.inputs, test.labels, test.label_names)
        r = fitted.report
        out["variants"][name] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "steps": r["steps"],
                                 "texts_per_step": round(r["texts_embedded_per_step"], 1),
                                 "train_seconds": round(r["train_seconds"], 2), "seconds": round(r["seconds"], 2)}
        print(f"  {out['data']} seed {seed} {name}: acc {m['accuracy']:.3f} steps {r['steps']} "
              f"train {r['train_seconds']:.1f} s", flush=True)
    return out


def summary(folder: Path, baseline: str = "setfit") -> None:
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    names = [n for n in VARIANTS if all(n in r["variants"] for r in records)]
    sets = sorted({r["data"] for r in records})
    print("| variant | " + " | ".join(sets) + f" | mean change | worst change | train seconds (ratio to {baseline}) |")
    print("|---" * (len(sets) + 4) + "|")
    for name in names:
        cells, changes = [], []
        for s in sets:
            rs = [r for r in records if r["data"] == s]
            change = statistics.mean(100 * (r["variants"][name]["accuracy"] - r["variants"][baseline]["accuracy"])
                                     for r in rs)
            acc = statistics.mean(r["variants"][name]["accuracy"] for r in rs)
            cells.append(f"{acc:.3f} ({change:+.1f})")
            changes.append(change)
        ratio = (sum(r["variants"][name]["train_seconds"] for r in records)
                 / sum(r["variants"][baseline]["train_seconds"] for r in records))
        print(f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(changes):+.1f} | {min(changes):+.1f} | "
              f"{ratio:.2f} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="trec,sms-spam,rotten-tomatoes,bbc-news")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--test-max", type=int, default=300)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="bench/out/contrastive-steps")
    p.add_argument("--summary", help="a folder of records: print the table only")
    p.add_argument("--baseline", default="setfit", help="the variant the others' changes are measured from")
    a = p.parse_args()
    if a.summary:
        return summary(Path(a.summary), a.baseline)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for data in a.data.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            started = time.perf_counter()
            record = measure(data, seed, a.shots, a.test_max, a.variants.split(","))
            (out / f"{record['data']}-{a.shots}-{seed}.json").write_text(json.dumps(record, indent=1))
            print(f"{data} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    summary(out, a.baseline)


if __name__ == "__main__":
    main()
