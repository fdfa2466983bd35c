"""Is ``--method auto`` (selection + final training) cheaper than ONE plain PEFT LoRA run of 20 epochs on the same
data? (issue 14). Side by side in one process, on the bench's splits (``catalog.make_compare_splits``: the test set
carved with seed 0, 8 shots per class drawn with the seed).

- ``peft``: ``bench/issue5_train_vs_peft.py``'s plain PEFT script (LoRA r=8 on query and value, mean-pooled head,
  AdamW, batch 16, max_length 256, 20 epochs) with PEFT's best CPU settings: dynamic padding, length-grouped
  batches, bf16 autocast where this CPU has native bf16, else fp32;
- ``auto``: ``graftune.runs.train(RunConfig(method="auto", ...))``: the product's whole run, its default budget,
  cross-validated selection and the pick's training, run directory written; ``trained_s`` leaves out the final
  run's scoring of the test set (``test_seconds``), as the PEFT side's does (``whole_s`` keeps it).

Wall seconds, load average and accuracies; the order of the two alternates per data set.

    PYTHONPATH=src:bench OMP_NUM_THREADS=1 .venv/bin/python bench/issue14_auto_time.py --data trec,bbc-news

(one thread per process: two processes of two threads each on two cores made every time 5-7x longer)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from issue5_train_vs_peft import loadavg, run_peft

from graftune.config import RunConfig
from graftune.runs import train
from graftune.strategies.catalog import load_compare_data, make_compare_splits, test_per_class_for


def run_auto(data: str, splits, per_class: int, seed: int) -> dict:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        cfg = RunConfig(model="minilm", data=data, method="auto", seed=seed, split_seed=0, shots=8,
                        test_per_class=per_class, val_size=0, out=str(Path(scratch) / "run"))
        m = train(cfg, progress=False, splits=splits)
        auto = m.get("auto") or {}
    # as the PEFT side's trained_s, without scoring the test set (the run's own timing of it; LoRA picks record
    # none, and their seconds keep it)
    whole = time.perf_counter() - t0
    return {"side": "auto", "trained_s": round(whole - m.get("test_seconds", 0.0), 2), "whole_s": round(whole, 2),
            "test_s": m.get("test_seconds"), "accuracy": m["accuracy"],
            "pick": auto.get("method"), "selection_s": auto.get("seconds"), "budget_s": auto.get("budget_s"),
            "candidates_s": {n: [round(c.get("seconds", 0.0), 2), c.get("folds")]
                             for n, c in (auto.get("candidates") or {}).items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="trec,bbc-news")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/out/issue14_auto_time.jsonl")
    a = ap.parse_args()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(a.data.split(",")):
        ds, _ = load_compare_data(data, None, "text", "label")
        per_class = test_per_class_for(ds, [8, 16])
        splits = make_compare_splits(ds, shots=8, seed=a.seed, test_per_class=per_class)
        sides = ["peft", "auto"] if i % 2 == 0 else ["auto", "peft"]
        for side in sides:
            before = loadavg()
            result = (run_peft("lora", splits, 20, 256) if side == "peft"
                      else run_auto(data, splits, per_class, a.seed))
            row = {"data": data, "seed": a.seed, **result, "load_before": before, "load_after": loadavg(),
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            row.pop("epoch_s", None)
            print(json.dumps(row), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
