"""Target selection: which modules of a base model an adapter attaches to."""

from __future__ import annotations

import difflib
import re

from torch import nn

from graftune.core.method import TargetSpec
from graftune.errors import TargetError

_LAYER_RE = re.compile(r"\.(\d+)(?:\.|$)")


_FAMILIES = {
    "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "distilbert", "electra": "bert",
    "mpnet": "mpnet", "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama",
    "smollm3": "llama", "gpt2": "gpt2", "vit": "vit", "deit": "vit", "dinov2": "vit",
}


def family_of(model: nn.Module) -> str:
    """The preset family of a model: from ``config.model_type`` for transformers models, else by its layers."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type:
        return _FAMILIES.get(model_type, model_type)
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return "cnn"
    return "generic"


def layer_index(name: str) -> int | None:
    """The first integer component of a dotted module name (``encoder.layer.3.attention`` -> 3)."""
    m = _LAYER_RE.search("." + name)
    return int(m.group(1)) if m else None


def num_layers(model: nn.Module) -> int:
    idx = [i for i in (layer_index(n) for n, _ in model.named_modules()) if i is not None]
    return max(idx) + 1 if idx else 0


def _matches(name: str, module: nn.Module, spec: TargetSpec, n_layers: int) -> bool:
    if spec.names and not any(name == s or name.endswith("." + s) for s in spec.names):
        return False
    if spec.regex and not re.search(spec.regex, name):
        return False
    if spec.types and type(module).__name__ not in spec.types:
        return False
    if spec.layers:
        i = layer_index(name)
        wanted = {k % n_layers if n_layers else k for k in spec.layers}
        if i is None or i not in wanted:
            return False
    return True


def select(model: nn.Module, spec: TargetSpec, *, top_k_layers: int | None = None,
           supported_types: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """Return ``{name: module}`` matching ``spec`` (in model order). Raises TargetError listing candidates."""
    n_layers = num_layers(model)
    if top_k_layers:
        if top_k_layers > n_layers:
            have = f"has {n_layers} numbered layers; use 1 to {n_layers}" if n_layers else "has no numbered layers; unset it"
            raise TargetError(f"top_k_layers={top_k_layers}, but this model {have}")
        top = tuple(range(max(0, n_layers - top_k_layers), n_layers))
        layers = top
        if spec.layers:
            # negative indices count from the top; an empty intersection must not fall back to "every layer"
            layers = tuple(sorted({k % n_layers for k in spec.layers} & set(top)))
            if not layers:
                raise TargetError(f"layers {list(spec.layers)} are not among the top {top_k_layers} layers "
                                  f"{list(top)}; drop one of the two filters or widen top_k_layers")
        spec = TargetSpec(spec.names, spec.regex, layers, spec.types)
    found = {n: m for n, m in model.named_modules() if n and _matches(n, m, spec, n_layers)}
    if supported_types:
        adaptable = {n: m for n, m in found.items() if type(m).__name__ in supported_types}
        if found and not adaptable:
            kinds = ", ".join(sorted({type(m).__name__ for m in found.values()}))
            raise TargetError(f"targets matched only modules of type {kinds}, which this method cannot adapt; "
                              f"it supports {', '.join(supported_types)}")
        found = adaptable
    if not found:
        raise TargetError(f"no module matches targets {spec.to_dict()}; {_candidates(model, spec, supported_types)}")
    return found


def _suffixes(model: nn.Module, supported: tuple[str, ...]) -> list[str]:
    """The last name part of ``model``'s modules (of ``supported`` types, if given), each once, in module order."""
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                              if n and (not supported or type(m).__name__ in supported)))


def _candidates(model: nn.Module, spec: TargetSpec, supported: tuple[str, ...]) -> str:
    suffixes = sorted(_suffixes(model, supported))
    close = []
    for s in spec.names:
        close += difflib.get_close_matches(s.rsplit(".", 1)[-1], suffixes, n=3)
    hint = f"did you mean {', '.join(dict.fromkeys(close))}? " if close else ""
    shown = ", ".join(suffixes[:40]) + (" ..." if len(suffixes) > 40 else "")
    return f"{hint}candidate module names: {shown}"


def preset(presets: dict[str, TargetSpec], family: str, *, model: nn.Module | None = None,
           supported_types: tuple[str, ...] = (), methods_with_preset: tuple[str, ...] = ()) -> TargetSpec:
    """The family's default targets. Without one, the error names the ``--set`` form with module names that exist
    in ``model`` (of ``supported_types``) and the methods that do have a preset for the family."""
    if family in presets:
        return presets[family]
    if "*" in presets:
        return presets["*"]
    other = ""
    if methods_with_preset:
        rest = f" (or {', '.join(methods_with_preset[:-1])})" if len(methods_with_preset) > 1 else ""
        other = f"pick a method that has them, --method {methods_with_preset[-1]}{rest}, or "
    suffixes = _suffixes(model, supported_types) if model is not None else []
    if suffixes:
        kinds = f" {'/'.join(supported_types)}" if supported_types else ""
        shown = ", ".join(suffixes[:12]) + (" ..." if len(suffixes) > 12 else "")
        how = (f"name the layers to adapt, e.g. --set 'targets=[{','.join(suffixes[:2])}]' "
               f"(this model's{kinds} layers end in: {shown})")
    elif supported_types:
        how = f"use another model: this method adapts {'/'.join(supported_types)} layers and this model has none"
    else:
        how = "name the layers to adapt with --set 'targets=[NAME,...]'"
    raise TargetError(f"no default targets for model family {family!r}; {other}{how}")
