"""graftune: graft small trainable modules onto frozen pre-trained models.

The public API is small and stable::

    from graftune import graft, AdapterModel, list_methods
"""

# the package, not the registry, imports the built-in methods: each registers itself (``@register``) on import
import graftune.methods  # noqa: F401
from graftune.core.method import Method, MethodConfig, TargetSpec, all_methods, get_method, register
from graftune.core.model import AdapterModel, graft
from graftune.errors import GraftuneError
from graftune.io.artifact import load_adapter, save_adapter

__version__ = "0.1.0"


def list_methods() -> list[dict]:
    """Every registered method: name, one-line description and declared capabilities."""
    from dataclasses import asdict

    return [{"name": m.name, "description": m.description, "site": m.site, **asdict(m.capabilities)}
            for m in all_methods()]


__all__ = ["AdapterModel", "GraftuneError", "Method", "MethodConfig", "TargetSpec", "all_methods", "get_method",
           "graft", "list_methods", "load_adapter", "register",
           "save_adapter"]
