"""Issue 13 (Session 7): does `graftune drift` see a recent shift that an all-time summary dilutes? Run by hand:

    OMP_NUM_THREADS=1 .venv/bin/python bench/issue13_drift_window.py --run /tmp/runs-bbc16 --work /tmp/b7/dwin

The run is a BBC News text classifier (MiniLM + LoRA, 16 shots a class). Three pools of served inputs, each embedded
once the way the server embeds them (``run.scoring.features_of``, the head's predicted class, the token ids: the
rows ``DriftTracker.observe`` receives): the run's test articles (held out from training: in distribution),
``--other`` (TREC questions by default: another data set) and the test articles about sport alone (a class-mix
change). Per seed and scenario, a week of traffic (``--rate`` inputs an hour, drawn from the in-distribution pool)
ends with ``--hours`` hours drawn from a shifted pool (or, for the false-alarm rate, from the in-distribution pool
again). The stream goes through ``DriftTracker`` (hour-wide buckets, a simulated clock, flushed every simulated
hour, a week kept) and ``read_window`` reads it back for ``--since 24h``, ``--since <hours>h`` and ``--all``, each
compared with the training split's summary (``reference_summary``, alpha 0.01). Prints how often each window
flags drift; writes ``WORK/results.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from graftune.data.sources import load_data
from graftune.data.splits import run_splits
from graftune.run.scoring import features_of
from graftune.runs import load_run
from graftune.serve.drift import DriftTracker, Window, compare, read_window, reference_summary
from graftune.tasks.classification import probabilities


# --- the pools ------------------------------------------------------------------------------------------------------
def embed(run, texts: list[str]) -> dict:
    """What the server's tracker gets for each text: the pooled features, the text, its ids, the predicted class."""
    features = features_of(run.task, run.model, texts, policy=run.policy)
    with torch.inference_mode():
        logits = run.head(features.to(next(run.head.parameters()).dtype)).float()
    predicted = [run.label_names[int(i)] for i in probabilities(logits, False).argmax(-1)]
    ids = [e["input_ids"] for e in run.task.encode(texts)]
    return {"x": features.double().numpy(), "texts": texts, "ids": ids, "label": predicted}


def feed(tracker: DriftTracker, clock: SimpleNamespace, entry, pool: dict, hours: int, rate: int,
         rng: np.random.Generator) -> None:
    """``hours`` of traffic from ``pool``: ``rate`` inputs an hour in 4 requests, flushed every hour."""
    for _ in range(hours):
        rows = rng.integers(0, len(pool["texts"]), rate)
        for part in np.array_split(rows, 4):
            tracker.observe(entry, torch.from_numpy(pool["x"][part]), [pool["texts"][i] for i in part],
                            [pool["ids"][i] for i in part], [{"label": pool["label"][i]} for i in part])
            clock.now += 3600 / 4
        tracker.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--other", default="trec")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--rate", type=int, default=20, help="inputs an hour")
    ap.add_argument("--hours", type=int, default=6, help="hours of shifted traffic at the end")
    ap.add_argument("--pool", type=int, default=200, help="texts per pool at most")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run = load_run(args.run, expect="classifier")
    test = run_splits(run.cfg, run.kind).test
    rng = np.random.default_rng(0)
    order = rng.permutation(len(test.inputs))[: args.pool]
    same = [str(test.inputs[i]) for i in order]
    sport = [str(t) for t, lab in zip(test.inputs, test.labels) if lab == "sport"][: args.pool]
    other_ds = load_data(args.other, task="classification")
    other = [str(other_ds.inputs[i]) for i in rng.permutation(len(other_ds.inputs))[: args.pool]]
    pools = {name: embed(run, texts) for name, texts in (("in-distribution", same), ("sport only", sport),
                                                           (args.other, other))}
    reference = reference_summary(args.run)
    print(f"pools embedded and reference built in {time.perf_counter() - t0:.0f} s "
          f"(reference: {reference.n} training articles)", flush=True)

    # --- the streams ------------------------------------------------------------------------------------------------
    windows = {"--since 24h": Window(86400), f"--since {args.hours}h": Window(args.hours * 3600.0),
               "--all": Window(None)}
    results: dict[str, dict[str, list]] = {}
    for scenario in ("in-distribution", args.other, "sport only"):
        results[scenario] = {w: [] for w in windows}
        for seed in range(args.seeds):
            folder = work / "drift"
            shutil.rmtree(folder, ignore_errors=True)
            clock = SimpleNamespace(now=1_800_000_000.0)
            tracker = DriftTracker(folder, clock=lambda c=clock: c.now)
            entry = SimpleNamespace(name="news", version=1, task=run.task)
            stream = np.random.default_rng(1000 + seed)
            feed(tracker, clock, entry, pools["in-distribution"], args.days * 24 - args.hours, args.rate, stream)
            feed(tracker, clock, entry, pools[scenario], args.hours, args.rate, stream)
            for label, window in windows.items():
                served, info = read_window(folder, "news", "1", window, now=clock.now)
                report = compare(reference, served, alpha=0.01)
                results[scenario][label].append({"drift": report["drift"], "served": served.n,
                                                 "buckets": info["buckets"],
                                                 "checks": sorted(k for k, c in report["checks"].items()
                                                                  if c["flagged"])})
        print(scenario, {w: sum(bool(r["drift"]) for r in rows) for w, rows in results[scenario].items()}, flush=True)
    (work / "results.json").write_text(json.dumps({"args": vars(args), "reference": reference.n,
                                                   "results": results}, indent=2))
    print(f"\n{args.seeds} seeds; {args.days} days at {args.rate} inputs an hour, the last {args.hours} h from the "
          f"scenario's pool; flagged (alpha 0.01), and the inputs each window took\n")
    print("| last hours from | " + " | ".join(windows) + " |")
    print("|---|" + "---|" * len(windows))
    for scenario, per_window in results.items():
        cells = []
        for rows in per_window.values():
            flagged = sum(bool(r["drift"]) for r in rows)
            checks = sorted({c for r in rows for c in r["checks"]})
            cells.append(f"{flagged}/{len(rows)} ({rows[0]['served']} inputs{'; ' + ', '.join(checks) if checks else ''})")
        print(f"| {scenario} | " + " | ".join(cells) + " |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
