"""``--method auto``: a quick comparison on the training examples only (never the test set) that picks the method
to train, with the evidence and the reason recorded. ``auto_pick`` returns the whole record, ``choose_method`` its
``(method, reason)`` form, and ``resolve`` (the recipe's entry in ``graftune.runs``) turns a ``method: auto``
config into the one to train.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import bootstrap
from sklearn.model_selection import StratifiedKFold

from graftune.config import RunConfig
from graftune.data.sources import count_of
from graftune.data.splits import Splits, make_splits
from graftune.errors import ConfigError, DataError
from graftune.recipes import adapter
from graftune.recipes.fewshot import make_head
from graftune.recipes.fewshot_run import unused_settings
from graftune.run.rundir import check_out
from graftune.strategies.catalog import (
    STRATEGIES,
    TRAIN_DEFAULTS,
    Frozen,
    load_compare_data,
    run_contrastive,
    run_train,
)
from graftune.strategies.summary import WITHIN
from graftune.tasks.classification import classification_metrics

#: the candidates by modality: ``head`` is the frozen baseline (text: ``probe``, the whole-text embeddings + a
#: logistic regression; images: the task head on pooled features), ``prototypes`` its nearest-class-mean variant
AUTO_CANDIDATES = {"text": ("head", "prototypes", "lora", "contrastive"), "image": ("head", "lora", "topk")}
#: candidates scored on frozen embeddings computed once: every fold costs a head fit only
CHEAP = ("head", "prototypes")
#: the training examples are cut into at most FOLDS stratified folds: every candidate predicts each example of a
#: fold it runs with a model fitted on the other folds, and candidates are compared on those predictions, paired
#: example by example
FOLDS = 5
#: trained candidates, successive halving: every one runs on the first RUNGS[0] folds; those not beaten by the
#: best (``_beaten``; at least two) go on to the next rung's folds, as the budget allows; one the best has beaten is
#: out of the running (it cannot win a tie at the end, against another best, on the few folds it ran); the comparison
#: stops early once one trained candidate is left, best, and every other candidate beaten by it
RUNGS = (1, 3, FOLDS)
#: futility stop: after this many folds, when the trained candidate first in ``PREFERENCE`` is ahead of or level with
#: every other on the examples both predicted, the remaining folds could overrule it only by turning that into a
#: lead of ``TIE_Z`` standard errors against it, and they are not run. Replayed on 51 splits (bench/RESULTS.md,
#: "Session 9: auto's futility stop"): no pick changed and a quarter of the trained folds were saved; a stop after
#: the first fold saved more but hid one of the five splits where a more sensitive rule (z = 1) would overrule.
FUTILITY_FOLDS = 3
#: resamples of the paired bootstrap that puts a standard error on a gap in macro-F1 (``_gap``)
RESAMPLES = 1000
#: a gap of more than TIE_Z standard errors overrules the preference order (``_beaten``). With three other
#: candidates a one-sided test at 1 standard error would overrule a right prior by chance alone up to about half
#: the time (3 x 16%); at 2, up to about 7% (3 x 2.3%). The bootstrap's standard error is also an underestimate on
#: a few dozen examples. bench/RESULTS.md ("Session 7") replays 1, 1.65, 2 and 2.5 on seven data sets.
TIE_Z = 2.0
#: which candidate wins a tie (a gap within the noise of the cross-validation): the earliest in this order. It is
#: the order of the strategies' test accuracy over the built-in text data sets at 8 shots (bench/RESULTS.md,
#: "Session 6": the contrastive recipe was the most accurate on every split of trec, sms-spam and rotten-tomatoes,
#: by 1 to 23 points; the logistic probe never below class means). With a few examples per validation fold the
#: cross-validation is noisy (one fold of 5 reviews moves a mean by 20 points), so it must show a candidate ahead
#: by more than its noise to overrule this prior; with more examples it does so sooner. Images: the smaller first.
PREFERENCE = ("contrastive", "probe", "head", "lora", "topk", "prototypes")
#: time per training example relative to the first trained candidate (LoRA, 3 epochs), to estimate a candidate
#: before it runs: contrastive trains 20 pairs per example on the top 2 layers; on BBC News (MiniLM, 40-80
#: articles) it took about 3x LoRA's 3 epochs per example (bench/RESULTS.md)
AUTO_COST = {"contrastive": 3.0}


def choose_method(model: str, data: Any, **kwargs) -> tuple[str, str]:
    """Pick a ``train --method`` for this model and data from a quick comparison (``auto_pick``'s arguments).
    Returns ``(method, reason)``; ``auto_pick`` returns the whole record."""
    record = auto_pick(model, data, **kwargs)
    return record["method"], record["reason"]


def auto_pick(model: str, data: Any, *, budget_s: float = 300.0, shots: int | None = None, seed: int = 0,
              text_column: str = "text", label_column: str = "label", test_size: float = 0.2,
              test_per_class: int | None = None, test: Any = None, max_length: int = 256,
              candidates: Sequence[str] | None = None, train_fn: Callable | None = None,
              split_args: dict | None = None, settings: dict | None = None, progress: bool = False,
              not_for_contrastive: Sequence[str] = (), not_for_probe: Sequence[str] = ()) -> dict:
    """The quick comparison behind ``--method auto``, as a record: ``method`` (a ``train --method``), ``options``,
    ``reason`` (plain words with the numbers), ``candidates`` (per candidate: macro-F1 and accuracy over its
    held-out predictions with the macro-F1's standard error, folds, held-out examples, seconds, trainable
    parameters), ``skipped``, the example counts and the budget.

    Only the training examples are read (those ``train`` would use: ``split_args`` is ``RunConfig.split_args()``);
    the test set is never looked at. They are cut into stratified folds (k = up to ``FOLDS``, at most the median
    class's size: a rarer class is held out in fewer folds); on a fold a candidate is fitted on the other folds and
    predicts the fold's examples. The cheap candidates (``CHEAP``: heads on frozen embeddings, computed once for
    every training example) run every fold. The trained candidates (LoRA with a head for 3 epochs, the contrastive
    recipe, top-k for images) are costly: successive halving runs each on the first fold, and the better ones on
    more (``RUNGS``), as the budget allows (a candidate estimated not to fit is skipped, the first trained one being
    the measurement).

    The rule (``decide``): a candidate's score is the macro-F1 of its held-out predictions pooled over its folds
    (with few examples a fold's own macro-F1 is nearly random: 3 examples give 0, 0.33, 0.67 or 1). The best score
    is the reference; a candidate is tied with it when, on the examples both predicted, the best's lead is within
    ``TIE_Z`` standard errors (a paired bootstrap over those examples) or within 1 point. Among the tied, the earliest in
    ``PREFERENCE`` wins: the strategies' order across data sets, which the cross-validation overrules only with a
    gap larger than its own noise.
    ``not_for_contrastive`` / ``not_for_probe``: run settings those recipes would not honour; contrastive is then
    skipped, and the text baseline is ``head`` (the task head on the first ``max_length`` tokens) instead of
    ``probe``.
    """
    train_fn = train_fn or adapter.train
    ds, user_test = load_compare_data(data, test, text_column, label_column)
    names = list(candidates or AUTO_CANDIDATES["text" if ds.modality == "text" else "image"])
    unknown = [c for c in names if c not in CHEAP and c not in STRATEGIES]
    if unknown or not names:
        raise ConfigError(f"auto candidates: unknown {', '.join(unknown) or '(none given)'}; use some of head, "
                          f"prototypes, {', '.join(n for n, s in STRATEGIES.items() if s.kind != 'features')}")
    args = dict(split_args) if split_args else {"seed": seed, "test_size": test_size, "shots": shots,
                                                 "test_per_class": test_per_class}
    train = make_splits(ds, test=user_test, **{**args, "val_size": 0}).train
    labels = np.asarray(train.labels)
    names_, counts = np.unique(labels, return_counts=True)
    smallest = min(counts)
    if smallest < 2:
        short = ", ".join(f"{n} ({c})" for n, c in zip(names_, counts) if c < 2)
        raise DataError(f"--method auto compares methods on held-out training examples and needs at least 2 per class "
                        f"once the test set is set aside; {short} has fewer; add examples, pass --test FILE, or pick a "
                        "--method (probe is the safe choice for so few)")
    # as many folds as the typical class fills (up to FOLDS): one rare class (2 examples, say) is held out in fewer
    # folds, instead of cutting every candidate's training to half the examples (2-fold)
    k = int(min(FOLDS, max(2, np.median(counts))))
    with warnings.catch_warnings():  # sklearn's note that the rare class is in fewer than k folds: intended
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        folds = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(labels)),
                                                                                          labels))
    truth = np.asarray([train.label_names.index(c) for c in labels])
    say = print if progress else (lambda *a, **kw: None)
    started = time.perf_counter()
    scores: dict[str, dict] = {}
    skipped: list[str] = []
    #: trained candidates that successive halving stopped because another was ahead by more than TIE_Z standard
    #: errors (name -> that one): out of the running, so one fold of evidence judged beaten cannot win a tie later
    dropped: dict[str, str] = {}
    stopped = ""
    text = ds.modality == "text"
    baseline = "probe" if text and not not_for_probe else "head"

    # --- cheap: frozen embeddings once, a head fit per fold ------------------------------------------------------
    cheap = [n for n in names if n in CHEAP and (n == "head" or baseline == "probe")]
    skipped += [f"{n} (a probe run would not honour your settings)" for n in names if n in CHEAP and n not in cheap]
    if cheap:
        t0 = time.perf_counter()
        frozen = Frozen(model, ds, max_length, windows=baseline == "probe")
        x = frozen.features(train.inputs)
        embed_seconds = time.perf_counter() - t0
        for name in cheap:
            t1 = time.perf_counter()
            runs = [{**fit_head(x, labels, fit, val, train.label_names, "prototype" if name == "prototypes" else
                                "logistic"), "val": val} for fit, val in folds]
            method = baseline if name == "head" else "prototypes"
            scores[method] = summarize_runs(method, runs, embed_seconds + time.perf_counter() - t1, truth,
                                             train.label_names)
            say(f"[auto] {method}: macro-F1 {scores[method]['macro_f1']:.3f} +- {scores[method]['macro_f1_se']:.3f} "
                f"over {len(runs)} folds ({scores[method]['seconds']:.0f} s)")

    # --- costly: successive halving over the folds -----------------------------------------------------------------
    costly = [n for n in names if n not in CHEAP]
    if "contrastive" in costly and (not text or not_for_contrastive):
        why = ("text only" if not text else
               f"your {', '.join('--' + n.replace('_', '-') for n in not_for_contrastive)} would not apply to it")
        skipped.append(f"contrastive ({why})")
        say(f"[auto] contrastive: skipped, {why}")
        costly.remove("contrastive")
    settings = {**(settings or {}), "max_length": max_length, "epochs": 3}
    runs_of: dict[str, list[dict]] = {n: [] for n in costly}
    per_example: list[float] = []  # seconds per training example of the trained candidates' fold runs
    fit_size = len(folds[0][0])
    data_spec = str(data) if not hasattr(data, "inputs") else ds.origin
    with tempfile.TemporaryDirectory(prefix="graftune-auto-") as scratch:
        for rung in RUNGS:
            for name in list(costly):
                while len(runs_of[name]) < min(rung, k):
                    i = len(runs_of[name])
                    left = budget_s - (time.perf_counter() - started)
                    cost = AUTO_COST.get(name) or STRATEGIES[name].cost
                    est = statistics.mean(per_example) * fit_size * cost if per_example else 0.0
                    if left <= 0 or est > left:
                        if not runs_of[name]:
                            skipped.append(f"{name} (for the {budget_s:g} s budget: est. {est:.0f} s, "
                                           f"{max(left, 0):.0f} s left)")
                            say(f"[auto] {name}: skipped, est. {est:.0f} s with {max(left, 0):.0f} s of the budget "
                                "left")
                        break
                    fit, val = folds[i]
                    inner = Splits(train=train.subset(list(fit)), val=train.subset([]), test=train.subset(list(val)),
                                   seed=seed, shots=args.get("shots"))
                    t0 = time.perf_counter()
                    if name == "contrastive":  # what `train --method contrastive` trains, with its defaults
                        result = run_contrastive(STRATEGIES[name], model, inner, seed, settings)
                    else:
                        result = run_train(STRATEGIES[name], model, data_spec, inner, seed, settings,
                                           Path(scratch) / f"{name}-{i}",
                                           {"text_column": text_column, "label_column": label_column}, train_fn)
                    seconds = time.perf_counter() - t0
                    result.pop("predict", None)  # the fold's model: not kept
                    per_example.append(seconds / max(len(fit), 1) / (AUTO_COST.get(name) or STRATEGIES[name].cost))
                    runs_of[name].append({**result, "fold": i, "seconds": seconds, "val": val})
                    say(f"[auto] {name}: fold {i + 1} macro-F1 {result['macro_f1']:.3f} ({seconds:.0f} s)")
            done = [n for n in costly if runs_of[n]]
            for name in done:
                scores[name] = summarize_runs(name, runs_of[name], sum(r["seconds"] for r in runs_of[name]), truth,
                                               train.label_names)
            if rung == RUNGS[-1]:
                break
            stop, costly, beaten = after_rung(rung, k, scores, {n: len(runs_of[n]) for n in done}, dropped, truth)
            if stop == "futility":
                stopped = (f" The trained candidates stopped after {rung} of {k} folds: {costly[0]}, which wins "
                           "ties, was ahead of or level with every other on the examples both predicted, and more "
                           f"folds could overrule it only by turning that into a lead of {TIE_Z:g} standard errors.")
                say(f"[auto] {costly[0]} leads after {rung} folds: no more folds needed")
                break
            for name, by in beaten.items():
                dropped[name] = by
                say(f"[auto] {name}: stopped after {count_of(len(runs_of[name]), 'fold')}, {by} ahead of it by "
                    f"more than {TIE_Z:g} standard errors")
            if stop == "ahead":
                say(f"[auto] {costly[0]} is ahead of every other candidate by more than {TIE_Z:g} standard errors: "
                    "no more folds needed")
                break
    if not scores:
        raise ConfigError(f"--method auto: no candidate fits in budget_s={budget_s:g}; raise the budget")

    val_size = len(folds[0][1])
    # never empty: whatever stopped a candidate was itself still running
    pick, best, close = decide({n: s for n, s in scores.items() if n not in dropped}, truth)
    listing = ", ".join(f"{s['method']} {s['macro_f1']:.3f} +- {s['macro_f1_se']:.3f} ({s['held_out']} examples, "
                        f"{s['seconds']:.0f} s{', stopped' if n in dropped else ''})" for n, s in scores.items())
    reason = (f"By {k}-fold cross-validation on the {len(train)} training examples (each predicted by a model fitted "
              f"on the other folds; {val_size} per fold; the test set untouched), the macro-F1 of the held-out "
              f"predictions, with its standard error, was: {listing}. ")
    others = [s["method"] for s in close if s is not pick]
    if pick is best:
        reason += f"{pick['method']} scored best"
        if others:
            reason += (f"; {', '.join(others)} tied with it (behind by no more than {TIE_Z:g} standard errors on the "
                       f"examples both predicted), and {_ties_go_to(pick['method'])}")
    else:
        lead = 100 * (best["macro_f1"] - pick["macro_f1"])
        reason += (f"{best['method']} and {pick['method']} scored the same" if lead < 0.05 else
                   f"{best['method']} scored best, {lead:.1f} points ahead of {pick['method']}, but within "
                   f"{TIE_Z:g} standard errors on the examples both predicted, so a tie")
        reason += f", and {_ties_go_to(pick['method'])}"
    reason += "." + stopped
    for name, by in dropped.items():
        reason += (f" {name} stopped after {count_of(scores[name]['folds'], 'fold')}: {by} was ahead of it by more "
                   f"than {TIE_Z:g} standard errors there, so it was out of the running.")
    if skipped:
        reason += f" Skipped: {', '.join(skipped)}."
    keep_keys = ("macro_f1", "macro_f1_se", "accuracy", "folds", "held_out", "seconds", "trainable_params")
    return {"method": pick["method"], "reason": reason, "budget_s": budget_s,
            "seconds": round(time.perf_counter() - started, 2), "training_examples": len(train),
            "held_out_per_fold": val_size, "folds": k,
            "candidates": {n: {key: s[key] for key in keep_keys} for n, s in scores.items()}, "skipped": skipped,
            "dropped": dropped}


def after_rung(rung: int, k: int, scores: dict[str, dict], runs: dict[str, int], dropped: dict[str, str],
               truth: np.ndarray) -> tuple[str, list[str], dict[str, str]]:
    """Successive halving's decision after a rung of folds (``auto_pick`` runs it; bench/issue14_auto_rules.py
    replays it on recorded predictions). ``scores``: every candidate's summary so far; ``runs``: the folds each
    trained candidate still going on has run; ``dropped``: those stopped earlier. Returns ``(stop, going, beaten)``:
    ``stop`` is "" to go on, "futility" (``going`` is then the candidate first in ``PREFERENCE``, ahead of or level
    with every other: more folds could overrule it only by turning that into a lead of ``TIE_Z`` standard errors) or
    "ahead" (``going`` is the one trained candidate left, which has beaten every other); ``beaten`` the candidates
    stopped now, out of the running (name -> the best that beat them)."""
    preferred = min(scores, key=_rank)
    # (only when the preferred one really ran this rung's folds, not one cut short by the budget)
    if FUTILITY_FOLDS <= rung < k and runs.get(preferred, 0) >= rung and all(
            _gap(scores[preferred], s, truth)[0] <= 0 for n, s in scores.items() if n != preferred):
        return "futility", [preferred], {}
    # the better half goes on (at least two: one fold is too little to drop a candidate on rank alone), and none
    # that the best still running has beaten (one that has run every fold is not stopped, only compared)
    ranked = sorted(runs, key=lambda n: -scores[n]["macro_f1"])
    keep = ranked[:max(2, math.ceil(len(ranked) / 2))]
    best = max((s for n, s in scores.items() if n not in dropped), key=lambda s: s["macro_f1"])
    beaten = {n: best["method"] for n in runs if runs[n] < k and _beaten(scores[n], best, truth)}
    out = {**dropped, **beaten}
    going = [n for n in keep if n not in out]
    if len(going) == 1 and scores[going[0]] is best and all(
            _beaten(s, best, truth) for n, s in scores.items() if s is not best and n not in out):
        return "ahead", going, beaten
    return "", going, beaten


def decide(scores: dict[str, dict], truth: np.ndarray, z: float = TIE_Z) -> tuple[dict, dict, list[dict]]:
    """The rule, on the candidates' summaries (``summarize_runs``) and the training examples' true classes:
    returns (pick, best, the candidates tied with the best). The best macro-F1 is the reference; a candidate is tied
    with it when ``_beaten`` says its gap is within the noise; the pick is the tied candidate earliest in
    ``PREFERENCE`` (the better score among equals)."""
    best = max(scores.values(), key=lambda s: s["macro_f1"])
    close = [s for s in scores.values() if not _beaten(s, best, truth, z)]
    pick = min(close, key=lambda s: (_rank(s["method"]), -s["macro_f1"]))
    return pick, best, close


def _ties_go_to(method: str) -> str:
    """Why a tie went to ``method``, in words true of it: only the first of ``PREFERENCE`` is the candidate most
    often best across data sets; another (``head`` when the probe and contrastive candidates were left out, say) is
    the first of the tied candidates in that order."""
    if method == PREFERENCE[0]:
        return f"ties go to {method}, the candidate most often best across data sets"
    return (f"ties go to {method}, the first of the tied candidates in auto's preference order "
            f"({', '.join(PREFERENCE)})")


def _rank(method: str) -> int:
    return PREFERENCE.index(method) if method in PREFERENCE else len(PREFERENCE)


def fit_head(x: np.ndarray, labels: np.ndarray, fit: np.ndarray, val: np.ndarray, label_names: Sequence[str],
             head: str) -> dict:
    """A head of ``recipes.fewshot`` fitted on the embeddings ``x[fit]`` and scored on ``x[val]``; ``predicted``:
    its label for each of ``val``."""
    t0 = time.perf_counter()
    clf = make_head(head, 1.0).fit(x[fit], labels[fit])
    pred = clf.predict(x[val])
    m = classification_metrics(np.asarray([list(label_names).index(c) for c in labels[val]]),
                               np.asarray([list(label_names).index(c) for c in pred]), list(label_names))
    # class means are computed, not trained (as compare counts them)
    params = int(clf.coef_.size + clf.intercept_.size) if hasattr(clf, "coef_") else 0
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "trainable_params": params,
            "seconds": time.perf_counter() - t0, "predicted": [str(p) for p in pred]}


def macro_f1(truth: np.ndarray, pred: np.ndarray, axis: int = -1) -> np.ndarray:
    """Macro-F1 of class indices along ``axis`` (any leading axes: many resamples at once), over the classes that
    occur in the truth or the predictions: ``classification_metrics``'s convention, in numpy so that a bootstrap
    computes a thousand of them in one call (scikit-learn's ``f1_score`` takes one sample at a time)."""
    truth, pred = np.moveaxis(np.asarray(truth), axis, -1), np.moveaxis(np.asarray(pred), axis, -1)
    total = np.zeros(truth.shape[:-1])
    present = np.zeros(truth.shape[:-1])
    for c in np.union1d(truth, pred):
        t, p = truth == c, pred == c
        both = t.sum(-1) + p.sum(-1)
        total += np.where(both > 0, 2 * (t & p).sum(-1) / np.maximum(both, 1), 0.0)
        present += both > 0
    return total / np.maximum(present, 1)


def summarize_runs(method: str, runs: list[dict], seconds: float, truth: np.ndarray,
                    label_names: Sequence[str]) -> dict:
    """One candidate's evidence: ``oof``, its predicted class index for every training example a fold of it held
    out (-1 for the others), and the macro-F1 and accuracy of those predictions pooled, with the macro-F1's
    bootstrap standard error."""
    oof = np.full(len(truth), -1)
    for r in runs:
        oof[np.asarray(r["val"])] = [list(label_names).index(p) for p in r["predicted"]]
    held = oof >= 0
    y, p = truth[held], oof[held]
    return {"method": method, "macro_f1": float(macro_f1(y, p)), "macro_f1_se": _standard_error(macro_f1, y, p),
            "accuracy": float((y == p).mean()), "folds": len(runs), "held_out": int(held.sum()),
            "trainable_params": int(max(r["trainable_params"] for r in runs)), "seconds": round(seconds, 2),
            "oof": oof}


def _standard_error(statistic: Callable, *samples: np.ndarray) -> float:
    """The standard error of ``statistic`` over examples (``samples`` aligned: resampled together), by the
    bootstrap: ``RESAMPLES`` resamples, seeded; infinite under 2 examples."""
    if len(samples[0]) < 2:
        return math.inf
    return float(bootstrap(samples, statistic, paired=True, vectorized=True, n_resamples=RESAMPLES,
                           method="percentile", random_state=0).standard_error)


def _difference(truth: np.ndarray, a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return macro_f1(truth, b, axis) - macro_f1(truth, a, axis)


def _gap(candidate: dict, best: dict, truth: np.ndarray) -> tuple[float, float]:
    """The best's lead over ``candidate`` in macro-F1 and its noise, on the training examples both predicted
    held out (the same folds: every candidate's folds start with the first, in order): the lead is the difference
    of the two macro-F1 there, the noise its standard error by a paired bootstrap over those examples (an example
    both get right or both get wrong moves neither)."""
    shared = (candidate["oof"] >= 0) & (best["oof"] >= 0)
    y, a, b = truth[shared], candidate["oof"][shared], best["oof"][shared]
    return float(_difference(y, a, b)), _standard_error(_difference, y, a, b)


def _beaten(candidate: dict, best: dict, truth: np.ndarray, z: float = TIE_Z) -> bool:
    """Behind the best by more than ``z`` standard errors of the paired gap (``_gap``), and by more than 1
    point: a gap the cross-validation cannot tell from noise is a tie. Successive halving spends no more folds on a
    beaten candidate."""
    if candidate is best:
        return False
    lead, noise = _gap(candidate, best, truth)
    return lead > max(WITHIN, z * noise) + 1e-9


def resolve(cfg, *, progress: bool = True, train_fn: Callable | None = None):
    """``method: auto`` -> the config to train: the method ``auto_pick`` chose on ``cfg``'s own training examples
    (same data, seed, shots, split settings, test file and max_length), with the options and learning rates it was
    scored with (a learning rate the config sets away from its default is kept), and the record in ``cfg.auto``."""
    if cfg.method != "auto":
        return cfg
    if not cfg.resume:
        check_out(cfg.out, overwrite=cfg.overwrite, inputs={"--data": cfg.data, "--test": cfg.test})  # refused
        # before the comparison, not after it
    if cfg.task == "causal-lm":
        raise ConfigError("method: auto picks among classification strategies; name a method for a causal-LM run "
                          "(--method lora, say)")
    record = auto_pick(cfg.model, cfg.data, budget_s=cfg.auto_budget, seed=cfg.seed, text_column=cfg.text_column,
                       label_column=cfg.label_column, test=cfg.test, max_length=cfg.max_length,
                       split_args=cfg.split_args(), progress=progress, train_fn=train_fn,
                       settings={k: v for k, v in (("precision", cfg.precision), ("threads", cfg.threads),
                                                   ("batch_size", cfg.batch_size), ("grad_accum", cfg.grad_accum))
                                 if v is not None},
                       not_for_contrastive=unused_settings(cfg),
                       not_for_probe=unused_settings(cfg, method="probe"))
    method = record["method"]
    changes: dict[str, Any] = {"method": method, "options": {}}
    if method == "prototypes":  # the probe recipe with class means for a head
        changes.update(method="probe", options={"head": "prototype"})
    elif method not in ("head", "probe", "contrastive"):  # those: their own defaults, as they were scored
        strategy = STRATEGIES[method]
        changes["options"] = dict(strategy.options)
        scored = {**TRAIN_DEFAULTS, **strategy.settings}
        defaults = {f.name: f.default for f in fields(RunConfig)}
        for key in ("lr", "head_lr"):  # what makes or breaks a method: train with the rates it was scored with
            if getattr(cfg, key) == defaults[key]:
                changes[key] = scored[key]
    record["applied"] = {k: v for k, v in changes.items() if k != "method"}
    return cfg.replace(**changes, auto=record)
