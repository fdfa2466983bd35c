"""Drift watch: do the inputs a served adapter sees still look like the data it was trained on?

The server keeps, per served name and version, :class:`Summary` objects of what it saw: the pooled embedding its
head reads (per-dimension mean and sum of squared deviations), the text length in characters, the share of unknown
tokens, and the predicted classes. It keeps them per **time bucket** (one per hour by default; ``bucket_s``) and
writes each bucket, atomically, to ``DRIFT_DIR/NAME/VERSION/<bucket start, UTC>.json`` every few seconds; buckets
that ended more than a week ago are deleted (``keep_s``), so the folder of a served version stays bounded.

``graftune drift NAME`` judges a **recent window**, not everything since the start: a month of normal traffic would
hide yesterday's change in an all-time summary. It merges the buckets of the last 24 hours by default (``--since``
DURATION, ``--last N`` for the newest buckets holding at least N inputs, ``--all`` for everything kept); merging
uses Chan et al.'s pairwise update, so the merged means and variances are exactly those of the inputs themselves.
A window is made of whole buckets: every bucket that overlaps it is taken.

The reference is the same summary of the version's training split (rebuilt from its run.yaml and data, embedded by
the same adapted model; cached beside the buckets as ``VERSION.reference-SPLIT.json``); :func:`compare` tests:

- embedding: a Welch t-test per dimension on the mean (two-sided);
- text length and unknown-token rate: a Welch t-test on the per-input mean;
- predicted classes: a chi-square test of the class counts (2 x K table), and per class a two-proportion z-test
  that names the classes whose share moved.

False-alarm rate: the overall level ``alpha`` (1% by default) is split by Bonferroni over the four checks, and
inside them over the D dimensions and the K classes. When served inputs are independent draws from the training
distribution, the chance that any check fires is then at most ``alpha`` (Bonferroni holds under any dependence
between dimensions; the t and normal approximations need a few dozen inputs on each side, hence ``MIN_ROWS``).
``bench/issue13_serving_load.py --drift`` measures the rate over seeds.

Files of older graftune versions: a summary written as sums and sums of squares (format version 1) is read and
converted exactly; an all-time summary ``DRIFT_DIR/NAME/VERSION.json`` (no buckets) is read by ``--all`` and
refused, in one line, by a window it overlaps (it cannot be cut).
"""

from __future__ import annotations

import calendar
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from graftune.data.sources import count_of
from graftune.data.splits import run_splits
from graftune.errors import ConfigError, DataError, GraftuneError
from graftune.io.atomic import write_file_atomically
from graftune.recipes.fewshot_run import predict_rows
from graftune.run.scoring import features_of
from graftune.runs import load_run
from graftune.tasks.classification import probabilities

log = logging.getLogger("graftune.serve")

FORMAT = "graftune-drift-summary"
#: 2: count, mean and M2 (Chan merging); 1 (read, converted exactly): sums and sums of squares
FORMAT_VERSION = 2
#: the server's time buckets: an hour wide, kept for a week; `graftune drift` judges the last day by default
BUCKET_S = 3600.0
KEEP_S = 7 * 86400.0
DEFAULT_SINCE_S = 86400.0
#: fewer served inputs than this: too few to judge (the approximations behind the tests need a few dozen)
MIN_ROWS = 30
SCALARS = ("chars", "unk_rate")
_CHECKS = 4  # embedding, chars, unk_rate, classes: the Bonferroni split of alpha


def safe_name(name: str) -> str:
    """A served name as a folder name (registry names are already plain; anything else is replaced)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:100] or "_"


# --- the running summary -------------------------------------------------------------------------------------
def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sum of squared deviations from it, per column (two passes: no cancellation)."""
    mean = x.mean(0)
    return mean, ((x - mean) ** 2).sum(0)


def _chan(n_a: int, mean_a, m2_a, n_b: int, mean_b, m2_b):
    """Chan, Golub & LeVeque's pairwise update: the mean and M2 of two groups together, from each group's."""
    n = n_a + n_b
    delta = mean_b - mean_a
    return mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


@dataclass
class Summary:
    """Count, mean and M2 (sum of squared deviations) per embedding dimension and per scalar, and the predicted
    class counts: mergeable exactly (:meth:`merge`), cheap to update, a few KB of JSON."""

    dim: int = 0
    n: int = 0
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    m2: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scalars: dict[str, list[float]] = field(default_factory=lambda: {k: [0.0, 0.0] for k in SCALARS})
    labels: dict[str, int] = field(default_factory=dict)
    first: float | None = None
    last: float | None = None

    def add(self, features: torch.Tensor | np.ndarray, texts: list[str], input_ids: list[list[int]],
            predicted: list[str], unk_id: int | None, *, now: float | None = None) -> None:
        """Add a batch of inputs (rows of ``features``), seen at ``now`` (default: the current time)."""
        x = features.detach().double().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features,
                                                                                                             float)
        if x.shape[0] == 0:
            return
        unk = [(sum(1 for i in ids if i == unk_id) / max(len(ids), 1)) if unk_id is not None else 0.0
               for ids in input_ids]
        now = time.time() if now is None else now
        mean, m2 = _moments(x)
        batch = Summary(x.shape[1], x.shape[0], mean, m2, labels={}, first=now, last=now)
        for key, values in (("chars", [len(t) for t in texts]), ("unk_rate", unk)):
            m, q = _moments(np.asarray(values, dtype=float))
            batch.scalars[key] = [float(m), float(q)]
        for label in predicted:
            batch.labels[label] = batch.labels.get(label, 0) + 1
        self.merge(batch)

    def merge(self, other: Summary) -> Summary:
        """Add ``other``'s inputs to this summary (in place; returns it)."""
        if other.n == 0:
            return self
        if self.dim and other.dim != self.dim:
            raise DataError(f"embedding of size {other.dim} does not fit a summary of size {self.dim}")
        if self.n == 0:
            self.dim, self.mean, self.m2 = other.dim, other.mean.copy(), other.m2.copy()
            self.scalars = {k: list(v) for k, v in other.scalars.items()}
        else:
            self.mean, self.m2 = _chan(self.n, self.mean, self.m2, other.n, other.mean, other.m2)
            for key in SCALARS:
                (m, q), (om, oq) = self.scalars[key], other.scalars[key]
                self.scalars[key] = [float(v) for v in _chan(self.n, m, q, other.n, om, oq)]
        self.n += other.n
        for label, count in other.labels.items():
            self.labels[label] = self.labels.get(label, 0) + count
        self.first = min(t for t in (self.first, other.first) if t is not None) if (self.first or other.first) \
            else None
        self.last = max(t for t in (self.last, other.last) if t is not None) if (self.last or other.last) else None
        return self

    @classmethod
    def merged(cls, parts: list[Summary]) -> Summary:
        out = cls()
        for part in parts:
            out.merge(part)
        return out

    def mean_var(self, key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased variance: of the embedding (``key=None``) or of one per-input scalar."""
        mean, m2 = (self.mean, self.m2) if key is None else (np.asarray(self.scalars[key][0]),
                                                             np.asarray(self.scalars[key][1]))
        return mean, np.maximum(m2, 0.0) / max(self.n - 1, 1)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "dim": self.dim, "n": self.n,
                "mean": self.mean.tolist(), "m2": self.m2.tolist(), "scalars": self.scalars, "labels": self.labels,
                "first": self.first, "last": self.last}

    @classmethod
    def from_dict(cls, d: dict) -> Summary:
        if d.get("format") != FORMAT:
            raise DataError(f"not a drift summary (format={d.get('format')!r})")
        version = int(d.get("format_version", 1))
        if version > FORMAT_VERSION:
            raise DataError(f"a drift summary of format version {version}, newer than this graftune reads "
                            f"({FORMAT_VERSION}); upgrade graftune")
        n, labels = int(d["n"]), {str(k): int(v) for k, v in d["labels"].items()}
        if version == 1:  # sums and sums of squares: mean = s / n, M2 = sq - n * mean^2 (what it computed then)
            def moments(s, sq):
                s, sq = np.asarray(s, float), np.asarray(sq, float)
                mean = s / max(n, 1)
                return mean, np.maximum(sq - n * mean * mean, 0.0)

            mean, m2 = moments(d["emb_sum"], d["emb_sq"])
            scalars = {k: [float(v) for v in moments(*d["scalars"][k])] for k in SCALARS}
        else:
            mean, m2 = np.asarray(d["mean"], float), np.asarray(d["m2"], float)
            scalars = {k: [float(v) for v in d["scalars"][k]] for k in SCALARS}
        return cls(int(d["dim"]), n, mean, m2, scalars, labels, d.get("first"), d.get("last"))


def write_json_atomically(path: Path, data: dict) -> None:
    """A reader never sees half a file (``io.atomic``: temporary file beside ``path``, fsync, rename)."""
    write_file_atomically(path, json.dumps(data))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable drift summary ({e}); delete it to start a new one") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a readable drift summary (not a JSON object); delete it to start a new one")
    return data


def _load(path: Path) -> tuple[Summary, dict]:
    """A summary file, and the JSON it was read from (a bucket's file also holds its start and end)."""
    data = _read_json(path)
    try:
        return Summary.from_dict(data), data
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a readable drift summary ({e}); delete it to start a new one") from None


def read_summary(path: Path) -> Summary:
    return _load(path)[0]


# --- durations and windows ---------------------------------------------------------------------------------------
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str, *, option: str) -> float:
    """``"90s"``, ``"30m"``, ``"6h"``, ``"7d"``, ``"2w"``, ``"1h30m"`` -> seconds; anything else, or zero, is
    refused naming ``option``."""
    compact = str(text).strip().lower().replace(" ", "")
    parts = _DURATION.findall(compact)
    if not parts or "".join(f"{v}{u}" for v, u in parts) != compact:
        raise ConfigError(f"{option} {text!r}: write a duration such as 30m, 6h, 7d or 1h30m (units s, m, h, d, w)")
    seconds = sum(float(v) * _UNITS[u] for v, u in parts)
    if seconds <= 0:
        raise ConfigError(f"{option} {text!r}: the duration must be longer than zero, e.g. 1h")
    return seconds


def format_duration(seconds: float) -> str:
    """The largest unit that divides ``seconds`` evenly (one day reads as 24h, one week as 7d)."""
    for unit in ("w", "d", "h", "m"):
        count, rest = divmod(seconds, _UNITS[unit])
        if count >= (2 if unit in ("w", "d") else 1) and rest == 0:
            return f"{int(count)}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class Window:
    """Which served inputs ``graftune drift`` judges: the buckets that overlap the last ``since_s`` seconds, or
    the newest buckets that together hold at least ``last`` inputs, or (neither) every bucket kept.

    Args:
        since_s: seconds back from now.
        last: a number of inputs, counted from the newest bucket back (whole buckets).
    """

    since_s: float | None = DEFAULT_SINCE_S
    last: int | None = None

    def __post_init__(self):
        if self.since_s is not None and self.last is not None:
            raise ConfigError("--since and --last: pass one of them (or --all)")
        if self.since_s is not None and not self.since_s > 0:
            raise ConfigError(f"--since: got {self.since_s} seconds; use a duration longer than zero, e.g. 1h")
        if self.last is not None and self.last < 1:
            raise ConfigError(f"--last: got {self.last}; use a number of inputs of 1 or more, e.g. --last 500")

    @classmethod
    def parse(cls, since: str | None = None, last: int | None = None, everything: bool = False) -> Window:
        """The CLI's ``--since DURATION | --last N | --all`` (none of them: the last 24 hours)."""
        if everything and (since is not None or last is not None):
            raise ConfigError("--all judges every input kept; leave out --since and --last with it")
        if since is not None and last is not None:
            raise ConfigError("--since and --last: pass one of them (or --all)")
        if everything:
            return cls(None, None)
        if last is not None:
            return cls(None, last)
        return cls(parse_duration(since, option="--since") if since is not None else DEFAULT_SINCE_S)

    def describe(self) -> str:
        if self.since_s is not None:
            return f"the last {format_duration(self.since_s)}"
        if self.last is not None:
            return f"the newest buckets holding at least {self.last} inputs"
        return "every input kept"


# --- the server side -----------------------------------------------------------------------------------------
def _stamp(start: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(start))


_STAMP = re.compile(r"^(\d{8}T\d{6}Z)\.json$")


def _stamp_time(name: str) -> float | None:
    m = _STAMP.match(name)
    return float(calendar.timegm(time.strptime(m.group(1), "%Y%m%dT%H%M%SZ"))) if m else None


class DriftTracker:
    """The store's observer: one :class:`Summary` per (name, version, time bucket), persisted to ``folder`` by
    ``flush``. A server restart continues the bucket it finds on disk.

    Args:
        folder: the drift folder (``DRIFT_DIR``).
        bucket_s: the width of a bucket in seconds: the finest a window can be cut.
        keep_s: buckets that ended longer ago than this are deleted (at ``flush``).
        clock: wall-clock time in seconds (buckets must survive a restart: not a monotonic clock).
    """

    def __init__(self, folder: str | Path, *, bucket_s: float = BUCKET_S, keep_s: float = KEEP_S,
                 clock: Callable[[], float] = time.time):
        if not bucket_s >= 1:
            raise ConfigError(f"--drift-bucket: got {bucket_s:g} seconds; use 1s or more, e.g. 1h")
        if not keep_s >= bucket_s:
            raise ConfigError(f"--drift-keep ({format_duration(keep_s)}) is shorter than a bucket "
                              f"({format_duration(bucket_s)}); keep at least one bucket, e.g. 7d")
        self.folder, self.bucket_s, self.keep_s, self.clock = Path(folder), float(bucket_s), float(keep_s), clock
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str, float], Summary] = {}  # open buckets, and closed ones not yet written
        self._dirty: set[tuple[str, str, float]] = set()

    def version_folder(self, name: str, version: str) -> Path:
        """Where the buckets of ``name@version`` are written."""
        return self.folder / safe_name(name) / safe_name(str(version))

    def legacy_path(self, name: str, version: str) -> Path:
        """The all-time summary older graftune versions wrote (read by ``--all`` only)."""
        return self.folder / safe_name(name) / f"{safe_name(str(version))}.json"

    def bucket_path(self, name: str, version: str, start: float) -> Path:
        return self.version_folder(name, version) / f"{_stamp(start)}.json"

    def held(self) -> int:
        """How many bucket summaries are in memory (bounded: the open ones and those not yet written)."""
        with self._lock:
            return len(self._buckets)

    def observe(self, entry: Any, features: torch.Tensor, texts: list[str], input_ids: list[list[int]],
                predictions: list[dict]) -> None:
        now = self.clock()
        key = (entry.name, str(entry.version), math.floor(now / self.bucket_s) * self.bucket_s)
        unk = getattr(getattr(entry.task, "tokenizer", None), "unk_token_id", None)
        predicted = [p.get("label", "") if "label" in p else "+".join(p.get("labels", [])) for p in predictions]
        with self._lock:
            summary = self._buckets.get(key)
            if summary is None:
                summary = self._buckets[key] = self._resume(*key)
            summary.add(features, texts, input_ids, predicted, unk, now=now)
            self._dirty.add(key)

    def _resume(self, name: str, version: str, start: float) -> Summary:
        """The bucket as a previous run of the server left it (a restart within the hour), else a new one."""
        path = self.bucket_path(name, version, start)
        if not path.is_file():
            return Summary()
        try:
            return read_summary(path)
        except GraftuneError as e:
            log.warning("%s; starting the bucket again", e)
            return Summary()

    def flush(self) -> int:
        """Write the buckets that changed since the last flush, forget the closed ones once written, and delete the
        files of buckets that ended more than ``keep_s`` ago; returns how many buckets were written."""
        now = self.clock()
        with self._lock:
            todo = {k: self._buckets[k].to_dict() for k in self._dirty}
            self._dirty.clear()
            for key in [k for k in self._buckets if k[2] + self.bucket_s <= now]:
                del self._buckets[key]  # closed: its last state is in ``todo`` or already on disk
        for (name, version, start), data in todo.items():
            data.update(bucket_start=start, bucket_end=start + self.bucket_s)
            try:
                write_json_atomically(self.bucket_path(name, version, start), data)
            except OSError as e:
                log.warning("could not write the drift summary of %s@%s: %s", name, version, e)
        for name, version in {(k[0], k[1]) for k in todo}:
            self._prune(self.version_folder(name, version), now)
        return len(todo)

    def _prune(self, folder: Path, now: float) -> None:
        try:
            files = list(folder.iterdir())
        except OSError:
            return
        for path in files:
            start = _stamp_time(path.name)
            if start is not None and start + self.bucket_s < now - self.keep_s:
                path.unlink(missing_ok=True)


# --- the client side: a window of buckets ----------------------------------------------------------------------
def _utc(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


def read_window(drift_dir: str | Path, name: str, version: str, window: Window, *,
                now: float | None = None) -> tuple[Summary, dict]:
    """The served inputs of ``name@version`` in ``window``, merged, and what was taken (``window`` in the report:
    its description, the buckets and inputs taken, their first and last time, what is kept in all)."""
    tracker = DriftTracker(drift_dir)
    now = time.time() if now is None else now
    folder, legacy_path = tracker.version_folder(name, version), tracker.legacy_path(name, version)
    buckets: list[tuple[float, Summary]] = []  # (end, summary)
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            start = _stamp_time(path.name)
            if start is None:
                continue
            summary, data = _load(path)
            buckets.append((float(data.get("bucket_end", start + BUCKET_S)), summary))
    legacy = read_summary(legacy_path) if legacy_path.is_file() else None
    if not buckets and legacy is None:
        raise DataError(f"no served inputs recorded for {name}@{version} in {drift_dir}; serve it with `graftune "
                        "serve` (summaries are written every few seconds) or pass the server's --drift-dir")

    def uncuttable() -> DataError:
        return DataError(f"{legacy_path} is an all-time summary written by an older graftune ({legacy.n} inputs since "
                         f"{_utc(legacy.first)}) and cannot be cut to {window.describe()}: pass --all to judge it "
                         "with the rest, or move it away")

    if window.since_s is not None:
        cutoff = now - window.since_s
        chosen = [s for end, s in buckets if end > cutoff]
        if legacy is not None and (legacy.last or 0) > cutoff:
            raise uncuttable()
    elif window.last is not None:
        chosen = []
        for _end, s in sorted(buckets, key=lambda b: -b[0]):
            if sum(c.n for c in chosen) >= window.last:
                break
            chosen.append(s)
        if legacy is not None and sum(c.n for c in chosen) < window.last:
            raise uncuttable()
    else:
        chosen = [s for _end, s in buckets] + ([legacy] if legacy is not None else [])
    served = Summary.merged(chosen)
    kept = Summary.merged([s for _end, s in buckets] + ([legacy] if legacy is not None else []))
    info = {"window": window.describe(), "since_s": window.since_s, "last": window.last, "buckets": len(chosen),
            "from": _utc(served.first), "to": _utc(served.last), "kept_inputs": kept.n,
            "kept_from": _utc(kept.first)}
    return served, info


# --- the reference: the training split, embedded as served --------------------------------------------------
def reference_summary(run_dir: str | Path, *, split: str = "train") -> Summary:
    """The summary of a run's training split (``split``: train, val or test), rebuilt from its run.yaml and data,
    with the embedding its served head reads and the head's predicted classes."""
    run = load_run(run_dir, expect="classifier")
    if (run.fewshot is None and run.head is None) or run.kind != "classification":
        raise DataError(f"{run_dir}: drift needs a text classification run with an adapter or head (this is a "
                        f"{run.cfg.method} {run.kind} run)")
    part = getattr(run_splits(run.cfg, run.kind, run_dir=run_dir, parts=(split,)), split)  # as trained
    inputs = list(part.inputs)
    if not inputs:
        raise DataError(f"{run_dir}: its {split} split is empty; nothing to compare served inputs with")
    if run.fewshot is not None:  # a contrastive (or probe) run: the embeddings its fitted head reads, as served
        features = run.fewshot.embed(inputs)
        predicted = [r["label"] for r in predict_rows(run.fewshot, inputs, run.label_names, features)]
    else:
        features, predicted = _served_features(run, inputs)
    ids = [e["input_ids"] for e in run.task.encode(inputs)]
    summary = Summary()
    summary.add(features, inputs, ids, predicted, getattr(run.task.tokenizer, "unk_token_id", None))
    return summary


def _served_features(run: Any, inputs: list[str]) -> tuple[torch.Tensor, list[str]]:
    """The pooled features an adapter run's task head reads, and its predicted classes."""
    features = features_of(run.task, run.model, inputs, policy=run.policy)
    with torch.inference_mode():
        logits = run.head(features.to(next(run.head.parameters()).dtype)).float()
    probs = probabilities(logits, run.multi_label)
    if run.multi_label:
        predicted = ["+".join(n for n, v in zip(run.label_names, row) if v >= 0.5) for row in probs.tolist()]
    else:
        predicted = [run.label_names[int(i)] for i in probs.argmax(-1)]
    return features, predicted


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
    w = report.get("window")
    cut = w is not None and (w["since_s"] is not None or w["last"] is not None)
    where = f" in {w['window']}" if cut else ""
    taken = (f"  window: {w['window']}: {count_of(report['served'], 'served input')}"
             + (f", {w['from']} to {w['to']}" if w["from"] else "")
             + f" ({count_of(w['buckets'], 'bucket')})"
             + (f"; {w['kept_inputs']} kept in all" + (f" since {w['kept_from']}" if w["kept_from"] else "")
                if cut else "")) if w else None
    part = {"train": "training", "val": "validation", "test": "test"}.get(report.get("split", "train"), "training")
    if report["drift"] is None:
        hint = "; widen --since, or pass --last N or --all" if w and w["since_s"] is not None else ""
        line = (f"{head} not enough served inputs{where} to judge yet ({report['served']} seen, {MIN_ROWS} needed; "
                f"reference: {report['reference']} {part} inputs{hint})")
        return "\n".join([line, taken] if taken else [line])
    verdict = (f"recent inputs do NOT look like the {part} data" if report["drift"] else
               f"recent inputs still look like the {part} data")
    served = count_of(report["served"], "served input")
    lines = [(f"{head} {verdict} (tests at a {a:.2%} false-alarm rate; {served}{where} "
              f"against {report['reference']} {part} inputs)")]
    if taken:
        lines.append(taken)
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
                 split: str = "train", window: Window | None = None, now: float | None = None) -> dict:
    """Compare what the server saw for ``name@version`` in ``window`` (default: the last 24 hours; read from
    ``drift_dir``) with the version's training split; the reference summary is computed once and cached beside the
    buckets. Adds ``window`` (what was taken) and ``text`` (plain words)."""
    served, taken = read_window(drift_dir, name, version, window or Window(), now=now)
    ref_path = DriftTracker(drift_dir).legacy_path(name, version).with_name(
        f"{safe_name(str(version))}.reference-{split}.json")
    if ref_path.is_file():
        ref = read_summary(ref_path)
    else:
        ref = reference_summary(run_dir, split=split)
        write_json_atomically(ref_path, ref.to_dict())
    report = compare(ref, served, alpha=alpha)
    report.update({"name": name, "version": str(version), "window": taken, "split": split})
    report["text"] = render(name, str(version), report)
    return report
