"""The entry points of a run: ``train(cfg)`` and ``load_run(run_dir)``, through ONE dispatch table from a config's
``method`` to its recipe.

A recipe is a module with ``check_config(cfg)`` (everything refusable before data or a model is loaded),
``train(cfg, *, progress, splits)`` (writes the run directory, returns its metrics) and ``load(run_dir, cfg, meta,
kind, *, merge, quantize)`` (the run back, ready to predict). Every adapter method of the engine (``graftune
methods``) and ``head`` train with the adapter loop (``recipes/adapter.py``); the other recipes are rows of
``RECIPES``. ``auto`` is a row too: it resolves the config to another method first (``strategies/auto.py``).

Adding a recipe: one file under ``recipes/`` with those three functions, and one row here.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from types import ModuleType

from graftune.config import FEW_PER_CLASS, HEAD_ONLY, RunConfig, build_config, read_yaml
from graftune.core.method import all_methods
from graftune.data.sources import ALIASES
from graftune.errors import ArtifactError, ConfigError, DataError
from graftune.io.artifact import read_meta
from graftune.recipes import adapter, contrastive, in_context_run, probe
from graftune.run import rundir
from graftune.run.loaded import LoadedRun
from graftune.run.rundir import RUN_FILE
from graftune.speed import quantize as quantization
from graftune.strategies import auto, catalog
from graftune.zoo import list_models

#: method -> recipe module, for the methods that are not the engine's adapter methods
RECIPES: dict[str, ModuleType] = {
    HEAD_ONLY: adapter,
    contrastive.METHOD: contrastive,
    probe.METHOD: probe,
    in_context_run.METHOD: in_context_run,
}
#: ``method: auto`` picks one of the others, then trains it (``strategies/auto.py``)
AUTO = "auto"


def recipe_names() -> list[str]:
    """The methods that are recipes rather than adapter methods, as ``graftune methods`` lists them."""
    return [*RECIPES, AUTO]


def recipe_rows() -> list[tuple[str, str]]:
    """(name, one-line description) of every recipe, for ``graftune methods``."""
    return [*((name, module.DESCRIPTION) for name, module in RECIPES.items()),
            (AUTO, "picked by cross-validation on your training examples among the recipes above and LoRA")]


def recipe_for(method: str) -> ModuleType:
    """The recipe that trains and loads ``method``; a one-line error naming both kinds when it is unknown."""
    if method in RECIPES:
        return RECIPES[method]
    adapters = [m.name for m in all_methods()]
    if method in adapters:
        return adapter
    if method in catalog.AS_RUN:  # a name from `graftune compare`'s table
        raise ConfigError(f"method: {method!r} is graftune compare's name for a strategy; train it with "
                          f"{catalog.AS_RUN[method]}")
    close = difflib.get_close_matches(str(method), [*adapters, *recipe_names()], n=1, cutoff=0.75)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"unknown method {method!r}; {hint}use an adapter method ({', '.join(adapters)}; see "
                      f"`graftune methods`), or one of the recipes {', '.join(recipe_names())}")


def check(cfg: RunConfig) -> RunConfig:
    """Everything refusable before data or a model is loaded, for ``cfg``'s recipe; returns ``cfg`` with its local
    data paths made absolute (so ``run.yaml`` can be evaluated from any working directory)."""
    if cfg.method != AUTO:
        recipe_for(cfg.method).check_config(cfg)
    return _absolute_paths(cfg)


def resume_config(out: str | Path, method: str | None = None) -> Path:
    """The saved config of the interrupted run in ``out`` (``train --resume``). A ``method`` given with --resume
    whose runs write no checkpoints (contrastive, probe, in-context) is refused first, in its recipe's words, rather
    than reported as "no interrupted run" (there never is one)."""
    if method is not None and method != AUTO:
        recipe_for(method).check_config(RunConfig(model="-", data="-", method=method, resume=True))
    return rundir.resume_config(out)


def resolve(cfg: RunConfig, *, progress: bool = True) -> RunConfig:
    """``cfg`` checked; for ``method: auto`` the config of the method auto picked (with its record in ``auto``)."""
    cfg = check(cfg)
    if cfg.method == AUTO:
        cfg = check(auto.resolve(cfg, progress=progress))
    return cfg


def default_method(cfg: RunConfig) -> tuple[RunConfig, str | None]:
    """For a config whose method nobody named (``graftune train`` without ``--method`` or ``--config``): the config
    with the method graftune trains by default on its data, and a sentence saying which and why when that is not
    ``cfg.method``. Single-label text with at most ``FEW_PER_CLASS`` training examples per class is ``auto`` (the
    contrastive recipe when a class has a single example: auto's folds need two), unless a setting the comparison's
    candidates would not honour is given (an option, ``--epochs``, a warm start, ...: those are LoRA's, so LoRA
    trains, and the sentence says why) or the run was launched data-parallel (torchrun: the comparison and the
    contrastive recipe run in one process). Loads and splits the data to count; a data problem is left to the run
    itself to report."""
    from graftune.data.splits import run_splits
    from graftune.recipes.fewshot_run import unused_settings
    from graftune.speed import distributed

    if cfg.method != "lora" or cfg.task == "causal-lm" or cfg.resume or distributed.launched():
        return cfg, None
    try:
        # counted as auto and the contrastive recipe would train: without a validation part unless one is asked for
        train = run_splits(cfg.with_defaults(val_size=0), cfg.task).train
    except (DataError, ConfigError):
        return cfg, None  # the run itself reports it, as it would with --method lora
    if train.modality != "text" or train.multi_label:
        return cfg, None
    counts = train.counts()
    per_class = sum(counts.values()) / max(len(counts), 1)
    if per_class > FEW_PER_CLASS:
        return cfg, None
    # the rule compares the mean over classes: say so, with the counts it came from (a bare "here 8.33" read as
    # a class of 8.33 examples)
    here = f"here {sum(counts.values())} in {len(counts)} classes, {per_class:.3g} on average"
    lora_only = [f"--set {key}" for key in cfg.options]
    lora_only += ["--" + name.replace("_", "-") for name in unused_settings(cfg)]
    if lora_only:  # said, not silent: these few examples would otherwise train auto's pick
        given = " and ".join(lora_only)
        return cfg, (f"no --method given: training LoRA, as {given} {'is' if len(lora_only) == 1 else 'are'} "
                     f"LoRA's; with at most {FEW_PER_CLASS} training examples per class on average ({here}) the "
                     "default would be --method auto: leave those out for it, or name a --method")
    rule = f"the default for single-label text with at most {FEW_PER_CLASS} training examples per class on average"
    if min(counts.values()) < 2:
        single = [str(label) for label, n in counts.items() if n < 2]
        shown = ", ".join(single[:5]) + (f" and {len(single) - 5} more" if len(single) > 5 else "")
        which = ("every class has" if len(single) == len(counts) else
                 f"class {single[0]} has" if len(single) == 1 else f"classes {shown} have")
        return cfg.replace(method=contrastive.METHOD), (
            f"no --method given: training contrastive (SetFit's recipe), as {which} a single training example "
            f"and --method auto, {rule} ({here}), needs 2 a class to cross-validate; --method probe is the other "
            "choice for so few")
    return cfg.replace(method=AUTO), (
        f"no --method given: --method auto, {rule} ({here}): it compares the frozen probe, class prototypes, LoRA "
        "and the contrastive recipe (those your settings and --budget allow) by cross-validation on your examples "
        "and trains its pick (the line above: the evidence and the reason). Measured: on 9 data sets it picked the "
        "contrastive recipe every time; on words in many categories, where that recipe fell 7-20 points below the "
        "probe, it picked the probe or class prototypes (bench/RESULTS.md). --method contrastive trains that recipe "
        "directly, in a fraction of the time")


def train(cfg: RunConfig, *, progress: bool = True, splits=None) -> dict:
    """Train as ``cfg`` says with its recipe, write the run directory ``cfg.out``, return its metrics (as in
    metrics.json: a recipe's per-example ``predicted`` is left out). ``splits``: ready-made ``data.splits.Splits``
    used instead of splitting ``cfg.data`` here."""
    cfg = resolve(cfg, progress=progress)
    metrics = recipe_for(cfg.method).train(cfg, progress=progress, splits=splits)
    return {k: v for k, v in metrics.items() if k != "predicted"}


def run_text_column(run_dir: str | Path) -> str:
    """The text column a run was trained on (run.yaml's ``text_column``), for reading a ``predict --input`` file
    as its data was read; ``text`` for exports and folders without a readable run.yaml (loading the run then says
    why)."""
    try:
        column = read_yaml(Path(run_dir) / RUN_FILE).get("text_column")
    except ConfigError:
        return "text"
    return column if isinstance(column, str) and column else "text"


def load_run(run_dir: str | Path, *, merge: bool = True, expect: str | None = None,
             quantize: str | None = None) -> LoadedRun:
    """Load ``RUN_DIR`` (``run.yaml`` + what its recipe saved) onto its base model, in eval mode. ``expect``
    (``classifier`` or ``causal-lm``) fails before any model is loaded when the run is of the other kind.
    ``quantize="int8"``: merge the adapters into the float32 weights and make the base's Linear layers dynamic
    int8 (``speed/quantize.py``; refused for adapters that cannot be merged). Only the model in memory changes,
    never the run directory."""
    quantize = quantization.check_choice(quantize)
    if quantize != "none" and not merge:
        raise ConfigError(f"quantize {quantize} needs the adapters merged: drop merge=False")
    run_dir = Path(run_dir)
    cfg = build_config(run_dir / RUN_FILE) if (run_dir / RUN_FILE).is_file() else None
    recipe = recipe_for(cfg.method) if cfg is not None and cfg.method != AUTO else None
    has_adapter = getattr(recipe, "HAS_ADAPTER", True)  # probe and in-context runs save no adapter/
    if recipe is None or (has_adapter and not (run_dir / "adapter").is_dir()):
        raise ArtifactError(f"{run_dir}: not a run directory (expected the run.yaml and adapter/, head/ (probe) or "
                            "in_context/ (in-context) that `graftune train --out` writes)")
    meta = read_meta(run_dir / "adapter") if has_adapter else {"extra": {"task": "classification"}}
    kind = (meta.get("extra") or {}).get("task") or cfg.task or "classification"
    if expect == "causal-lm" and kind != "causal-lm":
        raise DataError("this run is a classifier: use `graftune predict RUN_DIR TEXT` (generate is for causal-LM "
                        "runs)")
    if expect == "classifier" and kind == "causal-lm":
        raise DataError("this run is a causal-LM run: use `graftune generate RUN_DIR \"prompt\"`")
    return recipe.load(run_dir, cfg, meta, kind, merge=merge, quantize=quantize)


def _absolute_paths(cfg: RunConfig) -> RunConfig:
    """Local files and folders the config names (model, data, test, warm starts), as absolute paths; aliases
    stay."""
    changes = {}
    aliases = set(ALIASES) | {m.alias for m in list_models()}
    for name in ("model", "data", "test", "init_from", "stack_under"):
        value = getattr(cfg, name)
        if value and value not in aliases and Path(value).exists() and not Path(value).is_absolute():
            changes[name] = str(Path(value).resolve())
    return cfg.replace(**changes) if changes else cfg
