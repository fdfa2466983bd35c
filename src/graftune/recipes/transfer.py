"""Transfer between adapters: warm starts and stacking (``--init-from``, ``--stack-under``).

- **Warm start** (``init_from``): the new adapter starts from another adapter's weights instead of its usual
  initialization: a task adapter trained in one language (or on a related task) continues on the new data. The
  source must be the same method with the same tensor shapes on the same base; anything else is a one-line
  error naming the difference. Its classification head comes along only when its label names are exactly the new
  run's (same names, same order); otherwise the head starts afresh (probe or random, as ``head_init`` says).
- **Stacking** (``stack_under``): a frozen adapter (a language adapter, say) is loaded and applied under the
  trained one, in the spirit of MAD-X (Pfeiffer et al. 2020, https://arxiv.org/abs/2005.00052): at every
  site the frozen adapter acts first and the task adapter acts on its output (``AdapterModel.set_active(under,
  task)``). Only the task adapter trains. The frozen adapter is copied into the run directory
  (``RUN_DIR/stack_under/``), so ``eval``/``predict`` reload both from the run alone (``load_stack``); swapping
  in another language adapter is a matter of replacing that folder with an adapter of the same base.
- **Evaluating in another language** needs nothing here: ``graftune eval RUN_DIR --data OTHER_FILE`` scores a
  run on any labelled file with the same label names (with a multilingual base, that is zero-shot cross-lingual
  transfer).

A source is a run directory (``RUN_DIR``, its ``adapter/`` is used) or an adapter directory (``adapter.json`` +
``adapter.safetensors``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

from graftune.config import read_yaml, set_flag
from graftune.errors import ArtifactError, ConfigError
from graftune.io import artifact
from graftune.io.artifact import META_FILE, TENSORS_FILE, load_adapter
from graftune.run.rundir import RUN_FILE

#: the folder of a run directory holding the frozen adapter applied under the trained one
UNDER_DIR = "stack_under"
UNDER_NAME = "stack-under"


def source_dir(path: str | Path, flag: str) -> Path:
    """The adapter directory of ``path``: a run directory's ``adapter/``, or ``path`` itself."""
    p = Path(path)
    if (p / "adapter" / META_FILE).is_file():
        return p / "adapter"
    if (p / META_FILE).is_file():
        return p
    method = _run_method(p)
    if method is not None:
        what = _NO_ADAPTER.get(method, f"a {method} run, saved without adapter/")
        raise ConfigError(f"{flag} {path}: {what}, has no adapter to start from; pass the --out of a run trained "
                          "with an adapter method (lora, contrastive, ...)")
    raise ConfigError(f"{flag} {path}: not a run directory (with adapter/) or an adapter directory (with "
                      f"{META_FILE}); pass the --out of an earlier `graftune train`")


#: what the run kinds without an adapter keep instead (probe and in-context runs)
_NO_ADAPTER = {"probe": "a probe run, the frozen base and a fitted head/",
               "in-context": "an in-context run, a prompt of examples (in_context/)"}


def _run_method(folder: Path) -> str | None:
    """The method of the run directory ``folder`` (its run.yaml's ``method``), or None if it is not one."""
    try:
        method = read_yaml(folder / RUN_FILE).get("method") if (folder / RUN_FILE).is_file() else None
    except ConfigError:
        return None
    return method if isinstance(method, str) else None


def under_name(task_name: str) -> str:
    """The name the stacked frozen adapter is loaded under (never the task adapter's own name)."""
    return UNDER_NAME if task_name != UNDER_NAME else f"{UNDER_NAME}-2"


# --- warm start -------------------------------------------------------------------------------------------------
def warm_start(model, name: str, source: str | Path, *, head: nn.Module | None = None,
               label_names: list[str] | None = None) -> dict:
    """Load the adapter saved at ``source`` into adapter ``name`` of ``model`` (already added), and its head
    into ``head`` when the label names match. Returns a record of what was loaded."""
    folder = source_dir(source, "init_from")
    meta = artifact.read_meta(folder)
    info = model.info.get(name)
    if info is None:
        raise ConfigError("init_from: a head-only run has no adapter to warm-start; name the source's method "
                          f"(--method {meta['method']})")
    if meta["method"] != info.method.name:
        raise ConfigError(f"init_from {source}: its adapter is {meta['method']}, this run trains {info.method.name}; "
                          f"a warm start needs the same method (--method {meta['method']})")
    artifact.check_fingerprint(meta["base_fingerprint"], artifact.base_fingerprint(model), f"init_from {source}")
    tensors = artifact.read_tensors(folder / artifact.TENSORS_FILE)
    state = {k: v for k, v in tensors.items() if not k.startswith(artifact.HEAD_PREFIX)}
    own = model.adapter_state_dict(name)
    differ = sorted(k for k in set(own) | set(state) if k not in own or k not in state or own[k].shape != state[k].shape)
    if differ:
        theirs, ours = meta["config"], info.config.to_dict()
        options = [set_flag(k, theirs[k]) for k in sorted(theirs) if theirs.get(k) != ours.get(k)]
        k = differ[0]
        def shape(d):
            return tuple(d[k].shape) if k in d else "absent"

        raise ConfigError(f"init_from {source}: its {meta['method']} adapter does not have this run's shapes "
                          f"({k}: {shape(state)} there, {shape(own)} here); "
                          + (f"train with its options: {' '.join(options)}" if options else
                             "train with the options it was trained with"))
    model.load_adapter_state_dict(name, state)
    record = {"init_from": str(source), "init_method": meta["method"]}
    if head is None:
        return record
    theirs = meta.get("label_names")
    if not meta.get("head") or theirs != list(label_names or []):
        why = "the source has no head" if not meta.get("head") else "the label names differ"
        record["init_head"] = f"re-initialized: {why}"
        return record
    head_state, _ = artifact.read_head_state(folder)
    mine = head.state_dict()
    if set(head_state) != set(mine) or any(head_state[k].shape != mine[k].shape for k in mine):
        raise ArtifactError(f"init_from {source}: its head has other shapes than this run's (another base width?); "
                            "train from a source made on this base")
    head.load_state_dict(head_state)
    record["init_head"] = "loaded"  # train() then skips the probe initialization
    return record


# --- stacking ---------------------------------------------------------------------------------------------------
def stack_under(model, name: str | None, source: str | Path) -> str:
    """Load the adapter at ``source`` frozen and activate it under adapter ``name`` (or alone for a head-only
    run). Returns the frozen adapter's name in ``model``."""
    folder = source_dir(source, "stack_under")
    if folder.name == "adapter" and (folder.parent / UNDER_DIR).is_dir():
        raise ConfigError(f"stack_under {source}: that run has an adapter stacked under it already; stack one "
                          "level only (pass the language adapter itself)")
    under = under_name(name or "")
    load_adapter(model, folder, name=under)  # checks the base fingerprint; added frozen and inactive
    model.set_active(*([under, name] if name is not None else [under]))
    return under


def load_stack(model, run_dir: str | Path, task_name: str | None) -> list[str]:
    """For ``load_run``: load ``RUN_DIR/stack_under`` (if the run has one) under its name; return the names to
    activate before the task adapter."""
    folder = Path(run_dir) / UNDER_DIR
    if not folder.is_dir():
        return []
    under = under_name(task_name or "")
    load_adapter(model, folder, name=under)
    return [under]


# --- the hook train() calls ---------------------------------------------------------------------------------------
def apply_transfer(cfg, model, name: str, head: nn.Module | None, label_names: list[str], work: Path | None) -> dict:
    """What ``init_from`` and ``stack_under`` ask of a new run, after its adapter and head are built; the frozen
    adapter is copied into the run directory being written (``work``; None on the ranks of a data-parallel run
    that do not write). Returns a record for metrics.json (empty when neither is set)."""
    record: dict = {}
    task = name if name in model.info else None
    if cfg.stack_under:
        under = stack_under(model, task, cfg.stack_under)
        folder = source_dir(cfg.stack_under, "stack_under")
        if work is not None:
            (work / UNDER_DIR).mkdir(exist_ok=True)
            for file in (META_FILE, TENSORS_FILE):
                shutil.copy2(folder / file, work / UNDER_DIR / file)
        record.update(stack_under=str(cfg.stack_under), stack_under_method=model.info[under].method.name)
    if cfg.init_from:
        record.update(warm_start(model, name, cfg.init_from, head=head, label_names=label_names))
    return record
