"""Text classification: a pooled sentence vector from the (adapted) frozen encoder, then dropout + Linear.

Pooling follows the base: mean over real tokens (the attention mask is respected) for sentence encoders such
as MiniLM, the last non-pad token for decoders (the only position that has seen the whole text), or the first
token (``cls``). The loss is cross-entropy, or binary cross-entropy per label for multi-label data.

``classification_metrics`` is shared by every classification task (text and image) and by ``graftune eval``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graftune.errors import DataError
from graftune.tasks.base import pad

POOLINGS = ("mean", "last", "cls")


class ClassifierHead(nn.Module):
    """``logits = W dropout(features) + b``: the trainable head every classification task puts on the base."""

    def __init__(self, in_features: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.in_features, self.num_labels = in_features, num_labels
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features, num_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(features.to(self.linear.weight.dtype)))


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(batch, seq, dim) hidden states -> (batch, dim) float32 vectors; padding never counts."""
    if how == "cls":
        return hidden[:, 0].float()
    if how == "last":
        # the last position whose mask is 1: works for right and left padding alike
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask.long() * positions).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
    m = mask.unsqueeze(-1).float()
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1.0)


def encode_labels(labels: Sequence[Any], label_names: Sequence[str], multi_label: bool) -> list:
    """Class names -> indices (single-label) or multi-hot float lists (multi-label).

    Labels of the other kind are read where that is valid data: for multi-label a single name is a set of one, for
    single-label a set of one is its name. Several labels for a single-label classifier, or a name that is not
    among ``label_names``, are a DataError naming it (not a KeyError, nor a string iterated letter by letter)."""
    index = {n: i for i, n in enumerate(label_names)}

    def at(name: Any) -> int:
        if name not in index:
            known = ", ".join(label_names[:10]) + (" ..." if len(label_names) > 10 else "")
            raise DataError(f"label {name!r} is not one of the classifier's classes ({known}); score data "
                            "labelled with those")
        return index[name]

    if not multi_label:
        out = []
        for y in labels:
            if isinstance(y, (list, tuple)):
                if len(y) != 1:
                    raise DataError(f"{len(y)} labels ({'|'.join(map(str, y))!r}) for a single-label classifier; "
                                    "give each example one label")
                y = y[0]
            out.append(at(y))
        return out
    out = []
    for names in labels:
        row = [0.0] * len(label_names)
        for n in [names] if isinstance(names, str) else names:
            row[at(n)] = 1.0
        out.append(row)
    return out


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> torch.Tensor:
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, labels.float())
    return F.cross_entropy(logits, labels)


def probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Softmax over classes, or an independent sigmoid per label for multi-label heads."""
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)


def decide(probs: torch.Tensor, multi_label: bool, threshold: float = 0.5) -> torch.Tensor:
    """Predicted class indices (single-label) or a 0/1 matrix (multi-label)."""
    return (probs >= threshold).long() if multi_label else probs.argmax(dim=-1)


def classification_metrics(y_true, y_pred, label_names: Sequence[str], multi_label: bool = False) -> dict:
    """accuracy (exact-set accuracy for multi-label) with its 95% interval, macro-F1 (single-label: over the classes
    that occur in the truth or the predictions), per-class precision/recall/F1/support, and the confusion matrix
    (rows: true class, columns: predicted; per label 2x2 [[tn, fp], [fn, tp]] for multi-label)."""
    import numpy as np
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        multilabel_confusion_matrix,
        precision_recall_fscore_support,
    )

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = list(range(len(label_names)))
    if multi_label:
        p, r, f, s = precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
        confusion = {name: m.tolist() for name, m in zip(label_names, multilabel_confusion_matrix(y_true, y_pred))}
        macro = f1_score(y_true, y_pred, average="macro", zero_division=0)
    else:
        p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None, zero_division=0)
        confusion = confusion_matrix(y_true, y_pred, labels=labels).tolist()
        # over the classes that occur (in the truth or the predictions): a class absent from both has no F1, and
        # counting it as 0 would cap a perfect score on a file holding some of the classes
        present = sorted(set(y_true.tolist()) | set(y_pred.tolist())) or labels
        macro = f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
    accuracy = float(accuracy_score(y_true, y_pred))
    return {
        "accuracy": accuracy,
        "accuracy_interval": accuracy_interval(round(accuracy * len(y_true)), len(y_true)),
        "macro_f1": float(macro),
        "examples": len(y_true),
        "per_class": {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                             "support": int(s[i])} for i, name in enumerate(label_names)},
        "confusion_matrix": confusion,
        "label_names": list(label_names),
    }


def accuracy_interval(correct: int, n: int) -> list[float] | None:
    """The 95% interval of an accuracy of ``correct`` out of ``n`` examples (Wilson's score interval, as scipy
    computes it: unlike the normal approximation it stays within [0, 1] and is not zero-width at 0 or n correct).
    With the few dozen test examples of a few-shot split it is wide, and the summaries print it for that reason.
    None for no examples."""
    if n == 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(int(correct), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def format_accuracy(m: dict) -> str:
    """``accuracy 0.643 (95% interval 0.388-0.837)``: the accuracy of a metrics dict with its interval, as the train
    summary and ``graftune eval`` print it."""
    interval = m.get("accuracy_interval")
    shown = f"accuracy {m['accuracy']:.3f}"
    return shown + (f" (95% interval {interval[0]:.3f}-{interval[1]:.3f})" if interval else "")


def base_hidden(model: nn.Module, batch: dict) -> torch.Tensor:
    """The last hidden states of the (adapted) base for a tokenized batch, whatever the model class: encoders
    return ``last_hidden_state``; language-model heads are asked for their hidden states."""
    base = getattr(model, "base", model)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    has_lm_head = callable(getattr(base, "get_output_embeddings", None)) and base.get_output_embeddings() is not None
    if has_lm_head:
        out = model(**inputs, output_hidden_states=True)
        return out.hidden_states[-1]
    out = model(**inputs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@dataclass
class TextClassification:
    """Args:
    tokenizer: a Hugging Face tokenizer for the base.
    label_names: class names; the head's output i is class ``label_names[i]``.
    hidden_size: the base's hidden size (the head's input).
    multi_label: independent labels (sigmoid + BCE) instead of one class (softmax + CE).
    max_length: longer texts are truncated to this many tokens.
    pooling: ``mean`` (encoders), ``last`` (decoders) or ``cls``.
    dropout: dropout on the pooled vector, before the Linear head.
    """

    tokenizer: Any
    label_names: list[str]
    hidden_size: int
    multi_label: bool = False
    max_length: int = 256
    pooling: str = "mean"
    dropout: float = 0.1
    name: str = "classification"

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            from graftune.errors import ConfigError

            raise ConfigError(f"pooling: got {self.pooling!r}; use one of {', '.join(POOLINGS)}")
        pad_id = self.tokenizer.pad_token_id
        self.pad_id = pad_id if pad_id is not None else (self.tokenizer.eos_token_id or 0)

    def encode(self, inputs: Sequence[str], labels: Sequence[Any] | None = None) -> list[dict]:
        ids = self.tokenizer(list(inputs), truncation=True, max_length=self.max_length)["input_ids"]
        ys = encode_labels(labels, self.label_names, self.multi_label) if labels else [None] * len(ids)
        return [{"input_ids": i, "label": y} for i, y in zip(ids, ys)]

    def length(self, example: dict) -> int:
        return len(example["input_ids"])

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        ids = [e["input_ids"] for e in examples]
        batch = {"input_ids": pad(ids, self.pad_id), "attention_mask": pad([[1] * len(s) for s in ids], 0)}
        if examples[0]["label"] is not None:
            batch["labels"] = torch.tensor([e["label"] for e in examples],
                                           dtype=torch.float32 if self.multi_label else torch.long)
        return batch

    def build_head(self) -> nn.Module:
        return ClassifierHead(self.hidden_size, len(self.label_names), self.dropout)

    def features(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return pool(base_hidden(model, batch), batch["attention_mask"], self.pooling)

    def forward(self, model: nn.Module, head: nn.Module, batch: dict) -> torch.Tensor:
        return head(self.features(model, batch)).float()

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return classification_loss(logits, batch["labels"], self.multi_label)
