"""Which selection rule should ``--method auto`` use? Score every candidate on every fold AND on the test set, once,
then replay several rules offline on the same numbers and report each rule's regret (issue 14).

Per (data set, seed), on the bench's splits (``catalog.make_compare_splits``: the test set carved with seed 0, the
shots with the seed):
- the cross-validation auto runs (stratified folds of the training examples, the same folds and seed as
  ``strategies.auto``): every candidate (probe, prototypes, LoRA with a head for 3 epochs, the contrastive recipe)
  on every fold, its macro-F1 per fold and its prediction for every held-out example (records of session 6 held the
  cheap candidates on 10 folds, two repeats, and no predictions);
- every candidate trained on all training examples as auto's pick would be trained, and scored on the test set
  (``--reuse DIR``: taken from earlier records of the same splits instead).

A rule sees only the cross-validation (and, to mimic successive halving, only the folds it would have paid for)
and picks a candidate; its regret on a split is the best candidate's test accuracy minus its pick's.

    PYTHONPATH=src OMP_NUM_THREADS=2 .venv/bin/python bench/issue14_auto_rules.py --data trec,sms-spam \
        --seeds 0,1,2 --out bench/out/auto-rules          # runs (slow: the trained candidates on every fold)
    PYTHONPATH=src .venv/bin/python bench/issue14_auto_rules.py --replay bench/out/auto-rules   # rules only
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold

from graftune.data.splits import Splits
from graftune.evaluate import load_run, predict
from graftune.recipes import adapter
from graftune.strategies import auto
from graftune.strategies.catalog import (
    STRATEGIES,
    Frozen,
    load_compare_data,
    make_compare_splits,
    run_contrastive,
    run_features,
    run_train,
    test_per_class_for,
)

TRAINED = ("lora", "contrastive")


# --- measuring --------------------------------------------------------------------------------------------------------
def measure(data: str, seed: int, shots: int, model: str = "minilm", reuse: dict | None = None,
            only: tuple[str, ...] = ()) -> dict:
    """One split's record. ``only``: measure these candidates alone (folds and final run), the others' numbers
    copied from ``reuse`` (an earlier record of the same splits: a recipe changed, the rest did not)."""
    ds, _ = load_compare_data(data, None, "text", "label")
    splits = make_compare_splits(ds, shots=shots, seed=seed, test_per_class=test_per_class_for(ds, [8, 16]))
    train = splits.train
    labels = np.asarray(train.labels)
    k = int(min(auto.FOLDS, min(np.unique(labels, return_counts=True)[1])))
    # auto's folds (the first 5 of session 6's two repeats: the same examples, seed for seed)
    folds = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels))
    out = {"data": Path(data).stem if "/" in data else data, "seed": seed, "shots": shots, "train": len(train),
           "test": len(splits.test), "k": k, "labels": [str(v) for v in labels],
           "cv": {}, "oof": {}, "test_scores": {}, "seconds": {}}
    if only:
        assert reuse is not None and reuse["labels"] == out["labels"], "--only needs --reuse of the same splits"
        for key in ("cv", "oof", "test_scores"):
            out[key] = {n: v for n, v in reuse[key].items() if n not in only}
    frozen = Frozen(model, ds, 256)
    x = frozen.features(train.inputs)
    for name, head in (("probe", "logistic"), ("prototypes", "prototype")):
        if only and name not in only:
            continue
        runs = [auto.fit_head(x, labels, f, v, train.label_names, head) for f, v in folds]
        out["cv"][name] = [r["macro_f1"] for r in runs]
        out["oof"][name] = [[[int(i) for i in v], r["predicted"]] for (f, v), r in zip(folds, runs)]
        strategy = STRATEGIES["linear-probe" if name == "probe" else "prototypes"]
        out["test_scores"][name] = run_features(strategy, frozen, splits, "test")["accuracy"]
    settings = {"max_length": 256}
    with tempfile.TemporaryDirectory() as scratch:
        for name in TRAINED:
            if only and name not in only:
                continue
            t0 = time.perf_counter()
            scores, oof = [], []
            for i, (fit, val) in enumerate(folds):
                inner = Splits(train=train.subset(list(fit)), val=train.subset([]), test=train.subset(list(val)),
                               seed=seed, shots=shots)
                work = Path(scratch) / f"{name}-{i}"
                result = _run(name, model, data, inner, seed, {**settings, "epochs": 3}, work)
                scores.append(result["macro_f1"])
                predict_fn = result.get("predict") or functools.partial(predict, load_run(work))
                oof.append([[int(j) for j in val], [r["label"] for r in predict_fn(list(inner.test.inputs))]])
            out["cv"][name], out["oof"][name] = scores, oof
            out["seconds"][f"{name}_per_fold"] = round((time.perf_counter() - t0) / k, 1)
            if reuse is not None and not only:  # the same splits' test scores, measured before: the final runs are not repeated
                out["test_scores"][name] = reuse["test_scores"][name]
                print(f"  {data} seed {seed} {name}: cv {statistics.mean(scores):.3f} (was "
                      f"{statistics.mean(reuse['cv'][name]):.3f})", flush=True)
                continue
            t0 = time.perf_counter()
            # the final run as auto's pick trains it: the adapter loop with compare's settings (10 epochs)
            out["test_scores"][name] = _run(name, model, data, splits, seed, settings,
                                            Path(scratch) / f"{name}-final")["accuracy"]
            out["seconds"][f"{name}_final"] = round(time.perf_counter() - t0, 1)
            print(f"  {data} seed {seed} {name}: cv {statistics.mean(scores):.3f} test "
                  f"{out['test_scores'][name]:.3f}", flush=True)
    return out


def _run(name, model, data, splits, seed, settings, work):
    if name == "contrastive":
        return run_contrastive(STRATEGIES[name], model, splits, seed, settings)
    return run_train(STRATEGIES[name], model, data, splits, seed, settings, work, {"text_column": "text",
                                                                                  "label_column": "label"},
                     adapter.train)


# --- rules ------------------------------------------------------------------------------------------------------------
PARAMS = {"probe": 2_000, "prototypes": 0, "lora": 150_000, "contrastive": 50_000}


def _summary(name: str, folds: list[float]) -> dict:
    return {"method": name, "macro_f1": statistics.mean(folds), "per_fold": folds,
            "macro_f1_std": statistics.stdev(folds) if len(folds) > 1 else 0.0, "trainable_params": PARAMS[name],
            "seconds": 0.0, "folds": len(folds), "accuracy": statistics.mean(folds)}


def _fold_gap(c: dict, b: dict, val_size: int, *, shared: bool) -> tuple[float, float]:
    """The per-fold rules' gap of ``b`` over ``c`` and its noise: the mean and standard error of the paired per-fold
    differences (on the first folds both ran when ``shared``, session 6; only when both ran as many, session 5),
    else the difference of the means with their standard errors combined (one fold: a proportion's)."""
    x, y = c["per_fold"], b["per_fold"]
    n = min(len(x), len(y)) if shared else (len(x) if len(x) == len(y) else 0)
    if n > 1:
        d = [q - p for p, q in zip(x[:n], y[:n])]
        return statistics.mean(d), statistics.stdev(d) / math.sqrt(n)

    def se(s):
        f = s["per_fold"]
        return statistics.stdev(f) / math.sqrt(len(f)) if len(f) > 1 else math.sqrt(
            max(s["macro_f1"] * (1 - s["macro_f1"]), 0.0) / val_size)

    return b["macro_f1"] - c["macro_f1"], math.hypot(se(b), se(c))


def rule_session5(cv: dict, k: int, trained_folds: int = 3, val_size: int = 10) -> str:
    """auto's rule before session 6: a gap paired only when both ran as many folds (else the means with their
    standard errors combined), never a tie beyond 3 points, and the tie to the fewest trained parameters (within a
    factor 10, or all under 10,000; then the better mean, then fewer parameters)."""
    scores = {n: _summary(n, f if n not in TRAINED else f[:trained_folds]) for n, f in cv.items()}

    def gap(c, b):
        return _fold_gap(c, b, val_size, shared=False)

    best = max(scores.values(), key=lambda s: s["macro_f1"])
    close = [s for s in scores.values() if s is best or gap(s, best)[0] <= min(max(0.01, gap(s, best)[1]), 0.03)]
    smallest = min(s["trainable_params"] for s in close)
    small = [s for s in close if s["trainable_params"] <= max(10 * smallest, 10_000)]
    return max(small, key=lambda s: (s["macro_f1"], -s["trainable_params"]))["method"]


def rule_session6(cv: dict, k: int, trained_folds: int, val_size: int = 10) -> str:
    """auto's rule in session 6: per-fold macro-F1, the gap paired on the shared folds (with one shared fold the
    means with their standard errors combined), a tie within one standard error or 1 point, ties to the
    preference order."""
    scores = {n: _summary(n, f if n not in TRAINED else f[:trained_folds]) for n, f in cv.items()}

    def gap(c, b):
        return _fold_gap(c, b, val_size, shared=True)

    best = max(scores.values(), key=lambda s: s["macro_f1"])
    close = [s for s in scores.values() if s is best or gap(s, best)[0] <= max(0.01, gap(s, best)[1]) + 1e-9]
    return min(close, key=lambda s: (auto.PREFERENCE.index(s["method"]), -s["macro_f1"]))["method"]


def rule_z(record: dict, z: float) -> str:
    """``rule_auto`` with a gap of more than ``z`` standard errors needed to overrule the preference order."""
    return rule_auto(record, record["k"], z=z)


def rule_auto(record: dict, trained_folds: int, candidates=("probe", "prototypes", "lora", "contrastive"),
              z: float = auto.TIE_Z) -> str:
    """auto's rule as shipped (``auto.decide``: macro-F1 of the held-out predictions pooled over the folds, gaps
    paired example by example) with the trained candidates seen on their first ``trained_folds`` folds (the budget
    may buy fewer than all)."""
    names = sorted(set(record["labels"]))
    truth = np.asarray([names.index(c) for c in record["labels"]])
    k = record["k"]
    scores = {}
    for name in candidates:
        folds = record["oof"][name][:trained_folds if name in TRAINED else k]
        runs = [{"val": val, "predicted": pred, "trainable_params": PARAMS[name]} for val, pred in folds]
        scores[name] = auto.summarize_runs(name, runs, 0.0, truth, names)
    return auto.decide(scores, truth, z)[0]["method"]


def _scores(record: dict, trained_folds: int, candidates=("probe", "prototypes", "lora", "contrastive")):
    names = sorted(set(record["labels"]))
    truth = np.asarray([names.index(c) for c in record["labels"]])
    scores = {}
    for name in candidates:
        folds = record["oof"][name][:trained_folds if name in TRAINED else record["k"]]
        runs = [{"val": val, "predicted": pred, "trainable_params": PARAMS[name]} for val, pred in folds]
        scores[name] = auto.summarize_runs(name, runs, 0.0, truth, names)
    return scores, truth


def rule_futility(record: dict, checks: tuple[int, ...] = (auto.FUTILITY_FOLDS,),
                  first_lead: float | None = None) -> tuple[str, int]:
    """auto's rule with the futility stop (``auto.FUTILITY_FOLDS``) checked after each of ``checks`` folds: stop with
    the preferred candidate (contrastive) when no other is ahead of it on the examples both predicted. With
    ``first_lead`` the check after the first fold asks more: contrastive ahead of every other by more than
    ``first_lead`` standard errors of the paired gap (and 1 point). Returns the pick and the trained folds paid."""
    for t in checks:
        if t >= record["k"]:
            break
        scores, truth = _scores(record, t)
        others = [s for n, s in scores.items() if n != "contrastive"]
        if t == 1 and first_lead is not None:
            stop = all(auto._beaten(s, scores["contrastive"], truth, first_lead) for s in others)
        else:
            stop = all(auto._gap(scores["contrastive"], s, truth)[0] <= 0 for s in others)
        if stop:
            return "contrastive", t
    return rule_auto(record, record["k"]), record["k"]


def futility_replay(records: list[dict]) -> str:
    """The futility stop after 3 folds (shipped) and after 1 and 3: picks changed against the rule without it,
    trained folds paid for, and how often it stops before seeing a split where a more sensitive rule (z = 1 or
    1.65, all folds) would overrule the preference."""
    header = ("| stop checked after | picks changed | trained folds paid for | stops at 1 / 3 / all folds | "
              "splits a z = 1 / 1.65 rule overrules | of those, stopped before all folds |")
    lines = [header, "|---|---|---|---|---|---|"]
    for checks, first_lead in (((auto.FUTILITY_FOLDS,), None), ((1, auto.FUTILITY_FOLDS), None),
                               ((1, auto.FUTILITY_FOLDS), 1.0), ((1, auto.FUTILITY_FOLDS), 2.0)):
        changed, paid, stops, hidden, over = 0, [], {1: 0, 3: 0, "all": 0}, {1.0: 0, 1.65: 0}, {1.0: 0, 1.65: 0}
        for r in records:
            pick, t = rule_futility(r, checks, first_lead)
            changed += pick != rule_auto(r, r["k"])
            paid.append(t / r["k"])
            stops[t if t < r["k"] else "all"] += 1
            for z in (1.0, 1.65):
                if rule_z(r, z) != "contrastive":
                    over[z] += 1
                    hidden[z] += t < r["k"]
        lead = "" if first_lead is None else f" (after 1: a lead of {first_lead:g} standard errors)"
        lines.append(f"| {' and '.join(map(str, checks))} folds{lead} | {changed} of {len(records)} | "
                     f"{100 * statistics.mean(paid):.0f}% | {stops[1]} / {stops[3]} / {stops['all']} | "
                     f"{over[1.0]} / {over[1.65]} | {hidden[1.0]} / {hidden[1.65]} |")
    return "\n".join(lines)


def rule_halving(record: dict, beaten_stay_out: bool = True) -> tuple[str, dict]:
    """auto_pick's successive halving replayed on a record: the cheap candidates on every fold, the trained ones on
    ``auto.RUNGS`` folds as ``auto.after_rung`` (the step auto_pick runs) lets them go on, then ``auto.decide``.
    ``beaten_stay_out``: a trained candidate stopped as beaten is out of the running (session 13); False: it could
    still win a tie at the end (before). Returns the pick and the stopped candidates (name -> by
    whom)."""
    names = sorted(set(record["labels"]))
    truth = np.asarray([names.index(c) for c in record["labels"]])
    k = record["k"]
    folds_of = {n: 0 for n in TRAINED}

    def scores() -> dict:
        out = {}
        for name in ("probe", "prototypes", *TRAINED):
            folds = record["oof"][name][:folds_of.get(name, k)]
            if folds:
                runs = [{"val": val, "predicted": pred, "trainable_params": PARAMS[name]} for val, pred in folds]
                out[name] = auto.summarize_runs(name, runs, 0.0, truth, names)
        return out

    costly, dropped = list(TRAINED), {}
    for rung in auto.RUNGS:
        for name in costly:
            folds_of[name] = min(rung, k)
        now = scores()
        if rung == auto.RUNGS[-1]:
            break
        stop, costly, beaten = auto.after_rung(rung, k, now, {n: folds_of[n] for n in costly}, dropped, truth)
        dropped.update(beaten)
        if stop:
            break
    final = scores()
    eligible = {n: s for n, s in final.items() if not (beaten_stay_out and n in dropped)}
    return auto.decide(eligible, truth)[0]["method"], dropped


def halving_replay(records: list[dict]) -> str:
    """How often halving stopped a candidate as beaten, and how often keeping it out of the running (session 13)
    changed the pick."""
    now = [rule_halving(r) for r in records]
    before = [rule_halving(r, beaten_stay_out=False)[0] for r in records]
    changed = [(r, b, n[0]) for r, b, n in zip(records, before, now) if b != n[0]]
    return (f"halving simulated: a candidate stopped as beaten on {sum(bool(n[1]) for n in now)} of {len(records)} "
            f"splits; keeping it out of the running changed {len(changed)} pick(s)" +
            "".join(f"\n  {r['data']}: {b} -> {n}" for r, b, n in changed))


def rule_best_mean(cv: dict, k: int, trained_folds: int) -> str:
    """The best mean over the folds every candidate ran (paired: the same validation examples), no prior."""
    return max(cv, key=lambda c: statistics.mean(cv[c][:trained_folds]))


RULES = {
    "session 5 (ties to the smallest, 3-point cap), trained 3 folds": lambda r: rule_session5(r["cv"], r["k"], 3),
    "best mean on the shared folds, trained all folds": lambda r: rule_best_mean(r["cv"], r["k"], r["k"]),
    "session 6 (per-fold macro-F1), trained all folds": lambda r: rule_session6(r["cv"], r["k"], r["k"]),
    "session 6, trained 3 folds": lambda r: rule_session6(r["cv"], r["k"], 3),
    "**session 7 (auto.decide: pooled, paired per example, z = 2), trained all folds**":
        lambda r: rule_auto(r, r["k"]),
    "session 7, trained 3 folds": lambda r: rule_auto(r, 3),
    "session 7, trained 1 fold": lambda r: rule_auto(r, 1),
    "session 7 without lora and prototypes": lambda r: rule_auto(r, r["k"], candidates=("probe", "contrastive")),
    "session 7 with z = 1": lambda r: rule_z(r, 1.0),
    "session 7 with z = 1.65": lambda r: rule_z(r, 1.65),
    "session 7 with z = 2.5": lambda r: rule_z(r, 2.5),
    "shipped: halving simulated, a candidate stopped as beaten out of the running (session 13)":
        lambda r: rule_halving(r)[0],
    "always probe": lambda r: "probe",
    "always contrastive": lambda r: "contrastive",
    "always lora": lambda r: "lora",
}


def replay(records: list[dict]) -> str:
    lines = ["| rule | " + " | ".join(sorted({r["data"] for r in records})) + " | mean regret | worst | vs probe |",
             "|---|" + "---|" * (len({r["data"] for r in records}) + 3)]
    by_data = sorted({r["data"] for r in records})
    for name, rule in RULES.items():
        regrets: dict[str, list[float]] = {d: [] for d in by_data}
        gains = []
        for r in records:
            pick = rule(r)
            best = max(r["test_scores"].values())
            regrets[r["data"]].append(100 * (best - r["test_scores"][pick]))
            gains.append(100 * (r["test_scores"][pick] - r["test_scores"]["probe"]))
        per = [statistics.mean(v) for v in regrets.values()]
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in per) +
                     f" | {statistics.mean(per):.1f} | {max(per):.1f} | {statistics.mean(gains):+.1f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="trec,sms-spam,rotten-tomatoes,bbc-news")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--out", default="bench/out/auto-rules")
    p.add_argument("--replay", help="a folder of records: print the rules' regrets only")
    p.add_argument("--reuse", help="a folder of earlier records of the same splits: their test scores are taken, "
                   "and only the cross-validation runs again")
    p.add_argument("--only", default="", help="with --reuse: measure these candidates alone (comma-separated; "
                   "folds and final run), the others' numbers taken from the --reuse records")
    a = p.parse_args()
    if a.replay:
        records = [json.loads(f.read_text()) for f in sorted(Path(a.replay).glob("*.json"))]
        print(replay(records))
        print()
        print(futility_replay(records))
        print()
        print(halving_replay(records))
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for data in a.data.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            path = out / f"{Path(data).stem if '/' in data else data}-{a.shots}-{seed}.json"
            if path.exists():
                continue
            t0 = time.perf_counter()
            old = Path(a.reuse or "-") / path.name
            only = tuple(n for n in a.only.split(",") if n)
            if only and not old.is_file():
                print(f"{data} seed {seed}: no --reuse record {old}; skipped", flush=True)
                continue
            record = measure(data, seed, a.shots, reuse=json.loads(old.read_text()) if old.is_file() else None,
                             only=only)
            record["seconds"]["total"] = round(time.perf_counter() - t0, 1)
            path.write_text(json.dumps(record, indent=1))
            print(f"{data} seed {seed}: {record['test_scores']} in {record['seconds']['total']:.0f} s", flush=True)
    print(replay([json.loads(f.read_text()) for f in sorted(out.glob("*.json"))]))


if __name__ == "__main__":
    main()
