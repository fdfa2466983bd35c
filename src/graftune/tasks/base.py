"""The task protocol and what every task shares: task names, length-bucketed batches, padding."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from graftune.errors import ConfigError

#: task names accepted by ``--task`` (aliases map onto these three)
TASKS = ("classification", "image", "causal-lm")
_ALIASES = {"text": "classification", "text-classification": "classification", "image-classification": "image",
            "pairs": "causal-lm", "causal_lm": "causal-lm", "generation": "causal-lm"}


class Task(Protocol):
    """What the training loop needs from a task. ``Example`` is whatever ``encode`` returns per example."""

    name: str

    def encode(self, inputs: Sequence[Any], labels: Sequence[Any] | None = None) -> list[dict]:
        """Turn raw inputs (and labels) into per-example dicts, once, before training."""

    def length(self, example: dict) -> int:
        """A size used to group similar examples into one batch (tokens; 1 for images)."""

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Stack examples into one batch, padding only to the longest example of the batch."""

    def build_head(self) -> nn.Module | None:
        """A new trainable head (None when the base's own output is the prediction, as for causal LMs)."""

    def forward(self, model: nn.Module, head: nn.Module | None, batch: dict) -> torch.Tensor:
        """Logits for the batch (float32)."""

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """The scalar training loss."""


def task_name(name: str) -> str:
    """Normalize a task name or alias (``text`` -> ``classification``)."""
    name = _ALIASES.get(name, name)
    if name not in TASKS:
        raise ConfigError(f"task: got {name!r}; use one of {', '.join(TASKS)}")
    return name


def batches(examples: Sequence[dict], lengths: Sequence[int], batch_size: int, *,
            generator: torch.Generator | None = None) -> Iterator[list[int]]:
    """Index lists of batches, grouped by length so padding stays small.

    Without a generator (evaluation): sorted by length, longest first, so the first batch shows the peak
    memory. With one (training): shuffle, sort by length (stable: equal lengths keep the shuffled order, so
    batch composition still varies from epoch to epoch), cut into batches, then shuffle the batch order.
    """
    n = len(examples)
    if generator is None:
        order = sorted(range(n), key=lambda i: -lengths[i])
        yield from (order[i:i + batch_size] for i in range(0, n, batch_size))
        return
    perm = torch.randperm(n, generator=generator).tolist()
    order = sorted(perm, key=lambda i: lengths[i])
    groups = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    for j in torch.randperm(len(groups), generator=generator).tolist():
        yield groups[j]


def pad(seqs: Sequence[Sequence[int]], value: int, *, left: bool = False) -> torch.Tensor:
    """A LongTensor of the sequences padded with ``value`` to the longest (on the left for generation)."""
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            if left:
                out[i, width - len(s):] = torch.as_tensor(s, dtype=torch.long)
            else:
                out[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


#: the data modality each task trains on, and the zoo's name for the task
MODALITY_TASK = {"text": "classification", "image": "image", "pairs": "causal-lm"}
ZOO_TASK = {"classification": "text-classification", "image": "image-classification", "causal-lm": "causal-lm"}
