"""The model registry: immutable, hashed versions of run directories under a name, a regression gate on
promotion, rollback, and an audit log, all in one folder with an embedded SQLite index (nothing to start).

    reg = Registry(default_root())          # or Registry(Path("registry")); nothing is created before a push
    v = reg.push("runs/news", "news")       # -> Version(name="news", version=1, path=<a run directory>)
    reg.promote("news", 1)                  # the first version of a name promotes without a gate
    reg.promote("news", 2)                  # -> GateResult: refused when v2 is worse beyond sampling noise
    reg.rollback("news")                    # back to the previously promoted version
    reg.promoted()                          # {"news": Version(...)}: what a server serves
    reg.generation()                        # bumps on every change: poll it to notice promote/rollback

A server reads promoted versions through :meth:`Registry.promoted` and :meth:`Registry.load` (which re-hashes the
files before loading), and polls :meth:`Registry.generation` to follow promotions without a restart.
"""

from graftune.registry.gate import GateResult, paired_test
from graftune.registry.store import Registry, Version, default_root, open_registry, parse_ref

__all__ = ["GateResult", "Registry", "Version", "default_root", "open_registry", "paired_test", "parse_ref"]
