"""The regression gate of ``registry promote``: is the candidate worse than the promoted version, beyond what the
held-out data's size can tell apart from sampling noise?

Both versions predict the SAME held-out examples, so the comparison is paired: per example, each is right or
wrong. Only the discordant examples carry information about which is better: ``b`` (the candidate right, the
promoted version wrong) and ``c`` (the candidate wrong, the promoted right). The rule:

    refuse when the one-sided exact McNemar test finds the candidate worse: P(X >= c) < alpha,
    X ~ Binomial(b + c, 1/2)                                               (alpha = 0.05 unless told)

Under the null hypothesis "the candidate is exactly as accurate as the promoted version" each discordant example
is a fair coin, so a candidate that is as good is refused with probability at most ``alpha`` (the exact test is
conservative: at most 5 %, less with few discordant examples) -- the gate's false-refusal rate. A candidate that is
better is refused less often still. The tolerance this amounts to is printed in accuracy points: about
``z(1 - alpha) * SE`` of the paired difference, ``SE = sqrt((b + c)/n - ((b - c)/n)^2) / sqrt(n)`` (1.645 SE at
alpha 0.05); on 500 examples with 40 discordant ones that is ~1.5 points. Small held-out sets therefore let larger
drops through: the message says so, and ``--data FILE`` with more examples tightens the gate.

Scores are per-example correctness: the predicted label (the exact label set for multi-label runs), or for
causal-LM runs the greedy answer's exact match with the reference. Macro-F1 does not decompose per example and is
not the gate's metric.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from graftune.config import build_config
from graftune.data.splits import run_splits
from graftune.errors import DataError, GraftuneError
from graftune.evaluate import generate, load_run, predict, read_scored

#: the gate's one-sided significance level: its false-refusal rate for a candidate exactly as good
ALPHA = 0.05


@dataclass
class GateResult:
    """What ``Registry.promote`` decided and why. ``accepted``: the candidate is now promoted (``forced``: despite
    a refusal). With no promoted version to compare with (the first promotion) ``gated`` is False and the scores
    are None. ``message`` is the human summary the CLI prints."""

    name: str
    version: int
    accepted: bool
    gated: bool
    message: str
    incumbent: int | None = None
    forced: bool = False
    reason: str | None = None
    refused: bool = False
    metric: str | None = None
    examples: int = 0
    data: str | None = None
    candidate_score: float | None = None
    incumbent_score: float | None = None
    difference: float | None = None
    se: float | None = None
    tolerance: float | None = None
    p_value: float | None = None
    alpha: float = ALPHA
    discordant: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def paired_test(candidate: Sequence[bool], incumbent: Sequence[bool], *, alpha: float = ALPHA) -> dict:
    """The paired comparison of per-example correctness (the module docstring's rule): accuracies, their
    difference, its standard error, the tolerance ``z(1 - alpha) * SE``, the discordant counts ``(b, c)``, the
    one-sided exact McNemar p-value that the candidate is worse, and ``refused``."""
    from scipy.stats import binomtest, norm

    if len(candidate) != len(incumbent):
        raise ValueError("paired_test needs the two versions' results on the same examples")
    n = len(candidate)
    if n == 0:
        raise DataError("the held-out data has no examples to compare the versions on; pass --data FILE")
    b = sum(1 for x, y in zip(candidate, incumbent) if x and not y)
    c = sum(1 for x, y in zip(candidate, incumbent) if y and not x)
    diff = (b - c) / n
    se = math.sqrt(max((b + c) / n - diff * diff, 0.0) / n)
    p = binomtest(c, b + c, 0.5, alternative="greater").pvalue if b + c else 1.0
    return {"examples": n, "candidate": sum(map(bool, candidate)) / n, "incumbent": sum(map(bool, incumbent)) / n,
            "difference": diff, "se": se, "tolerance": float(norm.ppf(1 - alpha)) * se, "discordant": (b, c),
            "p_value": float(p), "refused": bool(p < alpha)}


def gate_numbers(stats: dict, ref: str, incumbent: str, metric: str, origin: str, alpha: float) -> str:
    """The numbers of a gate's message: both scores, the difference, the tolerance it amounts to and what it rests
    on, the discordant counts and the exact test's p-value (``stats``: :func:`paired_test`'s answer)."""
    b, c = stats["discordant"]
    n = stats["examples"]
    if stats["se"] > 0:
        tolerance = f"tolerance {stats['tolerance'] * 100:.1f} (paired SE {stats['se'] * 100:.1f}; "
    else:
        # every example has the same paired difference (all agree, or all n disagree the same way): the estimated
        # SE of the difference is 0, so the normal approximation gives a tolerance of 0 that means nothing; the
        # decision never used it (the exact test decides), so say what it rests on instead of printing "0.0"
        same = (f"the two agree on all {n} examples" if b + c == 0 else
                f"every example went the same way (only {ref if b else incumbent} right, on all {n})")
        tolerance = f"no tolerance: {same}, so the paired SE is 0 and the exact test alone decides ("
    return (f"{metric} {stats['candidate']:.3f} ({ref}) vs {stats['incumbent']:.3f} ({incumbent}, promoted) on {n} "
            f"examples of {origin}: difference {stats['difference'] * 100:+.1f} points, {tolerance}{b} examples only "
            f"{ref} got right, {c} only {incumbent}; one-sided McNemar p={stats['p_value']:.3g}, alpha {alpha:g})")


# --- held-out data ------------------------------------------------------------------------------------------------
@dataclass
class HeldOut:
    """Examples both versions are scored on, and where they came from (for the message and the audit)."""

    inputs: list[Any]
    labels: list[Any]
    kind: str
    origin: str


def recorded_test_split(run_dir: Path, kind: str, ref: str) -> HeldOut:
    """The test split of the run in ``run_dir``, rebuilt from its run.yaml as ``evaluate_run`` does (same data,
    seeds and split settings), checked against the fingerprint its data card recorded at training time."""
    cfg = build_config(run_dir / "run.yaml")
    try:  # run_splits checks the rebuilt split against the data card's fingerprint (a changed file is refused)
        split = run_splits(cfg, kind, run_dir=run_dir, parts=("test",)).test
    except GraftuneError as e:
        first = str(e).split(";")[0]
        raise DataError(f"{ref}: its test data is not reachable here or not as it was ({first}); pass --data FILE "
                        "with held-out examples") from None
    return HeldOut(list(split.inputs), list(split.labels), kind, f"{ref}'s test split ({split.origin})")


def data_file(path: str, cfg, kind: str, columns: dict[str, str] | None = None, *,
              multi_label: bool = False) -> HeldOut:
    """Every row of ``--data FILE``, read as ``graftune eval --data`` reads it (duplicates kept, labels as a
    ``multi_label`` run reads them), with the candidate's column settings or the ones ``columns`` names
    (``load_data``'s ``text_column`` ... keywords). One class is enough: it is scored, not trained on."""
    ds = read_scored(path, kind=kind, multi_label=multi_label, **(cfg.columns() | (columns or {})))
    return HeldOut(list(ds.inputs), list(ds.labels), kind, f"{path} (--data)")


# --- scoring ------------------------------------------------------------------------------------------------------
def correctness(run_dir: Path, held: HeldOut) -> list[bool]:
    """Per example of ``held``: is the run in ``run_dir`` right? The model is freed before returning, so the two
    versions are never in memory together."""
    run = load_run(run_dir)
    try:
        if held.kind == "causal-lm":
            answers = generate(run, [p for p, _ in held.inputs])
            return [a.strip() == r.strip() for a, (_, r) in zip(answers, held.inputs)]
        right = []
        for row, label in zip(predict(run, held.inputs), held.labels):
            right.append(set(row["labels"]) == set(label) if run.multi_label else row["label"] == label)
        return right
    finally:
        del run
        gc.collect()


def unseen_labels(held: HeldOut, label_names: Sequence[str], multi_label: bool) -> list[str]:
    """Labels of the held-out data that a version was not trained on (it can only get those examples wrong)."""
    return sorted({n for lab in held.labels for n in (lab if multi_label else (lab,))} - set(label_names))


def metric_name(kind: str) -> str:
    return "exact_match" if kind == "causal-lm" else "accuracy"
