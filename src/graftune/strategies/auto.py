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
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from graftune.config import RunConfig
from graftune.data.splits import Splits, make_splits
from graftune.errors import ConfigError, DataError
from graftune.recipes import adapter
from graftune.recipes.fewshot_run import unused_settings
from graftune.run.rundir import check_out
from graftune.strategies.catalog import (
    STRATEGIES,
    TRAIN_DEFAULTS,
    Frozen,
    load_compare_data,
    run_contrastive,
    run_features,
    run_train,
)
from graftune.strategies.summary import WITHIN

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
    error of the validation part's F1 when that is larger, the candidate with the fewest trained parameters wins
    (then the faster): a timing difference of a few seconds is noise, a smaller model is not.
    ``not_for_contrastive``: run settings the contrastive run would not honour (``--epochs`` ...): when given, that
    candidate is skipped and the reason says why. For text, the ``head`` candidate is ``probe`` (the frozen
    base's whole-text embeddings + logistic regression, compare's ``linear-probe``, trained as ``train --method
    probe``) unless ``not_for_probe`` names settings a probe run would not honour; then it is ``head`` (the task
    head on the first ``max_length`` tokens, scored as its logistic-regression start).
    """
    train_fn = train_fn or adapter.train
    unknown = [c for c in candidates if c != "head" and c not in STRATEGIES]
    if unknown or not candidates:
        raise ConfigError(f"auto candidates: unknown {', '.join(unknown) or '(none given)'}; use head or some of "
                          f"{', '.join(n for n, s in STRATEGIES.items() if s.kind == 'train')}")
    ds, user_test = load_compare_data(data, test, text_column, label_column)
    args = dict(split_args) if split_args else {"seed": seed, "test_size": test_size, "shots": shots,
                                                 "test_per_class": test_per_class}
    full = make_splits(ds, test=user_test, **{**args, "val_size": 0})
    fit_part, val_part = carve_val(full.train, seed)
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
                frozen = Frozen(model, ds, max_length, windows=probe)
                result = run_features(STRATEGIES["linear-probe"], frozen, inner, "val")
            elif name == "contrastive":  # what `train --method contrastive` trains, with its defaults
                result = run_contrastive(STRATEGIES[name], model, inner, seed, settings)
            else:
                result = run_train(STRATEGIES[name], model, str(data) if not hasattr(data, "inputs") else ds.origin,
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
    pick = min(close, key=lambda s: (s["trainable_params"], s["seconds"]))
    listing = ", ".join(f"{s['method']} {s['macro_f1']:.3f} ({s['seconds']:.0f} s)" for s in scores.values())
    reason = (f"On a validation part carved from the {len(full.train)} training examples ({len(val_part)} held out, "
              f"the test set untouched), macro-F1 was: {listing}. ")
    if pick is best:
        reason += f"{pick['method']} scored best"
    elif tie > WITHIN:
        reason += (f"{pick['method']} is within {100 * tie:.0f} points of the best ({best['method']}), the "
                   f"sampling noise of {len(val_part)} validation examples, and trains fewer parameters "
                   f"({pick['trainable_params']:,} vs {best['trainable_params']:,}), so it is chosen")
    else:
        reason += (f"{pick['method']} is within {100 * WITHIN:.0f} point of the best ({best['method']}) and trains "
                   f"fewer parameters ({pick['trainable_params']:,} vs {best['trainable_params']:,}), so it is chosen")
    reason += (f". With only {len(val_part)} validation examples, differences of a few points are noise."
               if len(val_part) < 50 else ".")
    if skipped:
        reason += f" Skipped: {', '.join(skipped)}."
    keep = ("macro_f1", "accuracy", "seconds", "trainable_params")
    return {"method": pick["method"], "reason": reason, "budget_s": budget_s,
            "seconds": round(time.perf_counter() - started, 2), "training_examples": len(full.train),
            "validation_examples": len(val_part),
            "candidates": {n: {k: s[k] for k in keep} for n, s in scores.items()}, "skipped": skipped}


def resolve(cfg, *, progress: bool = True, train_fn: Callable | None = None):
    """``method: auto`` -> the config to train: the method ``auto_pick`` chose on ``cfg``'s own training examples
    (same data, seed, shots, split settings, test file and max_length), with the options and learning rates it was
    scored with (a learning rate the config sets away from its default is kept), and the record in ``cfg.auto``."""
    if cfg.method != "auto":
        return cfg
    if not cfg.resume:
        check_out(cfg.out, overwrite=cfg.overwrite)  # a taken --out is refused before the comparison, not after
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


def carve_val(train, seed: int):
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
