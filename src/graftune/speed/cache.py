"""Frozen-prefix caching: when only the top of the network trains, compute the frozen bottom once per example.

If every active adapter sits in layers >= L (LoRA with ``top_k_layers``, top-k fine-tuning) or none does (a
head-only run: L is the number of layers), the hidden states leaving layer L-1 depend only on the input tokens,
not on anything that trains. :class:`FrozenPrefixCache` stores them per example (the row's real tokens are the
key) and, once every row of a batch is stored, runs the base with layers 0..L-1 standing aside: their forward
returns at once, and layer L-1 hands over the stored rows, padded to the batch. Everything else in the base's own
forward runs unchanged, for the batch at hand: embeddings (cheap, their output is dropped), the attention mask,
position ids and rotary embeddings, the layers >= L with their adapters, the final norm, heads. So nothing
architecture-specific is stored, only hidden states, and the layers above L see exactly what the plain forward
would give them.

It is transparent: :meth:`FrozenPrefixCache.attach` puts hooks on the base, and any call of the model in the
meantime (training steps, validation scoring, the probe that starts the head) is served from the cache or
fills it. A call whose rows are not all stored runs the whole base and stores the rows it lacks;
:meth:`FrozenPrefixCache.fill` stores a set of batches up front, running only the layers below L.

Correctness rests on a few facts, each checked:

- keys are the row's real token ids: changed inputs (an augmented copy, a new text) miss and are computed
  afresh, so a stored row is never reused for other tokens;
- the rows must be right-padded (padding after the real tokens, as ``task.collate`` does): then a real token's
  position, and so its hidden state, does not depend on the padding. Left-padded calls (generation), calls with
  ``past_key_values``, ``position_ids`` or ``inputs_embeds`` bypass the cache;
- the layers below L must not change from call to call: no active adapter below L or at the model inputs
  (prompt, prefix), no trainable base parameter below L, and no dropout there: rows are stored only while those
  layers are in eval mode (``train()`` uses the cache only without ``base_dropout``);
- :meth:`FrozenPrefixCache.verify` compares a cached forward with the plain one on a real batch before use.

Memory is capped (``max_mb``; unset: :func:`default_max_bytes`). A row that would take the store past the cap is
not stored: every call that holds it runs the whole base, as without the cache (still correct, just not faster),
and ``stats()`` counts such rows in ``rows_uncached_over_cap``.

``fewshot.contrastive_fit`` and ``train()`` both use this class.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

from graftune.core import targets
from graftune.core.model import MODEL_SITE, AdapterModel
from graftune.errors import ConfigError


class _Stop(Exception):
    """Raised after recording while filling: the layers above the cached point need not run."""


def layer_stack(base: nn.Module) -> tuple[nn.ModuleList, str] | None:
    """The ModuleList holding the repeated layers (``encoder.layer``, ``model.layers``) and its name."""
    best = None
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and (best is None or len(module) > len(best[0])):
            best = (module, name)
    return best


def plan(model: AdapterModel) -> tuple[int | None, str]:
    """``(L, note)``: the first layer that must run every step (the layers below it can be cached), or
    ``(None, why not)``. L equals the number of layers when nothing in the layer stack trains (head only)."""
    found = layer_stack(model.base)
    if found is None:
        return None, "the base has no layer stack (a ModuleList of repeated layers) to cut"
    layers, stack = found
    lowest = len(layers)
    for name in model.active:
        info = model.info[name]
        if info.method.site == "model" or MODEL_SITE in info.targets:
            return None, f"adapter {name} ({info.method.name}) changes the model's inputs"
        for t in info.targets:
            i = targets.layer_index(t)
            if i is None or not t.startswith(stack + "."):
                return None, f"adapter {name} targets {t}, outside the layer stack {stack}"
            lowest = min(lowest, i)
    for pname, p in model.base.named_parameters():
        if p.requires_grad:
            i = targets.layer_index(pname)
            if i is None or not pname.startswith(stack + "."):
                return None, f"base parameter {pname} trains outside the layer stack"
            lowest = min(lowest, i)
    if lowest == 0:
        return None, "an adapter sits in layer 0: nothing below it to cache"
    return lowest, describe(lowest, len(layers))


def describe(start: int, n_layers: int) -> str:
    first = f"layers 0..{start - 1}" if start > 1 else "layer 0"
    if start == n_layers:
        return f"{first} (every layer) computed once per example; nothing in the base runs per step"
    return f"layers {start}..{n_layers - 1} run per step; {first} computed once per example"


def _hidden(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def default_max_bytes(device: torch.device) -> int:
    """The cap when none is given: a quarter of the memory free now where the rows live (the GPU's for a model on
    CUDA; else RAM, split among the processes a launcher started on this machine). The cache only saves time, so
    it must never be what runs the machine out of memory: the other three quarters stay for the model, a training
    step's activations, the optimizer and whatever else runs. A quarter of 8 GB free holds MiniLM's fp32 hidden
    states for 5,000 texts of 256 tokens."""
    import psutil

    from graftune.speed.distributed import local_world_size

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 4
    return psutil.virtual_memory().available // 4 // local_world_size()


class FrozenPrefixCache:
    """Per-example hidden states leaving layer ``start - 1`` (see the module docstring).

    Use ``cache.attach()`` ... ``cache.detach()`` (or ``with cache.attached():``) around the model calls to serve;
    ``cache.enabled`` is False (with the reason in ``cache.note``) when the model cannot be cached. ``hits``,
    ``misses`` and ``bypassed`` count model calls; ``nbytes()`` is the memory held, never more than ``max_mb``
    megabytes (unset: :func:`default_max_bytes` for the model's device); ``over_cap`` holds the keys of the rows
    left uncached because of it."""

    def __init__(self, model: AdapterModel, start: int | None = None, *, max_mb: float | None = None):
        self.model = model
        found = layer_stack(model.base)
        self.layers = found[0] if found else None
        if start is None:
            self.start, self.note = plan(model)
        elif self.layers is None or not 0 < start <= len(self.layers):
            self.start, self.note = None, f"start={start}: no such layer boundary"
        else:
            self.start, self.note = start, describe(start, len(self.layers))
        self.store: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = self.bypassed = 0
        if max_mb is not None and max_mb <= 0:
            raise ConfigError(f"cache max_mb: got {max_mb}; use a positive number of megabytes")
        device = next(model.parameters(), torch.empty(0)).device
        self.max_bytes = int(max_mb * 1e6) if max_mb is not None else default_max_bytes(device)
        self.over_cap: set[bytes] = set()
        self._bytes = 0
        self._handles: list = []
        self._pending: list[tuple[int, bytes, int]] | None = None  # rows a running miss call must store
        self._patched: list[tuple[nn.Module, object]] = []
        self._tuple_out = False  # whether layer start-1 returns a tuple (older transformers) or a tensor
        self._stop = False

    @property
    def enabled(self) -> bool:
        return self.start is not None

    @property
    def attached_now(self) -> bool:
        return bool(self._handles)

    def nbytes(self) -> int:
        return self._bytes

    def stats(self) -> dict:
        return {"examples": len(self.store), "mb": round(self.nbytes() / 1e6, 2), "hits": self.hits,
                "misses": self.misses, "bypassed": self.bypassed, "max_mb": round(self.max_bytes / 1e6, 2),
                "rows_uncached_over_cap": len(self.over_cap)}

    # --- hooks -----------------------------------------------------------------------------------------------
    def attach(self) -> None:
        """Serve (and fill) every call of the model until :meth:`detach`. No-op when not enabled."""
        if not self.enabled or self._handles:
            return
        base, last = self.model.base, self.layers[self.start - 1]
        self._handles = [base.register_forward_pre_hook(self._before, with_kwargs=True),
                         base.register_forward_hook(self._after, always_call=True),
                         last.register_forward_hook(self._record)]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._unpatch()
        self._pending = None

    @contextlib.contextmanager
    def attached(self):
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    def clear(self) -> None:
        self.store.clear()
        self.over_cap.clear()
        self._bytes = 0

    def _rows(self, args: tuple, kwargs: dict) -> tuple[list[bytes], list[int]] | None:
        """Keys and real lengths of the call's rows, or None when this call must bypass the cache."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not torch.is_tensor(ids) or ids.dim() != 2 or len(args) > 1:
            return None
        for k in ("inputs_embeds", "past_key_values", "cache", "position_ids", "token_type_ids", "cache_position"):
            if kwargs.get(k) is not None:
                return None
        mask = kwargs.get("attention_mask")
        width = ids.shape[1]
        if mask is None:
            lengths = [width] * ids.shape[0]
        else:
            if mask.dim() != 2 or mask.shape != ids.shape:
                return None
            mask = mask.detach().cpu().bool()
            n = mask.sum(1)
            if not torch.equal(mask, torch.arange(width)[None, :] < n[:, None]):
                return None  # left padding (or holes): positions would depend on the padding
            lengths = n.tolist()
        rows = ids.detach().cpu()
        return [rows[r, :k].numpy().tobytes() for r, k in enumerate(lengths)], lengths

    def _before(self, module, args, kwargs):
        if self._pending is not None or self._patched:  # a call inside a call (not ours to handle)
            return
        found = self._rows(args, kwargs)
        if found is None:
            self.bypassed += 1
            return
        keys, lengths = found
        missing = [(r, k, n) for r, (k, n) in enumerate(zip(keys, lengths)) if k not in self.store]
        if missing and any(self.layers[i].training for i in range(self.start)):
            self.bypassed += 1  # dropout in the lower layers: their output is random, nothing to keep
            return
        if missing:
            self.misses += 1
            self._pending = missing
            return
        self.hits += 1
        stored = [self.store[k] for k in keys]
        width = kwargs.get("input_ids", args[0] if args else None).shape[1]
        hidden = nn.utils.rnn.pad_sequence(stored, batch_first=True)
        if hidden.shape[1] < width:
            hidden = nn.functional.pad(hidden, (0, 0, 0, width - hidden.shape[1]))
        self._patch(hidden)

    def _after(self, module, args, output):
        self._unpatch()
        self._pending = None

    def _record(self, module, args, output):
        if self._pending is None:
            return
        self._tuple_out = isinstance(output, (tuple, list))
        h = _hidden(output).detach()
        # stored tensors must be plain tensors even when recorded under inference_mode (evaluation), so that a
        # training step may later save them for backward
        with torch.inference_mode(False), torch.no_grad():
            for r, key, n in self._pending:
                size = n * h[r, 0].numel() * h.element_size()
                if self._bytes + size > self.max_bytes:
                    self.over_cap.add(key)  # runs uncached (the whole base) whenever a call holds it
                    continue
                self.store[key] = h[r, :n].clone()
                self._bytes += size
        self._pending = None
        if self._stop:
            raise _Stop

    def _patch(self, hidden: torch.Tensor) -> None:
        """Layers 0..start-1 return at once; layer start-1 returns ``hidden`` (as the real layer would)."""
        out = (hidden,) if self._tuple_out else hidden

        def skip(hidden_states=None, *args, **kwargs):
            return (hidden_states,) if self._tuple_out else hidden_states

        def hand_over(*args, **kwargs):
            return out

        for i in range(self.start):
            layer = self.layers[i]
            self._patched.append((layer, layer.__dict__.get("forward")))
            layer.forward = hand_over if i == self.start - 1 else skip

    def _unpatch(self) -> None:
        for layer, previous in self._patched:
            if previous is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = previous
        self._patched = []

    # --- filling and checking ---------------------------------------------------------------------------------
    @torch.no_grad()
    def fill(self, batches: Iterable[dict]) -> None:
        """Store the rows of ``batches`` (dicts with ``input_ids`` and ``attention_mask``, right-padded), running
        only the layers below ``start``. The model must be in eval mode; call it under the training autocast."""
        if not self.enabled:
            return
        with self.attached() if not self._handles else contextlib.nullcontext():
            self._stop = True
            try:
                for batch in batches:
                    try:
                        self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    except _Stop:
                        pass
            finally:
                self._stop = False

    @torch.no_grad()
    def verify(self, forward: Callable[[dict], torch.Tensor], batch: dict, *,
               rtol: float = 1e-3) -> tuple[bool, str]:
        """Compare ``forward(batch)`` served from the cache with the plain forward (the model in eval mode; only
        real positions are compared).

        ``forward``: the model call the cache will serve (``task.forward`` with the head in eval mode, say). Returns
        ``(ok, detail)``; on failure the caller should not use the cache. ``rtol``: relative to the largest output."""
        if not self.enabled:
            return False, self.note
        attached = bool(self._handles)
        modes = [(m, m.training) for m in self.model.modules()]  # train() may leave the base alone in eval mode
        self.detach()
        self.model.eval()
        try:
            ref = forward(batch).float()
            hits = self.hits
            with self.attached():
                forward(batch)  # stores the rows it lacks
                got = forward(batch).float()
        finally:
            for m, mode in modes:
                m.training = mode
            if attached:
                self.attach()
        if self.hits == hits:
            if self.over_cap:
                return False, (f"the cache's memory cap ({self.max_bytes / 1e6:g} MB) cannot hold the "
                               f"{len(batch['input_ids'])} rows it is checked on; raise cache_max_mb")
            return False, "the batch bypassed the cache (left-padded or with position ids)"
        mask = batch.get("attention_mask")
        if got.dim() == 3 and mask is not None and got.shape[:2] == mask.shape:
            keep = mask.bool()
            got, ref = got[keep], ref[keep]
        if got.shape != ref.shape:
            return False, f"cached output shape {tuple(got.shape)} differs from the plain {tuple(ref.shape)}"
        err = float((got - ref).abs().max()) if got.numel() else 0.0
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        if err > rtol * max(scale, 1e-6):
            return False, f"replaying the stored layers differs from the plain forward (max error {err:.2e})"
        return True, f"checked: max error {err:.1e} vs plain"


# --- in the training loop ---------------------------------------------------------------------------------------
def frozen_prefix_for_training(mode: str, model: AdapterModel, task, head: nn.Module | None,
                               example_sets: list[list[dict]], *, policy, base_dropout: bool, kind: str,
                               batch_size: int = 64,
                               max_mb: float | None = None) -> tuple[FrozenPrefixCache | None, str]:
    """``train()``'s cache: decide (``mode``: auto, on, off), check, store ``example_sets`` (the encoded train and
    val examples) and attach. Returns the attached cache, or None, and a note saying what was decided and why.

    ``task``: the task whose ``collate`` and ``forward`` the loop uses (batches on the training device);
    ``policy``: the precision policy (stored hidden states are computed under its autocast, as training's);
    ``max_mb``: the cache's memory cap (unset: :func:`default_max_bytes`)."""
    from graftune.tasks import batches

    if mode == "off":
        return None, "off (cache: off)"
    why, cache = None, None
    if kind == "image":
        why = "image inputs are not cached (rows are keyed by their token ids)"
    elif base_dropout:
        why = "base_dropout is on, so the frozen layers are random while training"
    else:
        cache = FrozenPrefixCache(model, max_mb=max_mb)
        why = None if cache.enabled else cache.note
    examples = [e for group in example_sets for e in group]
    if why is None and examples:
        modes = [(m, m.training) for m in (head.modules() if head is not None else [])]
        if head is not None:
            head.eval()
        try:
            with policy.autocast():
                # a few examples of ONE set: train's are labelled and val's are not, and a batch cannot mix them
                sample = next(group for group in example_sets if group)[:4]
                ok, detail = cache.verify(lambda b: task.forward(model, head, b), task.collate(sample),
                                          rtol=2e-2 if policy.autocast_dtype is not None else 1e-4)
        finally:
            for m, was in modes:
                m.training = was
        why = None if ok else detail
    if why is not None:
        if mode == "on":
            raise ConfigError(f"cache: on, but the frozen-prefix cache cannot apply: {why}; use --cache auto or off")
        return None, f"off ({why})"
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with policy.autocast():
            cache.fill(task.collate([group[i] for i in idx]) for group in example_sets
                       for idx in batches(group, [task.length(e) for e in group], batch_size))
    finally:
        for m, was in modes:
            m.training = was
    cache.attach()
    over = f"; {len(cache.over_cap)} rows over the {cache.max_bytes / 1e6:g} MB cap run uncached" if cache.over_cap else ""
    return cache, f"on: {cache.note} ({len(cache.store)} examples, {cache.nbytes() / 1e6:.1f} MB{over})"
