"""Long texts in few-shot embeddings: truncating at 256 tokens vs reading whole texts as windows.

BBC News articles are longer than the 256 tokens MiniLM's sentence-transformers config reads (the script prints
the token-length median and 90th percentile of the test set). Variants of ``fewshot.embed`` (the embeddings of
``frozen_fit`` and of ``contrastive_fit``'s head), each with a logistic-regression head (``frozen_fit``'s):

- ``256x1``: the first 256 tokens (``max_chunks=1``, the behaviour before windows);
- ``512x1``: the first 512 tokens (MiniLM's position limit);
- ``256x4``: up to 4 windows of 256 tokens, token-weighted mean (``max_chunks=4``, the default).

Same splits as ``graftune train``: ``make_splits(bbc, seed=0, shot_seed=SEED, shots=K, test_per_class=100,
val_size=0)``: one 500-article test set, embedded once per variant (its time is printed: the cost side).

    .venv/bin/python bench/issue4_long_texts.py [--shots 8 16] [--seeds 0 1 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from graftune.data.sources import load_data
from graftune.data.splits import make_splits
from graftune.recipes import fewshot as fs
from graftune.zoo import load_base

VARIANTS = {"256x1": (256, 1), "512x1": (512, 1), "256x4": (256, 4)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shots", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load_base("minilm")
    ds = load_data("bbc-news")
    splits = {(k, s): make_splits(ds, seed=0, shot_seed=s, shots=k, test_per_class=100, val_size=0)
              for k in args.shots for s in args.seeds}
    test = next(iter(splits.values())).test
    assert all(sp.test.inputs == test.inputs for sp in splits.values()), "the test set must be the same everywhere"
    lengths = [len(x) for x in base.tokenizer(list(test.inputs))["input_ids"]]
    print(f"test tokens: median {int(np.median(lengths))}, p90 {int(np.percentile(lengths, 90))}; "
          f"loadavg {os.getloadavg()}", flush=True)
    truth = np.asarray(test.labels)
    for name, (max_length, max_chunks) in VARIANTS.items():
        options = {"max_length": max_length, "max_chunks": max_chunks}
        t = time.perf_counter()
        test_emb = fs.embed(base.model, base.tokenizer, test.inputs, **options).numpy()
        test_seconds = time.perf_counter() - t
        for k in args.shots:
            accs = []
            for s in args.seeds:
                train = splits[(k, s)].train
                m = fs.frozen_fit(base, None, train.inputs, train.labels, **options)
                accs.append(round(float(np.mean(np.asarray(m.head.predict(test_emb)) == truth)), 4))
            print(json.dumps({"variant": name, "shots": k, "seeds": args.seeds, "accuracy": accs,
                              "mean": round(float(np.mean(accs)), 4), "std": round(float(np.std(accs, ddof=1)), 4)
                              if len(accs) > 1 else None, "test_embed_seconds": round(test_seconds, 1),
                              "loadavg": [round(x, 2) for x in os.getloadavg()]}), flush=True)


if __name__ == "__main__":
    main()
