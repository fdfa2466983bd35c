"""Issue 14: in-context few-shot with SmolLM2-135M-Instruct against the frozen MiniLM probe, on the same split.

For each data set: one split (seed 0): `shots` examples per class for training and a fixed test sample of
`--test` texts (`make_splits(test_size=N)`: stratified, the data set's own class proportions; val 0). The
in-context model puts those same shots in its prompt (all of them: k = shots), in a seeded order; the probe
(`fewshot.frozen_fit`, MiniLM whole-text embeddings + logistic regression, as `train --method probe`) fits on
them. Both label the same test texts. Reported: accuracy, macro-F1, seconds per test text (scoring only; the
in-context prefix is computed once and listed apart), the prompt size.

    OMP_NUM_THREADS=1 .venv/bin/python bench/issue14_in_context.py --data trec --variants codes,words,codes+cal,words+cal
    OMP_NUM_THREADS=1 .venv/bin/python bench/issue14_in_context.py --data bbc-news --variants codes,codes+cal
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from sklearn.metrics import accuracy_score, f1_score

from graftune.data.sources import load_data
from graftune.data.splits import make_splits
from graftune.recipes.fewshot import frozen_fit
from graftune.recipes.in_context import fit
from graftune.zoo import load_base

# How each data set's examples fit in SmolLM2's context: (max_example_tokens, max_text_tokens). BBC articles
# (median ~420 tokens) are cut: 40 examples x 96 tokens keep the prompt near 4.5k of the model's 8k positions,
# and each test article is read up to 128 tokens (its title and first paragraph).
LENGTHS = {"bbc-news": (96, 128), "trec": (64, 64), "rotten-tomatoes": (64, 128), "sms-spam": (64, 128)}
# Readable spellings for codes a language model cannot know (trec's coarse types, Li & Roth's definitions).
WORDS = {"trec": {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "person",
                  "LOC": "location", "NUM": "number"}}


def _metrics(y_true, y_pred) -> dict:
    return {"accuracy": round(float(accuracy_score(y_true, y_pred)), 4),
            "macro_f1": round(float(f1_score(y_true, y_pred, average="macro")), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="trec,bbc-news")
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="codes,words",
                    help="codes: label names as they are; words: WORDS spellings where defined; +cal: calibrate")
    ap.add_argument("--score", default="sum")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    lm = load_base("smollm2", task="causal-lm")
    encoder = load_base("minilm")
    rows = []
    for name in args.data.split(","):
        ds = load_data(name)
        s = make_splits(ds, seed=args.seed, test_size=args.test, val_size=0, shots=args.shots)
        train_x, train_y = list(s.train.inputs), list(s.train.labels)
        test_x, test_y = list(s.test.inputs), list(s.test.labels)

        t0 = time.perf_counter()
        probe = frozen_fit(encoder, None, train_x, train_y)
        t1 = time.perf_counter()
        pred = probe.predict(test_x)
        t2 = time.perf_counter()
        row = {"data": name, "strategy": "linear-probe (MiniLM)", "fit_seconds": round(t1 - t0, 2),
               "seconds_per_text": round((t2 - t1) / len(test_x), 4), **_metrics(test_y, pred)}
        rows.append(row)
        print(json.dumps(row), flush=True)

        ex_tokens, text_tokens = LENGTHS.get(name, (64, 128))
        for variant in args.variants.split(","):
            words = WORDS.get(name) if variant.startswith("words") else None
            if variant.startswith("words") and words is None:
                continue  # the names are words already
            model = fit(train_x, train_y, ds.label_names, k=args.shots, seed=args.seed, model=lm,
                        label_words=words, max_example_tokens=ex_tokens, max_text_tokens=text_tokens,
                        score=args.score, calibrate=variant.endswith("+cal"))
            proba = model.predict_proba(test_x)
            pred = [ds.label_names[i] for i in proba.argmax(axis=1)]
            cost = model.cost
            row = {"data": name, "strategy": f"in-context SmolLM2 ({variant})", "k": args.shots,
                   "prefix_tokens": cost["prefix_tokens"], "prefix_seconds": round(cost["prefix_seconds"], 2),
                   "seconds_per_text": round(cost["seconds_per_text"], 4),
                   "max_example_tokens": ex_tokens, "max_text_tokens": text_tokens,
                   "predicted": {n: pred.count(n) for n in ds.label_names}, **_metrics(test_y, pred)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        print(json.dumps({"data": name, "test": len(test_x), "test_counts": s.test.counts(),
                          "train": len(train_x)}), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    print("done")


if __name__ == "__main__":
    main()
