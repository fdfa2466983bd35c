"""BBC News, 8 shots per class, MiniLM: the few-shot strategies of ``graftune.recipes.fewshot`` side by side on
one split (seed 0: 40 training articles, 100 test articles per class = 500), accuracy and seconds.

Strategies (``--only`` picks some):
- ``prototypes``: frozen mean-pooled embeddings, nearest class mean by cosine;
- ``frozen-lr``: the same embeddings, scikit-learn logistic regression;
- ``contrastive-adapter``: SetFit-style pair training of LoRA (r=8, q/k/v/o of the top 2 layers) with the frozen
  lower layers cached, bf16 frozen base, pairs at 128 tokens; then logistic regression on 256-token embeddings;
- ``contrastive-full``: SetFit's recipe re-implemented: the whole body trained on the same pairs (lr 2e-5,
  float32, 256 tokens), then logistic regression. Stands in for SetFit (not installed here).
``--synth N`` also writes N synthetic articles per class with SmolLM2, filters them with the frozen-LR model and
reports what was kept, and the accuracy of frozen-LR trained on shots + kept synthetic articles.

Seconds: ``fit`` is wall time from a loaded base to a fitted model (embedding, pair training, head); ``cpu`` is
the process CPU time over the same span (both cores count), which is less sensitive to other processes on a
shared machine; ``predict`` is wall time for the 500 test articles. The load average is recorded with each row.

Run: ``.venv/bin/python bench/issue4_fewshot.py [--seed 0] [--shots 8] [--only a,b] [--synth 0]``
Writes one JSON line per strategy to ``bench/out/issue4_fewshot.jsonl`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from graftune.data.sources import load_data
from graftune.data.splits import make_splits
from graftune.recipes import fewshot as fs
from graftune.zoo import load_base

OUT = Path(__file__).parent / "out" / "issue4_fewshot.jsonl"
STRATEGIES = ("prototypes", "frozen-lr", "contrastive-adapter", "contrastive-full")


def fit(strategy: str, base, texts, labels, seed: int, options: dict):
    if strategy == "prototypes":
        return fs.frozen_fit(base, None, texts, labels, head="prototype")
    if strategy == "frozen-lr":
        return fs.frozen_fit(base, None, texts, labels, head="logistic")
    if strategy == "contrastive-adapter":
        return fs.contrastive_fit(base, None, texts, labels, body="adapter", seed=seed, **options)
    if strategy == "contrastive-full":
        # SetFit 1.2's defaults: 20 iterations, 1 epoch, batch 16, lr 2e-5, the model's 256 tokens, float32
        return fs.contrastive_fit(base, None, texts, labels, body="full", seed=seed, iterations=20, epochs=1,
                                  batch_size=16, lr=2e-5, max_length=256, embed_max_length=256, precision="fp32")
    raise SystemExit(f"unknown strategy {strategy!r}; use some of {', '.join(STRATEGIES)}")


def run(strategy: str, splits, seed: int, options: dict) -> dict:
    base = load_base("minilm")  # a fresh base: the bf16 policy casts the frozen weights in place
    train, test = splits.train, splits.test
    load0 = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    model = fit(strategy, base, train.inputs, train.labels, seed, options)
    fit_wall, fit_cpu = time.perf_counter() - wall, time.process_time() - cpu
    t = time.perf_counter()
    predicted = model.predict(test.inputs)
    predict_wall = time.perf_counter() - t
    accuracy = float(np.mean(np.asarray(predicted) == np.asarray(test.labels)))
    report = {k: v for k, v in model.report.items() if k not in ("strategy",)}
    return {"strategy": strategy, "seed": seed, "shots": splits.shots, "accuracy": round(accuracy, 4),
            "fit_seconds": round(fit_wall, 1), "fit_cpu_seconds": round(fit_cpu, 1),
            "predict_seconds": round(predict_wall, 1), "load_avg_before": round(load0, 2),
            "load_avg_after": round(os.getloadavg()[0], 2), "threads": torch.get_num_threads(), "report": report}


def synth(splits, per_class: int, seed: int) -> dict:
    """SmolLM2 writes articles per class; the frozen-LR model filters them; frozen-LR is refitted with them."""
    from graftune.data.augment.text import synthesize_with_lm

    minilm = load_base("minilm")
    train, test = splits.train, splits.test
    frozen = fs.frozen_fit(minilm, None, train.inputs, train.labels)
    lm = load_base("smollm2")
    by_class: dict = {}
    for text, label in zip(train.inputs, train.labels):
        by_class.setdefault(label, []).append(text)
    t = time.perf_counter()
    out = synthesize_with_lm(lm, None, by_class, per_class, seed=seed, filter_model=frozen.predict,
                             max_new_tokens=160, shots_in_prompt=2, max_words_in_prompt=50)
    gen_seconds = time.perf_counter() - t
    refit = fs.frozen_fit(minilm, None, [*train.inputs, *out.texts], [*train.labels, *out.labels])
    acc = float(np.mean(np.asarray(refit.predict(test.inputs)) == np.asarray(test.labels)))
    return {"strategy": f"frozen-lr+smollm2-synth{per_class}", "seed": seed, "shots": splits.shots,
            "accuracy": round(acc, 4), "generate_seconds": round(gen_seconds, 1), "record": out.record}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--only", default=",".join(STRATEGIES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--synth", type=int, default=0, help="synthetic articles asked per class (0: skip)")
    ap.add_argument("--adapter", default="{}", help="JSON options for contrastive_fit (adapter body)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_data("bbc-news")
    splits = make_splits(ds, seed=args.seed, shots=args.shots, test_per_class=100)
    print(f"bbc-news: {len(splits.train)} training articles, {len(splits.test)} test articles; "
          f"{torch.get_num_threads()} threads; {os.cpu_count()} CPUs")
    OUT.parent.mkdir(exist_ok=True)
    rows = []
    options = json.loads(args.adapter)
    for strategy in args.only.split(","):
        row = run(strategy, splits, args.seed, options)
        if options and strategy == "contrastive-adapter":
            row["options"] = options
        rows.append(row)
        print(json.dumps(row), flush=True)
        with OUT.open("a") as f:
            f.write(json.dumps({**row, "date": time.strftime("%Y-%m-%d %H:%M")}) + "\n")
    if args.synth:
        row = synth(splits, args.synth, args.seed)
        rows.append(row)
        print(json.dumps(row), flush=True)
        with OUT.open("a") as f:
            f.write(json.dumps({**row, "date": time.strftime("%Y-%m-%d %H:%M")}) + "\n")
    print("\n| strategy | accuracy | fit s (wall) | fit s (CPU) | predict 500 s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['strategy']} | {r['accuracy']:.3f} | {r.get('fit_seconds', '')} | {r.get('fit_cpu_seconds', '')} "
              f"| {r.get('predict_seconds', '')} |")


if __name__ == "__main__":
    main()
