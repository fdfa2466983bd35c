"""EfficientNet-Lite: the mobile-friendly EfficientNet variant, written here because torchvision/timm do not run
beside the CPU torch build we use.

Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs" (https://arxiv.org/abs/1905.11946); the Lite variant
(https://github.com/tensorflow/tpu/tree/master/models/official/efficientnet/lite) removes squeeze-and-excitation,
uses ReLU6 instead of swish, and keeps the stem (32 channels) and head (1280 channels) fixed when scaling.

Module names follow the lukemelas ``efficientnet_pytorch`` layout (``_conv_stem``, ``_blocks.N._depthwise_conv``,
``_fc`` ...) so published state dicts load with ``strict=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Stage:
    """One stage of identical MBConv blocks (only the first may change stride and width)."""

    expand: int
    kernel: int
    stride: int
    channels: int
    repeats: int


# EfficientNet-B0 layout (= Lite0: width and depth multipliers 1.0).
B0_STAGES = (
    Stage(1, 3, 1, 16, 1),
    Stage(6, 3, 2, 24, 2),
    Stage(6, 5, 2, 40, 2),
    Stage(6, 3, 2, 80, 3),
    Stage(6, 5, 1, 112, 3),
    Stage(6, 5, 2, 192, 4),
    Stage(6, 3, 1, 320, 1),
)

BN_EPS = 1e-3  # the TensorFlow default the weights were trained with (PyTorch's 1e-5 shifts every activation)
BN_MOMENTUM = 0.01  # TF's 0.99 decay in PyTorch's convention


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` (adapters target it by type); stride-2 convs get TF padding in ``_same_pad``."""
    return nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2 if stride == 1 else 0, groups=groups, bias=False)


def _same_pad(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """TensorFlow 'SAME' padding before a strided conv: the extra row/column goes bottom/right.

    The weights were trained in TensorFlow; PyTorch's symmetric padding shifts every stride-2 sampling grid by
    one pixel, which still runs but visibly degrades the ImageNet predictions.
    """
    if conv.stride[0] == 1:
        return x
    k, s = conv.kernel_size[0], conv.stride[0]
    ph = max((-(-x.shape[-2] // s) - 1) * s + k - x.shape[-2], 0)
    pw = max((-(-x.shape[-1] // s) - 1) * s + k - x.shape[-1], 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand -> depthwise kxk -> 1x1 project, ReLU6, identity skip when shapes allow.

    Stochastic depth (drop-connect) is left out: graftune trains adapters around a frozen body, not the body.
    """

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int):
        super().__init__()
        hidden = cin * expand
        if expand != 1:
            self._expand_conv = _conv(cin, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = _conv(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = _conv(hidden, cout, 1)
        self._bn2 = _bn(cout)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if hasattr(self, "_expand_conv"):
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(_same_pad(y, self._depthwise_conv))))
        y = self._bn2(self._project_conv(y))  # linear bottleneck: no activation after the projection
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier: ``forward(x)`` gives logits, ``features(x)`` the pooled ``head``-d vector.

    Args:
        stages: the block layout, ``B0_STAGES`` for Lite0.
        num_classes: outputs of the final linear layer ``_fc``.
        stem: channels of the first 3x3 stride-2 convolution.
        head: channels of the final 1x1 convolution (the feature size).
        dropout: dropout before ``_fc`` (active in training mode only).
        in_channels: image channels.
    """

    def __init__(self, stages: tuple[Stage, ...] = B0_STAGES, num_classes: int = 1000, stem: int = 32,
                 head: int = 1280, dropout: float = 0.2, in_channels: int = 3):
        super().__init__()
        self._conv_stem = _conv(in_channels, stem, 3, 2)
        self._bn0 = _bn(stem)
        blocks, cin = [], stem
        for s in stages:
            for i in range(s.repeats):
                blocks.append(MBConv(cin, s.channels, s.expand, s.kernel, s.stride if i == 0 else 1))
                cin = s.channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _conv(cin, head, 1)
        self._bn1 = _bn(head)
        self.act = nn.ReLU6(inplace=True)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(head, num_classes)
        self.num_features = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(batch, head)`` of images ``(batch, 3, H, W)``, before dropout and ``_fc``."""
        x = self.act(self._bn0(self._conv_stem(_same_pad(x, self._conv_stem))))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self._avg_pooling(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(batch, num_classes)``."""
        return self._fc(self._dropout(self.features(x)))


def efficientnet_lite0(num_classes: int = 1000) -> EfficientNetLite:
    """The Lite0 architecture with random weights (``graftune.zoo.load_base`` loads the ImageNet ones)."""
    return EfficientNetLite(B0_STAGES, num_classes=num_classes)


def tiny_efficientnet(num_classes: int = 10) -> EfficientNetLite:
    """A random two-stage Lite network (~10 k params) with the same module names, for tests: milliseconds a call."""
    stages = (Stage(1, 3, 1, 8, 1), Stage(4, 3, 2, 16, 2))
    return EfficientNetLite(stages, num_classes=num_classes, stem=8, head=32, dropout=0.0)
