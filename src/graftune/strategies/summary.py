"""What a comparison's rows say: the mean +- std table per (strategy, augmentation, shots), the effect of
augmentation, and a recommendation in plain words from the numbers (``graftune compare`` prints them; the report
and ``--method auto`` read them)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from graftune.data.sources import count_of
from graftune.strategies.catalog import STRATEGIES

WITHIN = 0.01  # "within 1 point of accuracy" counts as a tie for the recommendation

SAME_COST = 1.5  # training times within this factor (+0.5 s) count as the same cost for the recommendation


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Mean and std per (strategy, augment, shots) over the seeds that ran."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "accuracy" in r:
            groups.setdefault((r["strategy"], r["augment"], r["shots"]), []).append(r)
    out = []
    for (name, aug, k), rs in groups.items():
        acc = [r["accuracy"] for r in rs]
        f1 = [r["macro_f1"] for r in rs]
        out.append({"strategy": name, "augment": aug, "shots": k, "runs": len(rs),
                    "test_examples": max((r.get("test_examples") or 0 for r in rs), default=0) or None,
                    "accuracy": statistics.mean(acc), "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    "macro_f1": statistics.mean(f1), "macro_f1_std": statistics.stdev(f1) if len(f1) > 1 else 0.0,
                    "train_seconds": statistics.mean(r["train_seconds"] for r in rs),
                    "trainable_params": int(statistics.mean(r["trainable_params"] for r in rs)),
                    "peak_rss_mb": max(r.get("peak_rss_mb", 0) for r in rs)})
    order = list(STRATEGIES)
    return sorted(out, key=lambda s: (s["shots"], order.index(s["strategy"]) if s["strategy"] in order else 99,
                                      s["augment"]))


def format_summary(summary: Sequence[dict], rows: Sequence[dict] = ()) -> str:
    """The summary as a plain-text table (mean +- std over seeds), then a line per kind of run that did not
    finish (skipped for the budget, not applicable, failed)."""
    lines = []
    if summary:
        width = max(len(label(s)) for s in summary)
        lines.append(f"{'shots':>5}  {'strategy':<{width}}  {'runs':>4}  {'accuracy':>15}  {'macro-F1':>15}  "
                     f"{'train s':>8}  {'trained params':>14}")
        for s in summary:
            def spread(key, s=s):  # one seed: no spread to show
                return f"{s[key]:>7.3f} +- {s[key + '_std']:.3f}" if s["runs"] > 1 else f"{s[key]:>7.3f}{'':>8}"

            lines.append(f"{s['shots']:>5}  {label(s):<{width}}  {s['runs']:>4}  {spread('accuracy'):>15}  "
                         f"{spread('macro_f1'):>15}  {s['train_seconds']:>8.1f}  {s['trainable_params']:>14,}")
        n_test = max((s.get("test_examples") or 0 for s in summary), default=0)
        if n_test:
            lines.append(f"accuracy and macro-F1 {point_note(n_test)}; the same test set for every run")
    else:
        lines.append("no run finished")
    missed: dict[str, list[str]] = {}
    for r in rows:
        why = r.get("skipped") or (f"failed: {r['error']}" if "error" in r else None)
        if why:
            key = "skipped for the budget" if why.startswith("would exceed") else why
            missed.setdefault(key, []).append(f"{label(r)} shots={r['shots']} seed={r['seed']}")
    for why, runs in missed.items():
        shown = ", ".join(runs[:6]) + (f" and {len(runs) - 6} more" if len(runs) > 6 else "")
        lines.append(f"{len(runs)} run(s) {why}: {shown}")
    return "\n".join(lines)


def label(s: dict) -> str:
    return s["strategy"] + (" + aug" if s["augment"] else "")


def recommend(summary: Sequence[dict]) -> list[str]:
    """One plain-words recommendation per shot count, from the numbers: the cheapest configuration within
    ``WITHIN`` of the best mean accuracy, with the evidence and a caveat when the gap is within one std. Every
    accuracy gap comes with the test set's size (a point is a few examples, or one example is several points) and
    says when it rests on a single seed."""
    lines = []
    for k in sorted({s["shots"] for s in summary}):
        here = [s for s in summary if s["shots"] == k]
        best = max(here, key=lambda s: s["accuracy"])
        close = [s for s in here if best["accuracy"] - s["accuracy"] <= WITHIN + 1e-9]
        # training times within SAME_COST of the fastest are the same cost (timings carry noise): among those,
        # the fewest trained parameters, then the time
        fastest = min(s["train_seconds"] for s in close)
        cheap = [s for s in close if s["train_seconds"] <= SAME_COST * fastest + 0.5]
        pick = min(cheap, key=lambda s: (s["trainable_params"], s["train_seconds"]))
        n_test = max((s.get("test_examples") or 0 for s in here), default=0) or None

        def fmt(s):
            spread = f" +- {s['accuracy_std']:.3f}" if s["runs"] > 1 else ", 1 seed"
            return (f"{label(s)} ({s['accuracy']:.3f}{spread}, {s['train_seconds']:.0f} s, "
                    f"{s['trainable_params']:,} trained parameters)")

        if pick is best:
            runner = max((s for s in here if s is not best), key=lambda s: s["accuracy"], default=None)
            pair = (best, runner or best)
            text = f"With {count_of(k, 'example')} per class, {fmt(best)} is the most accurate"
            seeds = min(s["runs"] for s in pair)
            if runner is not None and best["accuracy"] == runner["accuracy"]:  # a tie is no lead
                gap = 0.0
                text = (f"With {count_of(k, 'example')} per class, {fmt(best)} and {fmt(runner)} are tied for the "
                        f"most accurate{point_note(n_test, ' (', ')')}{single_seed(pair)}")
            elif runner is not None:
                gap = best["accuracy"] - runner["accuracy"]
                text += f", {_points(gap, n_test)} ahead of {fmt(runner)}{single_seed(pair)}"
                if gap <= max(best["accuracy_std"], runner["accuracy_std"]) and seeds > 1:
                    text += (f". The gap is within one standard deviation over {seeds} seeds: "
                             "not a reliable difference")
            text += "."
        else:
            pair = (best, pick)
            seeds = min(s["runs"] for s in pair)
            gap = best["accuracy"] - pick["accuracy"]
            # the qualifiers follow what they qualify: the test set's size the point, the single seed the claim
            text = (f"With {count_of(k, 'example')} per class, {fmt(pick)} is within {100 * WITHIN:.0f} point"
                    f"{point_note(n_test, ' (', ')')} of the best, {fmt(best)}, {_saving(pick, best)}"
                    f"{single_seed(pair)}: ")
            text += ("more training is not needed here." if pick["strategy"] in ("linear-probe", "prototypes")
                     else f"prefer {label(pick)}.")
            if gap <= max(best["accuracy_std"], pick["accuracy_std"]) and gap > 0 and seeds > 1:
                text += (f" The gap of {_points(gap, n_test)} is within one standard deviation over {seeds} "
                         "seeds.")
        if seeds < 2:
            # said once for the pair, as single_seed() already named which of them ran on one seed ("One of these"
            # read wrong when both had)
            text += " A single seed has no spread to judge a gap by: treat small gaps as noise."
        lines.append(text)
    return lines


def point_note(n: int | None, before: str = "", after: str = "") -> str:
    """What a point of accuracy means on ``n`` test examples: "on 300 test examples: one point is 3 examples"
    ("one example is 1.7 points" below 100); empty when the size is unknown."""
    if not n:
        return ""
    if n == 100:
        return f"{before}on {n} test examples: one point is one example{after}"
    if n > 100:
        return f"{before}on {n} test examples: one point is {n / 100:.3g} examples{after}"
    return f"{before}on {n} test examples: one example is {100 / n:.1f} points{after}"


def _points(gap: float, n: int | None) -> str:
    """An accuracy gap in points and, with the test set's size, in examples: "13.0 points (39 of 300 test
    examples)"."""
    text = f"{100 * gap:.1f} points"
    return text + (f" ({round(gap * n)} of {n} test examples)" if n else "")


def single_seed(group: Sequence[dict]) -> str:
    """", on a single seed" when a claim about ``group`` rests on one seed (naming which when not all do)."""
    single = list(dict.fromkeys(label(s) for s in group if s["runs"] < 2))
    if not single:
        return ""
    if len(single) == len({label(s) for s in group}):
        return ", on a single seed"
    return f", on a single seed for {' and '.join(single)}"


def _saving(pick: dict, best: dict) -> str:
    """What the cheaper pick saves over the best, in words: training time when it is clearly less, else trained
    parameters (the recommendation orders by time, then parameters)."""
    ratio = best["train_seconds"] / max(pick["train_seconds"], 0.01)
    if ratio >= SAME_COST:
        return f"at {ratio:.0f}x less training time" if ratio >= 10 else f"at {ratio:.1f}x less training time"
    if pick["trainable_params"] < best["trainable_params"]:
        return (f"at about the same training time with fewer trained parameters ({pick['trainable_params']:,} vs "
                f"{best['trainable_params']:,})")
    return "at about the same cost"


def augmentation_effect(summary: Sequence[dict]) -> list[dict]:
    """Per strategy and shots with both variants: accuracy with augmentation minus without."""
    by = {(s["strategy"], s["shots"], s["augment"]): s for s in summary}
    out = []
    for (name, k, aug), s in by.items():
        plain = by.get((name, k, False))
        if aug and plain is not None:
            out.append({"strategy": name, "shots": k, "delta": s["accuracy"] - plain["accuracy"],
                        "noise": max(s["accuracy_std"], plain["accuracy_std"]),
                        "runs": min(s["runs"], plain["runs"])})
    return sorted(out, key=lambda d: (d["shots"], list(STRATEGIES).index(d["strategy"])))
