"""Frozen-prefix caching: when only the top of the network trains, compute the frozen bottom once.

If every active adapter sits in layers >= L (LoRA in the top k layers, top-k fine-tuning, ...), the hidden
states entering layer L depend only on the input, not on anything that trains. The first time a batch is seen
they are recorded (a pre-hook on layer L); afterwards the layers below L are stood in for by a pass-through and
the recorded hidden states are fed to layer L. The rest of the base's own forward runs unchanged, so attention
masks, position embeddings and heads are computed exactly as without the cache.

Entries are keyed by the batch's input tensors' bytes, so changed inputs (augmentation, new batches) miss the
cache and are computed afresh: invalidation is automatic. Dropout in the cached layers is frozen (it ran once);
in eval mode the cached forward is bit-identical to the plain one.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch
from torch import nn

from graftune.core import targets
from graftune.core.model import MODEL_SITE, AdapterModel


class _PassThrough(nn.Module):
    """Stands in for a cached layer: returns its hidden-state input unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _layer_list(base: nn.Module) -> tuple[nn.ModuleList, str] | None:
    """The ModuleList holding the repeated layers (``encoder.layer``, ``model.layers``, ``_blocks``)."""
    best = None
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and (best is None or len(module) > len(best[0])):
            best = (module, name)
    return best


def lowest_trained_layer(model: AdapterModel) -> int | None:
    """The lowest layer index any active adapter touches; None when caching is impossible (an adapter works on
    the model inputs, or on a module outside the layer stack)."""
    lowest = None
    for name in model.active:
        info = model.info[name]
        for t in info.targets:
            if t == MODEL_SITE:
                return None
            i = targets.layer_index(t)
            if i is None:
                return None
            lowest = i if lowest is None else min(lowest, i)
    return lowest


class FrozenPrefixCache:
    """Cache the input of layer ``start`` per batch. Use ``with cache.around(batch_tensors): out = model(...)``."""

    def __init__(self, model: AdapterModel, start: int | None = None):
        found = _layer_list(model.base)
        self.start = lowest_trained_layer(model) if start is None else start
        self.layers = found[0] if found else None
        self.enabled = bool(self.layers is not None and self.start)
        self.store: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    @staticmethod
    def key(*tensors: torch.Tensor) -> str:
        h = hashlib.sha1()
        for t in tensors:
            t = t.detach().cpu().contiguous()
            h.update(str((tuple(t.shape), t.dtype)).encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
        return h.hexdigest()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store.values())

    @contextlib.contextmanager
    def around(self, *inputs: torch.Tensor):
        """Run the model inside this block; ``inputs`` identify the batch (e.g. input_ids and attention_mask)."""
        if not self.enabled:
            yield
            return
        key = self.key(*inputs)
        target = self.layers[self.start]
        if key in self.store:
            self.hits += 1
            cached = self.store[key]
            saved = [self.layers[i] for i in range(self.start)]

            def feed(module, args, kwargs):
                if args:
                    return (cached, *args[1:]), kwargs
                first = next(iter(kwargs))
                return args, {**kwargs, first: cached}

            handle = target.register_forward_pre_hook(feed, with_kwargs=True)
            for i in range(self.start):
                self.layers[i] = _PassThrough()
            try:
                yield
            finally:
                handle.remove()
                for i, layer in enumerate(saved):
                    self.layers[i] = layer
            return

        self.misses += 1

        def record(module, args, kwargs):
            hidden = args[0] if args else next(iter(kwargs.values()))
            self.store[key] = hidden.detach()

        handle = target.register_forward_pre_hook(record, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
