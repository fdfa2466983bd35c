"""Scoring a model in memory: logits and pooled features in input order, the classification and causal-LM
metrics a run reports, and the frozen-encoder linear probe. Used by every recipe while it trains and by
``graftune eval`` on a loaded run."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from graftune.config import RunConfig
from graftune.errors import DataError
from graftune.run.log import progress_bar
from graftune.speed import precision
from graftune.tasks import Task, batches
from graftune.tasks.causal_lm import generation_metrics
from graftune.tasks.classification import (
    classification_loss,
    classification_metrics,
    decide,
    encode_labels,
    probabilities,
)

#: inputs encoded at a time during evaluation: bounds the memory of encoded images (224 px: 0.6 MB each)
_CHUNK = 256


@torch.inference_mode()
def logits_of(task: Task, model: nn.Module, head: nn.Module | None, inputs: Sequence[Any], *,
              batch_size: int = 32, policy: precision.Precision | None = None, show: str | None = None) -> torch.Tensor:
    """Float32 logits for ``inputs`` in their order (batched by length, padded per batch). ``show``: a progress
    bar with that title (on stderr; it disappears when done)."""
    model.eval()
    if head is not None:
        head.eval()
    autocast = policy.autocast if policy is not None else _no_autocast
    parts: list[torch.Tensor] = []
    bar = progress_bar(len(inputs), 0, show is not None, unit="example", desc=show)
    for start in range(0, len(inputs), _CHUNK):
        examples = task.encode(inputs[start:start + _CHUNK])
        out: list[torch.Tensor | None] = [None] * len(examples)
        lengths = [task.length(e) for e in examples]
        for idx in batches(examples, lengths, batch_size):
            with autocast():
                logits = task.forward(model, head, task.collate([examples[i] for i in idx])).float()
            for row, i in enumerate(idx):
                out[i] = logits[row]
            bar.update(len(idx))
        parts.extend(out)
    bar.close()
    return torch.stack(parts) if parts else torch.zeros(0)


def score_classification(task: Task, model: nn.Module, head: nn.Module, inputs: Sequence[Any],
                         labels: Sequence[Any], *, batch_size: int = 32,
                         policy: precision.Precision | None = None, show: str | None = None,
                         predictions: bool = False) -> dict:
    """accuracy, macro-F1, per-class P/R/F1, confusion matrix and mean loss of ``head(model(inputs))``; with
    ``predictions`` (single-label) also ``predicted``: the label name predicted for each input, in order."""
    logits = logits_of(task, model, head, inputs, batch_size=batch_size, policy=policy, show=show)
    y = encode_labels(labels, task.label_names, task.multi_label)
    target = torch.tensor(y, dtype=torch.float32 if task.multi_label else torch.long)
    pred = decide(probabilities(logits, task.multi_label), task.multi_label)
    metrics = classification_metrics(target.long().numpy(), pred.numpy(), task.label_names, task.multi_label)
    metrics["loss"] = float(classification_loss(logits, target, task.multi_label))
    if predictions and not task.multi_label:
        metrics["predicted"] = [task.label_names[int(i)] for i in pred]
    return metrics


@torch.inference_mode()
def score_causal_lm(task: Task, model: nn.Module, pairs: Sequence[tuple[str, str]], *, batch_size: int = 8,
                    policy: precision.Precision | None = None, generate: bool = True,
                    max_new_tokens: int = 64, show: str | None = None) -> dict:
    """Perplexity of the responses given the prompts; with ``generate``, also greedy answers scored by
    ``generation_metrics`` (exact match, JSON validity when the references are JSON). ``show``: progress bars
    with that title (scoring, then generation: the slow part of a causal-LM evaluation)."""
    model.eval()
    autocast = policy.autocast if policy is not None else _no_autocast
    examples = task.encode(pairs)
    total, count = 0.0, 0
    bar = progress_bar(len(examples), 0, show is not None, unit="example", desc=show and f"{show}: perplexity")
    for idx in batches(examples, [task.length(e) for e in examples], batch_size):
        batch = task.collate([examples[i] for i in idx])
        with autocast():
            logits = task.forward(model, None, batch)
        loss_sum, n = task.token_loss(logits, batch)
        total, count = total + float(loss_sum), count + int(n)
        bar.update(len(idx))
    bar.close()
    loss = total / max(count, 1)
    metrics: dict[str, Any] = {"loss": loss, "perplexity": float(torch.tensor(loss).exp()), "tokens": count}
    if generate and pairs:
        bar = progress_bar(len(pairs), 0, show is not None, unit="answer", desc=show and f"{show}: generating")
        with autocast():
            answers = task.generate(model, [p for p, _ in pairs], max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, on_batch=bar.update)
        bar.close()
        metrics.update(generation_metrics(answers, [r for _, r in pairs]))
        metrics["samples"] = [{"prompt": p, "reference": r, "generated": a}
                              for (p, r), a in list(zip(pairs, answers))[:5]]
    return metrics


def linear_probe(task: Task, model: nn.Module, train_inputs: Sequence[Any], train_labels: Sequence[Any],
                 test_inputs: Sequence[Any], test_labels: Sequence[Any], *, batch_size: int = 32,
                 policy: precision.Precision | None = None, seed: int = 0) -> dict:
    """The frozen-encoder baseline: pooled features of the frozen base + scikit-learn logistic regression."""
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
    return contextlib.nullcontext()


def score_probabilities(proba: np.ndarray, labels: Sequence[str], label_names: Sequence[str], *,
                        predictions: bool = False) -> dict:
    """The metrics a classification run reports (``classification_metrics``) from probabilities with one column
    per label name (the prediction is the most probable), plus ``loss``: the mean cross-entropy -log p(true class),
    p clamped at 1e-12; ``predictions``: see ``score_classification``."""
    y = np.asarray(encode_labels(labels, label_names, False), dtype=int)
    pred = proba.argmax(axis=1)
    metrics = classification_metrics(y, pred, list(label_names))
    p_true = np.clip(proba[np.arange(len(y)), y], 1e-12, None)
    metrics["loss"] = float(-np.log(p_true).mean()) if len(y) else 0.0
    if predictions:
        metrics["predicted"] = [label_names[int(i)] for i in pred]
    return metrics


def probability_rows(proba: np.ndarray, label_names: Sequence[str]) -> list[dict]:
    """``graftune predict``'s rows from probabilities with one column per label name."""
    return [{"label": label_names[int(row.argmax())],
             "probabilities": {n: round(float(v), 6) for n, v in zip(label_names, row)}} for row in proba]


def score_split(kind: str, task, model, head, ds, cfg: RunConfig, policy, *, generate: bool,
                show: str | None = None, predictions: bool = False) -> dict:
    """The metrics of a run's model on one split (val while training, test at the end), as the run reports them
    (``predictions``: see ``score_classification``)."""
    if kind == "causal-lm":
        return score_causal_lm(task, model, ds.inputs, batch_size=min(cfg.batch_size or 8, 8), policy=policy,
                               generate=generate, max_new_tokens=cfg.max_new_tokens, show=show)
    return score_classification(task, model, head, ds.inputs, ds.labels, batch_size=max(cfg.batch_size or 32, 32),
                                policy=policy, show=show, predictions=predictions)


# --- per-group metrics (eval and compare --group-column) ------------------------------------------------------------
#: a group with fewer examples than this is noted: one example moves its accuracy by more than 10 points
MIN_GROUP_EXAMPLES = 10


def group_metrics(labels: Sequence[str], preds: Sequence[str], groups: Sequence[Any], label_names: Sequence[str], *,
                  min_examples: int = MIN_GROUP_EXAMPLES) -> dict:
    """Accuracy and macro-F1 for each group, and the largest gap between groups of each: a model that is right for
    one group and wrong for another carries a bias the overall score hides. Each group is scored by
    ``classification_metrics``, whose macro-F1 averages the classes that occur in the group (truth or predictions):
    a class absent from a group, say "who" questions and the NUM class, does not count as F1 0.

    ``notes`` says, in words, where the numbers are thin: a group with fewer than ``min_examples`` examples, or a
    single group (no gap to measure)."""
    if not len(labels) == len(preds) == len(groups):
        raise DataError(f"got {len(labels)} labels, {len(preds)} predictions and {len(groups)} groups; pass one each")
    index = {n: i for i, n in enumerate(label_names)}
    unknown = sorted({str(v) for v in (*labels, *preds)} - set(index))
    if unknown:
        raise DataError(f"labels {', '.join(unknown[:3])} are not among {', '.join(label_names)}")
    y, p = np.asarray([index[v] for v in labels]), np.asarray([index[v] for v in preds])
    g = np.asarray([str(x) for x in groups])
    per = {}
    for name in sorted(set(g.tolist())):
        m = g == name
        scored = classification_metrics(y[m], p[m], label_names)
        per[name] = {"examples": int(m.sum()), "accuracy": round(scored["accuracy"], 4),
                     "macro_f1": round(scored["macro_f1"], 4)}

    def gap(key: str) -> dict:
        hi = max(per, key=lambda n: per[n][key])
        # on a tie the worst is another group than the best (a gap of 0 between two groups, not one with itself)
        lo = min(per, key=lambda n: (per[n][key], n == hi))
        return {"gap": round(per[hi][key] - per[lo][key], 4), "best": hi, "worst": lo}

    notes = [f"group {n!r} has {v['examples']} example{'s' if v['examples'] > 1 else ''}: one example moves its "
             f"accuracy by {100 / v['examples']:.0f} points" for n, v in per.items() if v["examples"] < min_examples]
    if len(per) == 1:
        notes.append(f"one group only ({next(iter(per))!r}): no gap to measure")
    return {"groups": per, "accuracy_gap": gap("accuracy") if per else None,
            "macro_f1_gap": gap("macro_f1") if per else None, "notes": notes}


def gap_text(gap: dict) -> str:
    """One of ``group_metrics``'s gaps in words: "0.120 (best north, worst east)"; a gap of 0 names no best or worst
    group ("0.000 (the groups are level)"), nor does a single group."""
    if gap["best"] == gap["worst"]:
        return f"{gap['gap']:.3f} (one group)"
    if gap["gap"] == 0:
        return f"{gap['gap']:.3f} (the groups are level)"
    return f"{gap['gap']:.3f} (best {gap['best']}, worst {gap['worst']})"


def format_groups(result: dict) -> str:
    """``group_metrics``'s result as a table, the largest gaps in one line, then the notes."""
    per = result["groups"]
    width = max([12, *(len(n) for n in per)])
    lines = [f"{'group':<{width}} {'examples':>8} {'accuracy':>8} {'macro-F1':>8}"]
    lines += [f"{n:<{width}} {v['examples']:>8} {v['accuracy']:>8.3f} {v['macro_f1']:>8.3f}" for n, v in per.items()]
    lines.append(f"largest gap: accuracy {gap_text(result['accuracy_gap'])}; "
                 f"macro-F1 {gap_text(result['macro_f1_gap'])}")
    lines += [f"note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines)
