"""What the two few-shot recipes (``recipes/contrastive.py`` and ``recipes/probe.py``) share: the refusals of
settings they do not use, the run writer (the same data path as every run: ``load_data``, ``make_splits`` with the
config's shots, seeds and test/val carving, the same ``data_card.json`` and ``run.yaml``), scoring with the fitted
``FewShotModel`` (its own ``embed`` and head, nothing re-implemented), the head on disk and the reloading.

``head/`` holds ``head.safetensors`` (logistic: ``coef`` and ``intercept`` as fitted; prototype: ``prototypes``, the
normalized class means; float32) and ``head.json`` (kind, classes, label names, ``C`` or ``temperature`` and the
embedding settings: adapter name or null, pooling, normalize, max_length, max_chunks, batch_size, precision,
autocast). ``load`` rebuilds the very same ``FewShotModel`` (base, precision cast, adapter, embedding settings and
a head whose fitted attributes are the saved ones), so ``eval`` and ``predict`` give what the model in memory gave
at training time (same device and precision). Everything is data (safetensors + JSON); nothing is pickled.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
import torch
from safetensors.torch import save_file
from sklearn.linear_model import LogisticRegression

from graftune.config import is_set
from graftune.core.method import check as check_field
from graftune.core.model import AdapterModel
from graftune.data.card import data_card
from graftune.data.sources import load_data
from graftune.data.splits import make_splits
from graftune.errors import ArtifactError, ConfigError, DataError
from graftune.io import artifact
from graftune.io.artifact import load_adapter, read_json, read_tensors
from graftune.io.atomic import write_dir_atomically
from graftune.recipes.fewshot import FewShotModel, PrototypeClassifier
from graftune.run.loaded import LoadedRun
from graftune.run.log import RunLog, brief
from graftune.run.memory import PeakMemory
from graftune.run.rundir import adapter_name, assembled_run, start_run_dir, write_run_files
from graftune.speed import distributed, precision
from graftune.speed.device import resolve as resolve_device
from graftune.speed.precision import cpu_features
from graftune.tasks import ZOO_TASK, build_task
from graftune.tasks.classification import classification_metrics
from graftune.zoo import load_base

#: the run-config methods of the two few-shot recipes
CONTRASTIVE, PROBE = "contrastive", "probe"
HEAD_DIR = "head"
HEAD_TENSORS = "head.safetensors"
HEAD_META = "head.json"
HEAD_FORMAT = "graftune-fewshot-head"
#: 1: a logistic regression read through an adapter (contrastive runs); 2 adds prototype heads and heads read from
#: the frozen base (``adapter: null``, probe runs). A head is written with the lowest version that describes it.
HEAD_FORMAT_VERSION = 2
HEAD_KINDS = ("logistic", "prototype")

#: what each method runs instead of train()'s epoch loop (for the refusals below)
_INSTEAD = {CONTRASTIVE: "it trains on pairs, then fits a logistic regression",
            PROBE: "it embeds the training texts once with the frozen base, then fits a head"}
_LOOP_FIELDS = ("head_lr", "weight_decay", "grad_accum", "warmup", "schedule", "dropout", "head_init", "base_dropout",
                "clip", "patience", "metric", "compile")


def _unused(method: str) -> dict[str, str]:
    """RunConfig fields that ``method`` does not use (refused when set away from their defaults), with the reason;
    the first one set is the one reported."""
    loop = f"steers train()'s epoch loop, which --method {method} does not run ({_INSTEAD[method]}); drop it"
    if method == CONTRASTIVE:
        own = {"epochs": "--method contrastive makes passes over pairs, not examples; set them with --set epochs=N "
                         "(default 1)",
               "init_from": "--method contrastive trains a fresh LoRA adapter on pairs; warm starts are for the other "
                            "methods, drop --init-from"}
        cache = {"cache_max_mb": "--method contrastive caches every training text (or none: --cache off); drop it"}
    else:
        nothing = "--method probe trains nothing by gradient (it embeds the training texts once, then fits a head)"
        own = {"epochs": f"{nothing}; drop --epochs", "lr": f"{nothing}; drop --lr",
               "batch_size": f"{nothing}; drop --batch-size",
               "init_from": "--method probe reads the frozen base alone; warm starts are for the other methods, drop "
                            "--init-from"}
        cache = {name: "--method probe embeds every text once, there is nothing to cache; drop it"
                 for name in ("cache", "cache_max_mb")}
    return {**own, "stack_under": f"--method {method} does not stack adapters; drop --stack-under",
            "resume": f"a {method} run writes no checkpoints to resume; start it again without --resume",
            **cache, **{name: loop for name in _LOOP_FIELDS}}


# --- config ---------------------------------------------------------------------------------------------------
def check(cfg: Any, allowed: Sequence[str]) -> None:
    """The checks both recipes make before data or a model is loaded: the task, settings that do not apply, and
    the ``--set`` option names (``allowed``); each recipe then checks its options' values."""
    method = cfg.method
    check_field(cfg.task in (None, "classification"), "task",
                f"got {cfg.task}; --method {method} trains text classifiers, use another --method for {cfg.task}")
    for name in unused_settings(cfg, method)[:1]:
        check_field(False, name, _unused(method)[name])
    unknown = sorted(set(cfg.options) - set(allowed))
    if unknown:
        raise ConfigError(f"options for {method}: unknown option(s) {', '.join(unknown)}; "
                          f"use {', '.join(allowed)} (--set key=value)")


def check_positive(opts: dict, names: Sequence[str], *, integer: bool) -> None:
    """Each option of ``names`` that is set is a positive integer (``integer``) or a positive number."""
    for name in names:
        value = opts.get(name, 1)
        kinds = int if integer else (int, float)
        check_field(isinstance(value, kinds) and not isinstance(value, bool) and value > 0, name,
                    f"got {value!r}; use a positive {'integer' if integer else 'number'}")


def unused_settings(cfg: Any, method: str = CONTRASTIVE) -> list[str]:
    """The run-config fields set away from their defaults that ``method`` does not use (``--method auto`` leaves the
    contrastive candidate out when there are any: the run would not honour them)."""
    return [name for name in _unused(method) if is_set(cfg, name)]


def check_data(ds: Any, method: str = CONTRASTIVE) -> None:
    """Single-label text only: both methods read sentence embeddings and fit a single-label head on them."""
    if ds.modality != "text":
        raise DataError(f"{ds.origin}: {ds.modality} data; --method {method} trains text classifiers, use another "
                        "--method (lora, say)")
    if ds.multi_label:
        how = "pairs texts by their one label" if method == CONTRASTIVE else "fits a single-label head"
        raise DataError(f"{ds.origin}: multi-label data; --method {method} {how}, use another --method (lora, say)")


# --- training ---------------------------------------------------------------------------------------------------
def train(cfg: Any, fit: Callable, *, progress: bool = True, splits: Any = None) -> dict:
    """Write the run directory ``cfg.out`` of a few-shot run, return its metrics. ``fit(cfg, model, base, splits,
    log, progress, adapter_name, policy)`` is the recipe's own part: it returns the fitted ``FewShotModel`` and what
    the run reports of it."""
    method = cfg.method
    cfg = cfg.with_defaults(val_size=0)  # a validation part would only take examples from training: nothing reads it
    if distributed.launched():
        raise ConfigError(f"method: {method} trains in one process; start it without torchrun / accelerate launch")
    start_run_dir(cfg, write=False)  # --out taken: say so before loading anything
    # --- data: the same loading and splits as every train() run; refused before a model or a file -------------
    columns = {"text_column": cfg.text_column, "label_column": cfg.label_column,
               "prompt_column": cfg.prompt_column, "response_column": cfg.response_column}
    ds = load_data(cfg.data, task=cfg.task, **columns)
    check_data(ds, method)
    if splits is None:
        user_test = load_data(cfg.test, task=ds.modality, min_classes=1, **columns) if cfg.test else None
        splits = make_splits(ds, test=user_test, **cfg.split_args())
    device = resolve_device(cfg.device)
    # contrastive_fit chooses the same policy for training; a probe only embeds (inference)
    policy = precision.choose(cfg.precision, device, inference=method == PROBE)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    # the whole run is measured, loading included; the log is closed (and a failed run removed) on the way out
    with assembled_run(cfg) as (out, work), PeakMemory() as memory, \
            contextlib.closing(RunLog(work / "log.jsonl", cfg, resumed=False)) as log:
        base = load_base(cfg.model, task=ZOO_TASK["classification"])
        base.check_max_length(cfg.max_length)
        base.model.to(device)
        model = AdapterModel(base.model, family=base.family)
        log.event("start", method=method, model=cfg.model, data=cfg.data, precision=policy.name,
                  train=len(splits.train), val=len(splits.val), test=len(splits.test))
        cpu0 = time.process_time()
        fitted, fit = fit(cfg, model, base, splits, log, progress, adapter_name(out), policy)
        train_cpu = time.process_time() - cpu0
        speed = {"device": str(device), "processes": 1, "cache": fit["cache"], "compile": None,
                 "threads": torch.get_num_threads(), "cpu": cpu_features()}
        log.event("speed", **speed)
        val = score(fitted, splits.val.inputs, splits.val.labels, ds.label_names) if len(splits.val) else None
        if method == CONTRASTIVE:
            log.event("epoch", epoch=fit["epochs"], last_loss=fit["last_loss"], val=brief(val),
                      seconds=time.perf_counter() - started)
        else:
            log.event("fit", head=fit["details"]["head"], val=brief(val), seconds=time.perf_counter() - started)

        # --- test, write the run directory ------------------------------------------------------------------
        scoring = time.perf_counter()
        test = score(fitted, splits.test.inputs, splits.test.labels, ds.label_names)
        scoring = time.perf_counter() - scoring
        adapter_bytes = 0
        if fitted.adapter is not None:
            extra = {"task": "classification", "multi_label": False, "base_model": cfg.model,
                     "pooling": fitted.pooling, "strategy": method}
            artifact.save_adapter(model, fitted.adapter, work / "adapter", label_names=ds.label_names, extra=extra)
            adapter_bytes = (work / "adapter" / artifact.TENSORS_FILE).stat().st_size
        save_head(fitted, work / HEAD_DIR, precision=fit["precision"], label_names=ds.label_names)
        # a logistic regression's weights are fitted; class means are computed, not trained (as compare counts them)
        head_params = int(fitted.head.coef_.size + fitted.head.intercept_.size) if hasattr(fitted.head, "coef_") \
            else 0
        adapter_params = fit["adapter_params"]
        metrics = {
            **test, "trainable_params": adapter_params + head_params,
            "total_params": sum(p.numel() for p in model.base.parameters()) + adapter_params + head_params,
            "adapter_bytes": adapter_bytes, "head_bytes": (work / HEAD_DIR / HEAD_TENSORS).stat().st_size,
            "train_seconds": round(fit["seconds"], 2), "train_cpu_seconds": round(train_cpu, 2),
            "wall_seconds": round(time.perf_counter() - started, 2), "test_seconds": round(scoring, 2),
            "peak_rss_mb": round(memory.peak, 1),
            # contrastive_fit has no early stopping (every epoch of pairs runs) and a probe has no epochs: no epoch
            # is picked on val
            "epochs_run": fit["epochs"], "best_epoch": None, "steps": fit["steps"],
            "stopped_early": False, "epochs": fit["epochs"],
            "precision": fit["precision"], "method": method, "task": "classification", "speed": speed,
            "val": brief(val), method: fit["details"],
        }
        write_run_files(work, cfg, metrics, splits, data_card(splits, source=ds, tokenizer=base.tokenizer))
        log.event("end", test=brief(test), train_seconds=fit["seconds"])
    return metrics


# --- scoring and predictions (the FewShotModel's own embed and head) ------------------------------------------
def outputs(fitted: Any, texts: Sequence[str], label_names: Sequence[str], emb: Any = None
            ) -> tuple[list[str], np.ndarray]:
    """Predicted labels (``head.predict``, as ``FewShotModel.predict``) and probabilities with one column per
    label name (a class the head never saw: 0), from one pass of ``fitted.embed`` (or its result ``emb``)."""
    emb = (fitted.embed(list(texts)) if emb is None else emb).numpy()
    labels = [str(c) for c in fitted.head.predict(emb)]
    proba = fitted.head.predict_proba(emb)
    column = {str(c): j for j, c in enumerate(fitted.head.classes_)}
    out = np.zeros((len(labels), len(label_names)), dtype=np.float64)
    for i, name in enumerate(label_names):
        if name in column:
            out[:, i] = proba[:, column[name]]
    return labels, out


def score(fitted: Any, inputs: Sequence[str], labels: Sequence[str], label_names: Sequence[str], *,
          predictions: bool = False) -> dict:
    """The metrics a classification run reports (``classification_metrics``), plus ``loss``: the mean
    cross-entropy of the head's probabilities (-log p(true class), p clamped at 1e-12); with ``predictions`` also
    ``predicted``, the label predicted for each input (as ``run.scoring.score_classification``)."""
    index = {n: i for i, n in enumerate(label_names)}
    pred, proba = outputs(fitted, inputs, label_names)
    y = np.asarray([index[label] for label in labels])
    metrics = classification_metrics(y, np.asarray([index[p] for p in pred]), list(label_names))
    p_true = np.clip(proba[np.arange(len(y)), y], 1e-12, None)
    metrics["loss"] = float(-np.log(p_true).mean())
    if predictions:
        metrics["predicted"] = [str(p) for p in pred]
    return metrics


def predict_rows(fitted: Any, inputs: Sequence[str], label_names: Sequence[str], embeddings: Any = None
                 ) -> list[dict]:
    """``evaluate.predict``'s rows: ``label`` and ``probabilities`` per class. ``embeddings``: ``fitted.embed(inputs)``
    when the caller has it already (the server keeps it for its drift summary)."""
    pred, proba = outputs(fitted, inputs, label_names, embeddings)
    return [{"label": label, "probabilities": {n: round(float(v), 6) for n, v in zip(label_names, row)}}
            for label, row in zip(pred, proba)]


# --- the head on disk ----------------------------------------------------------------------------------------------
def save_head(fitted: Any, path: Path, *, precision: str, label_names: Sequence[str] | None = None) -> Path:
    """``head.safetensors`` (logistic: ``coef``, ``intercept``; prototype: ``prototypes``; exactly the fitted
    values, in their dtype) and ``head.json`` (kind, classes, label names, ``C`` or ``temperature``, and how the
    embeddings it reads are made), written atomically."""
    head = fitted.head
    if isinstance(head, PrototypeClassifier):
        kind, params = "prototype", {"temperature": float(head.temperature)}
        tensors = {"prototypes": head.prototypes_.detach().contiguous().clone()}
    else:
        # the fitted dtype is kept (float32: the embeddings' own): a float64 copy would predict slightly differently
        kind, params = "logistic", {"C": float(head.C), "sklearn_version": sklearn.__version__}
        tensors = {"coef": torch.from_numpy(np.ascontiguousarray(head.coef_)),
                   "intercept": torch.from_numpy(np.ascontiguousarray(head.intercept_))}
    version = 1 if kind == "logistic" and fitted.adapter is not None else 2
    meta = {"format": HEAD_FORMAT, "format_version": version, "kind": kind,
            "classes": [str(c) for c in head.classes_],
            **({"label_names": list(label_names)} if label_names is not None else {}),
            "n_features": int(next(iter(tensors.values())).shape[-1]), **params,
            "embedding": {"adapter": fitted.adapter, "pooling": fitted.pooling, "normalize": True,
                          "max_length": fitted.max_length, "max_chunks": fitted.max_chunks,
                          "batch_size": fitted.batch_size, "precision": precision,
                          "autocast": fitted.precision is not None},
            "shapes": {k: list(v.shape) for k, v in tensors.items()}}

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / HEAD_TENSORS, metadata={"format": "pt", "graftune": HEAD_FORMAT})
        (tmp / HEAD_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    return write_dir_atomically(path, write, markers=(HEAD_META,))


def load_head(path: Path, method: str = CONTRASTIVE) -> tuple[Any, dict]:
    """The saved head (a scikit-learn ``LogisticRegression`` or a ``fewshot.PrototypeClassifier`` with the saved
    fitted attributes) and ``head.json``; anything missing, corrupt or inconsistent is an ArtifactError naming the
    file."""
    if not path.is_dir():
        raise ArtifactError(f"{path}: missing; a {method} run keeps its head there ({HEAD_META} + {HEAD_TENSORS}), "
                            "train the run again")
    file = path / HEAD_META
    meta = read_json(file)
    kind, version = meta.get("kind"), meta.get("format_version")
    if meta.get("format") != HEAD_FORMAT or kind not in HEAD_KINDS:
        raise ArtifactError(f"{file}: not a graftune few-shot head (format={meta.get('format')!r}, kind={kind!r}); "
                            "train the run again")
    if not isinstance(version, int) or version < 1:
        raise ArtifactError(f"{file}: bad format_version {version!r}; the file is corrupt, train the run again")
    if version > HEAD_FORMAT_VERSION:
        raise ArtifactError(f"{file}: format_version {version} is newer than this graftune reads "
                            f"({HEAD_FORMAT_VERSION}); upgrade graftune or train the run again")
    classes, emb, names = meta.get("classes"), meta.get("embedding"), meta.get("label_names")
    number = "C" if kind == "logistic" else "temperature"

    def strings(x: Any) -> bool:
        return isinstance(x, list) and len(x) >= 2 and all(isinstance(c, str) for c in x)

    ok = (strings(classes) and (names is None or strings(names)) and isinstance(emb, dict)
          and (isinstance(emb.get("adapter"), str) or (emb.get("adapter") is None and version >= 2))
          and (kind == "logistic" or version >= 2)  # version 1 knew logistic heads only
          and emb.get("normalize") is True and isinstance(emb.get("autocast", False), bool)
          and all(isinstance(emb.get(k), int) and emb[k] >= 1 for k in ("max_length", "max_chunks", "batch_size"))
          and isinstance(emb.get("pooling"), str) and isinstance(meta.get(number), (int, float))
          and meta[number] > 0)
    if not ok:
        raise ArtifactError(f"{file}: classes, label names, {number} or embedding settings missing or malformed; "
                            "the file is corrupt, train the run again")
    tensors = read_tensors(path / HEAD_TENSORS)
    head = _logistic(path, meta, tensors) if kind == "logistic" else _prototypes(path, meta, tensors)
    head.classes_ = np.asarray(classes)
    return head, meta


def _logistic(path: Path, meta: dict, tensors: dict) -> Any:
    classes = meta["classes"]
    coef, intercept = tensors.get("coef"), tensors.get("intercept")
    rows = 1 if len(classes) == 2 else len(classes)  # scikit-learn keeps one row for two classes
    if (coef is None or intercept is None or coef.dim() != 2 or coef.shape[0] != rows
            or tuple(intercept.shape) != (rows,) or coef.dtype not in (torch.float32, torch.float64)
            or intercept.dtype != coef.dtype):
        raise ArtifactError(f"{path / HEAD_TENSORS}: expected float coef ({rows} x features) and intercept "
                            f"({rows}) for {len(classes)} classes; the file is corrupt, train the run again")
    head = LogisticRegression(C=float(meta["C"]), max_iter=2000)
    head.coef_, head.intercept_ = coef.numpy(), intercept.numpy()
    head.n_features_in_ = int(coef.shape[1])
    return head


def _prototypes(path: Path, meta: dict, tensors: dict) -> Any:
    rows = len(meta["classes"])
    prototypes = tensors.get("prototypes")
    if prototypes is None or prototypes.dim() != 2 or prototypes.shape[0] != rows \
            or prototypes.dtype != torch.float32:
        raise ArtifactError(f"{path / HEAD_TENSORS}: expected float32 prototypes ({rows} x features), one per class; "
                            "the file is corrupt, train the run again")
    head = PrototypeClassifier(temperature=float(meta["temperature"]))
    head.prototypes_ = prototypes
    return head


# --- reloading a run -------------------------------------------------------------------------------------------------
def fewshot_model(model: Any, tokenizer: Any, head: Any, head_meta: dict, adapter: str | None, policy: Any,
                  method: str) -> FewShotModel:
    """A saved head (``load_head``) on ``model`` (an ``AdapterModel`` holding the run's adapter as ``adapter``, None
    for a probe run), embedding as at training time (``head.json``'s settings; the policy's autocast when it was
    used): ``load`` rebuilds a run this way, and the server on its shared base."""
    emb = head_meta["embedding"]
    strategy = "contrastive-adapter" if method == CONTRASTIVE else f"frozen+{head_meta['kind']}"
    return FewShotModel(model, tokenizer, head, emb["max_length"], emb["pooling"], adapter, emb["batch_size"],
                        {"strategy": strategy}, emb["max_chunks"],
                        precision=policy if emb.get("autocast", False) else None)


def load(run_dir: Path, cfg: Any, meta: dict, kind: str = "classification", *, merge: bool = True,
         quantize: str = "none") -> LoadedRun:
    """The run's ``FewShotModel`` rebuilt as at training time (base, precision cast, adapter of a contrastive run,
    head, embedding settings), in a ``LoadedRun`` whose ``fewshot`` holds it. ``meta``: the adapter's
    ``adapter.json`` (a probe run has none: the label names are in ``head.json``). ``merge`` does not apply: the
    embeddings are read as they were trained."""
    method, run_dir = cfg.method, Path(run_dir)
    if quantize != "none":
        raise ConfigError(f"quantize {quantize}: a {method} run predicts from the float embeddings its head was "
                          "fitted on, which int8 layers would change; drop --quantize")
    head, head_meta = load_head(run_dir / HEAD_DIR, method)  # read and checked before the model is loaded
    emb, file = head_meta["embedding"], run_dir / HEAD_DIR / HEAD_META
    if (emb["adapter"] is None) != (method == PROBE):
        raise ArtifactError(f"{file}: reads adapter {emb['adapter']!r}, which a {method} run does not have; train the "
                            "run again")
    label_names = list(meta.get("label_names") or head_meta.get("label_names") or [])
    if not label_names:
        raise ArtifactError(f"{file}: label_names missing; the file is corrupt, train the run again")
    base = load_base(cfg.model, task=ZOO_TASK["classification"])
    model = AdapterModel(base.model, family=base.family)
    policy = precision.choose(cfg.precision, "cpu", inference=True)
    precision.apply(model.base, policy)  # before the adapter is added: it stays float32, as in training
    name = None
    if emb["adapter"] is not None:
        name = load_adapter(model, run_dir / "adapter").name
        if name != emb["adapter"]:
            raise ArtifactError(f"{file}: reads adapter {emb['adapter']!r} but the run holds {name!r}; train the run "
                                "again")
    model.eval()
    fitted = fewshot_model(model, base.tokenizer, head, head_meta, name, policy, method)
    fitted.report["loaded_from"] = str(run_dir)
    task = build_task("classification", base, label_names=label_names, max_length=cfg.max_length)
    return LoadedRun(cfg, "classification", task, model, None, label_names, False, policy, meta, "none",
                     fewshot=fitted)
