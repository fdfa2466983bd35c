"""Bottleneck adapters: a small residual MLP applied to the output of a sub-layer.

    y' = y + W_up f(W_down y + b_down) + b_up,    W_down: m x d,  W_up: d x m (zero, so the model starts unchanged)

with d the width of the target's output, m = d / reduction_factor (or ``bottleneck_size``) and f a
non-linearity (Houlsby et al. 2019, https://arxiv.org/abs/1902.00751). The two classic placements are presets of
this one config, not separate methods:

- ``placement="pfeiffer"`` (default): one adapter per layer, after the feed-forward block
  (Pfeiffer et al. 2021, AdapterFusion, https://arxiv.org/abs/2005.00247);
- ``placement="houlsby"``: two per layer, after the attention block and after the feed-forward block.

Each adapter sits where Houlsby puts it: "applied directly to the output of the sub-layer, after it has been
projected back to the input size, but before adding the skip connection back", i.e. on the output of the block's
output projection (BERT ``output.dense``, Llama ``down_proj`` / ``o_proj``, GPT-2 ``c_proj``).

Convolutional adapter: on a target whose output is a feature map (B, C, H, W) (a ``Conv2d``, or a CNN block such as
an EfficientNet MBConv block, whose last layer is a convolution or a 2-D batch norm), the projections are 1x1
convolutions over the channels, i.e. the same per-pixel map (Chen et al. 2022, Conv-Adapter,
https://arxiv.org/abs/2208.07463, sequential variant).

Not mergeable: f sits between the two projections, so the update is not a linear map of the target's input and
cannot be folded into its weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from graftune.core.method import Capabilities, Method, MethodConfig, TargetSpec, check, register
from graftune.errors import ConfigError

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "tanh": torch.tanh}
_PLACEMENTS = ("pfeiffer", "houlsby")


@dataclass(frozen=True)
class BottleneckConfig(MethodConfig):
    """Args:
    placement: ``"pfeiffer"`` (after the feed-forward block) or ``"houlsby"`` (after attention and after the
        feed-forward block). Picks the preset targets; ignored when ``targets`` is given.
    reduction_factor: bottleneck width = target output width / reduction_factor (at least 1).
    bottleneck_size: the bottleneck width itself; overrides ``reduction_factor`` when set.
    non_linearity: ``"relu"``, ``"gelu"``, ``"swish"`` or ``"tanh"``.
    residual: add the adapter's output to the target's output (True); False replaces the output by the adapter's,
        so the model no longer starts unchanged.
    dropout: dropout on the bottleneck activations, in [0, 1).
    init_scale: standard deviation of the down-projection's normal initialisation (the up-projection starts at
        zero).
    """

    placement: str = "pfeiffer"
    reduction_factor: float = 16.0
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
    residual: bool = True
    dropout: float = 0.0
    init_scale: float = 0.01
    averaging_ignores: ClassVar[tuple[str, ...]] = (*MethodConfig.averaging_ignores, "placement", "init_scale")

    def validate(self):
        check(self.placement in _PLACEMENTS, "placement",
              f"got {self.placement!r}; use one of {', '.join(_PLACEMENTS)}")
        check(isinstance(self.reduction_factor, (int, float)) and not isinstance(self.reduction_factor, bool)
              and self.reduction_factor > 0, "reduction_factor",
              f"got {self.reduction_factor!r}; use a positive number (e.g. 16)")
        check(self.bottleneck_size is None or (isinstance(self.bottleneck_size, int)
                                               and not isinstance(self.bottleneck_size, bool)
                                               and self.bottleneck_size >= 1), "bottleneck_size",
              f"got {self.bottleneck_size!r}; use a positive integer, or unset it to use reduction_factor")
        check(self.non_linearity in _ACTIVATIONS, "non_linearity",
              f"got {self.non_linearity!r}; use one of {', '.join(_ACTIVATIONS)}")
        check(isinstance(self.residual, bool), "residual", f"got {self.residual!r}; use true or false")
        check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "dropout",
              f"got {self.dropout!r}; use a value in [0, 1)")
        check(isinstance(self.init_scale, (int, float)) and self.init_scale >= 0, "init_scale",
              f"got {self.init_scale!r}; use a non-negative standard deviation (e.g. 0.01)")

    def size_for(self, width: int) -> int:
        return self.bottleneck_size or max(1, math.floor(width / self.reduction_factor))


def _output_shape(target: nn.Module, target_name: str) -> tuple[int, bool]:
    """(width of the target's output, whether the output is a feature map (B, C, H, W)).

    Leaves say it directly. For a block, its last layer with parameters (in definition order) is taken to produce
    the output: the output projection (``down_proj``, ``c_proj``) or the norm after it (an MBConv's ``_bn2``).
    The adapter checks this at the first forward and names the fix if it was wrong."""
    kind = type(target).__name__
    if kind == "Linear":
        return target.out_features, False
    if kind == "Conv1D":  # transformers' GPT-2 layer, weight stored in x out
        return target.weight.shape[1], False
    if kind == "Conv2d":
        return target.out_channels, True
    if kind in ("BatchNorm2d", "GroupNorm", "InstanceNorm2d"):
        return target.weight.shape[0], True
    leaves = [m for m in target.modules() if m is not target and not any(True for _ in m.children())
              and any(True for _ in m.parameters(recurse=False))]
    if leaves:
        return _output_shape(leaves[-1], target_name)
    weight = getattr(target, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:  # LayerNorm, RMSNorm: (..., d)
        return weight.shape[0], False
    raise ConfigError(f"{target_name}: cannot tell the output width of a {kind}; target its output projection "
                      f"(a Linear, Conv1D or Conv2d) instead")


class BottleneckModule(nn.Module):
    """The adapter for one target. ``forward(x, y)`` returns ``y`` transformed (the target's input x is unused).

    Computed in the adapter's dtype (float32) and cast back to ``y``'s, so a bf16 base keeps bf16 activations."""

    def __init__(self, target: nn.Module, cfg: BottleneckConfig, target_name: str):
        super().__init__()
        self.width, self.conv = _output_shape(target, target_name)
        self.size = cfg.size_for(self.width)
        self.target_name = target_name
        self.non_linearity, self.residual = cfg.non_linearity, cfg.residual
        self.bottleneck_down = nn.Linear(self.width, self.size)
        self.bottleneck_up = nn.Linear(self.size, self.width)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        with torch.no_grad():
            nn.init.normal_(self.bottleneck_down.weight, std=cfg.init_scale)
            nn.init.zeros_(self.bottleneck_down.bias)
            nn.init.zeros_(self.bottleneck_up.weight)
            nn.init.zeros_(self.bottleneck_up.bias)

    def check(self, y: torch.Tensor) -> None:
        """Raise, naming the fix, if ``y`` is not the output this adapter was built for."""
        if self.conv != (y.dim() == 4) or y.shape[1 if self.conv else -1] != self.width:
            what = "a (B, C, H, W) feature map" if self.conv else "features on the last axis"
            raise ConfigError(f"{self.target_name}: the bottleneck adapter expected {what} of width {self.width}, "
                              f"got shape {tuple(y.shape)}; target the block's output projection instead")

    def project(self, layer: nn.Linear, h: torch.Tensor) -> torch.Tensor:
        """``layer`` on the features: a 1x1 convolution on feature maps, the Linear itself otherwise."""
        if self.conv:
            return F.conv2d(h, layer.weight[:, :, None, None], layer.bias)
        return layer(h)

    def forward(self, x: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        self.check(y)
        h = y.to(self.bottleneck_down.weight.dtype)
        h = self.dropout(_ACTIVATIONS[self.non_linearity](self.project(self.bottleneck_down, h)))
        out = self.project(self.bottleneck_up, h).to(y.dtype)
        return y + out if self.residual else out


# The sub-layer outputs per family. BERT-style names cover transformers 4.x ViT too; 5.x ViT/DeiT/DINOv2 use
# ``attention.o_proj`` / ``mlp.fc2``.
_FFN = {
    "bert": r"layer\.\d+\.output\.dense$",
    "mpnet": r"layer\.\d+\.output\.dense$",
    "distilbert": r"ffn\.lin2$",
    "llama": r"mlp\.down_proj$",
    "gpt2": r"mlp\.c_proj$",
    "vit": r"(layer\.\d+\.output\.dense|mlp\.fc2)$",
}
_ATTENTION = {
    "bert": r"attention\.output\.dense$",
    "mpnet": r"attention\.attn\.o$",
    "distilbert": r"attention\.out_lin$",
    "llama": r"self_attn\.o_proj$",
    "gpt2": r"attn\.c_proj$",
    "vit": r"(attention\.output\.dense|attention\.o_proj)$",
}
# CNNs have no attention: both placements adapt each block's output
_CNN = TargetSpec(regex=r"^_blocks\.\d+$")
PFEIFFER = {**{f: TargetSpec(regex=r) for f, r in _FFN.items()}, "cnn": _CNN}
HOULSBY = {**{f: TargetSpec(regex=f"({_ATTENTION[f]}|{r})") for f, r in _FFN.items()}, "cnn": _CNN}


@register
class Bottleneck(Method):
    name = "bottleneck"
    description = ("Bottleneck adapters: a small residual MLP after sub-layers (Pfeiffer or Houlsby placement; "
                   "1x1-conv adapters on CNN blocks). Mixed batches; not mergeable.")
    config_cls = BottleneckConfig
    capabilities = Capabilities(mergeable=False, mixed_batch=True, identity_at_init=True)
    merge_note = ("a non-linearity sits between the down- and up-projections, so the adapter is not a linear map "
                  "that can be folded into a weight")
    presets = PFEIFFER

    def target_presets(self, config):
        return HOULSBY if config.placement == "houlsby" else PFEIFFER

    def build(self, target, config, *, target_name):
        return BottleneckModule(target, config, target_name)

    def forward_mixed(self, modules, rows, x, y):
        first = modules[0]
        same = {(m.non_linearity, m.conv, m.width, m.residual, type(m.dropout), getattr(m.dropout, "p", 0.0))
                for m in modules}
        if len(same) > 1 or not first.residual:
            return super().forward_mixed(modules, rows, x, y)
        # One batched computation for all rows: stack every adapter's projections (padded to the largest
        # bottleneck, plus an all-zero adapter for base rows), gather one per row, two batched matmuls. Padded
        # units and base rows stay exactly zero because every non-linearity here maps 0 to 0.
        n, size, d = len(modules), max(m.size for m in modules), first.width
        dtype = first.bottleneck_down.weight.dtype
        down_w = y.new_zeros((n + 1, size, d), dtype=dtype)
        down_b = y.new_zeros((n + 1, 1, size), dtype=dtype)
        up_w = y.new_zeros((n + 1, d, size), dtype=dtype)
        up_b = y.new_zeros((n + 1, 1, d), dtype=dtype)
        for i, m in enumerate(modules):
            down_w[i, : m.size] = m.bottleneck_down.weight
            down_b[i, 0, : m.size] = m.bottleneck_down.bias
            up_w[i, :, : m.size] = m.bottleneck_up.weight
            up_b[i, 0] = m.bottleneck_up.bias
        idx = torch.where(rows < 0, n, rows)
        first.check(y)
        h = (y.movedim(1, -1) if first.conv else y).to(dtype)  # a 1x1 convolution is a map over channels
        shape = h.shape
        h = h.reshape(shape[0], -1, d)
        h = torch.baddbmm(down_b[idx], h, down_w[idx].transpose(1, 2))
        h = first.dropout(_ACTIVATIONS[first.non_linearity](h))
        out = torch.baddbmm(up_b[idx], h, up_w[idx].transpose(1, 2)).reshape(shape)
        out = out.movedim(-1, 1) if first.conv else out
        return y + out.to(y.dtype)
