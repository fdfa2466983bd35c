"""An honest comparison of adaptation strategies (``graftune compare``) and the quick pick behind ``--method auto``.

``run_compare`` runs every strategy on IDENTICAL splits: for each (shots, seed) the test set is the same for
every strategy, shot count and seed (carved once, ``test_per_class`` per class, seed 0), and the K training
examples per class are drawn from the rest with ``shot_seed=seed``; every strategy of one (shots, seed) sees the
very same training examples (the data card fingerprints are recorded per row and checked). Strategies:

- ``linear-probe``: frozen encoder, pooled features, scikit-learn logistic regression;
- ``prototypes``: frozen encoder, nearest class mean by cosine similarity (Snell et al. 2017);
- ``contrastive``: SetFit-style contrastive training of a LoRA adapter, then logistic regression (text only;
  ``strategies/fewshot.py``);
- ``bottleneck``, ``lora``, ``ia3``, ``prefix``, ``topk``, ``full``: ``train()`` with that method and a
  classification head (LP-FT: the head starts at the logistic-regression fit).

Each runs without and with augmentation of the training examples (EDA for text, small crops and rotations for
images; the test set is never augmented). ``budget_s`` bounds the wall time: before each run its cost is
estimated from the runs done so far (seconds per training example of the same strategy, else of the other
strategies scaled by a rough cost factor), and a run that would not fit in the time left is skipped with a row
saying so. The results go to ``results.json`` and ``report.html`` (tables, plots, a recommendation from the numbers).

``auto_pick`` (and ``choose_method``, its ``(method, reason)`` form) is the quick version behind ``train --method
auto``: a few cheap candidates scored on a validation part carved from the training examples only, never from the
test set; ``resolve_auto`` turns a ``method: auto`` config into the one to train, with the evidence recorded.
``format_summary`` is the plain-text table ``graftune compare`` prints.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graftune.errors import ConfigError, DataError


@dataclass(frozen=True)
class Strategy:
    """One way to adapt: how it runs (``features``, ``contrastive`` or ``train``), the method and its settings.

    ``cost`` is a rough cost per training example relative to LoRA, used only to estimate a strategy's time
    before it has run once (afterwards its own measured time is used)."""

    name: str
    kind: str
    method: str | None = None
    options: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    cost: float = 1.0
    description: str = ""


#: cheapest first: under a budget the baselines always run
STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("linear-probe", "features", description="frozen encoder + logistic regression (whole texts: up to 4 "
             "windows; as a run: train --method probe)", cost=0.05),
    Strategy("prototypes", "features", description="frozen encoder + nearest class mean (whole texts: up to 4 "
             "windows; as a run: train --method probe --set head=prototype)", cost=0.05),
    Strategy("contrastive", "contrastive", method="lora", description="contrastive few-shot (LoRA adapter, SetFit "
             "recipe) + logistic regression", cost=1.0),
    Strategy("lora-top2", "train", "lora", {"r": 8, "alpha": 16, "top_k_layers": 2}, cost=0.4,
             description="LoRA r=8 in the top 2 layers (the frozen layers below are computed once and cached)"),
    Strategy("ia3", "train", "ia3", settings={"lr": 1e-2}, description="IA3 scaling vectors"),
    Strategy("lora", "train", "lora", {"r": 8, "alpha": 16}, description="LoRA r=8"),
    Strategy("bottleneck", "train", "bottleneck", description="bottleneck adapters"),
    Strategy("prefix", "train", "prefix", description="prefix tuning"),
    Strategy("topk", "train", "topk", {"top_k_layers": 2}, settings={"lr": 1e-4}, cost=1.2,
             description="fine-tune the top 2 layers"),
    Strategy("full", "train", "full", settings={"lr": 5e-5}, cost=2.5, description="full fine-tuning"),
)}

#: train() settings shared by every ``train`` strategy (each may override some); ``settings=`` overrides these
TRAIN_DEFAULTS = {"epochs": 10, "lr": 2e-3, "head_lr": 1e-2, "batch_size": 16, "val_size": 0, "patience": 0,
                  "max_length": 256}
AUGMENT_COPIES = 4  # new examples per training example when augmenting
WITHIN = 0.01  # "within 1 point of accuracy" counts as a tie for the recommendation
SAME_COST = 1.5  # training times within this factor (+0.5 s) count as the same cost for the recommendation


# --- splits --------------------------------------------------------------------------------------------------
def _load(data: Any, test: Any, text_column: str, label_column: str):
    from graftune.data.sources import Dataset, load_data

    ds = data if isinstance(data, Dataset) else load_data(str(data), text_column=text_column,
                                                          label_column=label_column)
    if ds.modality not in ("text", "image") or ds.multi_label:
        raise DataError(f"{ds.origin}: compare handles single-label text or image classification; got "
                        f"{'multi-label ' if ds.multi_label else ''}{ds.modality} data")
    user_test = None
    if test is not None:
        user_test = test if isinstance(test, Dataset) else load_data(str(test), text_column=text_column,
                                                                     label_column=label_column, task=ds.modality)
    return ds, user_test


def _test_per_class(ds, shots: Sequence[int]) -> int:
    """Test examples per class: up to 100, leaving every class at least max(shots) for training."""
    smallest = min(ds.counts().values())
    n = min(100, smallest - max(shots))
    if n < 2:
        raise DataError(f"{ds.origin}: the smallest class has {smallest} examples, too few for {max(shots)} shots "
                        "plus a test set; lower --shots or pass --test")
    return n


def make_compare_splits(ds, *, shots: int, seed: int, test_per_class: int | None, user_test=None):
    """The splits of one (shots, seed): the test set does not depend on ``seed`` or ``shots``."""
    from graftune.data.splits import make_splits

    return make_splits(ds, seed=0, shot_seed=seed, shots=shots, val_size=0, test=user_test,
                       test_per_class=None if user_test is not None else test_per_class)


def augment_train(train, *, seed: int):
    """The training examples plus AUGMENT_COPIES new ones each (EDA for text; crops and small rotations for
    images, which keep digits and objects valid: no flips)."""
    import torch

    if train.modality == "text":
        from graftune.data.augment.text import eda

        new = eda(train.inputs, train.labels, n_per_example=AUGMENT_COPIES, seed=seed)
        return train.__class__(**{**train.__dict__, "inputs": list(train.inputs) + new.texts,
                                  "labels": list(train.labels) + list(new.labels)})
    from graftune.data.augment.image import random_crop, rotate

    gen = torch.Generator().manual_seed(seed)
    images = torch.stack([x.float() for x in train.inputs])
    inputs, labels = list(train.inputs), list(train.labels)
    for _ in range(AUGMENT_COPIES):
        pad = max(1, images.shape[-1] // 14)
        x, _, _ = random_crop(images, padding=pad, generator=gen)
        x, _, _ = rotate(x, degrees=10.0, generator=gen)
        inputs += list(x.to(train.inputs[0].dtype).unbind(0))
        labels += list(train.labels)
    return train.__class__(**{**train.__dict__, "inputs": inputs, "labels": labels})


# --- memory --------------------------------------------------------------------------------------------------
class _PeakRss:
    """Peak resident memory (MB) of this process while a block runs, sampled every 50 ms from /proc (falls back to
    the process-lifetime peak where /proc is missing)."""

    def __enter__(self):
        self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())
        if self.peak <= 0:
            from graftune.train import peak_rss_mb

            self.peak = peak_rss_mb()


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


# --- running one strategy --------------------------------------------------------------------------------------
class _Frozen:
    """The frozen base, its task and a cache of test features: shared by the ``features`` strategies.

    ``windows``: text is embedded as ``fewshot.frozen_fit`` does it (L2-normalized mean embeddings; a text longer
    than ``max_length`` tokens is read as up to ``fewshot.DEFAULT_CHUNKS`` windows), so the baselines see whole
    texts, as the contrastive strategy does. Without it (``--method auto``'s head candidate) the features are those
    the task head of ``train --method head`` reads: the pooled first ``max_length`` tokens."""

    def __init__(self, model: str, ds, max_length: int, *, windows: bool = True):
        from graftune.core.model import AdapterModel
        from graftune.speed import precision
        from graftune.tasks import MODALITY_TASK, ZOO_TASK, build_task
        from graftune.zoo import load_base

        started = time.perf_counter()
        kind = MODALITY_TASK[ds.modality]
        base = load_base(model, task=ZOO_TASK[kind])
        self.task = build_task(kind, base, label_names=ds.label_names, max_length=max_length)
        self.model = AdapterModel(base.model, family=base.family)
        self.policy = precision.choose("auto", inference=True)
        precision.apply(self.model.base, self.policy)
        self.windows = windows and ds.modality == "text"
        self.max_length = max_length
        self._test: dict[str, np.ndarray] = {}
        #: one-time costs (loading, embedding the test set): not charged to any run's estimate
        self.setup_seconds = time.perf_counter() - started

    def features(self, inputs) -> np.ndarray:
        from graftune.evaluate import features_of
        from graftune.strategies.fewshot import DEFAULT_CHUNKS, embed

        if not self.windows:
            return features_of(self.task, self.model, inputs, policy=self.policy).numpy()
        with self.policy.autocast():
            return embed(self.model, self.task.tokenizer, list(inputs), max_length=self.max_length,
                         pooling=self.task.pooling, max_chunks=DEFAULT_CHUNKS).numpy()

    def test_features(self, test, key: str) -> np.ndarray:
        if key not in self._test:
            started = time.perf_counter()
            self._test[key] = self.features(test.inputs)
            self.setup_seconds += time.perf_counter() - started
        return self._test[key]


def _run_features(strategy: Strategy, frozen: _Frozen, splits, test_key: str) -> dict:
    from graftune.strategies.fewshot import _make_head
    from graftune.tasks.classification import classification_metrics, encode_labels

    names = frozen.task.label_names
    started = time.perf_counter()
    x = frozen.features(splits.train.inputs)
    y = np.asarray(encode_labels(splits.train.labels, names, False))
    # the heads of fewshot.frozen_fit (and so of `train --method probe`)
    clf = _make_head("prototype" if strategy.name == "prototypes" else "logistic", 1.0).fit(x, y)
    # class means are computed, not trained
    trainable = int(clf.coef_.size + clf.intercept_.size) if strategy.name != "prototypes" else 0
    seconds = time.perf_counter() - started
    pred = clf.predict(frozen.test_features(splits.test, test_key))
    m = classification_metrics(np.asarray(encode_labels(splits.test.labels, names, False)), pred, names)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "trainable_params": trainable,
            "train_seconds": round(seconds, 2)}


def _run_contrastive(strategy: Strategy, model: str, splits, seed: int, settings: dict) -> dict:
    from graftune.strategies.fewshot import contrastive_fit
    from graftune.strategies.fewshot_run import PAIR_MAX_LENGTH, score
    from graftune.zoo import load_base

    if splits.train.modality != "text":
        raise _NotApplicable("text only (contrastive pairs of sentence embeddings)")
    base = load_base(model, task="text-classification")  # a fresh base: the adapter and bf16 cast stay in it
    fitted = contrastive_fit(base, None, splits.train.inputs, splits.train.labels, method=strategy.method,
                             seed=seed, embed_max_length=settings.get("max_length", 256),
                             max_length=min(PAIR_MAX_LENGTH, settings.get("max_length", 256)))
    m = score(fitted, splits.test.inputs, splits.test.labels, splits.test.label_names)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "trainable_params": int(fitted.report["trainable_params"]),
            "train_seconds": round(fitted.report["seconds"], 2)}


def _run_train(strategy: Strategy, model: str, data_spec: str, splits, seed: int, settings: dict, work: Path,
               columns: dict, train_fn: Callable) -> dict:
    from graftune.config import RunConfig

    merged = {**TRAIN_DEFAULTS, **strategy.settings, **settings}
    cfg = RunConfig(model=model, data=data_spec, method=strategy.method, options=dict(strategy.options),
                    seed=seed, shots=splits.shots, out=str(work), overwrite=True, **columns, **merged)
    m = train_fn(cfg, progress=False, splits=splits)
    card = work / "data_card.json"
    test_fp = json.loads(card.read_text())["splits"]["test"]["fingerprint"] if card.is_file() else None
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "trainable_params": int(m["trainable_params"]),
            "train_seconds": m["train_seconds"], "run_test_fingerprint": test_fp}


class _NotApplicable(Exception):
    pass


# --- the comparison --------------------------------------------------------------------------------------------
def run_compare(model: str, data: Any, *, shots: Sequence[int] = (8, 16, 64), seeds: int | Sequence[int] = 3,
                strategies: Sequence[str] | None = None, augment: Sequence[bool] = (False, True),
                budget_s: float | None = None, out_dir: str | Path, text_column: str = "text",
                label_column: str = "label", test: Any = None, test_per_class: int | None = None,
                settings: dict | None = None, progress: bool = True, train_fn: Callable | None = None) -> list[dict]:
    """Compare strategies on identical splits; write ``out_dir/results.json`` and ``out_dir/report.html``.

    Args:
        model: a zoo alias or model folder. data: a data alias, file or folder (or a loaded ``Dataset``).
        shots: training examples per class to try. seeds: how many shot draws (0..n-1), or the seeds themselves.
        strategies: names from ``STRATEGIES`` (None: all). augment: run without and/or with augmentation.
        budget_s: wall-time bound in seconds; runs estimated not to fit are skipped (a row says so).
        test: a separate test file (else ``test_per_class`` per class is carved once, the same for every run).
        settings: train() settings for the ``train`` strategies (epochs, lr, max_length, ...).
        train_fn: the training function (tests pass a fake); default ``graftune.train.train``.
    Returns the rows written to results.json.
    """
    from graftune.data.card import fingerprint

    if train_fn is None:
        from graftune.train import train as train_fn
    names = list(STRATEGIES) if strategies is None else list(strategies)
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or not names:
        raise ConfigError(f"strategies: unknown {', '.join(unknown) or '(none given)'}; use some of "
                          f"{', '.join(STRATEGIES)}")
    shots = sorted({int(k) for k in shots})
    if not shots or shots[0] < 1:
        raise ConfigError(f"shots: got {shots}; use positive counts such as 8 16 64")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ConfigError("seeds: use at least one seed")
    augment = list(dict.fromkeys(bool(a) for a in augment)) or [False]
    settings = check_settings(settings)
    out_dir = Path(out_dir)
    columns = {"text_column": text_column, "label_column": label_column}

    started = time.perf_counter()
    ds, user_test = _load(data, test, text_column, label_column)
    out_dir.mkdir(parents=True, exist_ok=True)  # after the checks: bad input leaves no folder behind
    per_class = test_per_class or (None if user_test is not None else _test_per_class(ds, shots))
    data_spec = str(data) if not hasattr(data, "inputs") else ds.origin
    frozen: _Frozen | None = None
    rows: list[dict] = []
    spent: dict[str, list[tuple[float, float]]] = {}  # strategy -> (fixed seconds, seconds per train example)
    say = print if progress else (lambda *a, **k: None)
    test_fp = None

    with tempfile.TemporaryDirectory(prefix="compare-", dir=out_dir) as scratch:
        # seeds outermost: under a budget, every shot count gets one seed before any gets a second
        for seed in seed_list:
            for k in shots:
                splits = make_compare_splits(ds, shots=k, seed=seed, test_per_class=per_class, user_test=user_test)
                test_fp = fingerprint(splits.test)
                base_train_fp = fingerprint(splits.train)
                for aug in augment:
                    run_splits = splits
                    if aug:
                        run_splits = _replace_train(splits, augment_train(splits.train, seed=seed))
                    train_fp = fingerprint(run_splits.train)
                    for name in names:
                        strategy = STRATEGIES[name]
                        row = {"strategy": name, "shots": k, "seed": seed, "augment": aug,
                               "train_examples": len(run_splits.train), "test_examples": len(splits.test),
                               "train_fingerprint": train_fp, "shots_fingerprint": base_train_fp,
                               "test_fingerprint": test_fp}
                        left = None if budget_s is None else budget_s - (time.perf_counter() - started)
                        if left is not None:
                            est = _estimate(strategy, len(run_splits.train), spent)
                            if est is not None and est > left:
                                row["skipped"] = f"would exceed budget (est. {est:.0f} s, left {max(left, 0):.0f} s)"
                                rows.append(row)
                                say(f"[compare] {name} shots={k} seed={seed} aug={aug}: {row['skipped']}")
                                continue
                        t0 = time.perf_counter()
                        setup0 = frozen.setup_seconds if frozen is not None else 0.0
                        try:
                            with _PeakRss() as rss:
                                if strategy.kind == "features":
                                    if frozen is None:
                                        frozen = _Frozen(model, ds, settings.get("max_length", 256))
                                    result = _run_features(strategy, frozen, run_splits, test_fp)
                                elif strategy.kind == "contrastive":
                                    result = _run_contrastive(strategy, model, run_splits, seed, settings)
                                else:
                                    work = Path(scratch) / f"{name}-{k}-{seed}-{int(aug)}"
                                    result = _run_train(strategy, model, data_spec, run_splits, seed, settings,
                                                        work, columns, train_fn)
                        except _NotApplicable as e:
                            row["skipped"] = f"not applicable: {e}"
                            rows.append(row)
                            continue
                        except Exception as e:  # noqa: BLE001 (one failing strategy must not end the comparison)
                            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                            rows.append(row)
                            say(f"[compare] {name} shots={k} seed={seed} aug={aug}: {row['error']}")
                            continue
                        wall = time.perf_counter() - t0
                        fp = result.pop("run_test_fingerprint", None)
                        if fp is not None and fp != test_fp:
                            raise RuntimeError(f"{name}: the run's test set differs from the comparison's (bug)")
                        row.update(result, wall_seconds=round(wall, 2), peak_rss_mb=round(rss.peak, 1))
                        # time that grows with the training examples vs the rest (loading, scoring the test set)
                        setup = (frozen.setup_seconds if frozen is not None else 0.0) - setup0
                        per_example = result["train_seconds"] / max(len(run_splits.train), 1)
                        fixed = max(wall - setup - result["train_seconds"], 0.0)
                        spent.setdefault(name, []).append((fixed, per_example))
                        rows.append(row)
                        say(f"[compare] {name} shots={k} seed={seed} aug={aug}: accuracy {row['accuracy']:.3f} "
                            f"({wall:.0f} s)")
                        _write_results(out_dir, rows, model, ds, test_fp, budget_s, time.perf_counter() - started)
    meta = _write_results(out_dir, rows, model, ds, test_fp, budget_s, time.perf_counter() - started)
    from graftune.strategies.report import render_report

    _atomic_write(out_dir / "report.html", render_report(rows, meta))
    return rows


#: RunConfig fields a comparison sets itself (per strategy, shots and seed): not settings
_NOT_SETTINGS = ("model", "data", "method", "options", "seed", "shots", "out", "resume", "overwrite", "text_column",
                 "label_column", "test", "test_size", "test_per_class", "val_size", "split_seed", "task", "auto",
                 "auto_budget", "init_from", "stack_under")


def check_settings(settings: dict | None) -> dict:
    """The train() settings of a comparison (``--set epochs=3``), checked now rather than in every run."""
    from dataclasses import fields

    from graftune.config import RunConfig

    settings = dict(settings or {})
    known = [f.name for f in fields(RunConfig) if f.name not in _NOT_SETTINGS]
    bad = sorted(k for k in settings if k not in known)
    if bad:
        raise ConfigError(f"settings: {', '.join(bad)} cannot be set for a comparison; use some of "
                          f"{', '.join(known)}")
    RunConfig(model="-", data="-", **{**TRAIN_DEFAULTS, **settings})  # bad values: one-line ConfigError
    return settings


def _replace_train(splits, train):
    from dataclasses import replace

    return replace(splits, train=train)


def _estimate(strategy: Strategy, n_train: int, spent: dict[str, list[tuple[float, float]]]) -> float | None:
    """Seconds for one run: fixed + per-example x n_train, from its own runs, else from the other adapter
    strategies' runs with the per-example part scaled by the cost factors; None before anything comparable has run
    (the first run is the measurement). One-time setup (loading the frozen base, embedding the test set) is not
    counted: it is paid once."""
    own = spent.get(strategy.name)
    if own:
        return statistics.mean(f for f, _ in own) + statistics.mean(e for _, e in own) * n_train
    others = [(STRATEGIES[n].cost, f, e) for n, v in spent.items() if STRATEGIES[n].kind != "features"
              for f, e in v]
    if not others:
        return None
    fixed = statistics.mean(f for _, f, _ in others)
    per_cost = statistics.mean(e / cost for cost, _, e in others)
    return fixed + per_cost * strategy.cost * n_train


def _write_results(out_dir: Path, rows: list[dict], model: str, ds, test_fp: str | None, budget_s, seconds) -> dict:
    meta = {"model": model, "data": ds.origin, "modality": ds.modality, "classes": len(ds.label_names),
            "examples": len(ds), "data_sha256": ds.sha256, "test_fingerprint": test_fp, "budget_s": budget_s,
            "seconds": round(seconds, 1), "date": time.strftime("%Y-%m-%d %H:%M"),
            "train_defaults": TRAIN_DEFAULTS, "augment_copies": AUGMENT_COPIES,
            "strategies": {n: s.description for n, s in STRATEGIES.items()}}
    _atomic_write(out_dir / "results.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return meta


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --- summaries (the report and --method auto read them) ------------------------------------------------------
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
        width = max(len(_label(s)) for s in summary)
        lines.append(f"{'shots':>5}  {'strategy':<{width}}  {'runs':>4}  {'accuracy':>15}  {'macro-F1':>15}  "
                     f"{'train s':>8}  {'trained params':>14}")
        for s in summary:
            def spread(key, s=s):  # one seed: no spread to show
                return f"{s[key]:>7.3f} +- {s[key + '_std']:.3f}" if s["runs"] > 1 else f"{s[key]:>7.3f}{'':>8}"

            lines.append(f"{s['shots']:>5}  {_label(s):<{width}}  {s['runs']:>4}  {spread('accuracy'):>15}  "
                         f"{spread('macro_f1'):>15}  {s['train_seconds']:>8.1f}  {s['trainable_params']:>14,}")
    else:
        lines.append("no run finished")
    missed: dict[str, list[str]] = {}
    for r in rows:
        why = r.get("skipped") or (f"failed: {r['error']}" if "error" in r else None)
        if why:
            key = "skipped for the budget" if why.startswith("would exceed") else why
            missed.setdefault(key, []).append(f"{_label(r)} shots={r['shots']} seed={r['seed']}")
    for why, runs in missed.items():
        shown = ", ".join(runs[:6]) + (f" and {len(runs) - 6} more" if len(runs) > 6 else "")
        lines.append(f"{len(runs)} run(s) {why}: {shown}")
    return "\n".join(lines)


def _label(s: dict) -> str:
    return s["strategy"] + (" + aug" if s["augment"] else "")


def recommend(summary: Sequence[dict]) -> list[str]:
    """One plain-words recommendation per shot count, from the numbers: the cheapest configuration within
    ``WITHIN`` of the best mean accuracy, with the evidence and a caveat when the gap is within one std."""
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
        def fmt(s):
            spread = f" +- {s['accuracy_std']:.3f}" if s["runs"] > 1 else ", 1 seed"
            return (f"{_label(s)} ({s['accuracy']:.3f}{spread}, {s['train_seconds']:.0f} s, "
                    f"{s['trainable_params']:,} trained parameters)")

        if pick is best:
            runner = max((s for s in here if s is not best), key=lambda s: s["accuracy"], default=None)
            text = f"With {k} examples per class, {fmt(best)} is the most accurate"
            seeds = min(s["runs"] for s in (best, runner or best))
            if runner is not None:
                gap = best["accuracy"] - runner["accuracy"]
                text += f", {100 * gap:.1f} points ahead of {fmt(runner)}"
                if gap <= max(best["accuracy_std"], runner["accuracy_std"]):
                    text += (f". The gap is within one standard deviation over {seeds} seed(s): "
                             "not a reliable difference")
            text += "."
        else:
            seeds = min(s["runs"] for s in (best, pick))
            gap = best["accuracy"] - pick["accuracy"]
            text = (f"With {k} examples per class, {fmt(pick)} is within {100 * WITHIN:.0f} point of the best, "
                    f"{fmt(best)}, {_saving(pick, best)}: ")
            text += ("more training is not needed here." if pick["strategy"] in ("linear-probe", "prototypes")
                     else f"prefer {_label(pick)}.")
            if gap <= max(best["accuracy_std"], pick["accuracy_std"]) and gap > 0:
                text += f" The {100 * gap:.1f}-point gap is within one standard deviation over {seeds} seed(s)."
        if seeds < 2:
            text += " One of these ran on a single seed only: its spread is unknown, so treat small gaps as noise."
        lines.append(text)
    return lines


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
                        "noise": max(s["accuracy_std"], plain["accuracy_std"])})
    return sorted(out, key=lambda d: (d["shots"], list(STRATEGIES).index(d["strategy"])))


# --- --method auto --------------------------------------------------------------------------------------------
AUTO_CANDIDATES = ("head", "lora", "topk", "contrastive")
#: time per training example relative to the first adapter candidate (LoRA, 3 epochs), to estimate a candidate
#: before it runs: contrastive trains 20 pairs per example on the top 2 layers; on BBC News (MiniLM, 40-80
#: articles) it took about 3x LoRA's 3 epochs per example (bench/RESULTS.md)
AUTO_COST = {"contrastive": 3.0}


def choose_method(model: str, data: Any, *, budget_s: float = 300.0, shots: int | None = None, seed: int = 0,
                  text_column: str = "text", label_column: str = "label", test_size: float = 0.2,
                  test_per_class: int | None = None, test: Any = None, max_length: int = 256,
                  candidates: Sequence[str] = AUTO_CANDIDATES, train_fn: Callable | None = None,
                  split_args: dict | None = None, progress: bool = False) -> tuple[str, str]:
    """Pick a ``train --method`` for this model and data from a quick comparison, within ``budget_s``.
    Returns ``(method, reason)``; ``auto_pick`` (same arguments) returns the whole record."""
    record = auto_pick(model, data, budget_s=budget_s, shots=shots, seed=seed, text_column=text_column,
                       label_column=label_column, test_size=test_size, test_per_class=test_per_class, test=test,
                       max_length=max_length, candidates=candidates, train_fn=train_fn, split_args=split_args,
                       progress=progress)
    return record["method"], record["reason"]


def auto_pick(model: str, data: Any, *, budget_s: float = 300.0, shots: int | None = None, seed: int = 0,
              text_column: str = "text", label_column: str = "label", test_size: float = 0.2,
              test_per_class: int | None = None, test: Any = None, max_length: int = 256,
              candidates: Sequence[str] = AUTO_CANDIDATES, train_fn: Callable | None = None,
              split_args: dict | None = None, settings: dict | None = None, progress: bool = False,
              not_for_contrastive: Sequence[str] = (), not_for_probe: Sequence[str] = ()) -> dict:
    """The quick comparison behind ``--method auto``, as a record: ``method``, ``reason`` (plain words with the
    numbers), ``candidates`` (per candidate: validation macro-F1, accuracy, seconds, trainable parameters),
    ``skipped``, the example counts and the budget. ``settings``: train() settings for the adapter candidates
    (precision, batch_size, ...); they train 3 epochs.

    The training examples are the ones ``train`` would use (``split_args``: ``RunConfig.split_args()``, else the
    same seed, shots and test carving); a validation part (a quarter, at least one per class) is carved from them,
    every candidate trains on the rest and is scored on it; the test set is never looked at. ``head`` is scored as
    its LP-FT start (the logistic-regression probe), the adapter candidates with 3 epochs, ``contrastive`` as
    ``graftune compare`` runs it (text only). A candidate estimated not to fit in the budget left is skipped (the
    first adapter candidate is the measurement). The best macro-F1 wins; within 1 point, or within one standard
    error of the validation part's F1 when that is larger, the faster candidate wins.
    ``not_for_contrastive``: run settings the contrastive run would not honour (``--epochs`` ...): when given, that
    candidate is skipped and the reason says why. For text, the ``head`` candidate is ``probe`` (the frozen
    base's whole-text embeddings + logistic regression, compare's ``linear-probe``, trained as ``train --method
    probe``) unless ``not_for_probe`` names settings a probe run would not honour; then it is ``head`` (the task
    head on the first ``max_length`` tokens, scored as its logistic-regression start).
    """
    from graftune.data.splits import Splits, make_splits

    if train_fn is None:
        from graftune.train import train as train_fn
    unknown = [c for c in candidates if c != "head" and c not in STRATEGIES]
    if unknown or not candidates:
        raise ConfigError(f"auto candidates: unknown {', '.join(unknown) or '(none given)'}; use head or some of "
                          f"{', '.join(n for n, s in STRATEGIES.items() if s.kind == 'train')}")
    ds, user_test = _load(data, test, text_column, label_column)
    args = dict(split_args) if split_args else {"seed": seed, "test_size": test_size, "shots": shots,
                                                 "test_per_class": test_per_class}
    full = make_splits(ds, test=user_test, **{**args, "val_size": 0})
    fit_part, val_part = _carve_val(full.train, seed)
    inner = Splits(train=fit_part, val=val_part.subset([]), test=val_part, seed=seed, shots=args.get("shots"))
    say = print if progress else (lambda *a, **k: None)
    started = time.perf_counter()
    scores: dict[str, dict] = {}
    skipped: list[str] = []
    settings = {**(settings or {}), "max_length": max_length, "epochs": 3}
    with tempfile.TemporaryDirectory(prefix="graftune-auto-") as scratch:
        for name in candidates:
            left = budget_s - (time.perf_counter() - started)
            per_example = [s["seconds"] / max(len(fit_part), 1) for s in scores.values()
                           if s["method"] not in ("head", "probe")]
            if name == "contrastive" and (ds.modality != "text" or not_for_contrastive):
                why = ("text only" if ds.modality != "text" else
                       f"your {', '.join('--' + n.replace('_', '-') for n in not_for_contrastive)} would not apply "
                       "to it")
                skipped.append(f"contrastive ({why})")
                say(f"[auto] contrastive: skipped, {why}")
                continue
            cost = AUTO_COST.get(name) or STRATEGIES["linear-probe" if name == "head" else name].cost
            est = statistics.mean(per_example) * len(fit_part) * cost if per_example else 0.0
            if left <= 0 or est > left:
                skipped.append(f"{name} (for the {budget_s:g} s budget: est. {est:.0f} s, {max(left, 0):.0f} s left)")
                say(f"[auto] {name}: skipped, est. {est:.0f} s with {max(left, 0):.0f} s of the budget left")
                continue
            t0 = time.perf_counter()
            if name == "head":
                probe = ds.modality == "text" and not not_for_probe
                name = "probe" if probe else "head"
                # what `train --method probe` fits (whole texts), or what `train --method head` trains on
                frozen = _Frozen(model, ds, max_length, windows=probe)
                result = _run_features(STRATEGIES["linear-probe"], frozen, inner, "val")
            elif name == "contrastive":  # what `train --method contrastive` trains, with its defaults
                result = _run_contrastive(STRATEGIES[name], model, inner, seed, settings)
            else:
                result = _run_train(STRATEGIES[name], model, str(data) if not hasattr(data, "inputs") else ds.origin,
                                    inner, seed, settings, Path(scratch) / name,
                                    {"text_column": text_column, "label_column": label_column}, train_fn)
            result.pop("run_test_fingerprint", None)
            scores[name] = {**result, "method": name, "seconds": round(time.perf_counter() - t0, 2)}
            say(f"[auto] {name}: validation macro-F1 {result['macro_f1']:.3f}, accuracy {result['accuracy']:.3f} "
                f"({scores[name]['seconds']:.0f} s)")
    if not scores:
        raise ConfigError(f"--method auto: no candidate fits in budget_s={budget_s:g}; raise the budget")
    best = max(scores.values(), key=lambda s: s["macro_f1"])
    # a tie is a gap within 1 point or within the sampling noise of the validation part (one standard error of a
    # proportion measured on that many examples), whichever is larger: on 10 examples that is about 10 points,
    # and then the cheapest of the tied candidates is the honest choice
    noise = math.sqrt(max(best["macro_f1"] * (1 - best["macro_f1"]), 0.0) / max(len(val_part), 1))
    tie = max(WITHIN, noise)
    close = [s for s in scores.values() if best["macro_f1"] - s["macro_f1"] <= tie + 1e-9]
    pick = min(close, key=lambda s: (s["seconds"], s["trainable_params"]))
    listing = ", ".join(f"{s['method']} {s['macro_f1']:.3f} ({s['seconds']:.0f} s)" for s in scores.values())
    reason = (f"On a validation part carved from the {len(full.train)} training examples ({len(val_part)} held out, "
              f"the test set untouched), macro-F1 was: {listing}. ")
    if pick is best:
        reason += f"{pick['method']} scored best"
    elif tie > WITHIN:
        reason += (f"{pick['method']} is within {100 * tie:.0f} points of the best ({best['method']}), the "
                   f"sampling noise of {len(val_part)} validation examples, and faster, so it is chosen")
    else:
        reason += (f"{pick['method']} is within {100 * WITHIN:.0f} point of the best ({best['method']}) and faster, "
                   "so it is chosen")
    reason += (f". With only {len(val_part)} validation examples, differences of a few points are noise."
               if len(val_part) < 50 else ".")
    if skipped:
        reason += f" Skipped: {', '.join(skipped)}."
    keep = ("macro_f1", "accuracy", "seconds", "trainable_params")
    return {"method": pick["method"], "reason": reason, "budget_s": budget_s,
            "seconds": round(time.perf_counter() - started, 2), "training_examples": len(full.train),
            "validation_examples": len(val_part),
            "candidates": {n: {k: s[k] for k in keep} for n, s in scores.items()}, "skipped": skipped}


def resolve_auto(cfg, *, progress: bool = True, train_fn: Callable | None = None):
    """``method: auto`` -> the config to train: the method ``auto_pick`` chose on ``cfg``'s own training examples
    (same data, seed, shots, split settings, test file and max_length), with the options and learning rates it was
    scored with (a learning rate the config sets away from its default is kept), and the record in ``cfg.auto``."""
    from dataclasses import fields

    from graftune.config import RunConfig
    from graftune.strategies.fewshot_run import unused_settings

    if cfg.method != "auto":
        return cfg
    if cfg.out and Path(cfg.out).exists() and not cfg.overwrite and not cfg.resume:
        raise ConfigError(f"{cfg.out} already exists; choose another --out or pass --overwrite")
    if cfg.task == "causal-lm":
        raise ConfigError("method: auto picks among classification strategies; name a method for a causal-LM run "
                          "(--method lora, say)")
    record = auto_pick(cfg.model, cfg.data, budget_s=cfg.auto_budget, seed=cfg.seed, text_column=cfg.text_column,
                       label_column=cfg.label_column, test=cfg.test, max_length=cfg.max_length,
                       split_args=cfg.split_args(), progress=progress, train_fn=train_fn,
                       settings={"precision": cfg.precision, "threads": cfg.threads, "batch_size": cfg.batch_size,
                                 "grad_accum": cfg.grad_accum},
                       not_for_contrastive=unused_settings(cfg),
                       not_for_probe=unused_settings(cfg, method="probe"))
    method = record["method"]
    changes: dict[str, Any] = {"method": method, "options": {}}
    if method not in ("head", "probe", "contrastive"):  # those: their own defaults, as they were scored
        strategy = STRATEGIES[method]
        changes["options"] = dict(strategy.options)
        scored = {**TRAIN_DEFAULTS, **strategy.settings}
        defaults = {f.name: f.default for f in fields(RunConfig)}
        for key in ("lr", "head_lr"):  # what makes or breaks a method: train with the rates it was scored with
            if getattr(cfg, key) == defaults[key]:
                changes[key] = scored[key]
    record["applied"] = {k: v for k, v in changes.items() if k != "method"}
    return cfg.replace(**changes, auto=record)


def _carve_val(train, seed: int):
    """A stratified quarter of ``train`` (at least one example per class, and at least one left to train on)."""
    rng = np.random.RandomState(seed + 7919)
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(train.labels):
        by_class.setdefault(label, []).append(i)
    short = [c for c, ix in by_class.items() if len(ix) < 2]
    if short:
        raise DataError(f"--method auto needs at least 2 training examples per class; {', '.join(short)} "
                        "has fewer; raise --shots or pick a --method")
    fit, val = [], []
    for ix in by_class.values():
        ix = list(rng.permutation(ix))
        n_val = max(1, math.floor(len(ix) / 4))
        val += ix[:n_val]
        fit += ix[n_val:]
    return train.subset(sorted(fit)), train.subset(sorted(val))
