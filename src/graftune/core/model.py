"""AdapterModel: a frozen base model plus named adapters grafted onto it from outside.

The base's module tree is never edited. Adapters attach through forward hooks on their target modules (and,
for prompt/prefix tuning, through a transform of the model's inputs), and their parameters live here, in
``self.adapters[name]``. Consequences:

- with adapters disabled (or none active) the base computes bit-identically, and ``base.state_dict()`` keeps
  its keys and values;
- switching the active adapter is a pointer change (no reload, no copy);
- merging swaps in new parameter *objects* and keeps the originals, so unmerge is exact.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graftune.core import routing, targets
from graftune.core.method import Method, MethodConfig, all_methods, get_method, make_config
from graftune.core.routing import Route
from graftune.errors import ConfigError, TargetError

MODEL_SITE = "__model__"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,63}$")


def site_key(target_name: str) -> str:
    """Module names contain dots, which nn.ModuleDict keys may not; ':' stands in for them."""
    return target_name.replace(".", ":")


def target_name(key: str) -> str:
    return key.replace(":", ".")


@dataclass
class AdapterInfo:
    name: str
    method: Method
    config: MethodConfig
    targets: list[str]


class _Site:
    """One hooked target module and the adapters attached to it: name -> that adapter's module for this target, in
    attachment order. The hook holds the modules themselves, not a key into ``AdapterModel.adapters``: under
    ``torch.compile`` a per-target key string is a guard that differs at every target, so the hook's code, shared
    by all targets, would be recompiled once per target (and run eager past dynamo's recompile limit)."""

    def __init__(self, module: nn.Module, kind: str):
        self.module = module
        self.kind = kind
        self.adapters: dict[str, nn.Module] = {}
        self.handle = None


class AdapterModel(nn.Module):
    """A frozen base with named adapters. Call it like the base; pass ``adapter_names=[...]`` (one per row,
    ``None`` for the base) for a mixed-adapter batch."""

    def __init__(self, base: nn.Module, family: str | None = None):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.family = family or targets.family_of(base)
        self.adapters = nn.ModuleDict()
        self.info: dict[str, AdapterInfo] = {}
        self._sites: dict[str, _Site] = {}
        self._active: tuple[str, ...] = ()
        self._merged: list[str] = []
        # target name -> {param name: original Parameter object}; filled by merges and params-site swaps
        self._originals: dict[str, dict[str, nn.Parameter]] = {}
        self._swapped: str | None = None  # the params-site adapter currently swapped in

    # --- adding and removing -------------------------------------------------------------------------------
    def add_adapter(self, name: str, method: str | Method = "lora", config: MethodConfig | None = None,
                    **options) -> AdapterInfo:
        """Graft a new adapter. Everything is built before anything is attached, so a bad config or target
        leaves the model as it was."""
        if not _NAME_RE.match(name or "") or name == routing.BASE:
            raise ConfigError(f"adapter name {name!r}: use letters, digits, '_' or '-' (at most 64 characters)")
        if name in self.info:
            raise ConfigError(f"an adapter named {name!r} is already loaded; delete it first or pick another name")
        if hasattr(nn.ModuleDict, name):  # nn.ModuleDict keys may not shadow its attributes (cpu, to, train...)
            raise ConfigError(f"adapter name {name!r} is reserved (a torch Module attribute); pick another name")
        m = get_method(method) if isinstance(method, str) else method
        cfg = config if config is not None else make_config(m, **options)
        if not isinstance(cfg, m.config_cls):
            raise ConfigError(f"method {m.name!r} needs a {m.config_cls.__name__}, got {type(cfg).__name__}")
        if m.site == "model":
            modules = {MODEL_SITE: m.build_model_site(self.base, cfg)}
            names = [MODEL_SITE]
        else:
            spec = cfg.targets
            if spec is None:
                spec = targets.preset(m.target_presets(cfg), self.family, model=self.base,
                                      supported_types=m.supported_types, methods_with_preset=_with_preset(self.family))
            found = targets.select(self.base, spec, top_k_layers=cfg.top_k_layers, supported_types=m.supported_types)
            swapped = self._swapped if m.site == "params" else None
            if swapped:
                self._swap_params(None)  # a params-site adapter copies the base's own parameters, not another's
            try:
                modules = {site_key(n): m.build(t, cfg, target_name=n) for n, t in found.items()}
            finally:
                if swapped:
                    self._swap_params(swapped)
            if m.site == "params":
                modules = _own_each_parameter_once(found, modules)
            names = [n for n in found if site_key(n) in modules]
        return self._attach(name, m, cfg, names, nn.ModuleDict(modules))

    def _attach(self, name: str, m: Method, cfg: MethodConfig, names: list[str], modules: nn.ModuleDict):
        device = next(self.base.parameters(), torch.empty(0)).device
        modules.to(device)
        for p in modules.parameters():
            p.requires_grad_(False)
        self.adapters[name] = modules
        info = AdapterInfo(name, m, cfg, names)
        self.info[name] = info
        if m.site in ("output", "input"):
            modules_by_name = dict(self.base.named_modules())
            for t in names:
                self._site(t, modules_by_name[t], m.site_for(t, cfg)).adapters[name] = modules[site_key(t)]
        return info

    def _site(self, tname: str, module: nn.Module, kind: str) -> _Site:
        key = f"{kind}:{tname}"
        if key not in self._sites:
            site = _Site(module, kind)
            # with_kwargs: some blocks are called with keyword inputs only (transformers' attention modules)
            if kind == "output":
                site.handle = module.register_forward_hook(self._output_hook(site), with_kwargs=True)
            else:
                site.handle = module.register_forward_pre_hook(self._input_hook(site), with_kwargs=True)
            self._sites[key] = site
        return self._sites[key]

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        if name in self._merged:
            self.unmerge(name)
        self.set_active(*[n for n in self._active if n != name])
        for key in list(self._sites):
            site = self._sites[key]
            if name in site.adapters:
                del site.adapters[name]
                if not site.adapters:
                    site.handle.remove()
                    del self._sites[key]
        del self.adapters[name]
        del self.info[name]

    def unload(self) -> nn.Module:
        """Remove every adapter and hook; return the base, whose state dict equals the original."""
        self.unmerge()
        for name in list(self.info):
            self.delete_adapter(name)
        return self.base

    # --- which adapters apply ------------------------------------------------------------------------------
    @property
    def active(self) -> tuple[str, ...]:
        return self._active

    def set_active(self, *names: str) -> None:
        """Activate adapters, applied in the order given (stacking). No names: the base alone."""
        for n in names:
            self._require(n)
        params_site = [n for n in names if self.info[n].method.site == "params"]
        if len(params_site) > 1:
            raise ConfigError(f"{', '.join(params_site)} each replace base parameters; activate one at a time")
        self._swap_params(params_site[0] if params_site else None)
        self._active = tuple(names)

    @contextlib.contextmanager
    def disabled(self):
        """Run the untouched base inside this block (bit-identical to it)."""
        if self._merged:
            raise ConfigError(f"adapters {', '.join(self._merged)} are merged into the weights; unmerge them first")
        previous = self._active
        self.set_active()
        try:
            with routing.routed(Route(())):
                yield
        finally:
            self.set_active(*previous)

    def set_trainable(self, *names: str) -> None:
        """Make exactly these adapters' parameters trainable (the base always stays frozen)."""
        for n in names:
            self._require(n)
        for n, mods in self.adapters.items():
            for p in mods.parameters():
                p.requires_grad_(n in names)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.adapters.parameters() if p.requires_grad]

    def _require(self, name: str) -> AdapterInfo:
        if name not in self.info:
            loaded = ", ".join(sorted(self.info)) or "none"
            raise ConfigError(f"no adapter named {name!r} is loaded (loaded: {loaded})")
        return self.info[name]

    def _route(self, adapter_names: Sequence[str | None] | None) -> Route:
        if adapter_names is None:
            return routing.current() or Route(self._active)
        route = routing.mixed_route(list(adapter_names), set(self.info))
        for n in route.names:
            info = self.info[n]
            if not info.method.capabilities.mixed_batch:
                raise ConfigError(f"adapter {n!r} ({info.method.name}) cannot serve mixed-adapter batches")
            if n in self._merged:
                raise ConfigError(f"adapter {n!r} is merged; unmerge it before serving mixed-adapter batches")
        if self._swapped:
            raise ConfigError(f"{self._swapped!r} replaces base parameters; deactivate it for mixed-adapter batches")
        return Route(route.names, route.rows.to(self._device()))

    def _device(self) -> torch.device:
        return next(self.base.parameters(), torch.empty(0)).device

    # --- forward -------------------------------------------------------------------------------------------
    def forward(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        route = self._route(adapter_names)
        with routing.routed(route):
            kwargs, post = self._prepare_inputs(route, kwargs)
            return post(self.base(*args, **kwargs))

    def generate(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        """``base.generate`` with the adapters applied (decoder LMs)."""
        route = self._route(adapter_names)
        with routing.routed(route):
            kwargs, _ = self._prepare_inputs(route, kwargs, generating=True)
            return self.base.generate(*args, **kwargs)

    @contextlib.contextmanager
    def routed(self, adapter_names: Sequence[str | None] | None = None):
        """Apply the adapters to any call on the base inside the block (e.g. ``base.features(x)``)."""
        with routing.routed(self._route(adapter_names)):
            yield

    def _prepare_inputs(self, route: Route, kwargs: dict, generating: bool = False) -> tuple[dict, Callable]:
        model_site = [n for n in route.names if self.info[n].method.site == "model"]
        if not model_site:
            return kwargs, _identity
        methods = {self.info[n].method.name for n in model_site}
        if len(methods) > 1 or (route.rows is None and len(model_site) > 1):
            raise ConfigError(f"adapters {', '.join(model_site)} all change the input sequence; use one at a time")
        method = self.info[model_site[0]].method
        mods = [self.adapters[n][MODEL_SITE] for n in model_site]
        rows = None if route.rows is None else _remap(route, model_site)
        return method.prepare(mods, rows, self.base, kwargs, generating=generating)

    # The hooks run inside compiled layers too (``compile: true``): dynamo traces them, guarding on what they read
    # (the route's names, ``site.adapters``' keys, ``self._merged``), so a change of the active, merged or attached
    # adapters recompiles once and takes effect at once. Targets share the hooks' code and read nothing that differs
    # between them but module objects, so one compiled layer serves every layer.
    def _output_hook(self, site: _Site):
        def hook(module, args, kwargs, output):
            route = routing.current() or Route(self._active)
            here = [n for n in route.names if n in site.adapters and n not in self._merged]
            if not here:
                return None
            y = output[0] if isinstance(output, tuple) else output
            x = args[0] if args else next(iter(kwargs.values()), None)
            y = self._apply_adapters(route, here, site, x, y)
            return (y, *output[1:]) if isinstance(output, tuple) else y

        return hook

    def _input_hook(self, site: _Site):
        def hook(module, args, kwargs):
            route = routing.current() or Route(self._active)
            here = [n for n in route.names if n in site.adapters and n not in self._merged]
            if not here:
                return None
            if args:
                return (self._apply_adapters(route, here, site, args[0]), *args[1:]), kwargs
            first = next(iter(kwargs))
            return args, {**kwargs, first: self._apply_adapters(route, here, site, kwargs[first])}

        return hook

    def _apply_adapters(self, route: Route, here: list[str], site: _Site, *xs):
        """Apply adapters ``here`` at one site: in order for a uniform batch, by row for a mixed one."""
        if route.rows is None:
            out = xs[-1]
            for n in here:
                out = site.adapters[n](*xs[:-1], out)
            return out
        # mixed batch: each row has at most one adapter; group by method so each group is one batched call
        out = xs[-1]
        by_method: dict[str, list[str]] = {}
        for n in here:
            by_method.setdefault(self.info[n].method.name, []).append(n)
        for names in by_method.values():
            method = self.info[names[0]].method
            out = method.forward_mixed([site.adapters[n] for n in names], _remap(route, names), *xs[:-1], out)
        return out

    # --- merging -------------------------------------------------------------------------------------------
    def merge(self, *names: str) -> None:
        """Fold adapters into the weights (LoRA, IA3, BitFit) for inference at base speed. Exactly reversible:
        the original parameter objects are kept, never written."""
        for name in names or self._active:
            info = self._require(name)
            if not info.method.capabilities.mergeable:
                raise ConfigError(f"{info.method.name} adapters cannot be merged into the base weights "
                                  f"({info.method.merge_note or 'their computation is not linear in the weights'})")
            if name in self._merged:
                continue
            modules_by_name = dict(self.base.named_modules())
            with torch.no_grad():
                for t in info.targets:
                    target = modules_by_name[t]
                    new = info.method.merged_params(self.adapters[name][site_key(t)], target)
                    saved = self._originals.setdefault(t, {})
                    for pname, value in new.items():
                        old = getattr(target, pname)
                        saved.setdefault(pname, old)
                        dtype = value.dtype if saved[pname] is None else saved[pname].dtype  # None: a new bias
                        setattr(target, pname, nn.Parameter(value.to(dtype), requires_grad=False))
            self._merged.append(name)

    def unmerge(self, *names: str) -> None:
        """Restore the original weights exactly, then re-merge the adapters that should stay merged."""
        keep = [n for n in self._merged if n not in (names or self._merged)]
        swapped = self._swapped
        self._restore_originals()  # this takes out a swapped-in params-site adapter too: put it back below
        self._merged, self._swapped = [], None
        self._swap_params(swapped)
        if keep:
            self.merge(*keep)

    @property
    def merged(self) -> tuple[str, ...]:
        return tuple(self._merged)

    def _restore_originals(self) -> None:
        modules_by_name = dict(self.base.named_modules())
        for t, params in self._originals.items():
            for pname, original in params.items():
                setattr(modules_by_name[t], pname, original)
        self._originals = {}

    def _swap_params(self, name: str | None) -> None:
        """Params-site adapters (top-k layers, full fine-tuning) own trainable copies of base parameters; while
        active, those copies stand in the base's modules. The base's own Parameter objects are kept aside."""
        if name == self._swapped:
            return
        if self._swapped is not None:
            if self._merged:
                raise ConfigError("unmerge adapters before switching a parameter-replacing adapter")
            self._restore_originals()
            self._swapped = None
        if name is None:
            return
        modules_by_name = dict(self.base.named_modules())
        # every place each parameter stands: a tied one (GPT-2's wte and lm_head) gets the copy in all of them
        places: dict[int, list[tuple[str, str]]] = {}
        for mname, module in modules_by_name.items():
            for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
                places.setdefault(id(p), []).append((mname, pname))
        for key, holder in self.adapters[name].items():
            t = target_name(key)
            for pname, value in holder.named_parameters():
                original = getattr(modules_by_name[t], pname)
                for mname, pn in places.get(id(original), [(t, pname)]):
                    self._originals.setdefault(mname, {}).setdefault(pn, original)
                    setattr(modules_by_name[mname], pn, value)
        self._swapped = name

    def _apply(self, fn, recurse=True):
        """nn.Module's conversion (``.to``, ``.half``). Parameters set aside by merges and params-site swaps stand
        in no module: convert them too, or restoring them would bring back the old device or dtype."""
        super()._apply(fn, recurse)
        done = {id(p) for p in self.parameters()}
        with torch.no_grad():
            for params in self._originals.values():
                for p in params.values():
                    if p is not None and id(p) not in done:
                        p.data = fn(p.data)
                        done.add(id(p))
        return self

    # --- composition ---------------------------------------------------------------------------------------
    def add_weighted_adapter(self, name: str, weights: dict[str, float]) -> AdapterInfo:
        """A new adapter whose parameters are the weighted average of same-method, same-shape adapters:
        ``sum(w * p)`` parameter by parameter, with the weights as given (not normalized)."""
        if not weights:
            raise ConfigError("weighted averaging needs at least one adapter: pass {name: weight, ...}")
        infos = [self._require(n) for n in weights]
        first = infos[0]
        if any(i.method is not first.method or i.targets != first.targets for i in infos):
            raise ConfigError("weighted averaging needs adapters of one method on the same targets")
        shapes = [{k: v.shape for k, v in self.adapters[i.name].state_dict().items()} for i in infos]
        if any(s != shapes[0] for s in shapes):
            raise ConfigError("weighted averaging needs same-shaped adapters (same rank / bottleneck size)")
        # the average is built with the first adapter's config: options that change the computation (LoRA's alpha,
        # a bottleneck's non-linearity) must agree, or the others' tensors would be used at the wrong scale
        first_cfg = first.config.to_dict()
        for i in infos[1:]:
            differ = sorted(k for k, v in i.config.to_dict().items()
                            if v != first_cfg[k] and k not in first.config.averaging_ignores)
            if differ:
                raise ConfigError(f"weighted averaging needs adapters with one config; {i.name!r} differs from "
                                  f"{first.name!r} in {', '.join(differ)}")
        modules = nn.ModuleDict()
        by_name = dict(self.base.named_modules())
        w = list(weights.values())
        for key in self.adapters[first.name]:
            t = target_name(key)
            modules[key] = first.method.combine([self.adapters[i.name][key] for i in infos], w, first.config,
                                                by_name.get(t, self.base), t)
        return self._attach(name, first.method, first.config, list(first.targets), modules)

    # --- state and reports ---------------------------------------------------------------------------------
    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors keyed ``<target module name>.<param>`` (``__model__.<param>`` for model sites)."""
        self._require(name)
        out = {}
        for key, mod in self.adapters[name].items():
            for pname, t in mod.state_dict().items():
                out[f"{target_name(key)}.{pname}"] = t.detach().cpu().contiguous()
        return out

    def load_adapter_state_dict(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Load tensors saved by ``adapter_state_dict``; shapes and key sets must match exactly."""
        own = self.adapter_state_dict(name)
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            from graftune.errors import ArtifactError

            raise ArtifactError(f"adapter tensors do not fit this base: missing {missing[:3]}, unexpected "
                                f"{unexpected[:3]} (was it saved from another model or config?)")
        for k, v in state.items():
            if v.shape != own[k].shape:
                from graftune.errors import ArtifactError

                raise ArtifactError(f"adapter tensor {k} has shape {tuple(v.shape)}, this base needs "
                                    f"{tuple(own[k].shape)} (saved from another model or config?)")
        with torch.no_grad():
            for key, mod in self.adapters[name].items():
                prefix = f"{target_name(key)}."
                mod.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def parameter_report(self) -> list[dict[str, Any]]:
        """One row per adapter: trainable (adapter) params, total (base + adapter), percent, bytes on disk."""
        base_total = sum(p.numel() for p in self.base.parameters())
        rows = []
        for name, mods in self.adapters.items():
            n = sum(p.numel() for p in mods.parameters())
            nbytes = sum(t.numel() * t.element_size() for t in mods.state_dict().values())
            rows.append({"adapter": name, "method": self.info[name].method.name, "trainable": n,
                         "total": base_total + n, "percent": 100.0 * n / max(base_total + n, 1), "bytes": nbytes})
        return rows


def _with_preset(family: str) -> tuple[str, ...]:
    """Methods with default targets written for ``family`` (a catch-all ``*`` preset does not count)."""
    return tuple(m.name for m in all_methods() if family in m.presets)


def _own_each_parameter_once(found: dict[str, nn.Module], modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Params-site holders: keep those that own parameters (not containers), and copy a parameter tied across
    targets once, in the first target; ``_swap_params`` puts that copy in every place the parameter stands."""
    seen: set[int] = set()
    kept = {}
    for n, t in found.items():
        holder = modules[site_key(n)]
        for pname, _ in list(holder.named_parameters()):
            original = getattr(t, pname)
            if id(original) in seen:
                delattr(holder, pname)
            seen.add(id(original))
        if next(holder.parameters(), None) is not None:
            kept[site_key(n)] = holder
    if not kept:
        raise TargetError(f"targets {', '.join(list(found)[:5])} own no parameters to train; pick modules that do "
                          f"(e.g. Linear or LayerNorm layers)")
    return kept


def _identity(x):
    return x


def _remap(route: Route, names: Iterable[str]) -> torch.Tensor:
    """Row indices into ``names`` (a subset of ``route.names``); rows using any other adapter become -1."""
    names = list(names)
    lut = torch.full((len(route.names) + 1,), -1, dtype=torch.long)
    for j, n in enumerate(names):
        lut[route.names.index(n)] = j
    return lut.to(route.rows.device)[route.rows]  # index -1 reads the last entry, which stays -1


def graft(base: nn.Module, method: str = "lora", *, name: str = "default", family: str | None = None,
          **options) -> AdapterModel:
    """Wrap ``base`` and graft one trainable, active adapter onto it."""
    model = base if isinstance(base, AdapterModel) else AdapterModel(base, family=family)
    model.add_adapter(name, method, **options)
    model.set_active(name)
    model.set_trainable(name)
    return model
