"""``compile: true``: ``torch.compile`` the base's repeated layers, with a fallback to eager when it fails.

Regional compilation (each layer of the layer stack compiled in place with ``nn.Module.compile``) rather than the
whole base: identical layers share one compiled graph, so compiling takes the time of one layer; the module tree,
parameter names and state dict stay as they were (adapters are saved by module name); the frozen-prefix cache
keeps standing the cached layers aside, and those are not compiled at all (after the first epoch they never run).

Compilation happens lazily, at the first call, and fails in many ways (no C++ compiler for the CPU backend, an
operation dynamo cannot trace), so :func:`compile_layers` runs a check call at once and, on any failure, puts
the layers back to eager and says why. Adapters attach through forward hooks, which dynamo traces into the layer's
graph (no graph break); they read nothing that differs between targets but module objects, so one compiled graph
serves every layer (``core/model.py``, ``tests/unit/test_compile_hooks.py``). A change of the active, merged or
attached adapters fails a guard and recompiles once.

The backend is ``inductor`` (torch's default); the environment variable ``GRAFTUNE_COMPILE_BACKEND`` picks
another (``aot_eager`` or ``eager`` to debug, or to test the wiring quickly).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch import nn

from graftune.speed.cache import layer_stack


def backend() -> str:
    return os.environ.get("GRAFTUNE_COMPILE_BACKEND", "inductor")


def compile_layers(base: nn.Module, *, start: int = 0, check: Callable[[], Any] | None = None) -> tuple[bool, str]:
    """Compile layers ``start..`` of ``base``'s layer stack (the whole base when it has none), then run ``check``
    (a model call that triggers compilation). Returns ``(compiled, note)``; on failure everything is eager again."""
    found = layer_stack(base)
    modules = list(found[0])[start:] if found is not None else [base]
    if not modules:
        return False, "compile: nothing in the base runs per step (every layer is cached); nothing to compile"
    name = backend()
    try:
        for m in modules:
            m.compile(backend=name)
        if check is not None:
            check()
    except Exception as e:  # noqa: BLE001 (any failure inside torch.compile means: run eager)
        for m in modules:
            m._compiled_call_impl = None  # what nn.Module.compile set; None is eager again
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return False, f"compile: torch.compile failed ({type(e).__name__}: {first}); running eager instead"
    what = f"layers {start}..{start + len(modules) - 1}" if found is not None else "the base"
    return True, f"compile: {what} compiled with torch.compile (backend {name})"
