"""The main job (``make demo`` / ``graftune demo``): what graftune is for. On TREC question types (6 classes, 8
labelled questions per class) ``--method auto`` compares the candidate recipes by cross-validation on those 48
training questions only, prints every candidate's score and the pick with its reason, trains the pick, and scores
it on held-out questions next to the frozen-encoder baseline (whole-text embeddings + logistic regression) on the
same split. A few minutes on a 2-core CPU, fully offline.
"""

from __future__ import annotations

import time
from pathlib import Path

from graftune.config import RunConfig
from graftune.core.model import AdapterModel
from graftune.data.sources import load_data
from graftune.data.splits import make_splits
from graftune.recipes.fewshot import frozen_fit
from graftune.recipes.fewshot_run import score
from graftune.run.scoring import linear_probe
from graftune.runs import resolve, train
from graftune.speed import precision
from graftune.tasks import ZOO_TASK, build_task
from graftune.zoo import load_base

#: the demo's run: auto within a budget, on a data set where the choice matters (the frozen probe is not enough)
DEMO = {"model": "minilm", "data": "trec", "method": "auto", "shots": 8, "test_per_class": 50, "split_seed": 0,
        "auto_budget": 120.0}


def demo_config(out: str | Path, *, seed: int = 0, **changes) -> RunConfig:
    """The demo's run config; ``seed`` draws the shots and seeds training, the test set stays fixed (seed 0)."""
    return RunConfig(**{**DEMO, **changes}, seed=seed, out=str(out), overwrite=True)


def probe_baseline(cfg: RunConfig) -> dict:
    """Frozen base + logistic regression on exactly the run's train and test splits. Texts are embedded as
    ``graftune compare``'s linear-probe does (``fewshot.frozen_fit``: L2-normalized mean embeddings, a long text
    read as up to 4 windows), so the baseline is as strong as graftune knows how to make it; other data: the
    pooled features of the task head (``evaluate.linear_probe``)."""
    started = time.perf_counter()
    ds = load_data(cfg.data, text_column=cfg.text_column, label_column=cfg.label_column)
    splits = make_splits(ds, **cfg.split_args())
    base = load_base(cfg.model, task=ZOO_TASK["classification"])
    task = build_task("classification", base, label_names=ds.label_names, max_length=cfg.max_length)
    model = AdapterModel(base.model, family=base.family)  # frozen, so the policy casts it
    policy = precision.choose(cfg.precision, inference=True)
    precision.apply(model.base, policy)
    if ds.modality != "text":
        metrics = linear_probe(task, model, splits.train.inputs, splits.train.labels, splits.test.inputs,
                               splits.test.labels, policy=policy, seed=cfg.seed)
        metrics["trainable_params"] = (task.hidden_size + 1) * len(ds.label_names)  # coef + intercept
    else:
        with policy.autocast():
            fitted = frozen_fit(model, base.tokenizer, splits.train.inputs, splits.train.labels,
                                max_length=cfg.max_length, pooling=task.pooling)
            metrics = score(fitted, splits.test.inputs, splits.test.labels, ds.label_names)
        metrics["trainable_params"] = int(fitted.head.coef_.size + fitted.head.intercept_.size)
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    return metrics


def run_demo(out: str | Path = "runs/demo", *, seed: int = 0, progress: bool = True) -> dict:
    """Pick with auto, train the pick into ``out``, score the baseline; return both metric dicts and the time."""
    started = time.perf_counter()
    cfg = resolve(demo_config(out, seed=seed), progress=progress)
    picked = train(cfg, progress=progress)
    probe = probe_baseline(cfg)
    return {"run_dir": str(out), "picked": picked, "probe": probe, "auto": cfg.auto,
            "seconds": round(time.perf_counter() - started, 1), "config": cfg.to_dict()}


def format_table(result: dict) -> str:
    """The demo's story as text: auto's evidence and pick, then the pick next to the frozen baseline on the test
    set."""
    picked, probe, record = result["picked"], result["probe"], result["auto"]
    lines = [(f"--method auto on {record['training_examples']} training questions ({record['folds']}-fold "
              "cross-validation, the test set untouched):")]
    for name, c in record["candidates"].items():
        lines.append(f"  {name:<12} macro-F1 {c['macro_f1']:.3f} +- {c['macro_f1_se']:.3f} on {c['held_out']} held-out "
                     f"({c['folds']} fold(s)), {c['trainable_params']:,} trained parameters, {c['seconds']:.0f} s")
    lines += [f"picked {record['method']}: {record['reason']}", ""]
    n = picked.get("examples", 0)
    lines.append(f"on {n} held-out questions (seed {result['config']['seed']}):")
    lines.append(f"{'':<44} {'accuracy':>9} {'macro-F1':>9} {'trained params':>15}")
    rows = [(f"auto's pick ({record['method']})", picked), ("frozen MiniLM + logistic regression", probe)]
    lines += [f"{name:<44} {m['accuracy']:>9.3f} {m['macro_f1']:>9.3f} {m['trainable_params']:>15,}"
              for name, m in rows]
    gap = picked["accuracy"] - probe["accuracy"]
    noise = (probe["accuracy"] * (1 - probe["accuracy"]) / max(n, 1)) ** 0.5
    verdict = ("a tie within the test set's sampling noise" if abs(gap) <= noise else
               "ahead of the frozen baseline" if gap > 0 else "behind the frozen baseline")
    lines.append(f"auto's pick is {100 * gap:+.1f} points: {verdict} (one standard error: {100 * noise:.1f} points).")
    hint = f"graftune predict {result['run_dir']} \"How far is the Moon from the Earth?\""
    lines += ["", f"total {result['seconds']:.0f} s; the run is in {result['run_dir']}/ (try: {hint})"]
    return "\n".join(lines)
