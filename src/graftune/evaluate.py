"""Metrics, predictions and generation: on a model in memory (used by the training loop) or on a finished run
directory (``graftune eval / predict / generate``).

A run directory is loaded back from its own ``run.yaml`` (which base, which task settings) and ``adapter/``
(the adapter, the head and the label names); LoRA-like adapters are merged into the (bf16) weights for speed, or,
with ``quantize="int8"``, into float32 weights whose Linear layers then become dynamic int8 (``speed/quantize.py``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftune.config import FEWSHOT_METHODS, RunConfig, build_config
from graftune.errors import ArtifactError, ConfigError, DataError
from graftune.speed import precision
from graftune.tasks import ZOO_TASK, Task, batches, build_task
from graftune.tasks.classification import classification_metrics, decide, probabilities

HEAD_ONLY = "head"
#: inputs encoded at a time during evaluation: bounds the memory of encoded images (224 px: 0.6 MB each)
_CHUNK = 256


# --- on a model in memory ------------------------------------------------------------------------------------
@torch.inference_mode()
def logits_of(task: Task, model: nn.Module, head: nn.Module | None, inputs: Sequence[Any], *,
              batch_size: int = 32, policy: precision.Precision | None = None) -> torch.Tensor:
    """Float32 logits for ``inputs`` in their order (batched by length, padded per batch)."""
    model.eval()
    if head is not None:
        head.eval()
    autocast = policy.autocast if policy is not None else _no_autocast
    parts: list[torch.Tensor] = []
    for start in range(0, len(inputs), _CHUNK):
        examples = task.encode(inputs[start:start + _CHUNK])
        out: list[torch.Tensor | None] = [None] * len(examples)
        lengths = [task.length(e) for e in examples]
        for idx in batches(examples, lengths, batch_size):
            with autocast():
                logits = task.forward(model, head, task.collate([examples[i] for i in idx])).float()
            for row, i in enumerate(idx):
                out[i] = logits[row]
        parts.extend(out)
    return torch.stack(parts) if parts else torch.zeros(0)


def score_classification(task: Task, model: nn.Module, head: nn.Module, inputs: Sequence[Any],
                         labels: Sequence[Any], *, batch_size: int = 32,
                         policy: precision.Precision | None = None) -> dict:
    """accuracy, macro-F1, per-class P/R/F1, confusion matrix and mean loss of ``head(model(inputs))``."""
    from graftune.tasks.classification import classification_loss, encode_labels

    logits = logits_of(task, model, head, inputs, batch_size=batch_size, policy=policy)
    y = encode_labels(labels, task.label_names, task.multi_label)
    target = torch.tensor(y, dtype=torch.float32 if task.multi_label else torch.long)
    pred = decide(probabilities(logits, task.multi_label), task.multi_label)
    metrics = classification_metrics(target.long().numpy(), pred.numpy(), task.label_names, task.multi_label)
    metrics["loss"] = float(classification_loss(logits, target, task.multi_label))
    return metrics


@torch.inference_mode()
def score_causal_lm(task: Task, model: nn.Module, pairs: Sequence[tuple[str, str]], *, batch_size: int = 8,
                    policy: precision.Precision | None = None, generate: bool = True,
                    max_new_tokens: int = 64) -> dict:
    """Perplexity of the responses given the prompts; with ``generate``, also greedy answers scored by
    ``generation_metrics`` (exact match, JSON validity when the references are JSON)."""
    from graftune.tasks.causal_lm import generation_metrics

    model.eval()
    autocast = policy.autocast if policy is not None else _no_autocast
    examples = task.encode(pairs)
    total, count = 0.0, 0
    for idx in batches(examples, [task.length(e) for e in examples], batch_size):
        batch = task.collate([examples[i] for i in idx])
        with autocast():
            logits = task.forward(model, None, batch)
        loss_sum, n = task.token_loss(logits, batch)
        total, count = total + float(loss_sum), count + int(n)
    loss = total / max(count, 1)
    metrics: dict[str, Any] = {"loss": loss, "perplexity": float(torch.tensor(loss).exp()), "tokens": count}
    if generate and pairs:
        with autocast():
            answers = task.generate(model, [p for p, _ in pairs], max_new_tokens=max_new_tokens,
                                    batch_size=batch_size)
        metrics.update(generation_metrics(answers, [r for _, r in pairs]))
        metrics["samples"] = [{"prompt": p, "reference": r, "generated": a}
                              for (p, r), a in list(zip(pairs, answers))[:5]]
    return metrics


def linear_probe(task: Task, model: nn.Module, train_inputs: Sequence[Any], train_labels: Sequence[Any],
                 test_inputs: Sequence[Any], test_labels: Sequence[Any], *, batch_size: int = 32,
                 policy: precision.Precision | None = None, seed: int = 0) -> dict:
    """The frozen-encoder baseline: pooled features of the frozen base + scikit-learn logistic regression."""
    from sklearn.linear_model import LogisticRegression

    from graftune.tasks.classification import encode_labels

    if task.multi_label:
        raise DataError("the linear-probe baseline handles single-label data only")
    x_train = features_of(task, model, train_inputs, batch_size=batch_size, policy=policy).numpy()
    x_test = features_of(task, model, test_inputs, batch_size=batch_size, policy=policy).numpy()
    clf = LogisticRegression(max_iter=2000, random_state=seed)
    clf.fit(x_train, encode_labels(train_labels, task.label_names, False))
    pred = clf.predict(x_test)
    return classification_metrics(encode_labels(test_labels, task.label_names, False), pred, task.label_names)


def features_of(task: Task, model: nn.Module, inputs: Sequence[Any], *, batch_size: int = 32,
                policy: precision.Precision | None = None) -> torch.Tensor:
    """The pooled float32 features the head reads, for ``inputs`` in their order."""
    return logits_of(_FeatureTask(task), model, None, inputs, batch_size=batch_size, policy=policy)


class _FeatureTask:
    """A task whose "logits" are the pooled features (for the linear probe)."""

    def __init__(self, task: Task):
        self.task = task

    def __getattr__(self, name):
        return getattr(self.task, name)

    def forward(self, model, head, batch):
        return self.task.features(model, batch)


def _no_autocast():
    import contextlib

    return contextlib.nullcontext()


# --- on a run directory --------------------------------------------------------------------------------------
@dataclass
class LoadedRun:
    """A finished run, ready to predict: its config, task, adapted model, head and precision policy."""

    cfg: RunConfig
    kind: str
    task: Task
    model: nn.Module
    head: nn.Module | None
    label_names: list[str]
    multi_label: bool
    policy: precision.Precision
    meta: dict
    quantize: str = "none"
    #: a ``--method contrastive`` or ``probe`` run: its ``strategies.fewshot.FewShotModel`` (embeddings + a head),
    #: which scores and predicts instead of ``task``/``head``
    fewshot: Any = None


def load_run(run_dir: str | Path, *, merge: bool = True, expect: str | None = None,
             quantize: str | None = None) -> LoadedRun:
    """Load ``RUN_DIR`` (``run.yaml`` + ``adapter/``) onto its base model, in eval mode. ``expect``
    (``classifier`` or ``causal-lm``) fails before any model is loaded when the run is of the other kind.
    ``quantize="int8"``: merge the adapters into the float32 weights and make the base's Linear layers dynamic
    int8 (``speed/quantize.py``; runs without bf16 autocast; refused for adapters that cannot be merged). Only
    the model in memory changes, never the run directory."""
    from graftune.core.model import AdapterModel
    from graftune.io.artifact import load_adapter, read_head_state, read_meta
    from graftune.speed import quantize as quantization
    from graftune.zoo import load_base

    quantize = quantization.check_choice(quantize)
    if quantize != "none" and not merge:
        raise ConfigError(f"quantize {quantize} needs the adapters merged: drop merge=False")
    run_dir = Path(run_dir)
    cfg = build_config(run_dir / "run.yaml") if (run_dir / "run.yaml").is_file() else None
    probe = cfg is not None and cfg.method == "probe"  # the frozen base + a fitted head: no adapter/
    if cfg is None or not (probe or (run_dir / "adapter").is_dir()):
        raise ArtifactError(f"{run_dir}: not a run directory (expected run.yaml and adapter/ written by "
                            "`graftune train --out`)")
    meta = {"extra": {"task": "classification"}} if probe else read_meta(run_dir / "adapter")
    extra = meta.get("extra") or {}
    kind = extra.get("task") or cfg.task or "classification"
    if expect == "causal-lm" and kind != "causal-lm":
        raise DataError("this run is a classifier: use `graftune predict RUN_DIR TEXT` (generate is for causal-LM "
                        "runs)")
    if expect == "classifier" and kind == "causal-lm":
        raise DataError("this run is a causal-LM run: use `graftune generate RUN_DIR \"prompt\"`")
    if cfg.method in FEWSHOT_METHODS:
        from graftune.strategies.fewshot_run import load_fewshot_run

        return load_fewshot_run(run_dir, cfg, meta, quantize=quantize)
    label_names = list(meta.get("label_names") or [])
    multi_label = bool(extra.get("multi_label", False))
    base = load_base(cfg.model, task=ZOO_TASK[kind])
    model = AdapterModel(base.model, family=base.family)
    task = build_task(kind, base, label_names=label_names, multi_label=multi_label, max_length=cfg.max_length,
                      dropout=cfg.dropout)
    from graftune.strategies.transfer import load_stack

    active = load_stack(model, run_dir, meta.get("name"))  # a frozen adapter stacked under the trained one
    if meta["method"] != HEAD_ONLY:
        active.append(load_adapter(model, run_dir / "adapter").name)
    model.set_active(*active)
    head = None
    if kind != "causal-lm":
        state, _ = read_head_state(run_dir / "adapter")
        head = task.build_head()
        head.load_state_dict(state)
        head.eval()
    # int8 layers take float32 only: the rest of an int8 model stays float32, without autocast
    policy = precision.choose("fp32" if quantize == "int8" else cfg.precision, inference=True)
    precision.apply(model.base, policy)
    if merge and model.active and all(model.info[n].method.capabilities.mergeable for n in model.active):
        model.merge(*model.active)
    if quantize == "int8":
        quantization.quantize_int8(model)
    model.eval()
    return LoadedRun(cfg, kind, task, model, head, label_names, multi_label, policy, meta, quantize)


def evaluate_run(run_dir: str | Path, *, data: str | None = None, text_column: str | None = None,
                 label_column: str | None = None, prompt_column: str | None = None,
                 response_column: str | None = None, batch_size: int = 32, generate: bool = True,
                 quantize: str | None = None) -> dict:
    """Metrics of a run on ``data`` (every example), or, without ``data``, on the run's own test split (rebuilt
    from run.yaml: same data, seed and split settings). ``quantize="int8"``: see :func:`load_run`; the metrics
    then say ``"quantize": "int8"``."""
    from graftune.data.sources import load_data
    from graftune.data.splits import make_splits

    run = load_run(run_dir, quantize=quantize)
    cfg = run.cfg
    columns = {"text_column": text_column or cfg.text_column, "label_column": label_column or cfg.label_column,
               "prompt_column": prompt_column or cfg.prompt_column,
               "response_column": response_column or cfg.response_column}
    if data is None:
        ds = load_data(cfg.data, task=run.kind, **_columns(cfg))
        test = load_data(cfg.test, task=run.kind, **_columns(cfg)) if cfg.test else None
        ds = make_splits(ds, test=test, **cfg.split_args()).test
    else:
        ds = load_data(data, task=run.kind, **columns)
    quantized = {"quantize": run.quantize} if run.quantize != "none" else {}
    if run.kind == "causal-lm":
        return score_causal_lm(run.task, run.model, ds.inputs, batch_size=min(batch_size, 8), policy=run.policy,
                               generate=generate, max_new_tokens=cfg.max_new_tokens) | quantized
    unseen = sorted({n for lab in ds.labels for n in (lab if ds.multi_label else (lab,))} - set(run.label_names))
    if unseen:
        raise DataError(f"{ds.origin}: labels the run was not trained on: {', '.join(unseen[:5])}; "
                        f"it knows {', '.join(run.label_names)}")
    if run.fewshot is not None:  # contrastive/probe: at the saved embedding batch size (padding as in training)
        from graftune.strategies.fewshot_run import score

        return score(run.fewshot, ds.inputs, ds.labels, run.label_names)
    return score_classification(run.task, run.model, run.head, ds.inputs, ds.labels, batch_size=batch_size,
                                policy=run.policy) | quantized


def _columns(cfg: RunConfig) -> dict:
    return {"text_column": cfg.text_column, "label_column": cfg.label_column, "prompt_column": cfg.prompt_column,
            "response_column": cfg.response_column}


def predict(run: LoadedRun, inputs: Sequence[Any], *, batch_size: int = 32) -> list[dict]:
    """One dict per input: ``label`` (or ``labels`` for multi-label) and ``probabilities`` per class."""
    if run.kind == "causal-lm":
        raise DataError("this run is a causal-LM run: use `graftune generate RUN_DIR \"prompt\"`")
    if run.fewshot is not None:
        from graftune.strategies.fewshot_run import predict_rows

        return predict_rows(run.fewshot, list(inputs), run.label_names)
    logits = logits_of(run.task, run.model, run.head, list(inputs), batch_size=batch_size, policy=run.policy)
    probs = probabilities(logits, run.multi_label)
    out = []
    for row in probs:
        p = {name: round(float(v), 6) for name, v in zip(run.label_names, row)}
        if run.multi_label:
            out.append({"labels": [n for n, v in p.items() if v >= 0.5], "probabilities": p})
        else:
            out.append({"label": run.label_names[int(row.argmax())], "probabilities": p})
    return out


def generate(run: LoadedRun, prompts: Sequence[str], *, max_new_tokens: int | None = None) -> list[str]:
    """Greedy answers of a causal-LM run to ``prompts``."""
    if run.kind != "causal-lm":
        raise DataError("this run is a classifier: use `graftune predict RUN_DIR TEXT` (generate is for causal-LM "
                        "runs)")
    with run.policy.autocast():
        return run.task.generate(run.model, list(prompts), max_new_tokens=max_new_tokens or run.cfg.max_new_tokens)


def read_inputs(path: str | Path, *, kind: str = "classification", text_column: str = "text") -> list[Any]:
    """Inputs to predict: a .txt file (one text per line), a .jsonl/.csv/.tsv file (the text column), or for
    image runs a list of image files / a folder of them."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file; pass a .txt (one text per line), .jsonl or .csv file")
    if kind == "image":
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        return [read_image(f) for f in files]
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; re-encode it to UTF-8") from None
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".csv", ".tsv"):
        if suffix == ".jsonl":
            try:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON lines ({e.msg}); fix the file") from None
        else:
            rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
        if not rows or not all(isinstance(r, dict) and text_column in r for r in rows):
            raise DataError(f"{path}: every row needs a '{text_column}' field; use --text-column NAME")
        return [str(r[text_column]) for r in rows]
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{path}: no text in the file; put one text per line")
    return lines


def read_image(path: str | Path) -> torch.Tensor:
    """An image file as a float (3, H, W) tensor in [0, 1]."""
    try:
        import numpy as np
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DataError("reading images needs Pillow: pip install pillow") from None
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not a readable image ({e}); use PNG or JPEG files") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
