"""Adapter artifacts: a directory with ``adapter.safetensors`` (tensors) and ``adapter.json`` (everything else).

Artifacts are data, never code: tensors are read with ``safetensors`` only (nothing is ever unpickled), and
the JSON names the method and its config, which are rebuilt through the registry. An artifact records a
*fingerprint* of the base it was trained on, so that loading it onto another base (another architecture, or
the same architecture with other weights) fails with a clear message instead of silently computing nonsense.

Writes are atomic: the directory is assembled next to its destination and renamed into place, so a crash or
an error never leaves a half-written artifact at the destination (an existing one stays as it was).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from graftune.core.method import get_method, make_config
from graftune.core.model import AdapterInfo, AdapterModel
from graftune.errors import ArtifactError, GraftuneError
from graftune.io.atomic import write_dir_atomically

FORMAT = "graftune-adapter"
FORMAT_VERSION = 1
TENSORS_FILE = "adapter.safetensors"
META_FILE = "adapter.json"
#: head tensors share the file with the adapter's; this prefix cannot clash with a module name of the base
HEAD_PREFIX = "__head__."
# values sampled from each base tensor for the fingerprint: the first and the last few
_SAMPLE = 32


# --- base fingerprint ----------------------------------------------------------------------------------------
def _base_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every parameter name of the base (tied ones under each name), as the base was
    loaded: where an AdapterModel has swapped parameter objects in (merges, params-site adapters), the
    originals it keeps aside are used instead."""
    if isinstance(model, AdapterModel):
        base, originals = model.base, model._originals
    else:
        base, originals = model, {}
    out = []
    for name, p in base.named_parameters(remove_duplicate=False):
        module, _, pname = name.rpartition(".")
        kept = originals.get(module, {})
        original = kept.get(pname, p) if pname in kept else p
        if original is not None:  # None: the parameter was added by an adapter (BitFit's bias on a bias-free base)
            out.append((name, original))
    return sorted(out, key=lambda item: item[0])


def base_fingerprint(base: nn.Module) -> dict:
    """A cheap, deterministic identity of a base model (an ``AdapterModel`` or a bare module).

    ``structure`` hashes the sorted parameter names and shapes (the architecture); ``values`` hashes the first
    and last few values of every parameter, rounded to bfloat16, so that the same architecture with other
    weights is told apart while the same weights held in fp32 or bf16 compare equal (a base is often run in
    bf16 for speed and served in fp32, or the other way round). Dtypes are recorded, not compared.
    """
    params = _base_parameters(base)
    module = base.base if isinstance(base, AdapterModel) else base
    structure = "\n".join(f"{n}:{tuple(t.shape)}" for n, t in params)
    samples = []
    for _, t in params:
        if t.device.type == "meta":
            continue
        flat = t.detach().reshape(-1)
        samples.append(flat[:_SAMPLE] if flat.numel() <= 2 * _SAMPLE else torch.cat([flat[:_SAMPLE], flat[-_SAMPLE:]]))
    values = torch.cat([s.to(torch.bfloat16) for s in samples]) if samples else torch.zeros(0, dtype=torch.bfloat16)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for _, t in params})
    return {
        "class": type(module).__name__,
        "model_type": getattr(getattr(module, "config", None), "model_type", None),
        "n_params": sum(t.numel() for _, t in params),
        "dtypes": dtypes,
        "structure": hashlib.sha256(structure.encode()).hexdigest(),
        "values": hashlib.sha256(values.cpu().view(torch.int16).numpy().tobytes()).hexdigest(),
    }


def describe_base(fp: dict) -> str:
    """A short human description of a fingerprint, for error messages."""
    kind = f"model_type={fp.get('model_type')}" if fp.get("model_type") else "no model_type"
    return f"{fp.get('class')} ({kind}, {fp.get('n_params', 0) / 1e6:.2f}M params, weights {str(fp.get('values'))[:8]})"


def check_fingerprint(saved: dict, current: dict, what: str) -> None:
    """Raise ArtifactError unless ``current`` (this base) is the base ``saved`` was made on."""
    same_arch = all(saved.get(k) == current.get(k) for k in ("class", "model_type", "structure"))
    if same_arch and saved.get("values") == current.get("values"):
        return
    why = "same architecture, other weights" if same_arch else "another architecture"
    raise ArtifactError(f"{what} was trained on base {describe_base(saved)} and cannot load onto this base "
                        f"({describe_base(current)}: {why}); load it onto the base it was made for")


# --- atomic directory writes ---------------------------------------------------------------------------------
# --- reading, with one-line errors --------------------------------------------------------------------------
def read_json(file: Path) -> dict:
    if not file.is_file():
        raise ArtifactError(f"{file}: missing; an adapter directory holds {META_FILE} and {TENSORS_FILE} "
                            "(was it written by save_adapter?)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{file}: not valid JSON ({e}); the file is corrupt, save the adapter again") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{file}: expected a JSON object, got {type(data).__name__}; save the adapter again")
    return data


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; anything else (truncated, corrupt, a pickle) is an ArtifactError."""
    if not file.is_file():
        raise ArtifactError(f"{file}: missing; the adapter directory is incomplete, save the adapter again")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        with open(file, "rb") as f:
            head = f.read(9)
        # a safetensors file is an 8-byte header length, then the JSON header; pickles start with PROTO (0x80, 2..5)
        # and torch.save archives are zip files
        pickled = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
        if head[8:9] != b"{" and (pickled or head[:4] == b"PK\x03\x04"):
            raise ArtifactError(f"{file}: is a pickle / torch.save file, not safetensors; graftune never "
                                "unpickles (re-save the weights with safetensors)") from None
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ArtifactError(f"{file}: not a valid safetensors file ({problem}); it is truncated or corrupt, "
                            "save the adapter again") from None


# --- save and load ------------------------------------------------------------------------------------------
def _head_info(head: nn.Module, state: dict[str, torch.Tensor]) -> dict:
    info: dict[str, Any] = {"class": type(head).__name__, "module": type(head).__module__,
                            "shapes": {k: list(v.shape) for k, v in state.items()},
                            "dtypes": {k: str(v.dtype).replace("torch.", "") for k, v in state.items()}}
    for attr in ("in_features", "out_features", "num_labels", "num_classes"):
        value = getattr(head, attr, None)
        if isinstance(value, int):
            info[attr] = value
    return info


def target_types(model: AdapterModel, info: AdapterInfo) -> tuple[dict[str, str], dict[str, list[int]]]:
    """Class name of each target (and the dilation of dilated convolutions): what an exporter needs to know
    about the base without loading it."""
    modules = dict(model.base.named_modules())
    types, dilation = {}, {}
    for t in info.targets:
        m = modules.get(t)
        if m is None:
            continue
        types[t] = type(m).__name__
        d = getattr(m, "dilation", None)
        if isinstance(d, tuple) and any(v != 1 for v in d):
            dilation[t] = list(d)
    return types, dilation


def save_adapter(model: AdapterModel, name: str, path: str | os.PathLike, *, head: nn.Module | None = None,
                 label_names: list[str] | None = None, extra: dict | None = None) -> Path:
    """Write adapter ``name`` (and optionally a task head) to the directory ``path``, atomically.

    Files: ``adapter.safetensors`` (the adapter's tensors keyed ``<target module>.<param>``, plus the head's
    keyed ``__head__.<param>``) and ``adapter.json`` (format, version, method, config, targets, base
    fingerprint, labels, head description, ``extra``, sizes). Returns ``path``.
    """
    info = model._require(name)
    tensors = {k: v.clone() for k, v in model.adapter_state_dict(name).items()}
    n_adapter = sum(v.numel() for v in tensors.values())
    head_meta = None
    if head is not None:
        head_state = {k: v.detach().cpu().clone().contiguous() for k, v in head.state_dict().items()}
        head_meta = _head_info(head, head_state)
        tensors.update({HEAD_PREFIX + k: v for k, v in head_state.items()})
    types, dilation = target_types(model, info)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "method": info.method.name,
        "config": info.config.to_dict(),
        "targets": list(info.targets),
        "target_types": types,
        "conv_dilation": dilation,
        "family": model.family,
        "base_fingerprint": base_fingerprint(model),
        "label_names": list(label_names) if label_names is not None else None,
        "head": head_meta,
        "extra": extra or {},
        "sizes": {"adapter_params": n_adapter, "head_params": sum(v.numel() for k, v in tensors.items()
                                                                  if k.startswith(HEAD_PREFIX))},
    }
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"adapter {name!r}: extra/label_names must be plain JSON data ({e})") from None

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / TENSORS_FILE, metadata={"format": "pt", "graftune": FORMAT})
        meta["sizes"]["bytes"] = (tmp / TENSORS_FILE).stat().st_size
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    return write_dir_atomically(path, write, markers=(META_FILE,))


def read_meta(path: str | os.PathLike) -> dict:
    """The validated ``adapter.json`` of an artifact directory."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such adapter directory (expected {META_FILE} + {TENSORS_FILE} inside)")
    meta = read_json(path / META_FILE)
    file = path / META_FILE
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{file}: not a graftune adapter (format={meta.get('format')!r}); "
                            "for a PEFT adapter use import_peft")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ArtifactError(f"{file}: bad format_version {version!r}; the file is corrupt, save the adapter again")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{file}: format_version {version} is newer than this graftune reads "
                            f"({FORMAT_VERSION}); upgrade graftune to load it")
    missing = [k for k in ("method", "config", "targets", "base_fingerprint") if k not in meta]
    if missing:
        raise ArtifactError(f"{file}: missing field(s) {', '.join(missing)}; the file is corrupt, save it again")
    if not isinstance(meta["config"], dict) or not isinstance(meta["targets"], list):
        raise ArtifactError(f"{file}: 'config' must be an object and 'targets' a list; save the adapter again")
    return meta


def load_adapter(model: AdapterModel, path: str | os.PathLike, *, name: str | None = None,
                 check_base: bool = True) -> AdapterInfo:
    """Add the adapter saved at ``path`` to ``model`` (under its saved name, or ``name``); it is not activated.

    Everything is read and checked before the model is touched, and if adding or filling the adapter fails the
    half-added adapter is deleted: on any error the model is exactly as before. ``check_base=False`` skips the
    fingerprint check (tensor shapes are still checked).
    """
    path = Path(path)
    meta = read_meta(path)
    label = f"adapter {str(meta.get('name') or path.name)!r} ({path})"
    try:
        method = get_method(meta["method"])
    except GraftuneError:
        raise ArtifactError(f"{label} uses method {meta['method']!r}, which this graftune does not have; "
                            "upgrade graftune or install the plugin that provides it") from None
    try:
        config = make_config(method, **meta["config"])
    except (GraftuneError, TypeError) as e:
        raise ArtifactError(f"{label}: its config does not fit this graftune's {method.name} ({e})") from None
    if check_base:
        check_fingerprint(meta["base_fingerprint"], base_fingerprint(model), label)
    tensors = read_tensors(path / TENSORS_FILE)
    state = {k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIX)}
    new_name = name or meta.get("name") or path.name
    info = model.add_adapter(new_name, method, config)
    try:
        if list(info.targets) != list(meta["targets"]):
            raise ArtifactError(f"{label} was saved on targets {meta['targets'][:3]}..., but its config selects "
                                f"{list(info.targets)[:3]}... on this base; load it onto the base it was made for")
        model.load_adapter_state_dict(new_name, state)
    except BaseException:
        model.delete_adapter(new_name)
        raise
    return info


def read_head_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The task head saved with an adapter: its tensors (keys without the prefix) and its JSON description
    (class, shapes, in/out features, plus ``label_names``). Raises ArtifactError if no head was saved."""
    path = Path(path)
    meta = read_meta(path)
    if not meta.get("head"):
        raise ArtifactError(f"{path}: this adapter was saved without a head; pass head= to save_adapter")
    tensors = read_tensors(path / TENSORS_FILE)
    state = {k[len(HEAD_PREFIX):]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
    return state, {**meta["head"], "label_names": meta.get("label_names")}
