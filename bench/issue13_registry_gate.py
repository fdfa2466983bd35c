"""The registry's regression gate on real data (issue 13): MiniLM + BBC News, frozen-embedding probe runs
(`--method probe`, seconds to train), pushed and promoted through `graftune registry`.

    .venv/bin/python bench/issue13_registry_gate.py [--out /tmp/issue13-gate] [--shots 16]

The data: the deduplicated BBC articles split once (seed 0): 100 test articles per class (500) into test.jsonl, the
rest into train.jsonl, and train_shuffled.jsonl (the same texts, labels permuted). Every run trains on a pool with
`--shots N` and is scored on test.jsonl (`--test`), so every version's recorded test split is the same 500 articles.

  v1 good      (true labels, seed 0)          promote: the first, no gate
  v2 shuffled  (permuted labels)              promote: must be refused (both numbers and the difference printed)
  v3 fewer     (true labels, 2 shots/class)   promote: worse by some points: refused if beyond sampling noise
  v4 good      (true labels, seed 1)          promote: as good as v1 within noise: accepted
  then `registry rollback news` (back to v1) and `registry log news`.

Run by hand (not in the suite); prints every command and its output, and the seconds each took.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from graftune.data.sources import load_data
from graftune.data.splits import make_splits

GRAFTUNE = [sys.executable, "-m", "graftune"]


def write_jsonl(path: Path, texts, labels) -> None:
    with path.open("w", encoding="utf-8") as f:
        for text, label in zip(texts, labels):
            f.write(json.dumps({"text": text, "label": label}) + "\n")


def sh(*args: str, ok_codes=(0,)) -> str:
    t = time.perf_counter()
    done = subprocess.run([*GRAFTUNE, *args], capture_output=True, text=True, check=False)
    took = time.perf_counter() - t
    print(f"$ graftune {' '.join(args)}   # {took:.1f} s, exit {done.returncode}")
    out = "\n".join(line for line in (done.stdout + done.stderr).splitlines() if "Loading weights" not in line)
    print(out.strip() + "\n")
    if done.returncode not in ok_codes:
        raise SystemExit(f"unexpected exit {done.returncode}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/issue13-gate")
    parser.add_argument("--shots", type=int, default=16)
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    ds = load_data("bbc-news")
    splits = make_splits(ds, seed=0, test_per_class=100, val_size=0)
    pool = list(splits.train.inputs) + list(splits.val.inputs)
    pool_labels = list(splits.train.labels) + list(splits.val.labels)
    write_jsonl(out / "test.jsonl", splits.test.inputs, splits.test.labels)
    write_jsonl(out / "train.jsonl", pool, pool_labels)
    shuffled = list(pool_labels)
    random.Random(0).shuffle(shuffled)
    write_jsonl(out / "train_shuffled.jsonl", pool, shuffled)
    print(f"bbc-news: {len(ds)} unique articles; test.jsonl {len(splits.test)}, train pool {len(pool)}\n")

    reg = ["--registry", str(out / "registry")]
    common = ["--model", "minilm", "--method", "probe", "--test", str(out / "test.jsonl"), "--quiet"]
    for run, data, shots, seed in (("good", "train.jsonl", args.shots, 0), ("shuffled", "train_shuffled.jsonl",
                                                                              args.shots, 0),
                                   ("fewer", "train.jsonl", 2, 0), ("good-seed1", "train.jsonl", args.shots, 1)):
        sh("train", "--data", str(out / data), "--shots", str(shots), "--seed", str(seed), "--out", str(out / run),
           *common)
        sh("registry", "push", str(out / run), "--name", "news", *reg)
    sh("registry", "promote", "news@1", *reg)
    sh("registry", "promote", "news@2", *reg, ok_codes=(1,))
    sh("registry", "promote", "news@3", *reg, ok_codes=(0, 1))
    sh("registry", "promote", "news@4", *reg, ok_codes=(0, 1))
    sh("registry", "rollback", "news", *reg, ok_codes=(0, 2))
    sh("registry", "list", *reg)
    sh("registry", "log", "news", *reg)


if __name__ == "__main__":
    main()
