"""LoRA adapters in Hugging Face PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT names a LoRA tensor ``base_model.model.<module path>.<suffix>`` (the adapter name is stripped on save),
where the module path is the base model's own (``encoder.layer.0.attention.self.query`` in a ``BertModel``,
``model.layers.0.self_attn.q_proj`` in a ``LlamaForCausalLM``) and the suffix is

=================  ==========================================  ===========================
graftune param     PEFT suffix (Linear, GPT-2 Conv1D, Conv2d)  PEFT suffix (Embedding)
=================  ==========================================  ===========================
``lora_A``         ``lora_A.weight`` (r x in)                  ``lora_embedding_A`` (r x num)
``lora_B``         ``lora_B.weight`` (out x r)                 ``lora_embedding_B`` (dim x r)
``lora_magnitude`` ``lora_magnitude_vector`` (DoRA, out)       (DoRA not supported)
=================  ==========================================  ===========================

The layouts are the same as ours (GPT-2's Conv1D included: PEFT's ``fan_in_fan_out`` only says that the base
weight is stored in x out), so conversion renames keys and translates the config (``lora_alpha`` = alpha,
``use_rslora`` = rslora, ``use_dora`` = dora, ``lora_dropout`` = dropout). PEFT options that change the math in
ways our LoRA does not model (per-module ranks, trained biases, modules_to_save, weight-changing inits such as
PiSSA, other variants) are refused with a clear error instead of being silently dropped.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from graftune.core import targets as targeting
from graftune.core.method import TargetSpec, make_config
from graftune.core.model import AdapterInfo, AdapterModel
from graftune.errors import ArtifactError, GraftuneError, TargetError
from graftune.io.artifact import HEAD_PREFIX, TENSORS_FILE, read_meta, read_tensors, target_types, write_dir_atomically
from graftune.io.atomic import check_creatable

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_LAYER_KEYS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}
_EMBEDDING_KEYS = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}
_SUPPORTED_TYPES = ("Linear", "Conv1D", "Conv2d", "Embedding")
# PEFT options whose non-default values change what the adapter computes; refused on import
_UNSUPPORTED = ("modules_to_save", "rank_pattern", "alpha_pattern", "layer_replication", "trainable_token_indices",
                "target_parameters", "alora_invocation_tokens", "use_qalora", "use_bdlora", "lora_bias",
                "arrow_config", "kasa_config", "monteclora_config", "velora_config")
# initializations that rewrite the base weights: the saved adapter is relative to a base we do not have
_BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")
# graftune's built-in aliases (graftune.zoo) as the hub ids PEFT users load; other names are written as given
_HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def _suffixes(kind: str) -> dict[str, str]:
    return _EMBEDDING_KEYS if kind == "Embedding" else _LAYER_KEYS


def _task_type(base_class: str | None) -> str | None:
    """PEFT's task type for a base class: decoder LMs get CAUSAL_LM (PeftModelForCausalLM, with generate)."""
    if base_class and base_class.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    return None


# --- export ---------------------------------------------------------------------------------------------------
def _to_peft(label: str, method: str, config: dict, state: dict[str, torch.Tensor], targets: list[str],
             types: dict[str, str], dilation: dict[str, list[int]], base_name: str | None,
             base_class: str | None) -> tuple[dict[str, torch.Tensor], dict]:
    if method != "lora":
        raise ArtifactError(f"{label}: only LoRA adapters export to PEFT format (this one is {method})")
    tensors, used = {}, set()
    for t in targets:
        kind = types.get(t)
        if kind not in _SUPPORTED_TYPES:
            raise ArtifactError(f"{label}: target {t} is a {kind}, which PEFT's LoRA format does not cover here")
        if t in dilation:
            raise ArtifactError(f"{label}: target {t} is a dilated Conv2d (dilation={dilation[t]}); PEFT's LoRA "
                                "ignores dilation, so the export would compute differently")
        for ours, theirs in _suffixes(kind).items():
            key = f"{t}.{ours}"
            if key in state:
                tensors[f"{PEFT_PREFIX}{t}.{theirs}"] = state[key].contiguous()
                used.add(key)
    left = sorted(set(state) - used)
    if left:
        raise ArtifactError(f"{label}: tensors {left[:3]} have no PEFT equivalent (DoRA on embeddings?)")
    alpha = config.get("alpha", 16.0)
    peft_config = {
        "peft_type": "LORA",
        "task_type": _task_type(base_class),
        "base_model_name_or_path": base_name,
        "r": config.get("r", 8),
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": config.get("dropout", 0.0),
        "use_rslora": bool(config.get("rslora", False)),
        "use_dora": bool(config.get("dora", False)),
        # full module names: PEFT's list matching (name == t or name ends with "." + t) selects exactly these
        "target_modules": sorted(targets),
        "fan_in_fan_out": any(types.get(t) == "Conv1D" for t in targets),
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    return tensors, peft_config


def _write_peft(out_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], peft_config: dict) -> Path:
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n", encoding="utf-8")

    return write_dir_atomically(out_dir, write, markers=(CONFIG_FILE,))


def export_peft(model: AdapterModel, name: str, out_dir: str | os.PathLike, *,
                base_model_name_or_path: str | None = None) -> Path:
    """Write LoRA adapter ``name`` as a PEFT adapter directory (atomically); load it with
    ``PeftModel.from_pretrained(base, out_dir)`` on the same base class graftune used."""
    check_creatable(out_dir, what="PEFT adapter folder", flag=None)
    info = model._require(name)
    label = f"adapter {name!r}"
    types, dilation = target_types(model, info)
    base_name = base_model_name_or_path or getattr(getattr(model.base, "config", None), "name_or_path", None) or None
    tensors, cfg = _to_peft(label, info.method.name, info.config.to_dict(), model.adapter_state_dict(name),
                            list(info.targets), types, dilation, base_name, type(model.base).__name__)
    return _write_peft(out_dir, tensors, cfg)


def _run_yaml(run_dir: Path) -> dict:
    """``run.yaml`` as a dict ({} when there is none)."""
    file = run_dir / "run.yaml"
    if not file.is_file():
        return {}
    import yaml

    try:
        run = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ArtifactError(f"{file}: not valid YAML ({str(e).splitlines()[0]}); fix or remove it") from None
    return run if isinstance(run, dict) else {}


def _run_method(run_dir: Path) -> str | None:
    return _run_yaml(run_dir).get("method")


def _run_model_name(run_dir: Path) -> str | None:
    """The base model named in ``run.yaml`` (``model: <alias, path or hub id>``), if there is one."""
    model = _run_yaml(run_dir).get("model")
    if isinstance(model, dict):
        model = model.get("name") or model.get("path") or model.get("id")
    return str(model) if model else None


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
               base_model_name_or_path: str | None = None) -> Path:
    """``graftune export RUN_DIR --format peft --out DIR``: convert the run's LoRA artifact (``RUN_DIR/adapter``)
    to a PEFT adapter directory. Works from the artifact alone; no model is loaded. ``base_model_name_or_path``
    defaults to ``model`` in ``RUN_DIR/run.yaml`` (then the artifact's ``extra["base_model"]``), with built-in
    aliases written as their hub ids."""
    check_creatable(out_dir, what="PEFT adapter folder")
    run_dir = Path(run_dir)
    adapter_dir = run_dir / "adapter"
    if not adapter_dir.exists() and _run_method(run_dir) == "probe":
        raise ArtifactError(f"{run_dir}: a probe run (the frozen base + a fitted head) has no adapter to export; "
                            "use it with graftune eval/predict, or train an adapter (--method lora)")
    meta = read_meta(adapter_dir)
    label = f"adapter {meta.get('name')!r} ({adapter_dir})"
    if meta["method"] != "lora":
        raise ArtifactError(f"{label}: only LoRA adapters export to PEFT format (this one is {meta['method']})")
    state = {k: v for k, v in read_tensors(adapter_dir / TENSORS_FILE).items() if not k.startswith(HEAD_PREFIX)}
    extra = meta.get("extra") or {}
    base_name = base_model_name_or_path or _run_model_name(run_dir) or extra.get("base_model")
    base_name = _HUB_IDS.get(base_name, base_name)
    tensors, cfg = _to_peft(label, meta["method"], meta["config"], state, list(meta["targets"]),
                            meta.get("target_types") or {}, meta.get("conv_dilation") or {}, base_name,
                            (meta.get("base_fingerprint") or {}).get("class"))
    return _write_peft(out_dir, tensors, cfg)


# --- import ---------------------------------------------------------------------------------------------------
def _read_peft_config(peft_dir: Path) -> dict:
    file = peft_dir / CONFIG_FILE
    if not file.is_file():
        raise ArtifactError(f"{peft_dir}: no {CONFIG_FILE}; not a PEFT adapter directory (for a graftune "
                            "artifact use load_adapter)")
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{file}: not valid JSON ({e}); re-save the PEFT adapter") from None
    if not isinstance(cfg, dict):
        raise ArtifactError(f"{file}: expected a JSON object; re-save the PEFT adapter")
    if cfg.get("peft_type") != "LORA":
        raise ArtifactError(f"{file}: only PEFT LoRA adapters import into graftune (this one is "
                            f"{cfg.get('peft_type')})")
    for key in _UNSUPPORTED:
        if cfg.get(key):
            raise ArtifactError(f"{file}: PEFT option {key}={cfg[key]!r} is not supported by graftune's LoRA "
                                "(supported: plain LoRA, rsLoRA, DoRA; one rank and alpha for all modules)")
    if cfg.get("bias", "none") != "none":
        raise ArtifactError(f"{file}: PEFT option bias={cfg['bias']!r} trains base biases, which graftune's LoRA "
                            "does not; retrain with bias='none'")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ArtifactError(f"{file}: init_lora_weights={init!r} rewrites the base weights; convert the adapter "
                            "with PEFT's path_initial_model_for_weight_conversion first")
    return cfg


def _split_peft_key(key: str) -> tuple[str, str]:
    """``base_model.model.<module>.<suffix>`` -> (module, our param name)."""
    if key.startswith(PEFT_PREFIX):
        rest = key[len(PEFT_PREFIX):]
        for table in (_LAYER_KEYS, _EMBEDDING_KEYS):
            for ours, theirs in table.items():
                if rest.endswith("." + theirs):
                    return rest[: -len(theirs) - 1], ours
        if rest.endswith(".lora_magnitude_vector.weight"):  # the key name of some PEFT versions
            return rest[: -len(".lora_magnitude_vector.weight")], "lora_magnitude"
    raise ArtifactError(f"PEFT tensor {key!r} is not a LoRA tensor graftune knows (lora_A/lora_B/"
                        "lora_embedding_A/B/lora_magnitude_vector under base_model.model.)")


def _targets_for(model: AdapterModel, modules: list[str], target_modules) -> TargetSpec:
    """A TargetSpec selecting exactly ``modules``: PEFT's own ``target_modules`` list where it does (readable),
    else the exact module names."""
    wanted = set(modules)
    candidates = []
    if isinstance(target_modules, list) and target_modules:
        candidates.append(TargetSpec(names=tuple(sorted(target_modules))))
    candidates.append(TargetSpec(names=tuple(sorted(modules))))
    candidates.append(TargetSpec(regex="^(?:" + "|".join(map(re.escape, sorted(modules))) + ")$"))
    for spec in candidates:
        try:
            if set(targeting.select(model.base, spec, supported_types=_SUPPORTED_TYPES)) == wanted:
                return spec
        except TargetError:
            continue
    return candidates[-1]


def import_peft(model: AdapterModel, peft_dir: str | os.PathLike, *, name: str = "default") -> AdapterInfo:
    """Add a PEFT LoRA adapter directory to ``model`` as graftune adapter ``name`` (not activated). On any error
    the model is exactly as before."""
    peft_dir = Path(peft_dir)
    cfg = _read_peft_config(peft_dir)
    weights = peft_dir / WEIGHTS_FILE
    if not weights.is_file() and (peft_dir / "adapter_model.bin").is_file():
        raise ArtifactError(f"{peft_dir}: has only the pickle-based adapter_model.bin, which graftune never "
                            "unpickles; re-save it with save_pretrained(..., safe_serialization=True)")
    label = f"PEFT adapter {peft_dir}"
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_tensors(weights).items():
        module, param = _split_peft_key(key)
        by_module.setdefault(module, {})[param] = tensor
    if not by_module:
        raise ArtifactError(f"{weights}: holds no LoRA tensors")
    modules = dict(model.base.named_modules())
    r, dora = cfg.get("r", 8), bool(cfg.get("use_dora", False))
    state = {}
    for m, params in by_module.items():
        if m not in modules:
            raise ArtifactError(f"{label} adapts module {m}, which this base does not have; load it onto the "
                                f"base it was made for ({cfg.get('base_model_name_or_path')}), with the same class")
        kind = type(modules[m]).__name__
        if kind not in _SUPPORTED_TYPES:
            raise ArtifactError(f"{label} adapts {m}, a {kind}; graftune's LoRA supports {', '.join(_SUPPORTED_TYPES)}")
        if kind == "Conv2d" and any(d != 1 for d in modules[m].dilation):
            raise ArtifactError(f"{label} adapts {m}, a dilated Conv2d, where PEFT's LoRA ignores the dilation "
                                "and graftune's does not; the import would compute differently")
        need = {"lora_A", "lora_B"} | ({"lora_magnitude"} if dora else set())
        if set(params) != need:
            raise ArtifactError(f"{label}: module {m} has tensors {sorted(params)}, expected {sorted(need)}")
        if params["lora_A"].shape[0] != r:
            raise ArtifactError(f"{label}: module {m} has rank {params['lora_A'].shape[0]}, the config says r={r}")
        state.update({f"{m}.{p}": t for p, t in params.items()})
    try:
        config = make_config("lora", r=r, alpha=float(cfg.get("lora_alpha", 8)), dropout=float(cfg.get("lora_dropout",
                             0.0)), rslora=bool(cfg.get("use_rslora", False)), dora=dora,
                             targets=_targets_for(model, list(by_module), cfg.get("target_modules")))
    except GraftuneError as e:
        raise ArtifactError(f"{label}: its config does not fit graftune's LoRA ({e})") from None
    try:
        info = model.add_adapter(name, "lora", config)
    except TargetError as e:
        raise ArtifactError(f"{label}: {e}") from None
    except GraftuneError as e:
        if name in model.info:
            raise
        raise ArtifactError(f"{label}: {e}") from None
    try:
        model.load_adapter_state_dict(name, state)
    except BaseException:
        model.delete_adapter(name)
        raise
    return info
