"""Image classification: the CNN's pooled ``features(x)`` (adapters applied), then dropout + Linear.

Images arrive as float tensors (C, H, W) in [0, 1] (see ``data.sources``). The base's transform
(``zoo.image_transform``: grayscale such as MNIST's 1 x 28 x 28 repeated to three channels, resized and
center-cropped to the model's input size, normalized) runs once per image before training, not once per epoch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graftune.tasks.classification import ClassifierHead, classification_loss, encode_labels


@dataclass
class ImageClassification:
    """Args:
    transform: (C, H, W) in [0, 1] -> the model's input tensor (``zoo.image_transform(base)``).
    label_names: class names; the head's output i is class ``label_names[i]``.
    feature_dim: size of the pooled feature vector (1280 for EfficientNet-Lite0).
    multi_label: independent labels (sigmoid + BCE).
    dropout: dropout on the pooled features, before the Linear head.
    """

    transform: Callable[[torch.Tensor], torch.Tensor]
    label_names: list[str]
    feature_dim: int
    multi_label: bool = False
    dropout: float = 0.2
    name: str = "image"

    def encode(self, inputs: Sequence[torch.Tensor], labels: Sequence[Any] | None = None) -> list[dict]:
        ys = encode_labels(labels, self.label_names, self.multi_label) if labels else [None] * len(inputs)
        return [{"pixels": self.transform(x).contiguous(), "label": y}
                for x, y in zip(inputs, ys)]

    def length(self, example: dict) -> int:
        return 1

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = {"pixels": torch.stack([e["pixels"] for e in examples])}
        if examples[0]["label"] is not None:
            batch["labels"] = torch.tensor([e["label"] for e in examples],
                                           dtype=torch.float32 if self.multi_label else torch.long)
        return batch

    def build_head(self) -> nn.Module:
        return ClassifierHead(self.feature_dim, len(self.label_names), self.dropout)

    def features(self, model: nn.Module, batch: dict) -> torch.Tensor:
        base = getattr(model, "base", model)
        dtype = next(base.parameters()).dtype
        routed = model.routed() if hasattr(model, "routed") else contextlib.nullcontext()
        with routed:
            f = base.features(batch["pixels"].to(dtype))
        if f.dim() == 4:  # (batch, channels, h, w): global average pooling
            f = f.mean(dim=(2, 3))
        return f.float()

    def forward(self, model: nn.Module, head: nn.Module, batch: dict) -> torch.Tensor:
        return head(self.features(model, batch)).float()

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return classification_loss(logits, batch["labels"], self.multi_label)
