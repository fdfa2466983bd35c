"""MNIST-5k, 16 shots per class, EfficientNet-Lite0 (ImageNet weights): convolutional bottleneck adapters on the
MBConv blocks + a linear head, vs the linear probe (frozen pooled 1280-d features + logistic regression) on the
same split (1,000 test digits: test_size 0.2, stratified, seed 0).

Run: ``.venv/bin/python bench/issue3_mnist.py [--seeds 0 1 2] [--set epochs=20 ...] [--no-probe]``
Writes one JSON line per run to ``bench/out/issue3_mnist.jsonl`` and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from graftune.config import RunConfig, parse_sets
from graftune.runs import train

OUT = Path(__file__).parent / "out" / "issue3_mnist.jsonl"
RECIPE = {"model": "efficientnet-lite0", "data": "mnist-5k", "method": "bottleneck", "options": {}, "shots": 16,
          "test_size": 0.2, "split_seed": 0, "val_size": 0, "epochs": 20, "lr": 3e-3, "head_lr": 1e-2,
          "batch_size": 16, "dropout": 0.2}


def probe(cfg: RunConfig) -> dict:
    """Frozen EfficientNet-Lite0 pooled features + logistic regression on the run's own splits."""
    from graftune.core.model import AdapterModel
    from graftune.data.sources import load_data
    from graftune.data.splits import make_splits
    from graftune.run.scoring import linear_probe
    from graftune.speed import precision
    from graftune.tasks import ZOO_TASK, build_task
    from graftune.zoo import load_base

    started = time.perf_counter()
    ds = load_data(cfg.data)
    splits = make_splits(ds, **cfg.split_args())
    base = load_base(cfg.model, task=ZOO_TASK["image"])
    task = build_task("image", base, label_names=ds.label_names)
    model = AdapterModel(base.model, family=base.family)
    policy = precision.choose(cfg.precision, inference=True)
    precision.apply(model.base, policy)
    m = linear_probe(task, model, splits.train.inputs, splits.train.labels, splits.test.inputs, splits.test.labels,
                     policy=policy, seed=cfg.seed)
    m["seconds"] = round(time.perf_counter() - started, 1)
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--no-probe", action="store_true")
    ap.add_argument("--label", default="bottleneck")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="override a recipe field (YAML value)")
    args = ap.parse_args()
    changes = parse_sets(args.sets)
    recipe = {**RECIPE, **changes}
    print(f"recipe: {json.dumps(recipe)}", flush=True)
    OUT.parent.mkdir(exist_ok=True)
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = RunConfig(**recipe, seed=seed, out=str(Path(tmp) / "run"))
            m = train(cfg, progress=False)
            row = {"label": args.label, "seed": seed, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                   "examples": m["examples"], "train_seconds": m["train_seconds"],
                   "train_cpu_seconds": m.get("train_cpu_seconds"), "wall_seconds": m["wall_seconds"],
                   "trainable_params": m["trainable_params"], "adapter_bytes": m["adapter_bytes"],
                   "peak_rss_mb": m["peak_rss_mb"], "changes": changes}
            if not args.no_probe:
                p = probe(cfg)
                row.update(probe_accuracy=p["accuracy"], probe_macro_f1=p["macro_f1"], probe_seconds=p["seconds"])
        rows.append(row)
        print(json.dumps(row), flush=True)
        with OUT.open("a") as f:
            f.write(json.dumps({**row, "date": time.strftime("%Y-%m-%d %H:%M")}) + "\n")
    accs = [r["accuracy"] for r in rows]
    print(f"{args.label}: accuracy {statistics.mean(accs):.3f} ({', '.join(f'{a:.3f}' for a in accs)})")
    if not args.no_probe:
        print(f"probe: accuracy {statistics.mean(r['probe_accuracy'] for r in rows):.3f}")


if __name__ == "__main__":
    main()
