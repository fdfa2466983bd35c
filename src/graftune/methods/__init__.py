"""Built-in methods: one import line per method file registers it."""

from graftune.methods import lora  # noqa: F401
