"""``graftune train --method contrastive``: the SetFit recipe of ``fewshot.contrastive_fit`` as a saved run.

The run goes through the same data path as every other ``train()`` run (``load_data``, ``make_splits`` with the
config's shots, seeds and test/val carving, the same ``data_card.json`` and ``run.yaml``), then:

1. ``contrastive_fit`` trains a LoRA adapter on pairs of training texts (same class: cosine 1, other class: 0)
   and fits a scikit-learn logistic regression on the adapted, L2-normalized, window-averaged embeddings;
2. the test split is scored with that ``FewShotModel`` (its own ``embed`` and head, nothing re-implemented);
3. the run directory gets ``adapter/`` (``io.artifact.save_adapter``: the LoRA adapter, no task head) and
   ``head/`` (``head.safetensors``: ``coef`` and ``intercept`` as fitted, float32; ``head.json``: the classes, ``C``
   and the embedding settings: adapter name, pooling, normalize, max_length, max_chunks, batch_size).

``load_contrastive`` (called by ``evaluate.load_run`` for such runs) rebuilds the very same ``FewShotModel``:
base, precision cast, adapter, embedding settings and a ``LogisticRegression`` whose fitted attributes are the
saved ones, so ``eval`` and ``predict`` give what the model in memory gave at training time (same device and
precision). Everything is data (safetensors + JSON); nothing is pickled.

Mapping of the run config onto ``contrastive_fit``: ``lr``, ``batch_size`` (pairs per step), ``seed``,
``precision`` and ``cache`` (``off``: no frozen-prefix cache) pass through; ``max_length`` is the embedding
length the head reads (``embed_max_length``), and pairs train on ``min(128, max_length)`` tokens, as ``graftune
compare`` runs it. ``--set`` takes ``OPTIONS``. Settings of ``train()``'s own loop (``--epochs``, ``--patience``,
``--schedule``, ...) do not apply and are refused away from their defaults, as are warm starts and stacking.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graftune.core.method import check
from graftune.errors import ArtifactError, ConfigError, DataError

CONTRASTIVE = "contrastive"
HEAD_DIR = "head"
HEAD_TENSORS = "head.safetensors"
HEAD_META = "head.json"
HEAD_FORMAT = "graftune-fewshot-head"
HEAD_FORMAT_VERSION = 1
#: ``--set`` options: ``contrastive_fit``'s own keyword arguments ...
FIT_OPTIONS = ("iterations", "epochs", "loss", "temperature", "head_c", "embed_max_chunks")
#: ... and the options of its LoRA adapter (default: r=8, alpha=16, attention projections of the top 2 layers)
LORA_OPTIONS = ("r", "alpha", "top_k_layers")
OPTIONS = FIT_OPTIONS + LORA_OPTIONS
#: tokens per text while training on pairs, at most (the head reads ``max_length``), as ``graftune compare`` does
PAIR_MAX_LENGTH = 128

_LOOP = "steers train()'s epoch loop, which --method contrastive does not run (it trains on pairs, then fits a " \
        "logistic regression); drop it"
#: RunConfig fields that contrastive training does not use: refused when set away from their defaults
_UNUSED = {
    "epochs": "--method contrastive makes passes over pairs, not examples; set them with --set epochs=N "
              "(default 1)",
    "init_from": "--method contrastive trains a fresh LoRA adapter on pairs; warm starts are for the other "
                 "methods, drop --init-from",
    "stack_under": "--method contrastive does not stack adapters; drop --stack-under",
    "resume": "a contrastive run writes no checkpoints to resume; start it again without --resume",
    "cache_max_mb": "--method contrastive caches every training text (or none: --cache off); drop it",
    **{name: _LOOP for name in ("head_lr", "weight_decay", "grad_accum", "warmup", "schedule", "dropout",
                                "head_init", "base_dropout", "clip", "patience", "metric", "compile")},
}


# --- config ---------------------------------------------------------------------------------------------------
def check_config(cfg: Any) -> None:
    """Called by ``RunConfig`` for ``method: contrastive``: everything that can be refused before data or a model
    is loaded (the task, settings that do not apply, the ``--set`` options and their values)."""
    from graftune.core.method import make_config
    from graftune.strategies.fewshot import LOSSES

    check(cfg.task in (None, "classification"), "task",
          f"got {cfg.task}; --method contrastive trains text classifiers, use another --method for {cfg.task}")
    for name in unused_settings(cfg)[:1]:
        check(False, name, _UNUSED[name])
    unknown = sorted(set(cfg.options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"options for contrastive: unknown option(s) {', '.join(unknown)}; "
                          f"use {', '.join(OPTIONS)} (--set key=value)")
    opts = cfg.options
    for name in ("iterations", "epochs", "embed_max_chunks"):
        value = opts.get(name, 1)
        check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name,
              f"got {value!r}; use a positive integer")
    for name in ("temperature", "head_c"):
        value = opts.get(name, 1.0)
        check(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, name,
              f"got {value!r}; use a positive number")
    check(opts.get("loss", "cosine") in LOSSES, "loss", f"got {opts.get('loss')!r}; use one of {', '.join(LOSSES)}")
    try:
        make_config("lora", **{k: opts[k] for k in LORA_OPTIONS if k in opts})
    except TypeError as e:
        raise ConfigError(f"options for contrastive: {e}") from None


def unused_settings(cfg: Any) -> list[str]:
    """The run-config fields set away from their defaults that contrastive training does not use (``--method
    auto`` leaves the contrastive candidate out when there are any: the run would not honour them)."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    return [name for name in _UNUSED if getattr(cfg, name) != defaults[name]]


def check_data(ds: Any) -> None:
    """Single-label text only: contrastive pairs compare the sentence embeddings of two texts by their class."""
    if ds.modality != "text":
        raise DataError(f"{ds.origin}: {ds.modality} data; --method contrastive trains text classifiers, use another "
                        "--method (lora, say)")
    if ds.multi_label:
        raise DataError(f"{ds.origin}: multi-label data; --method contrastive pairs texts by their one label, use "
                        "another --method (lora, say)")


def fit_arguments(cfg: Any, *, family: str | None, pooling: str | None, adapter_name: str = "fewshot") -> dict:
    """The keyword arguments of ``contrastive_fit`` (besides model, tokenizer, texts, labels) that ``cfg`` asks
    for, on a base of ``family`` with the zoo's ``pooling``."""
    from graftune.strategies.fewshot import _default_options

    opts = cfg.options
    lora = {**_default_options("lora", family), **{k: opts[k] for k in LORA_OPTIONS if k in opts}}
    return {"body": "adapter", "method": "lora", "method_options": lora, "lr": cfg.lr, "batch_size": cfg.batch_size,
            "seed": cfg.seed, "max_length": min(PAIR_MAX_LENGTH, cfg.max_length), "embed_max_length": cfg.max_length,
            "precision": cfg.precision, "cache": cfg.cache != "off", "pooling": pooling, "head": "logistic",
            "adapter_name": adapter_name, **{k: opts[k] for k in FIT_OPTIONS if k in opts}}


# --- training ---------------------------------------------------------------------------------------------------
def train_contrastive(cfg: Any, *, progress: bool = True, splits: Any = None) -> dict:
    """``train(cfg)`` for ``method: contrastive``: write the run directory ``cfg.out``, return its metrics."""
    from graftune.core.model import AdapterModel
    from graftune.data.card import data_card
    from graftune.data.sources import load_data
    from graftune.data.splits import make_splits
    from graftune.io import artifact
    from graftune.speed import distributed
    from graftune.speed import precision as _precision
    from graftune.speed.device import resolve as resolve_device
    from graftune.strategies.fewshot import contrastive_fit
    from graftune.tasks import ZOO_TASK
    from graftune.train import _brief, _finish_run_dir, _progress, _RunLog, _start_run_dir, adapter_name, peak_rss_mb
    from graftune.zoo import load_base

    if distributed.launched():
        raise ConfigError("method: contrastive trains in one process; start it without torchrun / accelerate launch")
    _start_run_dir(cfg, write=False)  # --out taken: say so before loading anything
    # --- data: the same loading and splits as every train() run; refused before a model or a file -------------
    columns = {"text_column": cfg.text_column, "label_column": cfg.label_column,
               "prompt_column": cfg.prompt_column, "response_column": cfg.response_column}
    ds = load_data(cfg.data, task=cfg.task, **columns)
    check_data(ds)
    if splits is None:
        user_test = load_data(cfg.test, task=ds.modality, **columns) if cfg.test else None
        splits = make_splits(ds, test=user_test, **cfg.split_args())
    device = resolve_device(cfg.device)
    policy_name = _precision.choose(cfg.precision, device).name  # what contrastive_fit will choose
    out, work = _start_run_dir(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started, log = time.perf_counter(), None
    try:
        base = load_base(cfg.model, task=ZOO_TASK["classification"])
        base.model.to(device)
        model = AdapterModel(base.model, family=base.family)
        log = _RunLog(work / "log.jsonl", cfg, resumed=False)
        log.event("start", method=CONTRASTIVE, model=cfg.model, data=cfg.data, precision=policy_name,
                  train=len(splits.train), val=len(splits.val), test=len(splits.test))
        fit_args = fit_arguments(cfg, family=base.family, pooling=base.pooling, adapter_name=adapter_name(out))
        epochs = fit_args.get("epochs", 1)  # contrastive_fit's default
        bar = None

        def on_step(info: dict) -> None:
            nonlocal bar
            if bar is None:
                bar = _progress(info["steps"], 0, progress)
            per_epoch = info["steps"] // epochs
            log.event("step", epoch=math.ceil(info["step"] / per_epoch), step=info["step"], loss=info["loss"],
                      lr=info["lr"])
            bar.update(1)
            bar.set_postfix_str(f"loss {info['loss']:.4f}", refresh=False)

        cpu0 = time.process_time()
        fitted = contrastive_fit(model, base.tokenizer, splits.train.inputs, splits.train.labels, on_step=on_step,
                                 **fit_args)
        train_cpu = time.process_time() - cpu0
        if bar is not None:
            bar.close()
        report = fitted.report
        speed = {"device": str(device), "processes": 1, "cache": report["cache"], "compile": None}
        log.event("speed", **speed)
        val = score(fitted, splits.val.inputs, splits.val.labels, ds.label_names) if len(splits.val) else None
        log.event("epoch", epoch=epochs, last_loss=report["last_loss"],
                  val=_brief(val), seconds=time.perf_counter() - started)

        # --- test, write the run directory ------------------------------------------------------------------
        test = score(fitted, splits.test.inputs, splits.test.labels, ds.label_names)
        extra = {"task": "classification", "multi_label": False, "base_model": cfg.model, "pooling": fitted.pooling,
                 "strategy": CONTRASTIVE}
        artifact.save_adapter(model, fitted.adapter, work / "adapter", label_names=ds.label_names, extra=extra)
        save_head(fitted, work / HEAD_DIR, precision=report["precision"])
        head_params = int(fitted.head.coef_.size + fitted.head.intercept_.size)
        adapter_params = int(report["trainable_params"])
        metrics = {
            **test, "trainable_params": adapter_params + head_params,
            "total_params": sum(p.numel() for p in model.base.parameters()) + adapter_params + head_params,
            "adapter_bytes": (work / "adapter" / artifact.TENSORS_FILE).stat().st_size,
            "head_bytes": (work / HEAD_DIR / HEAD_TENSORS).stat().st_size,
            "train_seconds": round(report["seconds"], 2), "train_cpu_seconds": round(train_cpu, 2),
            "wall_seconds": round(time.perf_counter() - started, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
            # the pairs' epochs all run: contrastive_fit has no early stopping, so no epoch is picked on val
            "epochs_run": epochs, "best_epoch": None, "steps": report["steps"],
            "precision": report["precision"], "method": CONTRASTIVE, "task": "classification", "speed": speed,
            "val": _brief(val),
            "contrastive": {k: report[k] for k in ("pairs", "loss", "first_loss", "last_loss", "lr", "max_length",
                                                   "embed_max_length", "embed_max_chunks", "train_seconds",
                                                   "head_seconds", "texts_embedded_per_step")},
        }
        if cfg.auto:  # picked by --method auto: the record goes with the run, as for the other methods
            metrics["auto"] = cfg.auto
        (work / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        (work / "data_card.json").write_text(json.dumps(data_card(splits, source=ds), indent=2) + "\n",
                                             encoding="utf-8")
        log.event("end", test=_brief(test), train_seconds=report["seconds"])
        log.close()
        log = None
    except BaseException:
        if log is not None:
            log.close()
        shutil.rmtree(work, ignore_errors=True)  # nothing to resume: a failed run leaves no trace
        raise
    _finish_run_dir(work, out, cfg)
    return metrics


# --- scoring and predictions (the FewShotModel's own embed and head) ------------------------------------------
def _outputs(fitted: Any, texts: Sequence[str], label_names: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Predicted labels (``head.predict``, as ``FewShotModel.predict``) and probabilities with one column per
    label name (a class the head never saw: 0), from one pass of ``fitted.embed``."""
    emb = fitted.embed(list(texts)).numpy()
    labels = [str(c) for c in fitted.head.predict(emb)]
    proba = fitted.head.predict_proba(emb)
    column = {str(c): j for j, c in enumerate(fitted.head.classes_)}
    out = np.zeros((len(labels), len(label_names)), dtype=np.float64)
    for i, name in enumerate(label_names):
        if name in column:
            out[:, i] = proba[:, column[name]]
    return labels, out


def score(fitted: Any, inputs: Sequence[str], labels: Sequence[str], label_names: Sequence[str]) -> dict:
    """The metrics a classification run reports (``classification_metrics``), plus ``loss``: the mean
    cross-entropy of the head's probabilities (-log p(true class), p clamped at 1e-12)."""
    from graftune.tasks.classification import classification_metrics

    index = {n: i for i, n in enumerate(label_names)}
    pred, proba = _outputs(fitted, inputs, label_names)
    y = np.asarray([index[label] for label in labels])
    metrics = classification_metrics(y, np.asarray([index[p] for p in pred]), list(label_names))
    p_true = np.clip(proba[np.arange(len(y)), y], 1e-12, None)
    metrics["loss"] = float(-np.log(p_true).mean())
    return metrics


def predict_rows(fitted: Any, inputs: Sequence[str], label_names: Sequence[str]) -> list[dict]:
    """``evaluate.predict``'s rows: ``label`` and ``probabilities`` per class."""
    pred, proba = _outputs(fitted, inputs, label_names)
    return [{"label": label, "probabilities": {n: round(float(v), 6) for n, v in zip(label_names, row)}}
            for label, row in zip(pred, proba)]


# --- the head on disk ----------------------------------------------------------------------------------------------
def save_head(fitted: Any, path: Path, *, precision: str) -> Path:
    """``head.safetensors`` (``coef``, ``intercept``: exactly the fitted values, in their dtype) and ``head.json`` (classes,
    C, and how the embeddings it reads are made), written atomically."""
    import sklearn
    from safetensors.torch import save_file

    from graftune.io.artifact import write_dir_atomically

    head = fitted.head
    # the fitted dtype is kept (float32: the embeddings' own): a float64 copy would predict slightly differently
    tensors = {"coef": torch.from_numpy(np.ascontiguousarray(head.coef_)),
               "intercept": torch.from_numpy(np.ascontiguousarray(head.intercept_))}
    meta = {"format": HEAD_FORMAT, "format_version": HEAD_FORMAT_VERSION, "kind": "logistic",
            "classes": [str(c) for c in head.classes_], "n_features": int(head.coef_.shape[1]), "C": float(head.C),
            "embedding": {"adapter": fitted.adapter, "pooling": fitted.pooling, "normalize": True,
                          "max_length": fitted.max_length, "max_chunks": fitted.max_chunks,
                          "batch_size": fitted.batch_size, "precision": precision},
            "shapes": {k: list(v.shape) for k, v in tensors.items()}, "sklearn_version": sklearn.__version__}

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / HEAD_TENSORS, metadata={"format": "pt", "graftune": HEAD_FORMAT})
        (tmp / HEAD_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    return write_dir_atomically(path, write, markers=(HEAD_META,))


def load_head(path: Path) -> tuple[Any, dict]:
    """The saved logistic regression (a scikit-learn ``LogisticRegression`` with the saved fitted attributes) and
    ``head.json``; anything missing, corrupt or inconsistent is an ArtifactError naming the file."""
    from sklearn.linear_model import LogisticRegression

    from graftune.io.artifact import read_json, read_tensors

    if not path.is_dir():
        raise ArtifactError(f"{path}: missing; a contrastive run keeps its logistic-regression head there "
                            f"({HEAD_META} + {HEAD_TENSORS}), train the run again")
    file = path / HEAD_META
    meta = read_json(file)
    if meta.get("format") != HEAD_FORMAT or meta.get("kind") != "logistic":
        raise ArtifactError(f"{file}: not a graftune logistic-regression head (format={meta.get('format')!r}); "
                            "train the run again")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > HEAD_FORMAT_VERSION:
        raise ArtifactError(f"{file}: format_version {meta.get('format_version')!r} is not one this graftune reads "
                            f"(up to {HEAD_FORMAT_VERSION}); upgrade graftune or train the run again")
    classes, emb = meta.get("classes"), meta.get("embedding")
    ok = (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)
          and isinstance(emb, dict) and isinstance(emb.get("adapter"), str) and emb.get("normalize") is True
          and all(isinstance(emb.get(k), int) and emb[k] >= 1 for k in ("max_length", "max_chunks", "batch_size"))
          and isinstance(emb.get("pooling"), str) and isinstance(meta.get("C"), (int, float)))
    if not ok:
        raise ArtifactError(f"{file}: classes, C or embedding settings missing or malformed; the file is corrupt, "
                            "train the run again")
    tensors = read_tensors(path / HEAD_TENSORS)
    coef, intercept = tensors.get("coef"), tensors.get("intercept")
    rows = 1 if len(classes) == 2 else len(classes)  # scikit-learn keeps one row for two classes
    if (coef is None or intercept is None or coef.dim() != 2 or coef.shape[0] != rows
            or tuple(intercept.shape) != (rows,) or coef.dtype not in (torch.float32, torch.float64)
            or intercept.dtype != coef.dtype):
        raise ArtifactError(f"{path / HEAD_TENSORS}: expected float coef ({rows} x features) and intercept "
                            f"({rows}) for {len(classes)} classes; the file is corrupt, train the run again")
    head = LogisticRegression(C=float(meta["C"]), max_iter=2000)
    head.coef_, head.intercept_ = coef.numpy(), intercept.numpy()
    head.classes_, head.n_features_in_ = np.asarray(classes), int(coef.shape[1])
    return head, meta


# --- reloading a run -------------------------------------------------------------------------------------------------
def load_contrastive(run_dir: Path, cfg: Any, meta: dict, *, quantize: str = "none") -> Any:
    """For ``evaluate.load_run``: the run's ``FewShotModel`` rebuilt as at training time (base, precision cast,
    adapter, head, embedding settings), in a ``LoadedRun`` whose ``fewshot`` holds it."""
    from graftune.core.model import AdapterModel
    from graftune.evaluate import LoadedRun
    from graftune.io.artifact import load_adapter
    from graftune.speed import precision as _precision
    from graftune.strategies.fewshot import FewShotModel
    from graftune.tasks import ZOO_TASK, build_task
    from graftune.zoo import load_base

    if quantize != "none":
        raise ConfigError(f"quantize {quantize}: a contrastive run predicts from the float embeddings its "
                          "logistic-regression head was fitted on, which int8 layers would change; drop --quantize")
    head, head_meta = load_head(Path(run_dir) / HEAD_DIR)  # read and checked before the model is loaded
    emb = head_meta["embedding"]
    label_names = list(meta.get("label_names") or [])
    base = load_base(cfg.model, task=ZOO_TASK["classification"])
    model = AdapterModel(base.model, family=base.family)
    policy = _precision.choose(cfg.precision, "cpu", inference=True)
    _precision.apply(model.base, policy)  # before the adapter is added: it stays float32, as in training
    name = load_adapter(model, Path(run_dir) / "adapter").name
    if name != emb["adapter"]:
        raise ArtifactError(f"{Path(run_dir) / HEAD_DIR / HEAD_META}: reads adapter {emb['adapter']!r} but the run "
                            f"holds {name!r}; train the run again")
    model.eval()
    fitted = FewShotModel(model, base.tokenizer, head, emb["max_length"], emb["pooling"], name, emb["batch_size"],
                          {"strategy": "contrastive-adapter", "loaded_from": str(run_dir)}, emb["max_chunks"])
    task = build_task("classification", base, label_names=label_names, max_length=cfg.max_length)
    return LoadedRun(cfg, "classification", task, model, None, label_names, False, policy, meta, "none",
                     fewshot=fitted)
