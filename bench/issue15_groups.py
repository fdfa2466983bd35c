"""Issue 15, per-group gaps: write a shipped data set as a CSV with a real group column, for
``graftune eval --group-column`` and ``graftune compare --group-column`` (bench/RESULTS.md, "Session 6: trust").

- ``bbc-news``: group ``length``, ``short`` or ``long``: the article's word count below or from the median.
- ``trec``: group ``first_word``, the question's first word lower-cased (what, how, who, where, when, why, which,
  name) and ``other`` for the rest.

    python bench/issue15_groups.py bbc-news /tmp/bbc_groups.csv
    python bench/issue15_groups.py trec /tmp/trec_groups.csv
"""

from __future__ import annotations

import csv
import statistics
import sys
from collections import Counter

from graftune.data.sources import load_data

QUESTION_WORDS = ("what", "how", "who", "where", "when", "why", "which", "name")


def groups_of(alias: str, texts: list[str]) -> tuple[str, list[str]]:
    if alias == "bbc-news":
        median = statistics.median(len(t.split()) for t in texts)
        return "length", ["short" if len(t.split()) < median else "long" for t in texts]
    if alias == "trec":
        first = [t.split()[0].lower().strip("?,'\"") if t.split() else "" for t in texts]
        return "first_word", [w if w in QUESTION_WORDS else "other" for w in first]
    raise SystemExit(f"no group rule for {alias}: use bbc-news or trec")


def main(alias: str, out: str) -> None:
    ds = load_data(alias)
    column, groups = groups_of(alias, ds.inputs)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", column])
        writer.writerows(zip(ds.inputs, ds.labels, groups))
    print(f"{out}: {len(ds)} examples, {column}: {dict(Counter(groups).most_common())}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
