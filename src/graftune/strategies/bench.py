"""``graftune bench``: the comparison on several data sets at once, with ``--method auto`` judged by its regret.

The work is a list of independent jobs, one per (data set, strategy, shots, seed) (``plan_jobs``), and one pure
function ``run_job(spec) -> row`` that runs one of them from the spec alone: it loads the data, carves the splits
with ``catalog.make_compare_splits`` (so every strategy of one (data set, shots, seed) sees the very same training
examples, and every run of a data set the same test set), runs the strategy with the catalog's runners, and returns
a row. ``auto`` is a job like the others: ``strategies.auto.auto_pick`` chooses on the job's training examples only
(by cross-validation; the test set is never read), then the pick is trained through its recipe on the same splits,
as ``graftune train --method auto`` would train it, and scored on the shared test set.

Because a job needs nothing but its spec, the jobs run in this process one after the other, or as Ray tasks on a
local Ray instance or a cluster (``run_jobs(..., ray_address=...)``): the rows come back in job order and are the
same either way, timings aside. Ray is optional (``pip install ray``); without it the bench runs locally.

``summarize_bench`` turns the rows into the per data set table: the best strategy, the frozen probe and auto side
by side, and auto's regret (the best strategy's mean accuracy minus auto's, over the same seeds).
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import platform
import socket
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from graftune.config import RunConfig
from graftune.data.card import fingerprint
from graftune.data.sources import ALIASES
from graftune.errors import ConfigError
from graftune.io.atomic import write_file_atomically
from graftune.recipes import adapter, contrastive, probe
from graftune.recipes.fewshot_run import unused_settings
from graftune.run.rundir import check_out
from graftune.strategies import auto
from graftune.strategies.catalog import (
    IN_CONTEXT_MODEL,
    STRATEGIES,
    Frozen,
    NotApplicable,
    check_settings,
    load_compare_data,
    make_compare_splits,
    run_strategy,
    test_per_class_for,
)
from graftune.strategies.report.bench import AUTO_BEST, render_bench

#: the built-in classification aliases (``data.sources.ALIASES``): the text sets and the image set
DEFAULT_DATA = ("bbc-news", "trec", "rotten-tomatoes", "sms-spam", "convention-2012", "digits")
DEFAULT_SHOTS = (8, 16)
DEFAULT_SEEDS = 3
#: the frozen baselines, the strongest fine-tuning recipes of compare; ``all`` runs every strategy of the catalog
DEFAULT_STRATEGIES = ("linear-probe", "prototypes", "contrastive", "lora")
#: the base model per modality (zoo aliases)
DEFAULT_MODELS = {"text": "minilm", "image": "efficientnet-lite0"}
AUTO = "auto"
PROBE = "linear-probe"
#: row keys that measure time or memory: they differ from run to run, everything else is reproducible
TIMING_KEYS = ("wall_seconds", "train_seconds", "selection_seconds", "reason")
FILES = ("bench.json", "bench.html", "bench.md")


@dataclass(frozen=True)
class JobSpec:
    """Everything one job needs, and nothing else (it travels to a Ray worker as is).

    ``test_per_class`` is fixed per data set by the planner (from the largest shot count), so the test set of a
    data set is the same for every job of it."""

    data: str
    strategy: str
    shots: int
    seed: int
    model: str
    test_per_class: int
    settings: dict = field(default_factory=dict)
    text_column: str = "text"
    label_column: str = "label"
    auto_budget: float = 300.0

    def key(self) -> str:
        return f"{self.data} {self.strategy} shots={self.shots} seed={self.seed}"


def check_inputs(data: Sequence[str], *, shots: Sequence[int], seeds: int, strategies: Sequence[str],
                 budget_s: float | None = None, auto_budget: float = 300.0,
                 settings: dict | None = None) -> tuple[list[str], list[int], list[int], list[str], dict]:
    """The bench's choices checked, before any data or model is loaded: one-line ``ConfigError`` otherwise.
    Returns (data sets, shots, seeds, strategies, settings); ``all`` in ``strategies`` means every one."""
    data = list(dict.fromkeys(d for d in data if d))
    if not data:
        raise ConfigError(f"--data: name at least one data set, e.g. --data {','.join(DEFAULT_DATA[:2])}")
    shots = sorted({int(k) for k in shots})
    if not shots or shots[0] < 1:
        raise ConfigError(f"--shots {shots}: use positive counts such as 8,16")
    if int(seeds) < 1:
        raise ConfigError(f"--seeds {seeds}: use at least 1 (seeds 0..N-1 are run)")
    names = list(STRATEGIES) if "all" in strategies else list(dict.fromkeys(strategies))
    unknown = [n for n in names if n not in STRATEGIES and n != AUTO]
    if unknown or not names:
        raise ConfigError(f"--strategies: unknown {', '.join(unknown) or '(none given)'}; use some of "
                          f"{', '.join(STRATEGIES)}, {AUTO} or all")
    if budget_s is not None and not 0 < budget_s < math.inf:  # also refuses NaN; inf is no JSON number
        raise ConfigError(f"--budget {budget_s:g}: use a positive number of seconds per data set, e.g. --budget 900")
    if not 0 < auto_budget < math.inf:
        raise ConfigError(f"--auto-budget {auto_budget:g}: use a positive number of seconds, e.g. 300")
    return data, shots, list(range(int(seeds))), names, check_settings(settings)


def describe_data(data: Sequence[str], shots: Sequence[int], *, text_column: str = "text",
                  label_column: str = "label") -> dict[str, dict]:
    """Per data set: its modality, size, classes and the test examples per class. Loads each one and carves every
    split now (cheap, no model), so data that cannot be used (unknown alias, too few examples for the shots) is a
    one-line error before any job runs."""
    out = {}
    for name in data:
        ds, _ = load_compare_data(name, None, text_column, label_column)
        per_class = test_per_class_for(ds, shots)
        for k in shots:
            make_compare_splits(ds, shots=k, seed=0, test_per_class=per_class)
        out[name] = {"origin": ds.origin, "modality": ds.modality, "examples": len(ds),
                     "classes": len(ds.label_names), "test_per_class": per_class,
                     "test_examples": per_class * len(ds.label_names)}
    return out


def plan_jobs(datasets: dict[str, dict], *, shots: Sequence[int], seeds: Sequence[int], strategies: Sequence[str],
              models: dict[str, str] | None = None, settings: dict | None = None, with_auto: bool = True,
              auto_budget: float = 300.0, text_column: str = "text", label_column: str = "label") -> list[JobSpec]:
    """The job list (``datasets`` as ``describe_data`` returns it). Per data set, seeds outermost and shots next
    (under a budget every shot count gets a seed before any gets a second); within one split the cheap strategies
    first, then auto, then the trained ones."""
    models = {**DEFAULT_MODELS, **(models or {})}
    names = [n for n in STRATEGIES if n in strategies]  # the catalog's order: cheapest first
    if with_auto or AUTO in strategies:
        cheap = [n for n in names if STRATEGIES[n].kind == "features"]
        names = cheap + [AUTO] + [n for n in names if n not in cheap]
    jobs = []
    for name, info in datasets.items():
        for seed in seeds:
            for k in shots:
                jobs += [JobSpec(data=name, strategy=s, shots=int(k), seed=int(seed), model=models[info["modality"]],
                                 test_per_class=int(info["test_per_class"]), settings=dict(settings or {}),
                                 text_column=text_column, label_column=label_column, auto_budget=float(auto_budget))
                         for s in names]
    return jobs


# --- one job ------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _dataset(data: str, text_column: str, label_column: str):
    """A data set loaded once per process (a Ray worker runs many jobs of the same data set)."""
    return load_compare_data(data, None, text_column, label_column)[0]


@functools.lru_cache(maxsize=2)
def _frozen(model: str, data: str, text_column: str, label_column: str, max_length: int) -> Frozen:
    """The frozen base of the feature strategies, loaded once per process and data set (it caches the test
    features, which are the same for every job of the data set)."""
    return Frozen(model, _dataset(data, text_column, label_column), max_length)


#: the recipes auto's pick can name, apart from the adapter loop's methods (as ``graftune.runs.RECIPES`` has them)
_PICK_RECIPES = {probe.METHOD: probe, contrastive.METHOD: contrastive}


def run_job(spec: JobSpec, train_fn: Callable | None = None) -> dict:
    """Run one job from its spec alone and return its row: the split fingerprints, accuracy, macro-F1, trained
    parameters, times; ``skipped`` (not applicable) or ``error`` (one line) instead of the metrics when it did not
    finish. ``train_fn``: the adapter loop's training function (tests pass a fake); default the real one."""
    ds = _dataset(spec.data, spec.text_column, spec.label_column)
    splits = make_compare_splits(ds, shots=spec.shots, seed=spec.seed, test_per_class=spec.test_per_class)
    test_fp = fingerprint(splits.test)
    in_context = spec.strategy in STRATEGIES and STRATEGIES[spec.strategy].kind == "in-context"
    row: dict[str, Any] = {"data": spec.data, "strategy": spec.strategy, "shots": spec.shots, "seed": spec.seed,
                           "model": IN_CONTEXT_MODEL if in_context else spec.model,  # the model that ran
                           "train_examples": len(splits.train),
                           "test_examples": len(splits.test), "train_fingerprint": fingerprint(splits.train),
                           "test_fingerprint": test_fp}
    started = time.perf_counter()
    columns = {"text_column": spec.text_column, "label_column": spec.label_column}
    try:
        if spec.strategy == AUTO:
            result = _run_auto(spec, splits, columns, train_fn)
        else:
            with tempfile.TemporaryDirectory(prefix="graftune-bench-") as scratch:
                result = run_strategy(
                    STRATEGIES[spec.strategy], model=spec.model, data_spec=spec.data, splits=splits, seed=spec.seed,
                    settings=spec.settings, work=Path(scratch) / "run", columns=columns,
                    train_fn=train_fn or adapter.train, test_key=test_fp,
                    frozen=lambda: _frozen(spec.model, spec.data, spec.text_column, spec.label_column,
                                           int(spec.settings.get("max_length", 256))))
    except NotApplicable as e:
        return {**row, "skipped": f"not applicable: {e}"}
    except Exception as e:  # noqa: BLE001 (one failing job must not end the bench: its row says why)
        return {**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
    fp = result.pop("run_test_fingerprint", None)
    result.pop("predict", None)  # a row is data (it may travel back from a Ray worker): the model stays here
    result.pop("predicted", None)
    if fp is not None and fp != test_fp:
        return {**row, "error": "the run's test set differs from the bench's (bug)"}
    return {**row, **result, "wall_seconds": round(time.perf_counter() - started, 2)}


def _run_auto(spec: JobSpec, splits, columns: dict, train_fn: Callable | None) -> dict:
    """``--method auto`` on the job's training examples, as ``graftune train --method auto`` runs it: the config
    asks for exactly the bench's split (test carved with seed 0, ``test_per_class`` per class, the shots drawn with
    the job's seed), so ``auto_pick`` cross-validates on the same training examples the other strategies got and
    never reads the test set; the pick is then trained through its recipe on the given splits."""
    with tempfile.TemporaryDirectory(prefix="graftune-bench-auto-") as scratch:
        cfg = RunConfig(model=spec.model, data=spec.data, method=AUTO, seed=spec.seed, split_seed=0,
                        shots=spec.shots, test_per_class=spec.test_per_class, val_size=0,
                        out=str(Path(scratch) / "run"),
                        auto_budget=spec.auto_budget, **columns, **spec.settings)
        # bench's --set (epochs=5, lr, ...) is for the strategies that use it, as the other jobs apply it: the
        # adapter loop's settings would make `train --method auto` drop its contrastive and probe candidates (set
        # there, they mean "I am configuring LoRA"), so they are held back from the selection and given to the pick
        # only when it trains through the adapter loop
        loop = set(unused_settings(cfg)) | set(unused_settings(cfg, method=probe.METHOD))
        held = {k: v for k, v in spec.settings.items() if k in loop}
        if held:
            cfg = cfg.replace(**{f.name: f.default for f in fields(RunConfig) if f.name in held})
        picked = auto.resolve(cfg, progress=False, train_fn=train_fn)
        recipe = _PICK_RECIPES.get(picked.method, adapter)
        if held and recipe is adapter:
            picked = picked.replace(**held)
        recipe.check_config(picked)
        fit = train_fn if recipe is adapter and train_fn is not None else recipe.train
        m = fit(picked, progress=False, splits=splits)
        card = Path(picked.out) / "data_card.json"
        test_fp = json.loads(card.read_text())["splits"]["test"]["fingerprint"] if card.is_file() else None
    record = picked.auto or {}
    options = picked.options or {}
    pick = "prototypes" if options.get("head") == "prototype" else picked.method
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "trainable_params": int(m["trainable_params"]),
            "train_seconds": m["train_seconds"], "pick": pick, "reason": record.get("reason", ""),
            "selection_seconds": record.get("seconds"), "auto_training_examples": record.get("training_examples"),
            "run_test_fingerprint": test_fp}


# --- running the jobs -----------------------------------------------------------------------------------------------
def import_ray():
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise ConfigError("--ray needs Ray, which is not installed: pip install ray (or pip install "
                          "'graftune[ray]'), or drop --ray to run the jobs here") from None


class RayStartError(ConfigError):
    """Ray did not start (``--ray local``) or could not be reached (an address)."""


def check_ray_reachable(address: str | None) -> None:
    """For ``--ray HOST:PORT`` or ``ray://HOST:PORT``: one TCP connection (5 s at most) before anything is written.
    ``ray.init`` alone retries an address nobody answers on for minutes, logging every try (a plain GCS address
    was seen still retrying after 9 minutes). ``local``, ``auto`` and a missing port are left to ``ray.init``."""
    if not address or address in ("local", "auto"):
        return
    url = urlparse(address if "://" in address else f"gcs://{address}")
    try:
        host, port = url.hostname, url.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        return
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        raise RayStartError(f"--ray {address}: nothing answers at {host}:{port} ({e.strerror or e}); check the "
                            "address and `ray status` there, or drop --ray to run the jobs here") from None


def start_ray(ray, address: str) -> None:
    """``ray.init`` for ``--ray ADDRESS``; a failure is one line naming the address and what to check."""
    check_ray_reachable(address)
    try:
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        else:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    except Exception as e:  # noqa: BLE001 (Ray raises many kinds: connection, timeout, version mismatch)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        where = ("a local Ray instance did not start" if address == "local" else
                 f"could not connect to the Ray cluster at {address}")
        raise RayStartError(f"--ray {address}: {where} ({first[:200]}); check `ray status` there, or drop --ray to "
                            "run the jobs here") from None


def run_jobs(jobs: Sequence[JobSpec], *, ray_address: str | None = None, budget_s: float | None = None,
             train_fn: Callable | None = None, on_row: Callable[[list[dict | None]], None] | None = None,
             say: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Run ``jobs`` here (in order) or as Ray tasks (``ray_address``: ``local`` starts a Ray instance on this
    machine, else ``ray://HOST:10001`` or a cluster address); the rows come back in job order either way.

    ``budget_s`` bounds the seconds spent per data set (the sum of its jobs' wall times): before a job starts, its
    time is estimated from the finished jobs of the same data set and strategy (the first one is the measurement);
    a job that would not fit gets a row saying so. Under Ray at most as many jobs are in flight as the cluster has
    CPUs when there is a budget (their estimates count as spent). ``on_row`` is called with the rows so far (None
    for those not done) after each job."""
    rows: list[dict | None] = [None] * len(jobs)
    spent: dict[str, float] = {}
    walls: dict[tuple, list[tuple[int, float]]] = {}  # (data, strategy) -> [(shots, wall seconds)]

    def estimate(spec: JobSpec) -> float | None:
        seen = walls.get((spec.data, spec.strategy))
        if not seen:
            return None
        same = [w for k, w in seen if k == spec.shots]
        return statistics.mean(same) if same else statistics.mean(w * spec.shots / k for k, w in seen)

    def over_budget(spec: JobSpec, reserved: float = 0.0) -> str | None:
        if budget_s is None:
            return None
        left = budget_s - spent.get(spec.data, 0.0) - reserved
        est = estimate(spec)
        if left <= 0 or (est is not None and est > left):
            est_text = f"est. {est:.0f} s, " if est is not None else ""
            return f"would exceed the {budget_s:g} s budget of {spec.data} ({est_text}{max(left, 0):.0f} s left)"
        return None

    def done(i: int, row: dict) -> None:
        rows[i] = row
        spec = jobs[i]
        if "wall_seconds" in row:
            spent[spec.data] = spent.get(spec.data, 0.0) + row["wall_seconds"]
            walls.setdefault((spec.data, spec.strategy), []).append((spec.shots, row["wall_seconds"]))
        say(f"[bench] {spec.key()}: " + (f"accuracy {row['accuracy']:.3f} ({row['wall_seconds']:.0f} s)"
                                         + (f", picked {row['pick']}" if "pick" in row else "")
                                         if "accuracy" in row else row.get("skipped") or row.get("error", "")))
        if on_row is not None:
            on_row(rows)

    def skip_row(spec: JobSpec, why: str) -> dict:
        return {"data": spec.data, "strategy": spec.strategy, "shots": spec.shots, "seed": spec.seed,
                "model": spec.model, "skipped": why}

    if ray_address is None:
        for i, spec in enumerate(jobs):
            why = over_budget(spec)
            done(i, skip_row(spec, why) if why else run_job(spec, train_fn))
        return rows  # type: ignore[return-value]

    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        start_ray(ray, ray_address)
    try:
        task = ray.remote(num_cpus=1)(run_job)
        limit = len(jobs) if budget_s is None else max(1, int(ray.cluster_resources().get("CPU", 1)))
        pending = list(range(len(jobs)))
        flying: dict[Any, int] = {}
        while pending or flying:
            while pending and len(flying) < limit:
                i = pending.pop(0)
                spec = jobs[i]
                reserved = sum(estimate(jobs[j]) or 0.0 for j in flying.values() if jobs[j].data == spec.data)
                why = over_budget(spec, reserved)
                if why:
                    done(i, skip_row(spec, why))
                    continue
                ref = task.remote(spec, train_fn) if train_fn is not None else task.remote(spec)
                flying[ref] = i
            if flying:
                ready, _ = ray.wait(list(flying), num_returns=1)
                for ref in ready:
                    done(flying.pop(ref), ray.get(ref))
    finally:
        if started_here:
            ray.shutdown()
    return rows  # type: ignore[return-value]


# --- the summary ----------------------------------------------------------------------------------------------
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize_bench(rows: Sequence[dict]) -> dict:
    """The numbers of a bench, from its rows.

    ``strategies``: per (data set, shots, strategy) the mean and std of accuracy over its finished seeds, macro-F1,
    times, and auto's picks. ``sets``: per (data set, shots) the best strategy, the frozen probe and auto side by
    side over the SAME seeds: those on which auto finished; a strategy missing one of them is left out of "best"
    (named in ``incomplete``). ``regret`` = best mean accuracy minus auto's, negative where auto was above every
    other strategy (``auto_best``); ``auto_minus_probe`` = auto's minus the probe's. ``overall``: the mean and the
    largest regret over the sets, and auto minus probe on average."""
    finished = [r for r in rows if r and "accuracy" in r]
    groups: dict[tuple, list[dict]] = {}
    for r in finished:
        groups.setdefault((r["data"], r["shots"], r["strategy"]), []).append(r)
    order = [*STRATEGIES, AUTO]
    strategies = []
    for (data, k, name), rs in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1], order.index(g[0][2]))):
        acc, acc_std = _mean_std([r["accuracy"] for r in rs])
        entry = {"data": data, "shots": k, "strategy": name, "runs": len(rs), "seeds": sorted(r["seed"] for r in rs),
                 "accuracy": acc, "accuracy_std": acc_std,
                 "macro_f1": statistics.mean(r["macro_f1"] for r in rs),
                 "train_seconds": statistics.mean(r["train_seconds"] for r in rs),
                 "wall_seconds": statistics.mean(r["wall_seconds"] for r in rs),
                 "trainable_params": int(statistics.mean(r["trainable_params"] for r in rs))}
        if name == AUTO:
            entry["picks"] = dict(Counter(r["pick"] for r in rs))
        strategies.append(entry)

    sets = []
    for data, k in dict.fromkeys((r["data"], r["shots"]) for r in rows if r):
        by_seed = {(r["strategy"], r["seed"]): r for r in finished if r["data"] == data and r["shots"] == k}
        names = [n for n in order if any(s == n for s, _ in by_seed)]
        auto_seeds = sorted(seed for s, seed in by_seed if s == AUTO)
        seeds = auto_seeds or sorted({seed for _, seed in by_seed})
        means, incomplete = {}, []
        for n in names:
            if all((n, s) in by_seed for s in seeds):
                means[n] = _mean_std([by_seed[(n, s)]["accuracy"] for s in seeds])
            else:
                incomplete.append(n)
        others = {n: v for n, v in means.items() if n != AUTO}
        entry: dict[str, Any] = {"data": data, "shots": k, "seeds": seeds, "incomplete": incomplete,
                                 "best": None, "best_accuracy": None, "probe_accuracy": None, "auto_accuracy": None,
                                 "regret": None, "auto_best": False, "auto_minus_probe": None}
        if others:
            best = max(others, key=lambda n: others[n][0])
            entry.update(best=best, best_accuracy=others[best][0], best_std=others[best][1],
                         best_seconds=statistics.mean(by_seed[(best, s)]["wall_seconds"] for s in seeds))
        if PROBE in means:
            entry.update(probe_accuracy=means[PROBE][0], probe_std=means[PROBE][1])
        if AUTO in means:
            entry.update(auto_accuracy=means[AUTO][0], auto_std=means[AUTO][1],
                         auto_seconds=statistics.mean(by_seed[(AUTO, s)]["wall_seconds"] for s in seeds),
                         auto_picks=dict(Counter(by_seed[(AUTO, s)]["pick"] for s in seeds)))
            if entry["best_accuracy"] is not None:
                entry["regret"] = entry["best_accuracy"] - entry["auto_accuracy"]
                entry["auto_best"] = entry["regret"] < 0
            if entry["probe_accuracy"] is not None:
                entry["auto_minus_probe"] = entry["auto_accuracy"] - entry["probe_accuracy"]
        sets.append(entry)

    regrets = [s["regret"] for s in sets if s["regret"] is not None]
    gains = [s["auto_minus_probe"] for s in sets if s["auto_minus_probe"] is not None]
    overall = {"sets": len(sets), "mean_regret": statistics.mean(regrets) if regrets else None,
               "max_regret": max(regrets) if regrets else None,
               "sets_within_1_point": sum(g <= 0.01 + 1e-9 for g in regrets),
               "mean_auto_minus_probe": statistics.mean(gains) if gains else None}
    missed = [r for r in rows if r and "accuracy" not in r]
    return {"strategies": strategies, "sets": sets, "overall": overall,
            "not_finished": [{k: r.get(k) for k in ("data", "strategy", "shots", "seed", "skipped", "error")
                              if r.get(k) is not None} for r in missed]}


def _pct(v: float | None, std: float | None = None) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" + (f" ± {100 * std:.1f}" if std else "")


def _points(v: float | None, signed: bool = False) -> str:
    return "-" if v is None else (f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}")


def _seconds(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def format_markdown(summary: dict, meta: dict) -> str:
    """The tables for bench/RESULTS.md: per (data set, shots) the best strategy, the frozen probe and auto side by
    side (accuracy in %, mean ± std over seeds; regret and auto - probe in points; a negative regret says that auto
    was above every other strategy), then every strategy's accuracy, then what did not finish."""
    header = ("| data set | shots | seeds | best strategy | best acc. % | linear-probe % | auto % | auto's picks | "
              "regret (pts) | auto − probe (pts) | auto s | best's s |")
    intro = (f"`{meta.get('command', 'graftune bench')}` — {meta.get('date')}, {meta.get('machine')}; "
             f"{meta.get('seconds')} s in all.")
    lines = [intro, "", header, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary["sets"]:
        picks = ", ".join(f"{n} ×{c}" for n, c in (s.get("auto_picks") or {}).items()) or "-"
        cells = [s["data"], s["shots"], len(s["seeds"]), s["best"] or "-", _pct(s["best_accuracy"], s.get("best_std")),
                 _pct(s["probe_accuracy"], s.get("probe_std")), _pct(s["auto_accuracy"], s.get("auto_std")), picks,
                 _points(s["regret"]) + (f" ({AUTO_BEST})" if s["auto_best"] else ""),
                 _points(s["auto_minus_probe"], True), _seconds(s.get("auto_seconds")),
                 _seconds(s.get("best_seconds"))]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    o = summary["overall"]
    if o["mean_regret"] is not None:
        lines += ["", f"auto's regret: {_points(o['mean_regret'])} points on average, {_points(o['max_regret'])} at "
                      f"most; within 1 point on {o['sets_within_1_point']} of {o['sets']} set(s)."
                  + (f" auto − probe: {_points(o['mean_auto_minus_probe'], True)} points on average."
                     if o["mean_auto_minus_probe"] is not None else "")]
    names = [n for n in [*STRATEGIES, AUTO] if any(e["strategy"] == n for e in summary["strategies"])]
    if names:
        cell = {(e["data"], e["shots"], e["strategy"]): e for e in summary["strategies"]}
        lines += ["", "| data set | shots | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for data, k in dict.fromkeys((e["data"], e["shots"]) for e in summary["strategies"]):
            vals = [cell.get((data, k, n)) for n in names]
            lines.append(f"| {data} | {k} | " + " | ".join(
                f"{_pct(e['accuracy'], e['accuracy_std'])} ({e['wall_seconds']:.0f} s)" if e else "-" for e in vals)
                + " |")
    if summary["not_finished"]:
        lines += ["", f"Not finished ({len(summary['not_finished'])}): " + "; ".join(
            f"{r['data']} {r['strategy']} shots={r['shots']} seed={r['seed']}: {r.get('skipped') or r.get('error')}"
            for r in summary["not_finished"][:12])]
    return "\n".join(lines) + "\n"


def machine() -> str:
    """The CPU's model name and core count, for the record."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def is_bench(path: Path) -> bool:
    """A folder ``graftune bench`` wrote (what ``--overwrite`` may replace)."""
    return (Path(path) / "bench.json").is_file()


def write_outputs(out_dir: Path, rows: Sequence[dict | None], meta: dict, *, finished: bool) -> dict:
    """bench.json (every row, the summary, the meta) and, once finished, bench.html and bench.md; each file written
    atomically, so an interrupted bench leaves a valid bench.json of the jobs done so far (``finished: false``)."""
    done = [r for r in rows if r is not None]
    summary = summarize_bench(done)
    meta = {**meta, "finished": finished}
    write_file_atomically(out_dir / "bench.json", json.dumps({"meta": meta, "summary": summary, "rows": done},
                                                             indent=2) + "\n")
    if finished:
        write_file_atomically(out_dir / "bench.md", format_markdown(summary, meta))
        write_file_atomically(out_dir / "bench.html", render_bench(summary, meta))
    return summary


def run_bench(data: Sequence[str] = DEFAULT_DATA, *, out_dir: str | Path, shots: Sequence[int] = DEFAULT_SHOTS,
              seeds: int = DEFAULT_SEEDS, strategies: Sequence[str] = DEFAULT_STRATEGIES, with_auto: bool = True,
              auto_budget: float = 300.0, budget_s: float | None = None, models: dict[str, str] | None = None,
              settings: dict | None = None, ray_address: str | None = None, text_column: str = "text",
              label_column: str = "label", overwrite: bool = False, progress: bool = True,
              train_fn: Callable | None = None, command: str = "") -> dict:
    """The whole bench: check everything (choices, Ray, every data set and split, ``out_dir``) before any job
    runs, run the jobs, write bench.json / bench.html / bench.md into ``out_dir``. Returns the summary.

    ``budget_s`` is per data set (see ``run_jobs``); ``auto_budget`` is auto's own selection budget (its default
    is ``train --method auto``'s). ``overwrite`` replaces a folder an earlier bench wrote (or an empty one)."""
    data, shots, seed_list, names, settings = check_inputs(data, shots=shots, seeds=seeds, strategies=strategies,
                                                           budget_s=budget_s, auto_budget=auto_budget,
                                                           settings=settings)
    if ray_address is not None:
        if not ray_address.strip():
            raise ConfigError("--ray: give local or a cluster address, e.g. --ray local or --ray ray://HOST:10001")
        import_ray()
    out_dir = check_out(out_dir, overwrite=overwrite, what="bench folder", is_ours=is_bench)
    # local files as absolute paths: a Ray worker's working directory is not this one
    data = [d if d in ALIASES or not Path(d).exists() else str(Path(d).resolve()) for d in data]
    datasets = describe_data(data, shots, text_column=text_column, label_column=label_column)
    jobs = plan_jobs(datasets, shots=shots, seeds=seed_list, strategies=names, models=models, settings=settings,
                     with_auto=with_auto, auto_budget=auto_budget, text_column=text_column,
                     label_column=label_column)
    started = time.perf_counter()
    meta = {"command": command or "graftune bench", "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(),
            "data": datasets, "shots": shots, "seeds": seed_list, "strategies": [j for j in dict.fromkeys(
                s.strategy for s in jobs)], "models": {**DEFAULT_MODELS, **(models or {})}, "settings": settings,
            "budget_s": budget_s, "auto_budget_s": auto_budget, "ray": ray_address, "jobs": len(jobs),
            "jobs_list": [asdict(j) for j in jobs]}
    check_ray_reachable(ray_address)  # before the folder exists: a wrong address leaves nothing behind
    out_dir.mkdir(parents=True, exist_ok=True)
    say = print if progress else (lambda s: None)
    say(f"[bench] {len(jobs)} jobs on {len(datasets)} data set(s)" + (f", as Ray tasks ({ray_address})"
                                                                       if ray_address else ""))

    def checkpoint(rows):
        write_outputs(out_dir, rows, {**meta, "seconds": round(time.perf_counter() - started, 1)}, finished=False)

    rows = run_jobs(jobs, ray_address=ray_address, budget_s=budget_s, train_fn=train_fn, on_row=checkpoint, say=say)
    return write_outputs(out_dir, rows, {**meta, "seconds": round(time.perf_counter() - started, 1)}, finished=True)
