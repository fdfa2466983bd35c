"""A finished run loaded back for prediction: what every recipe's ``load`` returns and ``graftune eval / predict /
generate`` read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from graftune.config import RunConfig
from graftune.speed import precision
from graftune.tasks import Task


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
    #: a ``--method contrastive`` or ``probe`` run: its ``recipes.fewshot.FewShotModel`` (embeddings + a head),
    #: which scores and predicts instead of ``task``/``head``
    fewshot: Any = None
    #: a run that predicts by itself (``--method in-context``): ``predictor.predict_proba(texts)`` gives one column
    #: per label name, used instead of ``task``/``head``
    predictor: Any = None
