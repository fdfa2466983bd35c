"""Drift watch: do the inputs a served adapter sees still look like the data it was trained on?

The server keeps, per served name and version, a running :class:`Summary` of what it saw: the pooled embedding
its head reads (per-dimension sums and sums of squares), the text length in characters, the share of unknown
tokens, and the predicted classes. It writes them, atomically, to ``DRIFT_DIR/NAME/VERSION.json`` every few
seconds. ``graftune drift NAME`` computes the same summary on the version's training split (rebuilt from its
run.yaml and data, embedded by the same adapted model; cached beside it as ``VERSION.reference.json``) and
compares the two with :func:`compare`:

- embedding: a Welch t-test per dimension on the mean (two-sided);
- text length and unknown-token rate: a Welch t-test on the per-input mean;
- predicted classes: a chi-square test of the class counts (2 x K table), and per class a two-proportion z-test
  that names the classes whose share moved.

False-alarm rate: the overall level ``alpha`` (1% by default) is split by Bonferroni over the four checks, and
inside them over the D dimensions and the K classes. When served inputs are independent draws from the training
distribution, the chance that any check fires is then at most ``alpha`` (Bonferroni holds under any dependence
between dimensions; the t and normal approximations need a few dozen inputs on each side, hence ``MIN_ROWS``).
``bench/issue13_serving_load.py --drift`` measures the rate over seeds.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from graftune.data.sources import load_data
from graftune.data.splits import make_splits
from graftune.errors import DataError, GraftuneError
from graftune.io.atomic import write_file_atomically
from graftune.run.scoring import features_of
from graftune.runs import load_run
from graftune.tasks.classification import probabilities

log = logging.getLogger("graftune.serve")

FORMAT = "graftune-drift-summary"
#: fewer served inputs than this: too few to judge (the approximations behind the tests need a few dozen)
MIN_ROWS = 30
SCALARS = ("chars", "unk_rate")
_CHECKS = 4  # embedding, chars, unk_rate, classes: the Bonferroni split of alpha


def safe_name(name: str) -> str:
    """A served name as a folder name (registry names are already plain; anything else is replaced)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:100] or "_"


# --- the running summary -------------------------------------------------------------------------------------
@dataclass
class Summary:
    """Sums that make means and variances: mergeable, cheap to update, a few KB of JSON."""

    dim: int = 0
    n: int = 0
    emb_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    emb_sq: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scalars: dict[str, list[float]] = field(default_factory=lambda: {k: [0.0, 0.0] for k in SCALARS})
    labels: dict[str, int] = field(default_factory=dict)
    first: float | None = None
    last: float | None = None

    def add(self, features: torch.Tensor | np.ndarray, texts: list[str], input_ids: list[list[int]],
            predicted: list[str], unk_id: int | None) -> None:
        x = features.detach().double().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features,
                                                                                                             float)
        if self.dim == 0:
            self.dim = x.shape[1]
            self.emb_sum, self.emb_sq = np.zeros(self.dim), np.zeros(self.dim)
        if x.shape[1] != self.dim:
            raise DataError(f"embedding of size {x.shape[1]} does not fit a summary of size {self.dim}")
        self.n += x.shape[0]
        self.emb_sum += x.sum(0)
        self.emb_sq += (x * x).sum(0)
        for key, values in (("chars", [len(t) for t in texts]),
                            ("unk_rate", [(sum(1 for i in ids if i == unk_id) / max(len(ids), 1))
                                          if unk_id is not None else 0.0 for ids in input_ids])):
            v = np.asarray(values, dtype=float)
            self.scalars[key][0] += float(v.sum())
            self.scalars[key][1] += float((v * v).sum())
        for label in predicted:
            self.labels[label] = self.labels.get(label, 0) + 1
        now = time.time()
        self.first = self.first or now
        self.last = now

    def mean_var(self, key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased variance: of the embedding (``key=None``) or of one per-input scalar."""
        s, sq = (self.emb_sum, self.emb_sq) if key is None else (np.asarray(self.scalars[key][0]),
                                                                 np.asarray(self.scalars[key][1]))
        n = max(self.n, 1)
        mean = s / n
        var = np.maximum(sq - n * mean * mean, 0.0) / max(self.n - 1, 1)
        return mean, var

    def to_dict(self) -> dict:
        return {"format": FORMAT, "dim": self.dim, "n": self.n, "emb_sum": self.emb_sum.tolist(),
                "emb_sq": self.emb_sq.tolist(), "scalars": self.scalars, "labels": self.labels,
                "first": self.first, "last": self.last}

    @classmethod
    def from_dict(cls, d: dict) -> Summary:
        if d.get("format") != FORMAT:
            raise DataError(f"not a drift summary (format={d.get('format')!r})")
        return cls(int(d["dim"]), int(d["n"]), np.asarray(d["emb_sum"], float), np.asarray(d["emb_sq"], float),
                   {k: [float(v) for v in d["scalars"][k]] for k in SCALARS},
                   {str(k): int(v) for k, v in d["labels"].items()}, d.get("first"), d.get("last"))


def write_json_atomically(path: Path, data: dict) -> None:
    """A reader never sees half a file (``io.atomic``: temporary file beside ``path``, fsync, rename)."""
    write_file_atomically(path, json.dumps(data))


def read_summary(path: Path) -> Summary:
    try:
        return Summary.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a readable drift summary ({e}); delete it to start a new one") from None


# --- the server side -----------------------------------------------------------------------------------------
class DriftTracker:
    """The store's observer: one running summary per (name, version), persisted to ``folder`` by ``flush``.
    A server restart continues the summary it finds on disk."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._summaries: dict[tuple[str, str], Summary] = {}
        self._dirty: set[tuple[str, str]] = set()

    def path(self, name: str, version: str) -> Path:
        return self.folder / safe_name(name) / f"{safe_name(str(version))}.json"

    def observe(self, entry: Any, features: torch.Tensor, texts: list[str], input_ids: list[list[int]],
                predictions: list[dict]) -> None:
        key = (entry.name, str(entry.version))
        unk = getattr(getattr(entry.task, "tokenizer", None), "unk_token_id", None)
        predicted = [p.get("label", "") if "label" in p else "+".join(p.get("labels", [])) for p in predictions]
        with self._lock:
            summary = self._summaries.get(key)
            if summary is None:
                path = self.path(*key)
                try:
                    summary = read_summary(path) if path.is_file() else Summary()
                except GraftuneError as e:
                    log.warning("%s; starting a new drift summary", e)
                    summary = Summary()
                self._summaries[key] = summary
            summary.add(features, texts, input_ids, predicted, unk)
            self._dirty.add(key)

    def flush(self) -> int:
        """Write the summaries that changed since the last flush; returns how many were written."""
        with self._lock:
            todo = {k: self._summaries[k].to_dict() for k in self._dirty}
            self._dirty.clear()
        for (name, version), data in todo.items():
            try:
                write_json_atomically(self.path(name, version), data)
            except OSError as e:
                log.warning("could not write the drift summary of %s@%s: %s", name, version, e)
        return len(todo)


# --- the reference: the training split, embedded as served --------------------------------------------------
def reference_summary(run_dir: str | Path, *, split: str = "train") -> Summary:
    """The summary of a run's training split (``split``: train, val or test), rebuilt from its run.yaml and data,
    with the embedding its served head reads and the head's predicted classes."""
    run = load_run(run_dir, expect="classifier")
    if run.fewshot is not None or run.head is None or run.kind != "classification":
        raise DataError(f"{run_dir}: drift needs a text classification run with an adapter or head (this is a "
                        f"{run.cfg.method} {run.kind} run)")
    cfg = run.cfg
    columns = {"text_column": cfg.text_column, "label_column": cfg.label_column}
    ds = load_data(cfg.data, task=run.kind, **columns)
    test = load_data(cfg.test, task=run.kind, **columns) if cfg.test else None
    part = getattr(make_splits(ds, test=test, **cfg.split_args()), split)
    inputs = list(part.inputs)
    if not inputs:
        raise DataError(f"{run_dir}: its {split} split is empty; nothing to compare served inputs with")
    features = features_of(run.task, run.model, inputs, policy=run.policy)
    with torch.inference_mode():
        logits = run.head(features.to(next(run.head.parameters()).dtype)).float()
    probs = probabilities(logits, run.multi_label)
    if run.multi_label:
        predicted = ["+".join(n for n, v in zip(run.label_names, row) if v >= 0.5) for row in probs.tolist()]
    else:
        predicted = [run.label_names[int(i)] for i in probs.argmax(-1)]
    ids = [e["input_ids"] for e in run.task.encode(inputs)]
    summary = Summary()
    summary.add(features, inputs, ids, predicted, getattr(run.task.tokenizer, "unk_token_id", None))
    return summary


# --- the test ------------------------------------------------------------------------------------------------
def _welch(ref: Summary, new: Summary, key: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Welch's t statistic and two-sided p-value per component (dimensions, or one scalar)."""
    m1, v1 = ref.mean_var(key)
    m2, v2 = new.mean_var(key)
    a, b = v1 / ref.n, v2 / new.n
    se2 = a + b
    ok = se2 > 1e-300
    t = np.where(ok, (m2 - m1) / np.sqrt(np.where(ok, se2, 1.0)), 0.0)
    denom = a * a / max(ref.n - 1, 1) + b * b / max(new.n - 1, 1)
    df = np.where(denom > 0, se2 * se2 / np.where(denom > 0, denom, 1.0), 1.0)
    p = np.where(ok, 2 * stats.t.sf(np.abs(t), np.maximum(df, 1.0)), 1.0)
    # no spread on either side (every text equally long, no unknown tokens anywhere): any difference is certain
    differ = np.abs(m2 - m1) > 1e-12
    t = np.where(ok, t, np.where(differ, np.inf, 0.0))
    p = np.where(ok, p, np.where(differ, 0.0, 1.0))
    return np.atleast_1d(t), np.atleast_1d(p)


def compare(ref: Summary, new: Summary, *, alpha: float = 0.01) -> dict:
    """Is ``new`` (served) drawn from the distribution of ``ref`` (training)? See the module docstring for the
    tests and their false-alarm rate. Returns a JSON-able report; ``drift`` is True, False, or None (too few)."""
    if not 0 < alpha < 1:
        raise DataError(f"alpha: got {alpha}; use a false-alarm rate between 0 and 1, e.g. 0.01")
    report: dict[str, Any] = {"alpha": alpha, "served": new.n, "reference": ref.n, "checks": {}, "moved": []}
    if new.n < MIN_ROWS or ref.n < 2:
        report["drift"] = None
        return report
    if ref.dim != new.dim:
        raise DataError(f"the served embedding has {new.dim} dimensions, the reference {ref.dim}: not the same "
                        "model; compare a version with its own served summary")
    level = alpha / _CHECKS
    t, p = _welch(ref, new, None)
    moved_dims = int((p < level / ref.dim).sum())
    report["checks"]["embedding"] = {"flagged": moved_dims > 0, "dims_moved": moved_dims, "dims": ref.dim,
                                     "max_abs_t": float(np.abs(t).max()), "min_p": float(p.min()),
                                     "level": level / ref.dim}
    for key in SCALARS:
        t, p = _welch(ref, new, key)
        m_ref, m_new = ref.mean_var(key)[0], new.mean_var(key)[0]
        report["checks"][key] = {"flagged": bool(p[0] < level), "reference_mean": float(m_ref),
                                 "served_mean": float(m_new), "t": float(t[0]), "p": float(p[0]), "level": level}
    classes = sorted(set(ref.labels) | set(new.labels))
    r = np.array([ref.labels.get(c, 0) for c in classes], float)
    s = np.array([new.labels.get(c, 0) for c in classes], float)
    keep = (r + s) > 0
    if keep.sum() >= 2:
        chi2, p_chi, dof, _ = stats.chi2_contingency(np.stack([r[keep], s[keep]]), correction=False)
        chi = {"flagged": bool(p_chi < level), "chi2": float(chi2), "dof": int(dof), "p": float(p_chi),
               "level": level}
    else:
        chi = {"flagged": False, "chi2": 0.0, "dof": 0, "p": 1.0, "level": level}
    n1, n2 = r.sum(), s.sum()
    shares = []
    for c, c1, c2 in zip(classes, r, s):
        p1, p2 = c1 / n1, c2 / n2
        pooled = (c1 + c2) / (n1 + n2)
        se = math.sqrt(max(pooled * (1 - pooled) * (1 / n1 + 1 / n2), 1e-300))
        pz = float(2 * stats.norm.sf(abs(p2 - p1) / se)) if pooled not in (0.0, 1.0) else 1.0
        row = {"class": c, "reference_share": float(p1), "served_share": float(p2), "p": pz}
        shares.append(row)
        if pz < level / len(classes):
            report["moved"].append(row)
    chi["shares"] = shares
    report["checks"]["classes"] = chi
    report["drift"] = any(c["flagged"] for c in report["checks"].values())
    return report


def render(name: str, version: str, report: dict) -> str:
    """The report in plain words."""
    a = report["alpha"]
    head = f"{name} (version {version}):"
    if report["drift"] is None:
        return (f"{head} not enough served inputs to judge yet ({report['served']} seen, {MIN_ROWS} needed; "
                f"reference: {report['reference']} training inputs)")
    verdict = ("recent inputs do NOT look like the training data" if report["drift"] else
               "recent inputs still look like the training data")
    lines = [(f"{head} {verdict} (tests at a {a:.2%} false-alarm rate; {report['served']} served inputs against "
              f"{report['reference']} training inputs)")]
    c = report["checks"]
    e = c["embedding"]
    lines.append(f"  embedding: {e['dims_moved']} of {e['dims']} dimensions moved (largest |t| {e['max_abs_t']:.1f})"
                 + ("" if e["flagged"] else ": no change beyond noise"))
    lines.append(f"  text length: {c['chars']['reference_mean']:.0f} characters on average in training, "
                 f"{c['chars']['served_mean']:.0f} served" + (" (moved)" if c["chars"]["flagged"] else ""))
    lines.append(f"  unknown tokens: {c['unk_rate']['reference_mean']:.2%} in training, "
                 f"{c['unk_rate']['served_mean']:.2%} served" + (" (moved)" if c["unk_rate"]["flagged"] else ""))
    if report["moved"]:
        moved = ", ".join(f"{m['class']} {m['reference_share']:.0%} -> {m['served_share']:.0%}"
                          for m in report["moved"])
        lines.append(f"  predicted classes: shares moved: {moved}")
    elif c["classes"]["flagged"]:
        lines.append("  predicted classes: the mix changed, no single class's share moved beyond noise")
    else:
        lines.append("  predicted classes: shares as in training")
    return "\n".join(lines)


def drift_report(name: str, version: str, run_dir: str | Path, drift_dir: str | Path, *, alpha: float = 0.01,
                 split: str = "train") -> dict:
    """Compare what the server saw for ``name@version`` (``drift_dir``) with the version's training split; the
    reference summary is computed once and cached beside the served one. Adds ``text`` (plain words)."""
    tracker = DriftTracker(drift_dir)
    served_path = tracker.path(name, version)
    if not served_path.is_file():
        raise DataError(f"no served inputs recorded for {name}@{version} in {drift_dir}; serve it with `graftune "
                        "serve` (summaries are written every few seconds) or pass the server's --drift-dir")
    served = read_summary(served_path)
    ref_path = served_path.with_name(f"{safe_name(str(version))}.reference-{split}.json")
    if ref_path.is_file():
        ref = read_summary(ref_path)
    else:
        ref = reference_summary(run_dir, split=split)
        write_json_atomically(ref_path, ref.to_dict())
    report = compare(ref, served, alpha=alpha)
    report.update({"name": name, "version": str(version), "text": render(name, str(version), report)})
    return report
