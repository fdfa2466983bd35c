"""The honest strategy comparison on BBC News with MiniLM (issue 4): every strategy on identical splits, with and
without EDA augmentation, under a wall-time budget (runs estimated not to fit are skipped and listed).

Run: ``.venv/bin/python bench/issue4_compare.py [--shots 8 16] [--seeds 0 1 2] [--budget 1800] [--epochs 5]
[--max-length 128]``. Writes ``bench/out/issue4_compare/results.json`` and ``report.html`` and prints a summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from graftune.strategies.catalog import STRATEGIES
from graftune.strategies.compare import run_compare
from graftune.strategies.summary import augmentation_effect, recommend, summarize

OUT = Path(__file__).parent / "out" / "issue4_compare"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--data", default="bbc-news")
    ap.add_argument("--shots", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--budget", type=float, default=1800.0)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    rows = run_compare(args.model, args.data, shots=args.shots, seeds=args.seeds, strategies=args.strategies,
                       budget_s=args.budget, out_dir=args.out, test_per_class=args.test_per_class,
                       settings={"epochs": args.epochs, "max_length": args.max_length}, progress=True)
    summary = summarize(rows)
    for s in summary:
        print(json.dumps(s))
    for line in recommend(summary):
        print(line)
    for e in augmentation_effect(summary):
        print(f"augmentation {e['strategy']} shots={e['shots']}: {100 * e['delta']:+.1f} points "
              f"(std {100 * e['noise']:.1f})")
    print(f"skipped/failed: {sum('accuracy' not in r for r in rows)} of {len(rows)}; see {args.out}/report.html")


if __name__ == "__main__":
    main()
