"""Partial and full fine-tuning: BitFit, the top k layers, every parameter.

BitFit (Ben Zaken et al. 2021, https://arxiv.org/abs/2106.10199) trains only the bias terms. Here each target
gets a zero-initialized bias *delta* added to its output, so the base's own biases are never written:

    y' = f(x) + db      (Linear, Conv1D, LayerNorm: db over the last dims; Conv2d, BatchNorm2d: db per channel,
                         broadcast over height and width)

which equals training the bias b as b + db. It is identity at init, mergeable (b' = b + db) and serves
mixed-adapter batches with one gather. A target without a bias (Llama's projections, convolutions followed by
batch norm) gets a *new* zero-initialized bias; the presets pick modules that have biases, except on Llama-style
models, which have none: there BitFit adds biases to the attention and MLP projections.

``topk`` and ``full`` (``site="params"``) own trainable copies of base parameters, which core swaps into the base
while the adapter is active (the base's own Parameter objects are kept aside, never written):

    topk: the parameters of every module in layers n-k .. n-1 (``top_k_layers``, default 2)
    full: every parameter of the model (embeddings, all layers, final norm, output projection)

Each adapter holds a full copy of what it trains: memory = the copied weights, plus the optimizer's state.

Training only the task head is not a method: the head lives outside the base, so there is nothing to graft;
``graftune train --method head`` trains the head alone (see the training docs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from graftune.core.method import Capabilities, Method, MethodConfig, TargetSpec, check, register

# --- BitFit ----------------------------------------------------------------------------------------------------

_CHANNEL_FIRST = ("Conv2d", "BatchNorm2d")  # output (batch, channels, height, width): the bias is per channel
_BIAS_TYPES = ("Linear", "Conv1D", "LayerNorm", *_CHANNEL_FIRST)


@dataclass(frozen=True)
class BitFitConfig(MethodConfig):
    """BitFit has no options of its own; ``targets`` and ``top_k_layers`` pick the biases to train."""


def _bias_shape(target: nn.Module) -> tuple[int, ...]:
    """The shape of ``target``'s bias, or of the bias it would have (for modules built without one)."""
    if getattr(target, "bias", None) is not None:
        return tuple(target.bias.shape)
    kind = type(target).__name__
    if kind == "Linear":
        return (target.out_features,)
    if kind == "Conv1D":
        return (target.nf,)
    if kind == "LayerNorm":
        return tuple(target.normalized_shape)
    if kind == "Conv2d":
        return (target.out_channels,)
    return (target.num_features,)  # BatchNorm2d


class BitFitBias(nn.Module):
    """A bias delta for one target. ``forward(x, y)`` returns ``y + db`` broadcast like the target's bias."""

    def __init__(self, target: nn.Module):
        super().__init__()
        self.channel_first = type(target).__name__ in _CHANNEL_FIRST
        self.bitfit_bias = nn.Parameter(torch.zeros(_bias_shape(target)))

    def broadcast(self, d: torch.Tensor, y: torch.Tensor, batched: bool = False) -> torch.Tensor:
        """Shape bias deltas ``d`` (``(*bias)``, or ``(batch, *bias)`` if ``batched``) to add to output ``y``."""
        lead = d.shape[:1] if batched else ()
        if self.channel_first:
            return d.view(*lead, -1, 1, 1)
        return d.view(*lead, *([1] * (y.dim() - len(lead) - self.bitfit_bias.dim())), *self.bitfit_bias.shape)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + self.broadcast(self.bitfit_bias, y).to(y.dtype)


@register
class BitFit(Method):
    name = "bitfit"
    description = "Bias terms only: a zero-initialized bias delta on every Linear/Conv/norm output. Mergeable."
    config_cls = BitFitConfig
    capabilities = Capabilities(mergeable=True, mixed_batch=True, identity_at_init=True)
    supported_types = _BIAS_TYPES
    presets: ClassVar[dict[str, TargetSpec]] = {
        "bert": TargetSpec(types=("Linear", "LayerNorm")),
        "mpnet": TargetSpec(types=("Linear", "LayerNorm")),
        "distilbert": TargetSpec(types=("Linear", "LayerNorm")),
        "vit": TargetSpec(types=("Linear", "LayerNorm")),
        # lm_head has no bias: left out
        "gpt2": TargetSpec(types=("Conv1D", "LayerNorm")),
        # Llama-style models have no biases at all (RMSNorm has none either): new biases on the projections
        "llama": TargetSpec(names=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
        # convolutions without a bias are followed by batch norm, whose bias is the one to train
        "cnn": TargetSpec(types=("BatchNorm2d", "Linear")),
        "*": TargetSpec(types=_BIAS_TYPES),
    }

    def build(self, target, config, *, target_name):
        return BitFitBias(target)

    def merged_params(self, module, target):
        delta = module.bitfit_bias.detach()
        if target.bias is None:
            dtype = next(iter(target.parameters()), delta).dtype
            return {"bias": delta.to(dtype)}
        return {"bias": (target.bias.float() + delta.float()).to(target.bias.dtype)}

    def forward_mixed(self, modules, rows, x, y):
        # One gather for all rows: stack the adapters' deltas plus a zero row for base rows (-1).
        deltas = torch.stack([m.bitfit_bias for m in modules])
        table = torch.cat([deltas, deltas.new_zeros((1, *deltas.shape[1:]))])
        d = table[torch.where(rows < 0, len(modules), rows)]
        return y + modules[0].broadcast(d, y, batched=True).to(y.dtype)


# --- top-k layers and full fine-tuning ---------------------------------------------------------------------


@dataclass(frozen=True)
class TopKConfig(MethodConfig):
    """Args:
    top_k_layers: how many of the top layers to train (1 .. the model's number of layers); default 2.
    """

    top_k_layers: int | None = 2

    def validate(self):
        check(self.top_k_layers is not None, "top_k_layers",
              "topk needs a number of layers to train (e.g. 2); to train every layer use method 'full'")


@dataclass(frozen=True)
class FullConfig(MethodConfig):
    """Full fine-tuning has no options of its own; ``targets`` may narrow it to some modules."""

    def validate(self):
        check(self.top_k_layers is None, "top_k_layers",
              f"got {self.top_k_layers}; full trains every layer: use method 'topk' to train only the top layers")


class _ParamCopies(Method):
    """Shared by topk and full: the adapter for one target owns trainable copies of the target's own (direct)
    parameters, registered under the same names, which core swaps into the target while the adapter is active.
    A target with no direct parameters (a container) and the second place of a tied parameter get none."""

    site = "params"
    capabilities = Capabilities(mergeable=False, mixed_batch=False, identity_at_init=True)
    merge_note = "its weights already are full weights"
    presets: ClassVar[dict[str, TargetSpec]] = {"*": TargetSpec()}  # every module; top_k_layers narrows it to the top layers

    def build(self, target, config, *, target_name):
        holder = nn.Module()
        for pname, p in target.named_parameters(recurse=False):
            holder.register_parameter(pname, nn.Parameter(p.detach().clone(), requires_grad=False))
        return holder

    def combine(self, modules, weights, config, target, target_name):
        # The weighted average of copies, name by name (a holder may lack a tied parameter its target has).
        holder = nn.Module()
        with torch.no_grad():
            for pname, p in modules[0].named_parameters():
                value = sum(w * dict(m.named_parameters())[pname].float() for m, w in zip(modules, weights))
                holder.register_parameter(pname, nn.Parameter(value.to(p.dtype), requires_grad=False))
        return holder


@register
class TopK(_ParamCopies):
    name = "topk"
    description = "Fine-tune the top k layers (top_k_layers, default 2): trainable copies of their weights."
    config_cls = TopKConfig


@register
class Full(_ParamCopies):
    name = "full"
    description = "Full fine-tuning baseline: a trainable copy of every weight (memory: a second model)."
    config_cls = FullConfig
