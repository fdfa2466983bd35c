"""The registry's regression gate on real data (issue 13): MiniLM + BBC News, frozen-embedding probe runs
(`--method probe`, seconds to train), pushed and promoted through `graftune registry`.

    .venv/bin/python bench/issue13_registry_gate.py [--out /tmp/issue13-gate] [--shots 16] [--test-per-class 100]
                                                    [--max-length 256]

The data: the deduplicated BBC articles split once (seed 0): `--test-per-class` test articles per class into
test.jsonl, the rest into train.jsonl, and train_shuffled.jsonl (the same texts, labels permuted). Every run trains
on a pool with `--shots N` and is scored on test.jsonl (`--test`), so every version's recorded test split is the
same articles.

  news@1    good       (true labels)       the first promotion: no gate
  news@2    shuffled   (permuted labels)   must be refused: both numbers and the difference printed, exit 1
  news-b@1  shuffled                       the first promotion of news-b: no gate
  news-b@2  good                           better than the promoted news-b@1: accepted
  then `registry rollback news-b` (back to news-b@1), `registry list` and `registry log`.

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
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    ds = load_data("bbc-news")
    splits = make_splits(ds, seed=0, test_per_class=args.test_per_class, val_size=0)
    pool = list(splits.train.inputs) + list(splits.val.inputs)
    pool_labels = list(splits.train.labels) + list(splits.val.labels)
    write_jsonl(out / "test.jsonl", splits.test.inputs, splits.test.labels)
    write_jsonl(out / "train.jsonl", pool, pool_labels)
    shuffled = list(pool_labels)
    random.Random(0).shuffle(shuffled)
    write_jsonl(out / "train_shuffled.jsonl", pool, shuffled)
    print(f"bbc-news: {len(ds)} unique articles; test.jsonl {len(splits.test)}, train pool {len(pool)}\n")

    reg = ["--registry", str(out / "registry")]
    common = ["--model", "minilm", "--method", "probe", "--test", str(out / "test.jsonl"), "--max-length",
              str(args.max_length), "--quiet"]
    for run, data in (("good", "train.jsonl"), ("shuffled", "train_shuffled.jsonl")):
        sh("train", "--data", str(out / data), "--shots", str(args.shots), "--out", str(out / run), *common)
    sh("registry", "push", str(out / "good"), "--name", "news", *reg)
    sh("registry", "promote", "news@1", *reg)
    sh("registry", "push", str(out / "shuffled"), "--name", "news", *reg)
    sh("registry", "promote", "news@2", *reg, ok_codes=(1,))
    sh("registry", "push", str(out / "shuffled"), "--name", "news-b", *reg)
    sh("registry", "promote", "news-b@1", *reg)
    sh("registry", "push", str(out / "good"), "--name", "news-b", *reg)
    sh("registry", "promote", "news-b@2", *reg)
    sh("registry", "rollback", "news-b", *reg)
    sh("registry", "list", *reg)
    sh("registry", "log", *reg)


if __name__ == "__main__":
    main()
