"""LoRA: low-rank updates of frozen weights, with the rsLoRA and DoRA options.

    y = W x + b + s * B A dropout(x),    A: r x in (random),  B: out x r (zero, so the model starts unchanged)

with s = alpha / r (Hu et al. 2021, https://arxiv.org/abs/2106.09685) or s = alpha / sqrt(r) with
``rslora`` (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732). DoRA (Liu et al. 2024,
https://arxiv.org/abs/2402.09353) splits the adapted weight into a learned magnitude m (one per output) and a
direction:  W' = m * (W + s B A) / ||W + s B A||  (norm per output row, treated as a constant in backward as
the paper recommends).

Targets: ``nn.Linear``, transformers' GPT-2 ``Conv1D`` (weight stored in x out), ``nn.Conv2d`` (A is a conv
with the target's kernel, B a 1x1 conv; groups=1 only) and ``nn.Embedding`` (A is a lookup table).
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

_KINDS = {"Linear": "linear", "Conv1D": "conv1d", "Conv2d": "conv2d", "Embedding": "embedding"}


@dataclass(frozen=True)
class LoraConfig(MethodConfig):
    """Args:
    r: rank of the update (1..1024).
    alpha: scale numerator; s = alpha / r (or alpha / sqrt(r) with rslora).
    dropout: dropout on the adapter's input, in [0, 1).
    rslora: rank-stabilized scaling alpha / sqrt(r).
    dora: weight-decomposed LoRA (Linear and Conv1D targets).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False

    def validate(self):
        check(isinstance(self.r, int) and 1 <= self.r <= 1024, "r", f"got {self.r!r}; use an integer from 1 to 1024")
        check(self.alpha > 0, "alpha", f"got {self.alpha!r}; use a positive number (e.g. 2 * r)")
        check(0 <= self.dropout < 1, "dropout", f"got {self.dropout!r}; use a value in [0, 1)")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoraModule(nn.Module):
    """The low-rank update for one target. ``forward(x, y)`` returns the target's output with the update added."""

    def __init__(self, target: nn.Module, cfg: LoraConfig, target_name: str):
        super().__init__()
        kind = _KINDS[type(target).__name__]
        self.kind, self.scaling, self.r = kind, cfg.scaling, cfg.r
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        w = target.weight
        if kind == "linear":
            n_in, n_out = target.in_features, target.out_features
        elif kind == "conv1d":
            n_in, n_out = w.shape
        elif kind == "embedding":
            n_in, n_out = target.num_embeddings, target.embedding_dim
        else:
            if target.groups != 1:
                raise ConfigError(f"{target_name}: LoRA supports Conv2d with groups=1 only (this one has "
                                  f"groups={target.groups}); target the 1x1 convolutions instead")
            n_in, n_out = target.in_channels, target.out_channels
            self.conv = {"stride": target.stride, "padding": target.padding, "dilation": target.dilation}
        a_shape = (cfg.r, n_in, *w.shape[2:]) if kind == "conv2d" else (cfg.r, n_in)
        b_shape = (n_out, cfg.r, 1, 1) if kind == "conv2d" else (n_out, cfg.r)
        self.lora_A = nn.Parameter(torch.empty(a_shape))
        self.lora_B = nn.Parameter(torch.zeros(b_shape))
        if kind == "embedding":
            nn.init.normal_(self.lora_A)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if cfg.dora:
            if kind not in ("linear", "conv1d"):
                raise ConfigError(f"{target_name}: DoRA supports Linear and Conv1D targets; set dora=false here")
            self.lora_magnitude = nn.Parameter(self._weight(target).float().norm(dim=1))
            self.__dict__["_target"] = target  # a reference, not a submodule: the base stays outside the adapter

    @staticmethod
    def _weight_of(kind: str, target: nn.Module) -> torch.Tensor:
        return target.weight.T if kind == "conv1d" else target.weight

    def _weight(self, target: nn.Module) -> torch.Tensor:
        """The target's weight as out x in (Linear layout)."""
        return self._weight_of(self.kind, target)

    def delta(self) -> torch.Tensor:
        """s * B A in the target's weight layout."""
        if self.kind == "conv2d":
            d = (self.lora_B.flatten(1) @ self.lora_A.flatten(1)).view(self.lora_B.shape[0], *self.lora_A.shape[1:])
            return d * self.scaling
        d = (self.lora_B @ self.lora_A) * self.scaling
        return d.T if self.kind in ("conv1d", "embedding") else d

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """s * B A dropout(x), computed in the adapter's dtype; under CPU autocast x keeps its dtype, since
        autocast runs these products in bf16 anyway (a bf16 x would otherwise go to float32 and back)."""
        if self.kind == "embedding":
            return F.embedding(x, self.lora_A.T) @ self.lora_B.T * self.scaling
        if not (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")):
            x = x.to(self.lora_A.dtype)
        x = self.dropout(x)
        if self.kind == "conv2d":
            return F.conv2d(F.conv2d(x, self.lora_A, **self.conv), self.lora_B) * self.scaling
        return (x @ self.lora_A.T) @ self.lora_B.T * self.scaling

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "lora_magnitude"):
            return y + self.update(x).to(y.dtype)
        target = self.__dict__["_target"]
        w = self._weight(target).to(self.lora_A.dtype)
        norm = (w + (self.lora_B @ self.lora_A) * self.scaling).norm(dim=1).detach()
        scale = self.lora_magnitude / norm
        bias = target.bias if target.bias is not None else 0
        # y - bias is W x; DoRA's output is scale * (W x + update) + bias
        return (scale * ((y - bias).to(scale.dtype) + self.update(x)) + bias).to(y.dtype)


@register
class LoRA(Method):
    name = "lora"
    description = "Low-rank updates B·A of frozen weights (rank r, alpha; rsLoRA and DoRA options). Mergeable."
    config_cls = LoraConfig
    capabilities = Capabilities(mergeable=True, mixed_batch=True, identity_at_init=True)
    supported_types = tuple(_KINDS)
    presets: ClassVar[dict[str, TargetSpec]] = {
        "bert": TargetSpec(names=("query", "value")),
        "mpnet": TargetSpec(names=("q", "v")),
        "distilbert": TargetSpec(names=("q_lin", "v_lin")),
        "llama": TargetSpec(names=("q_proj", "v_proj")),
        "gpt2": TargetSpec(names=("c_attn",)),
        # transformers 4.x ViT names them query/value, 5.x (ViT, DeiT, DINOv2) q_proj/v_proj
        "vit": TargetSpec(names=("query", "value", "q_proj", "v_proj")),
        "cnn": TargetSpec(names=("_expand_conv", "_project_conv")),
        "*": TargetSpec(types=("Linear",)),
    }
    #: every attention projection (queries, keys, values and the output), for recipes that adapt attention as a
    #: whole (the contrastive recipe's default)
    attention_presets: ClassVar[dict[str, TargetSpec]] = {
        "bert": TargetSpec(names=("query", "key", "value", "attention.output.dense")),
        "llama": TargetSpec(names=("q_proj", "k_proj", "v_proj", "o_proj")),
    }

    def build(self, target, config, *, target_name):
        return LoraModule(target, config, target_name)

    def merged_params(self, module, target):
        w = target.weight
        new = w.float() + module.delta()
        if hasattr(module, "lora_magnitude"):
            lin = module._weight_of(module.kind, target).float() + (module.lora_B @ module.lora_A) * module.scaling
            lin = lin * (module.lora_magnitude / lin.norm(dim=1))[:, None]
            new = lin.T if module.kind == "conv1d" else lin
        return {"weight": new.to(w.dtype)}

    def forward_mixed(self, modules, rows, x, y):
        kinds = {m.kind for m in modules}
        dropouts = {m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0 for m in modules}
        if kinds - {"linear", "conv1d"} or len(dropouts) > 1 or any(hasattr(m, "lora_magnitude") for m in modules):
            return super().forward_mixed(modules, rows, x, y)
        # One batched computation for all rows: stack every adapter's A and s*B (padded to the largest rank,
        # plus an all-zero adapter for base rows), gather one per row, two batched matmuls.
        r = max(m.r for m in modules)
        n_in, n_out = modules[0].lora_A.shape[1], modules[0].lora_B.shape[0]
        dtype = modules[0].lora_A.dtype
        A = x.new_zeros((len(modules) + 1, r, n_in), dtype=dtype)
        B = x.new_zeros((len(modules) + 1, n_out, r), dtype=dtype)
        for i, m in enumerate(modules):
            A[i, : m.r] = m.lora_A
            B[i, :, : m.r] = m.lora_B * m.scaling
        idx = torch.where(rows < 0, len(modules), rows)
        h = modules[0].dropout(x.to(dtype))
        flat = h.dim() == 2
        h = h.unsqueeze(1) if flat else h.reshape(h.shape[0], -1, n_in)
        out = torch.bmm(torch.bmm(h, A[idx].transpose(1, 2)), B[idx].transpose(1, 2))
        return y + (out.squeeze(1) if flat else out.reshape(*y.shape)).to(y.dtype)
