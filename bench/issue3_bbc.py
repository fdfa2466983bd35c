"""BBC News, 16 shots per class, MiniLM: graftune's demo recipe (LoRA r=8 on query/value + mean-pooled head) over
seeds, and the frozen-encoder + logistic-regression baseline on the same splits (100 test articles per class,
fixed by the seed, as in RESOURCES.md).

Run: ``.venv/bin/python bench/issue3_bbc.py [--seeds 0 1 2] [--epochs N --lr X ...] [--no-probe]``
Writes one JSON line per run to ``bench/out/issue3_bbc.jsonl`` and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from graftune.config import parse_sets
from graftune.demo import DEMO, demo_config, probe_baseline
from graftune.runs import train

OUT = Path(__file__).parent / "out" / "issue3_bbc.jsonl"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-probe", action="store_true", help="skip the logistic-regression baseline")
    ap.add_argument("--label", default="demo", help="a name for this variant in the output")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="override a RunConfig field of the demo recipe, e.g. --set epochs=15 (YAML value)")
    args = ap.parse_args()
    changes = parse_sets(args.sets)
    print(f"recipe: {json.dumps({**DEMO, **changes})}")
    OUT.parent.mkdir(exist_ok=True)
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = demo_config(Path(tmp) / "run", seed=seed, **changes)
            started = time.perf_counter()
            m = train(cfg, progress=False)
            row = {"label": args.label, "seed": seed, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                   "train_seconds": m["train_seconds"], "train_cpu_seconds": m.get("train_cpu_seconds"),
                   "wall_seconds": round(time.perf_counter() - started, 1),
                   "trainable_params": m["trainable_params"], "adapter_bytes": m["adapter_bytes"],
                   "peak_rss_mb": m["peak_rss_mb"], "precision": m["precision"], "changes": changes}
            if not args.no_probe:
                p = probe_baseline(cfg)
                row.update(probe_accuracy=p["accuracy"], probe_macro_f1=p["macro_f1"], probe_seconds=p["seconds"])
        rows.append(row)
        print(json.dumps(row), flush=True)
        with OUT.open("a") as f:
            f.write(json.dumps({**row, "date": time.strftime("%Y-%m-%d %H:%M")}) + "\n")
    accs = [r["accuracy"] for r in rows]
    spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"{args.label}: accuracy {statistics.mean(accs):.3f} +- {spread:.3f} over seeds {args.seeds} "
          f"({', '.join(f'{a:.3f}' for a in accs)}); train {statistics.mean(r['train_seconds'] for r in rows):.0f} s")
    if not args.no_probe:
        probes = [r["probe_accuracy"] for r in rows]
        print(f"probe: accuracy {statistics.mean(probes):.3f} ({', '.join(f'{a:.3f}' for a in probes)})")


if __name__ == "__main__":
    main()
