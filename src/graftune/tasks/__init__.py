"""Tasks: how examples become batches, how a batch becomes a loss, and how predictions become metrics.

The training loop (``recipes/adapter.py``) knows only this small protocol; each task is one file:

- ``classification.py``: text classification on an encoder (mean pooling) or a decoder (last non-pad token);
- ``image.py``: image classification on a CNN's pooled ``features()``;
- ``causal_lm.py``: prompt/response pairs, loss on the response tokens only, and generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from graftune.errors import ConfigError
from graftune.tasks.base import MODALITY_TASK, TASKS, ZOO_TASK, Task, batches, pad, task_name
from graftune.tasks.causal_lm import CausalLM
from graftune.tasks.classification import TextClassification
from graftune.tasks.image import ImageClassification
from graftune.zoo import image_transform

__all__ = ["MODALITY_TASK", "TASKS", "ZOO_TASK", "Task", "batches", "build_task", "pad", "task_name"]


def build_task(kind: str, base: Any, *, label_names: Sequence[str] = (), multi_label: bool = False,
               max_length: int = 256, dropout: float = 0.1) -> Task:
    """The task object for a loaded ``zoo.Base``: tokenizer, pooling and feature size come from the base."""
    kind = task_name(kind)
    if kind == "causal-lm":
        if base.tokenizer is None:
            raise ConfigError(f"model {base.name!r} has no tokenizer; causal-LM training needs a text model")
        return CausalLM(base.tokenizer, max_length=max_length)
    if kind == "image":
        if not callable(getattr(base.model, "features", None)) or not base.image_size:
            raise ConfigError(f"model {base.name!r} is not an image model; use efficientnet-lite0 for images")
        with torch.no_grad():
            p = next(base.model.parameters())
            dim = base.model.features(torch.zeros(1, 3, base.image_size, base.image_size, dtype=p.dtype)).shape[1]
        return ImageClassification(image_transform(base), list(label_names), dim, multi_label, dropout)
    if base.tokenizer is None:
        raise ConfigError(f"model {base.name!r} has no tokenizer; text classification needs a text model")
    hidden = getattr(base.model.config, "hidden_size", None) or base.model.config.n_embd
    return TextClassification(base.tokenizer, list(label_names), hidden, multi_label, max_length,
                              base.pooling if base.pooling in ("mean", "last", "cls") else "mean", dropout)
