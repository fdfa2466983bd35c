"""Built-in methods: one import line per method file registers it."""

from graftune.methods import (
    bottleneck,  # noqa: F401
    ia3,  # noqa: F401
    lora,  # noqa: F401
    partial,  # noqa: F401
    prefix,  # noqa: F401
    prompt,  # noqa: F401
)
