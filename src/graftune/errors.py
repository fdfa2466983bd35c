"""Errors a user can cause. The CLI prints the one-line message and exits non-zero; anything else is a bug."""


class GraftuneError(Exception):
    """Base class: one line that names the problem and the fix."""


class ConfigError(GraftuneError):
    """A bad config value (names the field and the fix)."""


class TargetError(GraftuneError):
    """No module matched a target selection, or a target has an unsupported type."""


class ArtifactError(GraftuneError):
    """A missing, corrupt, truncated or incompatible adapter artifact."""


class DataError(GraftuneError):
    """Missing file, wrong column, too few examples, undecodable input, unseen labels."""


class ModelError(GraftuneError):
    """A base model that cannot be found or loaded (offline hub id, bad folder)."""
