"""The main job (``make demo`` / ``graftune demo``): fine-tune the shipped MiniLM on 16 BBC News articles per
class with LoRA, score it on 100 held-out articles per class, and compare with the frozen-encoder baseline
(mean-pooled embeddings + logistic regression) on the same split. Minutes on a 2-core CPU, fully offline.
"""

from __future__ import annotations

import time
from pathlib import Path

from graftune.config import RunConfig

#: the demo's recipe (bench/issue3_bbc.py measures it over seeds)
DEMO = {"model": "minilm", "data": "bbc-news", "method": "lora", "options": {"r": 8, "alpha": 16}, "shots": 16,
        "test_per_class": 100, "split_seed": 0, "val_size": 0, "epochs": 10, "lr": 2e-3, "head_lr": 1e-2,
        "batch_size": 16, "max_length": 256, "head_init": "random"}


def demo_config(out: str | Path, *, seed: int = 0, **changes) -> RunConfig:
    """The demo's run config; ``seed`` draws the shots and seeds training, the test set stays fixed (seed 0)."""
    return RunConfig(**{**DEMO, **changes}, seed=seed, out=str(out), overwrite=True)


def probe_baseline(cfg: RunConfig) -> dict:
    """Frozen base + logistic regression on exactly the run's train and test splits. Texts are embedded as
    ``graftune compare``'s linear-probe does (``fewshot.frozen_fit``: L2-normalized mean embeddings, a long text
    read as up to 4 windows), so the baseline is as strong as graftune knows how to make it; other data: the
    pooled features of the task head (``evaluate.linear_probe``)."""
    from graftune.core.model import AdapterModel
    from graftune.data.sources import load_data
    from graftune.data.splits import make_splits
    from graftune.recipes.fewshot import frozen_fit
    from graftune.recipes.fewshot_run import score
    from graftune.run.scoring import linear_probe
    from graftune.speed import precision
    from graftune.tasks import ZOO_TASK, build_task
    from graftune.zoo import load_base

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


def run_demo(out: str | Path = "runs/demo-bbc", *, seed: int = 0, progress: bool = True) -> dict:
    """Train the demo run into ``out``, score the baseline; return both metric dicts and the total time."""
    from graftune.runs import train

    started = time.perf_counter()
    cfg = demo_config(out, seed=seed)
    lora = train(cfg, progress=progress)
    probe = probe_baseline(cfg)
    return {"run_dir": str(out), "lora": lora, "probe": probe, "seconds": round(time.perf_counter() - started, 1),
            "config": cfg.to_dict()}


def format_table(result: dict) -> str:
    """The demo's comparison as a small text table."""
    lora, probe = result["lora"], result["probe"]
    rows = [("frozen MiniLM + logistic regression", probe["accuracy"], probe["macro_f1"], probe["trainable_params"],
             probe["seconds"]),
            (f"LoRA r=8 (q,v) + head, {result['config']['epochs']} epochs", lora["accuracy"], lora["macro_f1"],
             lora["trainable_params"], lora["wall_seconds"])]
    n = lora.get("examples", 0)
    lines = [f"BBC News, 16 articles per class for training, {n} held-out articles (seed {result['config']['seed']})",
             "",
             f"{'':<40} {'accuracy':>9} {'macro-F1':>9} {'trained params':>15} {'seconds':>8}"]
    lines += [f"{name:<40} {acc:>9.3f} {f1:>9.3f} {params:>15,} {sec:>8.1f}" for name, acc, f1, params, sec in rows]
    hint = f"graftune predict {result['run_dir']} \"Shares rose after the merger\""
    lines += ["", f"total {result['seconds']:.0f} s; the run is in {result['run_dir']}/ (try: {hint})"]
    return "\n".join(lines)
