"""An honest comparison of adaptation strategies (``graftune compare``): every strategy of the catalog
(``strategies/catalog.py``) on IDENTICAL splits. For each (shots, seed) the test set is the same for every strategy,
shot count and seed (carved once, ``test_per_class`` per class, seed 0), and the K training examples per class are
drawn from the rest with ``shot_seed=seed``; every strategy of one (shots, seed) sees the very same training
examples (the data card fingerprints are recorded per row and checked).

Each runs without and with augmentation of the training examples. ``budget_s`` bounds the wall time: before each
run its cost is estimated from the runs done so far (seconds per training example of the same strategy, else of the
other strategies scaled by a rough cost factor), and a run that would not fit in the time left is skipped with a
row saying so. The results go to ``results.json`` and ``report.html``; ``strategies/summary.py`` turns the rows
into the table and the recommendation.

``TrustOptions`` asks for more than accuracy on each finished run (docs/trust.md): accuracy and macro-F1 per group
of a group column and the largest gap (``run.scoring.group_metrics``), and the perturbation curves and greedy
attack of ``strategies.robustness.measure`` on a seeded sample of the test set (the same texts for every run).
Both need the run's model after it is scored: the features, contrastive and in-context runners hand back a
``predict`` function over their fitted model; a ``train`` strategy's run is loaded back from its scratch folder.
Every strategy is measured the same way, on the same sampled texts.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from graftune.data.card import fingerprint
from graftune.data.checks import (
    empty_texts_removed,
    split_checks,
    split_warnings,
    vocabulary_fit,
    vocabulary_problem,
)
from graftune.data.sources import Dataset, count_of, load_data
from graftune.errors import ConfigError, DataError, GraftuneError
from graftune.evaluate import load_run, predict
from graftune.io.atomic import write_file_atomically
from graftune.recipes import adapter
from graftune.run.memory import PeakMemory
from graftune.run.rundir import check_out, finish_run_dir
from graftune.run.scoring import gap_text, group_metrics
from graftune.strategies.catalog import (
    AUGMENT_COPIES,
    STRATEGIES,
    TRAIN_DEFAULTS,
    Frozen,
    NotApplicable,
    Strategy,
    augment_train,
    check_settings,
    load_compare_data,
    make_compare_splits,
    run_strategy,
    test_per_class_for,
)
from graftune.strategies.report import render_report
from graftune.strategies.robustness import BUDGET, STRENGTHS, measure
from graftune.tasks import MODALITY_TASK, ZOO_TASK
from graftune.zoo import check_task, load_base


@dataclass(frozen=True)
class TrustOptions:
    """What a comparison measures beyond accuracy on each finished run (module docstring).

    Args:
        group_column: a column of the data file (of the ``test`` file when one is given: the file the test
            examples come from) naming each example's group; None: no per-group metrics.
        robustness: measure accuracy under noise and the greedy attack's success rate on every run.
        sample: test examples the robustness curves score (a seeded sample, the same for every run).
        attack_sample: texts the attack tries at most (correctly classified ones among the sample).
    """

    group_column: str | None = None
    robustness: bool = False
    sample: int = 100
    attack_sample: int = 20

    def __post_init__(self):
        if self.sample < 1 or self.attack_sample < 1:
            raise ConfigError(f"robustness sample {self.sample}, attack sample {self.attack_sample}: use positive "
                              "counts, e.g. --robustness-sample 100 --attack-sample 20")

    @property
    def wanted(self) -> bool:
        return self.group_column is not None or self.robustness

    def describe(self) -> dict:
        """What results.json records of the options."""
        out: dict[str, Any] = {"group_column": self.group_column}
        if self.robustness:
            out["robustness"] = {"sample": self.sample, "attack_sample": self.attack_sample, "budget": BUDGET,
                                 "strengths": list(STRENGTHS), "seed": 0}
        return out


def run_compare(model: str, data: Any, *, shots: Sequence[int] = (8, 16, 64), seeds: int | Sequence[int] = 3,
                strategies: Sequence[str] | None = None, augment: Sequence[bool] = (False, True),
                budget_s: float | None = None, out_dir: str | Path, text_column: str = "text",
                label_column: str = "label", test: Any = None, test_per_class: int | None = None,
                settings: dict | None = None, progress: bool = True, train_fn: Callable | None = None,
                overwrite: bool = False, trust: TrustOptions | None = None) -> list[dict]:
    """Compare strategies on identical splits; write ``out_dir/results.json`` and ``out_dir/report.html``.

    Every check (names, shots, seeds, budget, settings, the data, every split, ``out_dir``) comes before anything is
    written, so a refused comparison leaves no folder behind. The folder is assembled next to ``out_dir`` (as a run
    directory is) and renamed into place when complete; a comparison that fails midway removes its assembly.
    ``overwrite`` replaces an existing comparison folder (one holding results.json) or an empty folder, nothing
    else.

    Args:
        model: a zoo alias or model folder. data: a data alias, file or folder (or a loaded ``Dataset``).
        shots: training examples per class to try. seeds: how many shot draws (0..n-1), or the seeds themselves.
        strategies: names from ``STRATEGIES`` (None: all). augment: run without and/or with augmentation.
        budget_s: wall-time bound in seconds; runs estimated not to fit are skipped (a row says so).
        test: a separate test file (else ``test_per_class`` per class is carved once, the same for every run).
        settings: train() settings for the ``train`` strategies (epochs, lr, max_length, ...).
        train_fn: the training function (tests pass a fake); default the adapter loop, ``recipes.adapter.train``.
        overwrite: replace ``out_dir`` if it is a comparison folder (or empty); otherwise an existing one is refused.
        trust: per-group metrics and robustness per run (``TrustOptions``); None: neither.
    Returns the rows written to results.json.
    """
    train_fn = train_fn or adapter.train
    names = [n for n, s in STRATEGIES.items() if s.default] if strategies is None else list(strategies)
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
    if budget_s is not None and not 0 < budget_s < math.inf:  # also refuses NaN; inf is no JSON number
        raise ConfigError(f"--budget {budget_s:g}: use a positive number of seconds, e.g. --budget 600")
    augment = list(dict.fromkeys(bool(a) for a in augment)) or [False]
    settings = check_settings(settings)
    out_dir = check_out(out_dir, overwrite=overwrite, what="comparison folder", is_ours=is_comparison,
                        inputs={"--data": data if isinstance(data, (str, Path)) else None,
                                "--test": test if isinstance(test, (str, Path)) else None})
    columns = {"text_column": text_column, "label_column": label_column}

    trust = trust if trust is not None and trust.wanted else None
    started = time.perf_counter()
    if trust is not None and trust.group_column is not None:
        data, test = _load_with_groups(data, test, columns, trust.group_column)
    ds, user_test = load_compare_data(data, test, text_column, label_column)
    check_task(model, ZOO_TASK[MODALITY_TASK[ds.modality]])  # a text model on images: said before any run
    if trust is not None and trust.robustness and ds.modality != "text":
        raise ConfigError(f"--robustness: the perturbations and the attack edit text; not applicable to "
                          f"{ds.modality} data (drop --robustness)")
    per_class = test_per_class or (None if user_test is not None else test_per_class_for(ds, shots))
    # every split now (cheap, no model): data too small for a shot count is refused before anything is written
    all_splits = {(seed, k): _groups_on_test_only(make_compare_splits(ds, shots=k, seed=seed,
                                                                      test_per_class=per_class, user_test=user_test))
                  for seed in seed_list for k in shots}
    work_dir, created = _start_assembly(out_dir)
    try:
        rows, meta = _run_all(model, data, ds, names, shots, seed_list, augment, all_splits, settings, budget_s,
                              columns, train_fn, progress, work_dir, started, trust)
        write_file_atomically(work_dir / "report.html", render_report(rows, meta))
        finish_run_dir(work_dir, out_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)  # the scratch runs and partial results go with it
        _remove_empty(created)
        raise
    return rows


def _load_with_groups(data: Any, test: Any, columns: dict, group_column: str) -> tuple[Any, Any]:
    """``data`` and ``test`` with the group column read from the file the test examples come from: ``test`` when
    given, else ``data`` (its carved test split keeps each example's group: ``Dataset.subset`` carries them)."""
    if test is not None:
        test = test if isinstance(test, Dataset) else load_data(str(test), group_column=group_column, **columns)
        source = test
    else:
        data = data if isinstance(data, Dataset) else load_data(str(data), group_column=group_column, **columns)
        source = data
    if source.groups is None:
        raise DataError(f"{source.origin}: loaded without its group column; load it with "
                        f"load_data(..., group_column={group_column!r})")
    return data, test


def _groups_on_test_only(splits):
    """Only the test examples' groups are read; the training part drops them (augmentation adds examples without
    one)."""
    return replace(splits, train=replace(splits.train, groups=None), val=replace(splits.val, groups=None))


def _trust_of(strategy: Strategy, work: Path, test, trust: TrustOptions, predict_fn: Callable | None,
              predicted: list[str] | None) -> dict:
    """Per-group metrics and robustness of one finished run. Groups: from ``predicted``, the run's own label for
    each test example (every runner hands it back). Robustness: through ``predict_fn`` (rows with ``label`` and
    ``probabilities``: what the features, contrastive and in-context runners hand back), or for a ``train``
    strategy through its run in ``work``, loaded back."""
    started = time.perf_counter()
    out: dict[str, Any] = {}
    if trust.group_column is not None:
        if predicted is None:
            return {"trust_error": "not measured: the run handed back no predictions"}
        out["groups"] = {"column": trust.group_column, **group_metrics(test.labels, predicted, test.groups,
                                                                       test.label_names)}
    if trust.robustness:
        if predict_fn is None:
            if strategy.kind != "train":
                return {"trust_error": f"not measured: a {strategy.kind} strategy that handed back no model"}
            try:
                run = load_run(work)
            except GraftuneError as e:  # e.g. a training function that wrote no run
                return {"trust_error": f"not measured: {str(e).splitlines()[0]}"[:300]}
            predict_fn = functools.partial(predict, run)
        # seed 0 for every run: the same sampled texts, the same perturbations and attack edits
        out["robustness"] = measure(predict_fn, test.inputs, test.labels, sample=trust.sample,
                                    attack_sample=trust.attack_sample, budget=BUDGET, seed=0)
    out["trust_seconds"] = round(time.perf_counter() - started, 2)
    return out


def is_comparison(path: Path) -> bool:
    """A folder ``graftune compare`` wrote (what ``--overwrite`` may replace)."""
    return (Path(path) / "results.json").is_file()


def _start_assembly(out_dir: Path) -> tuple[Path, list[Path]]:
    """The hidden folder next to ``out_dir`` the comparison is assembled in, and the parent folders created for it
    (removed again if the comparison fails)."""
    created = [p for p in (out_dir.parent, *out_dir.parent.parents) if not p.exists()]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own (not a train run's .NAME.partial, which may hold a run to --resume)
    work = out_dir.parent / f".{out_dir.name}.compare-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    return work, created


def _remove_empty(folders: list[Path]) -> None:
    for p in folders:  # deepest first; only what this comparison created, and only if still empty
        try:
            os.rmdir(p)
        except OSError:
            return


def _run_all(model, data, ds, names, shots, seed_list, augment, all_splits, settings, budget_s, columns, train_fn,
             progress, out_dir: Path, started: float, trust: TrustOptions | None) -> tuple[list[dict], dict]:
    """Every (seed, shots, augment, strategy) run into ``out_dir`` (results.json rewritten after each)."""
    data_spec = str(data) if not hasattr(data, "inputs") else ds.origin
    frozen: Frozen | None = None
    if ds.modality == "text" and any(STRATEGIES[n].kind == "features" for n in names):
        frozen = Frozen(model, ds, settings.get("max_length", 256))  # its tokenizer serves the vocabulary check
    test = next(iter(all_splits.values())).test  # one test set for every run
    user_test = (test.origin, test.sha256) != (ds.origin, ds.sha256)  # a --test file, not carved from ds
    warnings = data_warnings(model, ds, frozen.task.tokenizer if frozen is not None else None,
                             test if user_test else None)
    if not user_test and len(test) == len(ds.label_names):  # carved one a class: the least a small class allows
        warnings.append(_one_test_each(ds, len(test), max(shots)))
    rows: list[dict] = []
    spent: dict[str, list[tuple[float, float]]] = {}  # strategy -> (fixed seconds, seconds per train example)
    say = print if progress else (lambda *a, **k: None)
    test_fp = None

    def frozen_base() -> Frozen:  # loaded once, on first use; its setup time is read after each run
        nonlocal frozen
        if frozen is None:
            frozen = Frozen(model, ds, settings.get("max_length", 256))
        return frozen

    with tempfile.TemporaryDirectory(prefix="compare-", dir=out_dir) as scratch:
        # seeds outermost: under a budget, every shot count gets one seed before any gets a second
        for seed in seed_list:
            for k in shots:
                splits = all_splits[(seed, k)]
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
                            # spent: no strategy's first run either, once one run has measured something
                            spent_out = left <= 0 and any("accuracy" in r for r in rows)
                            if spent_out or (est is not None and est > left):
                                row["skipped"] = (f"would exceed budget (est. {est:.0f} s, left {max(left, 0):.0f} s)"
                                                  if est is not None else "the budget is spent")
                                rows.append(row)
                                say(f"[compare] {name} shots={k} seed={seed} aug={aug}: {row['skipped']}")
                                continue
                        t0 = time.perf_counter()
                        setup0 = frozen.setup_seconds if frozen is not None else 0.0
                        work = Path(scratch) / f"{name}-{k}-{seed}-{int(aug)}"
                        try:
                            with PeakMemory() as rss:
                                result = run_strategy(strategy, model=model, data_spec=data_spec,
                                                      splits=run_splits, seed=seed, settings=settings, work=work,
                                                      columns=columns, train_fn=train_fn, frozen=frozen_base,
                                                      test_key=test_fp)
                        except NotApplicable as e:
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
                        predict_fn = result.pop("predict", None)  # the strategy's model, where it has one
                        predicted = result.pop("predicted", None)  # its label per test example
                        if fp is not None and fp != test_fp:
                            raise RuntimeError(f"{name}: the run's test set differs from the comparison's (bug)")
                        row.update(result, wall_seconds=round(wall, 2), peak_rss_mb=round(rss.peak, 1))
                        # time that grows with the training examples vs the rest (loading, scoring the test set)
                        setup = (frozen.setup_seconds if frozen is not None else 0.0) - setup0
                        per_example = result["train_seconds"] / max(len(run_splits.train), 1)
                        fixed = max(wall - setup - result["train_seconds"], 0.0)
                        spent.setdefault(name, []).append((fixed, per_example))
                        if trust is not None:  # after the timing: measuring the model is not training it
                            row.update(_trust_of(strategy, work, splits.test, trust, predict_fn, predicted))
                        rows.append(row)
                        say(f"[compare] {name} shots={k} seed={seed} aug={aug}: accuracy {row['accuracy']:.3f} "
                            f"({wall:.0f} s){_trust_line(row)}")
                        _write_results(out_dir, rows, model, ds, test_fp, budget_s, time.perf_counter() - started,
                                       names, settings, augment, trust, warnings)
    meta = _write_results(out_dir, rows, model, ds, test_fp, budget_s, time.perf_counter() - started, names,
                          settings, augment, trust, warnings)
    return rows, meta


def data_warnings(model: str, ds: Dataset, tokenizer: Any = None, test: Dataset | None = None) -> list[str]:
    """What a person must hear before reading the comparison: rows loading dropped for an empty text (as ``train``
    says them), a ``test`` set that shares examples with the training pool ``ds`` (every accuracy then overstates;
    the check ``train`` runs on its splits), and texts the model's vocabulary does not read (every strategy then
    sees little of their meaning; ``data.checks.vocabulary_fit``). ``tokenizer``: the model's, when already loaded
    (else loaded for it)."""
    out = split_warnings({"empty_texts_removed": empty_texts_removed(ds, *([test] if test is not None else []))})
    if test is not None:
        none = replace(ds, inputs=[], labels=[])
        checks = split_checks(ds, none, test)
        out += [line for line in split_warnings({k: checks.get(k) for k in ("overlap", "near_overlap_train_test")
                                                 if k in checks}) if line]
    if ds.modality != "text":
        return out
    tokenizer = tokenizer or load_base(model, task="text-classification").tokenizer
    problem = vocabulary_problem(vocabulary_fit(tokenizer, ds.inputs))
    return out + ([problem] if problem else [])


def _one_test_each(ds: Dataset, n_test: int, shots: int) -> str:
    """The warning for a carved test set of one example a class (``catalog.test_per_class_for``'s least)."""
    counts = ds.counts()
    small = min(counts, key=counts.get)
    why = (f": the smallest class ({small}, {count_of(counts[small], 'example')}) has room for no more beside "
           f"{count_of(shots, 'training example')}" if counts[small] - shots <= 1 else "")  # else asked for
    return (f"the test set holds 1 example a class ({n_test} in all){why}; {n_test} test examples cannot tell "
            "strategies apart: add examples or pass --test FILE")


def _trust_line(row: dict) -> str:
    """The progress line's tail: the largest group gap and the attack's success rate, when measured."""
    parts = []
    if row.get("groups"):
        parts.append(f"group gap {gap_text(row['groups']['accuracy_gap'])}")
    if row.get("robustness"):
        attack = row["robustness"]["attack"]
        parts.append("attack " + (f"{attack['success_rate']:.2f}" if attack else "not run"))
    if row.get("trust_error"):
        parts.append(row["trust_error"])
    return "; " + "; ".join(parts) if parts else ""


def _replace_train(splits, train):
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


def effective_settings(strategy: Strategy, settings: dict) -> dict:
    """The settings a strategy's runs really used: for a ``train`` strategy TRAIN_DEFAULTS, then the strategy's
    own, then the user's (as ``catalog.run_train`` merges them); the other kinds (features, contrastive,
    in-context) read only ``max_length`` (the contrastive recipe keeps its own SetFit defaults for the rest)."""
    if strategy.kind == "train":
        return {**TRAIN_DEFAULTS, **strategy.settings, **settings}
    return {"max_length": settings.get("max_length", TRAIN_DEFAULTS["max_length"])}


def _write_results(out_dir: Path, rows: list[dict], model: str, ds, test_fp: str | None, budget_s, seconds,
                   names: Sequence[str], settings: dict, augment: Sequence[bool], trust: TrustOptions | None,
                   warnings: Sequence[str] = ()) -> dict:
    """results.json: the rows and what they were measured with (``settings``: each strategy's effective
    settings; ``user_settings``: what --set gave; ``warnings``: ``data_warnings``, when there are any)."""
    meta = {"model": model, "data": ds.origin, "modality": ds.modality, "classes": len(ds.label_names),
            "examples": len(ds), "data_sha256": ds.sha256, "test_fingerprint": test_fp,
            "test_examples": max((r["test_examples"] for r in rows), default=None), "budget_s": budget_s,
            "seconds": round(seconds, 1), "date": time.strftime("%Y-%m-%d %H:%M"),
            "user_settings": dict(settings),
            "settings": {n: effective_settings(STRATEGIES[n], settings) for n in names},
            "train_defaults": TRAIN_DEFAULTS, "augment": list(augment),
            "augment_copies": AUGMENT_COPIES if any(augment) else 0,
            "strategies": {n: STRATEGIES[n].description for n in names}}
    if warnings:
        meta["warnings"] = list(warnings)
    if trust is not None:
        meta["trust"] = trust.describe()
    write_file_atomically(out_dir / "results.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return meta
