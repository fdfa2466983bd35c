"""IA3: learned vectors that rescale keys, values and feed-forward activations.

    k' = l_k * k,   v' = l_v * v               (output site: the key/value projections' outputs)
    h' = W_down (l_ff * f(W_up x))             (input site: the feed-forward down-projection's input)

with every l a vector initialised to ones, so the model starts unchanged (Liu et al. 2022, "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning",
https://arxiv.org/abs/2205.05638). Which targets are scaled at their input is decided per target by
``feedforward`` (a regular expression on the module name).

Mergeable: rescaling is linear, so l folds into the target's weight (Linear weights are out x in):
output site W' = diag(l) W, b' = l * b;  input site W' = W diag(l), b unchanged.

GPT-2 computes queries, keys and values with one fused projection (``c_attn``); its vector spans all three, so
queries are rescaled too (ones at init; a redundant but harmless extra degree of freedom).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from graftune.core.method import Capabilities, Method, MethodConfig, TargetSpec, check, register

# The feed-forward down-projections of the supported families (BERT/MPNet and 4.x ViT, 5.x ViT/DeiT/DINOv2,
# DistilBERT, Llama-style, GPT-2).
FEEDFORWARD = r"(layer\.\d+\.output\.dense|mlp\.fc2|ffn\.lin2|mlp\.down_proj|mlp\.c_proj)$"


@dataclass(frozen=True)
class IA3Config(MethodConfig):
    """Args:
    feedforward: regular expression on target names whose *input* is rescaled (the feed-forward
        down-projections); every other target has its output rescaled.
    """

    feedforward: str = FEEDFORWARD

    def validate(self):
        check(isinstance(self.feedforward, str), "feedforward", f"got {self.feedforward!r}; use a regular expression")
        try:
            re.compile(self.feedforward)
        except re.error as e:
            check(False, "feedforward", f"{self.feedforward!r} is not a valid regular expression ({e})")


class IA3Module(nn.Module):
    """One learned vector ``ia3_l``. ``forward(*xs)`` rescales the last argument: the target's output (output
    site, called with ``(x, y)``) or its input (input site, called with ``(x,)``); features are on the last axis."""

    def __init__(self, target: nn.Module, site: str):
        super().__init__()
        self.site = site
        self.conv1d = type(target).__name__ == "Conv1D"  # GPT-2's layer: weight stored in x out
        n_in, n_out = target.weight.shape[::-1] if not self.conv1d else target.weight.shape
        self.ia3_l = nn.Parameter(torch.ones(n_in if site == "input" else n_out))

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        t = xs[-1]
        return (t.to(self.ia3_l.dtype) * self.ia3_l).to(t.dtype)


@register
class IA3(Method):
    name = "ia3"
    description = "IA3: learned vectors rescaling keys, values and feed-forward activations (ones at init). Mergeable."
    config_cls = IA3Config
    capabilities = Capabilities(mergeable=True, mixed_batch=True, identity_at_init=True)
    supported_types = ("Linear", "Conv1D")
    presets: ClassVar[dict[str, TargetSpec]] = {
        "bert": TargetSpec(regex=r"(\.key|\.value|layer\.\d+\.output\.dense)$"),
        "mpnet": TargetSpec(regex=r"(attn\.k|attn\.v|layer\.\d+\.output\.dense)$"),
        "distilbert": TargetSpec(names=("k_lin", "v_lin", "ffn.lin2")),
        "llama": TargetSpec(names=("k_proj", "v_proj", "down_proj")),
        "gpt2": TargetSpec(names=("c_attn", "mlp.c_proj")),
        "vit": TargetSpec(regex=r"(\.key|\.value|\.k_proj|\.v_proj|layer\.\d+\.output\.dense|mlp\.fc2)$"),
    }

    def site_for(self, target_name, config):
        return "input" if re.search(config.feedforward, target_name) else "output"

    def build(self, target, config, *, target_name):
        return IA3Module(target, self.site_for(target_name, config))

    def merged_params(self, module, target):
        scale = module.ia3_l
        # the axis of the weight that l scales: out for output site, in for input site (Conv1D is in x out)
        out_axis = 1 if module.conv1d else 0
        axis = out_axis if module.site == "output" else 1 - out_axis
        shape = [1, 1]
        shape[axis] = -1
        new = {"weight": (target.weight.float() * scale.view(shape)).to(target.weight.dtype)}
        if module.site == "output" and target.bias is not None:
            new["bias"] = (target.bias.float() * scale).to(target.bias.dtype)
        return new

    def forward_mixed(self, modules, rows, *xs):
        # One gathered multiply: stack the vectors plus a ones row for base rows, pick one per row.
        t = xs[-1]
        vectors = torch.stack([m.ia3_l for m in modules] + [torch.ones_like(modules[0].ia3_l)])
        scale = vectors[torch.where(rows < 0, len(modules), rows)]
        scale = scale.view(t.shape[0], *([1] * (t.dim() - 2)), t.shape[-1])
        return (t.to(scale.dtype) * scale).to(t.dtype)
