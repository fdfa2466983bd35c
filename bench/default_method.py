"""What does a user get from ``graftune train`` without ``--method``? The default (``runs.default_method``: since
session 13 ``--method auto`` for few-shot single-label text; before, the contrastive recipe, and before session 9
LoRA with every training default) against the frozen probe (``--method probe``) and the contrastive recipe
(``--method contrastive``), each a whole ``graftune.runs.train`` run with the same config but the method: same
splits (the test set of the other issue-14 benches, the shots and the validation carve of the defaults), the same
test examples. Per (data set, seed) one JSON line: test accuracy, macro-F1, training seconds (auto's: its
comparison included) and the method each trained.

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python bench/default_method.py --data trec,sms-spam \
        --shots 8 --seeds 0,1,2 --out bench/out/default-method.jsonl
    PYTHONPATH=src .venv/bin/python bench/default_method.py --summary bench/out/default-method.jsonl
    PYTHONPATH=src .venv/bin/python bench/default_method.py --small-csv /tmp/u1/q.csv   # a user's small file
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from graftune.config import RunConfig
from graftune.runs import default_method, train
from graftune.strategies.catalog import load_compare_data, test_per_class_for

METHODS = ("default", "probe", "contrastive")


def measure(data: str, seed: int, shots: int, extra: tuple[str, ...] = ()) -> dict:
    """``extra``: more methods trained on the same splits (``auto`` above the threshold, where the default is LoRA)."""
    row = {"data": Path(data).stem if "/" in data else data, "seed": seed, "shots": shots}
    # the test set of the other issue-14 benches: up to 100 a class, fewer where a class is small
    test_per_class = test_per_class_for(load_compare_data(data, None, "text", "label")[0], [8, 16, shots])
    with tempfile.TemporaryDirectory() as tmp:
        for name in METHODS + extra:
            fields = {} if name == "default" else {"method": name}
            cfg = RunConfig(model="minilm", data=data, shots=shots, seed=seed, test_per_class=test_per_class,
                            out=str(Path(tmp) / name), **fields)
            rule = default_method(cfg)[0].method if name == "default" else cfg.method
            m = train(cfg.replace(method=rule), progress=False)
            compared = m["auto"]["seconds"] if "auto" in m else 0.0  # auto's comparison, before the pick trains
            card = json.loads((Path(tmp) / name / "data_card.json").read_text())
            row[name] = {"method": m["method"], "rule": rule, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                         "train_seconds": round(m["train_seconds"] + compared, 1),
                         "train": card["splits"]["train"]["examples"], "val": card["splits"]["val"]["examples"],
                         "test_fingerprint": card["splits"]["test"]["fingerprint"]}
            print(f"  {row['data']} seed {seed} {name}: {m['method']}, acc {m['accuracy']:.3f} "
                  f"({row[name]['train_seconds']:.0f} s)", flush=True)
    assert len({row[n]["test_fingerprint"] for n in METHODS + extra}) == 1, "methods scored on different test sets"
    return row


def summary(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # rows before session 13 have no "rule": this bench then trained RunConfig's LoRA as the default. One table per
    # rule, so LoRA's rows and auto's are never averaged together
    for rule in sorted({r["default"].get("rule", "lora") for r in rows}):
        _table(rule, [r for r in rows if r["default"].get("rule", "lora") == rule])


def _table(rule: str, rows: list[dict]) -> None:
    sets = sorted({r["data"] for r in rows})
    extra = tuple(n for n in ("auto",) if all(n in r for r in rows))  # measured with --extra on every row
    print(f"\n| data set | seeds | default ({rule}) | probe | contrastive | {' | '.join(extra + ('',))}"
          "contrastive - default (pts) | default - best other (pts) |")
    print("|---" * (7 + len(extra)) + "|")
    gaps, wins = [], []
    for s in sets:
        rs = [r for r in rows if r["data"] == s]
        acc = {n: statistics.mean(r[n]["accuracy"] for r in rs) for n in METHODS + extra}
        secs = {n: statistics.mean(r[n]["train_seconds"] for r in rs) for n in METHODS + extra}
        gap = 100 * (acc["default"] - max(acc["probe"], acc["contrastive"]))
        win = 100 * (acc["contrastive"] - acc["default"])
        gaps.append(gap)
        wins.append(win)
        cells = " | ".join(f"{100 * acc[n]:.1f} ({secs[n]:.0f} s)" for n in METHODS + extra)
        print(f"| {s} | {len(rs)} | {cells} | {win:+.1f} | {gap:+.1f} |")
    print(f"\ncontrastive - default: {statistics.mean(wins):+.1f} points on average, {min(wins):+.1f} to "
          f"{max(wins):+.1f}; default - best other: {statistics.mean(gaps):+.1f} on average, best {max(gaps):+.1f}, "
          f"worst {min(gaps):+.1f}")


def small_csv(path: Path, per_class: int = 12) -> None:
    """A user's small file: ``per_class`` TREC questions of each type (shuffled with seed 1), columns question and
    type (RESULTS' 12-a-class example)."""
    import csv
    import random

    ds, _ = load_compare_data("trec", None, "text", "label")
    rows = [(t, ds.label_names[y] if isinstance(y, int) else y) for t, y in zip(ds.inputs, ds.labels)]
    random.seed(1)
    random.shuffle(rows)
    by: dict[str, list[str]] = {}
    for text, label in rows:
        by.setdefault(label, []).append(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "type"])
        for label, texts in by.items():
            w.writerows([t, label] for t in texts[:per_class])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="trec,sms-spam,rotten-tomatoes,bbc-news")
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", type=Path)
    p.add_argument("--extra", default="", help="more methods on the same splits, comma-separated (auto)")
    p.add_argument("--summary", type=Path)
    p.add_argument("--small-csv", type=Path, help="write the 12-a-class TREC file of RESULTS' example and stop")
    a = p.parse_args()
    if a.small_csv:
        small_csv(a.small_csv)
        return
    if a.summary:
        summary(a.summary)
        return
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for data in a.data.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            row = measure(data, seed, a.shots, tuple(m for m in a.extra.split(",") if m))
            with a.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
