"""What model-site methods that add virtual tokens (prompt and prefix tuning) share: reading the batch shape from
the keyword inputs, extending the attention mask and position ids, and trimming outputs back to the inputs.

Conventions. The virtual block is ``width`` positions wide and comes before the real tokens. Row b uses the
rightmost ``counts[b]`` of them (its adapter's virtual tokens, left-padded with masked columns to the widest
adapter in a mixed batch; 0 for rows that use the base): those occupy positions 0..counts[b]-1 and shift the
row's real tokens by counts[b], so base rows keep exactly the positions the base would give them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from graftune.core import targets
from graftune.errors import ConfigError

#: output fields that run along the sequence and are trimmed back to the caller's tokens
SEQUENCE_FIELDS = ("last_hidden_state", "logits", "hidden_states")


def cache_argument(model: nn.Module) -> str:
    """The keyword by which ``model``'s forward takes a key/value cache: transformers 5.25 renamed
    ``past_key_values`` to ``cache`` (the old name warns, and is removed in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def check_family(base: nn.Module, method: str, families: tuple[str, ...]) -> None:
    """Raise unless ``base`` is a transformers model of one of ``families``."""
    family = targets.family_of(base)
    if family not in families or not hasattr(base, "get_input_embeddings"):
        raise ConfigError(f"{method} tuning supports the {', '.join(families)} model families; this base is "
                          f"{family!r} (use lora or ia3 for it)")


def inputs_shape(kwargs: dict, method: str) -> tuple[int, int, torch.device]:
    """(batch, tokens, device) of the keyword inputs; raise if they were given positionally or with a cache."""
    ref = kwargs.get("input_ids")
    if ref is None:
        ref = kwargs.get("inputs_embeds")
    if ref is None:
        raise ConfigError(f"{method} tuning needs the inputs by keyword: call with input_ids=... (or inputs_embeds=...)")
    if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
        raise ConfigError(f"{method} tuning cannot continue a cache passed in; call without one "
                          f"(AdapterModel.generate does cached decoding)")
    return ref.shape[0], ref.shape[1], ref.device


def row_index(rows: torch.Tensor | None, n_adapters: int, batch: int, device: torch.device) -> torch.Tensor:
    """Per row, an index into ``[adapter 0, ..., adapter n-1, base]``."""
    if rows is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return torch.where(rows < 0, n_adapters, rows).to(device)


def compute_dtype(base: nn.Module, device: torch.device) -> torch.dtype:
    """The dtype the base computes in: autocast's if it is on, else its input embeddings' (the frozen weights')."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return base.get_input_embeddings().weight.dtype


def vocab_sample(base: nn.Module, n: int) -> torch.Tensor:
    """n random token ids among the first 5,000 of the vocabulary (tokenizers list frequent tokens first; prompt
    tuning's vocabulary init samples the 5,000 most common tokens)."""
    vocab = base.get_input_embeddings().weight.shape[0]
    return torch.randint(0, min(vocab, 5000), (n,))


def extend_inputs(base: nn.Module, kwargs: dict, counts: torch.Tensor, width: int, length: int, *,
                  generating: bool, virtual_positions: bool) -> None:
    """In place on ``kwargs``: prepend ``width`` columns to ``attention_mask`` (row b: ``counts[b]`` ones on the
    right) and shift ``position_ids`` by ``counts``; with ``virtual_positions`` (the virtual tokens are fed as
    inputs, as in prompt tuning) the position ids cover them too. When generating without position ids given,
    transformers derives them from the extended mask (its cumulative sum), which is the same shift."""
    batch, device = counts.shape[0], counts.device
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.long, device=device)
    if mask.dim() != 2:
        raise ConfigError("prompt/prefix tuning needs a 2-D attention_mask (batch x tokens), not a prepared 4-D one")
    first = width - counts  # row b's first own virtual column
    cols = torch.arange(width, device=device)[None, :]
    kwargs["attention_mask"] = torch.cat([(cols >= first[:, None]).to(mask.dtype), mask], dim=1)
    positions = kwargs.get("position_ids")
    if (generating and positions is None) or "position_ids" not in inspect.signature(base.forward).parameters:
        return
    if positions is None:
        positions = torch.arange(length, device=device)[None, :]
    positions = (positions + counts[:, None]).expand(batch, -1)
    if virtual_positions:
        positions = torch.cat([(cols - first[:, None]).clamp(min=0), positions], dim=1)
    kwargs["position_ids"] = positions


def trimmer(width: int, length: int) -> Callable[[Any], Any]:
    """A function that drops the first ``width`` positions of the sequence outputs of a ``width + length`` run."""
    total = width + length

    def cut(x):
        if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[1] == total:
            return x[:, width:]
        if isinstance(x, tuple) and x and all(isinstance(t, torch.Tensor) for t in x):
            return tuple(cut(t) for t in x)
        return x

    def trim(out):
        if isinstance(out, torch.Tensor):
            return cut(out)
        if isinstance(out, dict):  # transformers' ModelOutput
            for key in SEQUENCE_FIELDS:
                if out.get(key) is not None:
                    out[key] = cut(out[key])
            return out
        if isinstance(out, tuple):  # return_dict=False: only (batch, tokens, features) tensors are sequences
            return type(out)(cut(x) for x in out)
        return out

    return trim
