"""The Method contract and the registry.

A method is one file in ``graftune/methods/`` that subclasses :class:`Method` and is registered once with
``@register``. It says *what* to build for one target module and one adapter name; everything every method
needs (hooks, disabled/merged state, stacking several adapters, mixed-batch routing, the trainable filter,
saving by prefix) lives once in ``core/model.py``.

Sites. A method attaches to target modules at one of these *sites* (``Method.site``):

- ``"output"``: ``y' = module.forward(x, y)`` after the target runs (LoRA, IA3 on keys/values, bottleneck,
  BitFit). Tuple outputs (attention blocks) are handled by core: the adapter sees the first element.
- ``"input"``: ``x' = module.forward(x)`` before the target runs (IA3 on the feed-forward down-projection).
  An output-site method may put some targets at the input site by overriding ``Method.site_for``.
- ``"model"``: the adapter transforms the base model's keyword inputs (prompt and prefix tuning). Such methods
  declare ``changes_seq_len`` and return a function that trims the outputs back.
- ``"params"``: the adapter owns replacement parameters swapped into the base while it is active (top-k
  layers, full fine-tuning); core swaps the parameter objects, so the base's own tensors are never written.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from graftune.errors import ConfigError

SITES = ("output", "input", "model", "params")


@dataclass(frozen=True)
class Capabilities:
    """What a method can do; the contract suite gates on these, and core raises if an undeclared one is used."""

    mergeable: bool = False
    mixed_batch: bool = False
    identity_at_init: bool = True
    changes_seq_len: bool = False


@dataclass(frozen=True)
class TargetSpec:
    """Which modules an adapter attaches to. Empty fields do not filter; every given field must match.

    Args:
        names: module-name suffixes (``"query"`` matches ``encoder.layer.0.attention.self.query``) or exact names.
        regex: a regular expression matched (``re.search``) against the full module name.
        layers: layer indices (``[4, 5]``) or negative indices counted from the top (``[-1]``); a module's layer
            is the first integer in its dotted name.
        types: class names (``"Linear"``, ``"Conv1D"``, ``"Conv2d"``, ``"Embedding"``).
    """

    names: tuple[str, ...] = ()
    regex: str | None = None
    layers: tuple[int, ...] = ()
    types: tuple[str, ...] = ()

    def __post_init__(self):
        for f in ("names", "layers", "types"):
            value = getattr(self, f)
            if isinstance(value, (str, int)):
                object.__setattr__(self, f, (value,))
            elif not isinstance(value, dict) and hasattr(value, "__iter__"):  # a list, a range of layers...
                object.__setattr__(self, f, tuple(value))
        check_field_types(self, prefix="targets.")

    def is_empty(self) -> bool:
        return not (self.names or self.regex or self.layers or self.types)

    def to_dict(self) -> dict:
        return {"names": list(self.names), "regex": self.regex, "layers": list(self.layers), "types": list(self.types)}


@dataclass(frozen=True)
class MethodConfig:
    """Fields every method config has. Subclasses add their own and validate them in ``validate()``.

    Args:
        targets: where to attach; ``None`` takes the method's preset for the model family.
        top_k_layers: keep only targets in the top k layers (fast: the frozen lower part can be cached).
    """

    targets: TargetSpec | None = None
    top_k_layers: int | None = None
    #: options that may differ between adapters averaged by ``add_weighted_adapter`` (they pick targets, which are
    #: compared once resolved, or act only at init or in training); every other option must agree
    averaging_ignores: ClassVar[tuple[str, ...]] = ("targets", "top_k_layers", "dropout")

    def __post_init__(self):
        if isinstance(self.targets, dict):
            unknown = sorted(set(self.targets) - {f.name for f in dataclasses.fields(TargetSpec)})
            check(not unknown, "targets", f"unknown key(s) {', '.join(map(str, unknown))}; use names, regex, "
                                          "layers or types")
            object.__setattr__(self, "targets", TargetSpec(**self.targets))
        elif isinstance(self.targets, (list, tuple, str)):
            object.__setattr__(self, "targets", TargetSpec(names=self.targets))
        check_field_types(self)  # before the range checks, which assume the types
        if self.top_k_layers is not None and self.top_k_layers < 1:
            raise ConfigError(f"top_k_layers={self.top_k_layers}: must be a positive number of layers, or unset")
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the field and the fix."""

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, TargetSpec) else value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> MethodConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)} for this method; "
                              f"known: {', '.join(sorted(known))}")
        return cls(**data)


def check(condition: bool, field: str, message: str) -> None:
    """Config validation helper: raise ConfigError naming ``field`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{field}: {message}")


# --- field types, checked from the annotations -------------------------------------------------------------------
# Options arrive from YAML (``--set``, run.yaml) and JSON (adapter.json, PEFT configs), where ``true`` is a bool
# and ``abc`` a string; Python would take True as the integer 1 and any non-empty string as true, so each field is
# held to its annotation once, here, rather than in every method's validate().
@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name in hints}


def _fits(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # an integer is a number too (alpha=16)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        item = args[0] if args else Any
        return isinstance(value, (tuple, list)) and all(_fits(v, item) for v in value)
    if tp is Any:
        return True
    return isinstance(value, tp) if isinstance(tp, type) else True


def _wanted(tp: Any) -> str:
    """What a field of type ``tp`` takes, in a user's words."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        named = [_wanted(a) for a in args if a is not type(None)]
        return " or ".join(named) + (", or leave it unset" if type(None) in args else "")
    if origin in (tuple, list):
        return f"a list of {_wanted(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if tp is TargetSpec:
        return "a list of module names or a mapping of names, regex, layers, types"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, f"a {getattr(tp, '__name__', tp)}")


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a decimal number", str: "a string", list: "a list",
            tuple: "a list", dict: "a mapping", type(None): "nothing"}.get(type(value), type(value).__name__)


def check_field_types(config: Any, *, prefix: str = "") -> None:
    """Raise ConfigError naming the first field of dataclass ``config`` whose value does not fit its annotation:
    ints take integers but not booleans, floats take integers too, bools only true/false, ``X | None`` also
    None, ``tuple[str, ...]`` a list of strings."""
    for name, tp in _field_types(type(config)).items():
        value = getattr(config, name)
        if not _fits(value, tp):
            shown = list(value) if isinstance(value, tuple) else value
            raise ConfigError(f"{prefix}{name}: got {shown!r} ({_kind(value)}); use {_wanted(tp)}")


class Method:
    """One adaptation method. Subclasses set the class attributes and implement ``build``.

    ``build`` returns the adapter module for one target; its parameters are the adapter's trainable state.
    Methods that can batch rows using different adapters override ``forward_mixed``.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]]
    capabilities: ClassVar[Capabilities] = Capabilities()
    site: ClassVar[str] = "output"
    #: family -> default TargetSpec; "*" is the fallback
    presets: ClassVar[dict[str, TargetSpec]] = {}
    #: model families this method works on (empty: those with a preset, or all with a "*" preset)
    families: ClassVar[tuple[str, ...]] = ()
    #: module class names this method can attach to (empty: any)
    supported_types: ClassVar[tuple[str, ...]] = ()

    def build(self, target: nn.Module, config: MethodConfig, *, target_name: str) -> nn.Module:
        raise NotImplementedError

    def target_presets(self, config: MethodConfig) -> dict[str, TargetSpec]:
        """The family presets used when ``config.targets`` is None; a config option may pick among several
        (the bottleneck adapter's ``placement``). Default: ``presets``."""
        return self.presets

    def site_for(self, target_name: str, config: MethodConfig) -> str:
        """The site (``"output"`` or ``"input"``) for one target of an output/input-site method; lets one method
        use both (IA3 scales keys/values at the output and feed-forward activations at the input). Default:
        ``site``."""
        return self.site

    def build_model_site(self, base: nn.Module, config: MethodConfig) -> nn.Module:
        """For ``site == "model"`` methods: the one adapter module for the whole model."""
        raise NotImplementedError

    def forward_mixed(self, modules: list[nn.Module], rows: torch.Tensor, *args) -> Any:
        """Apply adapter ``modules[rows[i]]`` to row i (``rows[i] == -1``: no adapter). Default: each adapter on
        the whole batch, rows selected with ``torch.where`` (correct for any row-wise method; methods override
        this with one gathered/batched computation)."""
        x_or_y = args[-1]
        out = x_or_y
        for i, m in enumerate(modules):
            sel = (rows == i).view(-1, *([1] * (x_or_y.dim() - 1)))
            out = torch.where(sel, m(*args), out)
        return out

    #: mergeable methods leave this empty; others say in a few words why they cannot be merged
    merge_note: ClassVar[str] = ""

    def merged_params(self, module: nn.Module, target: nn.Module) -> dict[str, torch.Tensor]:
        """Mergeable methods: ``{param name: new value}`` for ``target`` with this adapter folded in."""
        raise NotImplementedError

    def prepare(self, modules: list[nn.Module], rows: torch.Tensor | None, base: nn.Module, kwargs: dict,
                *, generating: bool = False) -> tuple[dict, Callable[[Any], Any]]:
        """``site == "model"`` methods: transform the base's keyword inputs (e.g. prepend soft prompts and extend
        ``attention_mask``); return the new kwargs and a function that trims the output back to the input's
        length. ``rows`` as in ``forward_mixed``, or None when every row uses ``modules[0]``."""
        raise NotImplementedError

    def combine(self, modules: list[nn.Module], weights: list[float], config: MethodConfig,
                target: nn.Module, target_name: str) -> nn.Module:
        """A new adapter module that is the weighted average of same-shaped ``modules`` (parameter-wise)."""
        new = self.build(target, config, target_name=target_name)
        with torch.no_grad():
            for name, p in new.named_parameters():
                p.copy_(sum(w * dict(m.named_parameters())[name] for m, w in zip(modules, weights)))
        return new


_REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: register a method under ``cls.name``. Duplicate names are a bug and raise."""
    if cls.name in _REGISTRY:
        raise RuntimeError(f"method {cls.name!r} registered twice")
    if cls.site not in SITES:
        raise RuntimeError(f"method {cls.name!r}: site must be one of {SITES}")
    _REGISTRY[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(sorted(_REGISTRY))} (see `graftune methods`)")


def all_methods() -> list[Method]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def make_config(method: str | Method, **options) -> MethodConfig:
    m = get_method(method) if isinstance(method, str) else method
    return m.config_cls.from_dict(options)
