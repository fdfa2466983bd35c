"""Per-forward routing: which adapters apply, and for mixed batches which adapter each row uses.

The model's forward publishes a :class:`Route` in a context variable; hooks read it. Routing travels in a
context, not in keyword arguments threaded through every layer of every architecture.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass

import torch

BASE = "__base__"


@dataclass(frozen=True)
class Route:
    """``names``: adapters applied, in order (stacking). ``rows``: for a mixed batch, a LongTensor with one
    index into ``names`` per row (-1 = base only); then each row gets exactly one adapter."""

    names: tuple[str, ...]
    rows: torch.Tensor | None = None


_ROUTE: contextvars.ContextVar[Route | None] = contextvars.ContextVar("graftune_route", default=None)
# torch.compile (dynamo) cannot read a ContextVar: each adapter hook in a compiled layer would break the graph there.
# It does trace a thread-local's attribute, and guards on its value in the calling thread. ``routed`` keeps this
# copy in step with the context variable, and code being compiled reads it. The two can differ only when asyncio
# tasks interleave ``routed`` blocks in one thread; AdapterModel's forward sets its route and runs the base without
# awaiting in between.
_TRACED = threading.local()


def current() -> Route | None:
    if torch.compiler.is_compiling():
        return getattr(_TRACED, "route", None)
    return _ROUTE.get()


@contextlib.contextmanager
def routed(route: Route | None):
    token = _ROUTE.set(route)
    previous, _TRACED.route = getattr(_TRACED, "route", None), route
    try:
        yield
    finally:
        _TRACED.route = previous
        _ROUTE.reset(token)


def mixed_route(adapter_names: list[str | None], known: set[str]) -> Route:
    """Turn one adapter name per row (None or "__base__" for the base) into a Route, once per forward."""
    from graftune.errors import ConfigError

    order: list[str] = []
    for n in adapter_names:
        if n not in (None, BASE) and n not in order:
            if n not in known:
                raise ConfigError(f"adapter_names names {n!r}, which is not loaded; loaded: {', '.join(sorted(known))}")
            order.append(n)
    rows = torch.tensor([-1 if n in (None, BASE) else order.index(n) for n in adapter_names], dtype=torch.long)
    return Route(tuple(order), rows)
