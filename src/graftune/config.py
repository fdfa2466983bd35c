"""The run configuration: one frozen, validated dataclass, read from YAML and command-line flags (flags win).

``run.yaml`` in every run directory is this config written back in full (``to_yaml``), so
``graftune train --config RUN_DIR/run.yaml --out OTHER`` repeats the run. Method options (``r``, ``alpha``,
``targets``, ...) live under ``options``; on the command line they are given as ``--set key=value`` (repeatable;
the value is read as YAML, so ``--set r=8`` is an int, ``--set targets=[query,value]`` a list).
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from graftune.core.method import all_methods, check, make_config
from graftune.errors import ConfigError
from graftune.speed.precision import CHOICES
from graftune.tasks import task_name

#: the method name of a run that trains the task head alone (no adapter)
HEAD_ONLY = "head"

SCHEDULES = ("linear", "cosine", "constant")
METRICS = ("macro_f1", "accuracy", "loss")
LOG_TO = ("mlflow", "tensorboard")
HEAD_INITS = ("probe", "random")
CACHE_CHOICES = ("auto", "on", "off")
#: the optimizer step of the adapter loop when ``lr`` / ``batch_size`` are unset (``RunConfig.with_step_defaults``;
#: a recipe with other defaults passes its own)
STEP_DEFAULTS = {"lr": 1e-3, "batch_size": 16}
#: the adapter loop's validation part when ``val_size`` is unset (early stopping reads it)
VAL_SIZE = 0.1
#: with no method named (``runs.default_method``), single-label text with at most this many training examples per
#: class (on average) is ``method: auto`` instead of LoRA, the engine's default. LoRA with train's defaults was the
#: least accurate choice at 8, 16, 32 and 64 a class (bench/RESULTS.md, "Session 9: what train does without
#: --method" and "Session 14": the contrastive recipe +2.9 points at 32 and +2.5 at 64 on average, ahead on 6 of 7
#: sets at 64, tied on bbc-news); auto, which picks among the frozen probe, class prototypes, LoRA and the
#: contrastive recipe by cross-validation, was as accurate as the contrastive recipe on every replayed split of 9
#: data sets and avoided its losses on data unlike them (7 to 20 points below the probe on texts of a word or two;
#: "Session 13"). 64 is the largest size measured, not a tuned value: above it LoRA stays the default.
FEW_PER_CLASS = 64
#: fields that say where and how to run, not what to compute: never written to run.yaml
_RUNTIME = ("out", "resume", "overwrite")


@dataclass(frozen=True)
class RunConfig:
    """Args:
    model: a zoo alias (``minilm``, ``smollm2``, ``efficientnet-lite0``), a local model folder or a hub id.
    data: a data alias (``bbc-news``, ``mnist-5k``, ``json-answers``), a file or a folder.
    method: an adaptation method (``graftune methods``), ``head`` to train only the task head, ``auto``:
        picked by a quick comparison on validation examples carved from the training examples,
        ``contrastive``: the SetFit recipe (pairs train a LoRA adapter, then a logistic regression), or ``probe``:
        the frozen base's whole-text embeddings + a logistic regression or nearest class mean (both single-label
        text only; options and what does not apply: ``recipes/contrastive.py``, ``recipes/probe.py``).
    options: the method's options (``{"r": 8, "alpha": 16}``).
    task: ``classification``, ``image`` or ``causal-lm``; unset: from the data (text, image, pairs).
    text_column, label_column, prompt_column, response_column: column names in tabular data.
    test: a separate test file (nothing is carved from ``data`` for testing then).
    shots: K training examples per class (unset: every example not held out).
    test_size: fraction (or count) held out for testing when neither ``test`` nor ``test_per_class`` is given.
    test_per_class: exactly N test examples per class.
    val_size: fraction (or count) held out for early stopping; with ``shots``, 0 switches val off (else val is
        the next max(K, 8) examples per class). Unset: the method's own, filled in when the run starts:
        ``VAL_SIZE`` for the adapter loop, whose early stopping reads it; 0 for the contrastive, probe and
        in-context recipes, which never read a validation part (``split_args`` before that: ``VAL_SIZE``).
    seed: seeds the splits, the shots, the head's initialization, the data order and dropout.
    split_seed: seeds the test/val carving apart from the shots and the training (unset: ``seed``): one fixed
        test set, many shot draws.
    epochs: passes over the training data (at most: early stopping may end sooner).
    lr: AdamW learning rate of the adapter; head_lr: of the head (unset: lr). Unset: the method's own
        (``STEP_DEFAULTS``; the contrastive recipe's ``contrastive.STEP_DEFAULTS``), filled in when the run starts
        (``with_step_defaults``), so ``run.yaml`` records the rate that trained.
    weight_decay: AdamW weight decay (never on biases and norms).
    batch_size: examples per optimizer step (micro-batches of batch_size / grad_accum are run); for the
        contrastive recipe, pairs per step. Unset: the method's own, as ``lr``.
    grad_accum: split each batch into this many micro-batches (same result, less memory).
    max_length: tokens per text; longer ones are truncated.
    warmup: fraction of the optimizer steps spent warming the learning rate up from 0.
    schedule: learning-rate decay after warm-up: linear, cosine or constant.
    dropout: dropout before the classification head.
    head_init: ``probe`` starts the classification head at a logistic regression fitted on the starting
        features (LP-FT), ``random`` at a random Linear.
    base_dropout: run the frozen base in training mode (its own dropout active; batch-norm statistics would
        move). Off by default: the base computes exactly as at inference, and it is faster.
    clip: gradient-norm clipping (0: off).
    patience: stop after this many epochs without a better val metric (0: never stop early). The best
        epoch's weights are restored at the end whenever there is a val set.
    metric: the val metric that picks the best epoch: macro_f1, accuracy (classification) or loss.
    precision: auto (bf16 frozen base on CPUs with native bf16; see speed/precision.py), fp32, bf16, fp16.
    cache: frozen-prefix cache (speed/cache.py): ``auto`` uses it when only the top of the network trains (a
        head-only run, adapters in the top layers only: ``--set top_k_layers=2``), ``on`` insists (an error says
        why it cannot apply), ``off`` never. The lower layers then run once per example instead of every epoch.
    cache_max_mb: the cache's memory cap in MB (unset: a quarter of the memory free when training starts; see
        ``speed.cache.default_max_bytes``). Rows past it are not stored and run through the whole base (same
        result, less speed-up); ``metrics.json`` counts them (``rows_uncached_over_cap``).
    device: ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``. On CUDA: autocast
        (bf16 where supported, else fp16 with a gradient scaler) and pinned-memory batches.
    compile: ``torch.compile`` the base's layers (those that run every step); falls back to eager, with a
        message, where compilation fails.
    max_new_tokens: generation length when evaluating causal-LM runs.
    log_to: also log to mlflow or tensorboard (if installed).
    threads: torch CPU threads (unset: torch's default).
    auto_budget: seconds the quick comparison behind ``method: auto`` may take (``strategies/auto.py``).
    auto: set by ``method: auto``, not by hand: the method it picked, the validation evidence and the reason (a
        record kept in run.yaml and metrics.json; training reads only ``method`` and ``options``).
    init_from: warm start: a run directory or adapter directory whose adapter (same method, same shapes, same
        base) gives the new adapter its starting weights; its head too when the label names match
        (``recipes/transfer.py``).
    stack_under: a run directory or adapter directory whose adapter (a language adapter, say) is loaded frozen
        and applied under the trained one; it is copied into the run, and eval/predict reload both.
    out: the run directory to write. resume: continue an interrupted run in ``out``. overwrite: replace ``out``.
    """

    model: str = ""
    data: str = ""
    method: str = "lora"
    options: dict = field(default_factory=dict)
    task: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    test: str | None = None
    shots: int | None = None
    test_size: float = 0.2
    test_per_class: int | None = None
    val_size: float | None = None
    seed: int = 0
    split_seed: int | None = None
    epochs: int = 10
    lr: float | None = None
    head_lr: float | None = None
    weight_decay: float = 0.01
    batch_size: int | None = None
    grad_accum: int = 1
    max_length: int = 256
    warmup: float = 0.1
    schedule: str = "linear"
    dropout: float = 0.1
    head_init: str = "probe"
    base_dropout: bool = False
    clip: float = 1.0
    patience: int = 5
    metric: str = "macro_f1"
    precision: str = "auto"
    cache: str = "auto"
    cache_max_mb: float | None = None
    device: str = "auto"
    compile: bool = False
    max_new_tokens: int = 64
    log_to: str | None = None
    threads: int | None = None
    auto_budget: float = 300.0
    auto: dict | None = None
    init_from: str | None = None
    stack_under: str | None = None
    out: str | None = None
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self):
        _check_types(self)
        check(bool(self.model), "model", "missing; pass --model (an alias from `graftune models`, or a folder)")
        check(bool(self.data), "data", "missing; pass --data (an alias such as bbc-news, or a file)")
        check(bool(self.method), "method", "missing; pass --method (see `graftune methods`, or head)")
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "max_new_tokens"):
            value = getattr(self, name)
            check(value is None or value >= 1, name, f"got {value}; use a positive integer")
        batch = STEP_DEFAULTS["batch_size"] if self.batch_size is None else self.batch_size
        check(batch % self.grad_accum == 0, "grad_accum",
              f"batch_size {batch} is not a multiple of grad_accum {self.grad_accum}; make it one")
        check(self.shots is None or self.shots >= 1, "shots", f"got {self.shots}; use a positive integer or unset")
        check(self.test_per_class is None or self.test_per_class >= 1, "test_per_class",
              f"got {self.test_per_class}; use a positive integer or unset")
        check(self.lr is None or self.lr > 0, "lr", f"got {self.lr}; use a positive learning rate such as 1e-3")
        check(self.head_lr is None or self.head_lr > 0, "head_lr", f"got {self.head_lr}; use a positive rate")
        check(self.weight_decay >= 0, "weight_decay", f"got {self.weight_decay}; use 0 or more")
        check(0 <= self.warmup < 1, "warmup", f"got {self.warmup}; use a fraction of the steps in [0, 1)")
        check(0 <= self.dropout < 1, "dropout", f"got {self.dropout}; use a value in [0, 1)")
        check(self.clip >= 0, "clip", f"got {self.clip}; use a positive max gradient norm, or 0 for none")
        check(self.patience >= 0, "patience", f"got {self.patience}; use 0 (no early stopping) or more epochs")
        check(self.seed >= 0, "seed", f"got {self.seed}; use a non-negative integer")
        check(self.split_seed is None or self.split_seed >= 0, "split_seed",
              f"got {self.split_seed}; use a non-negative integer or unset")
        check(self.threads is None or self.threads >= 1, "threads", f"got {self.threads}; use a positive count")
        check(0 < self.auto_budget < math.inf, "auto_budget",  # NaN fails too; inf is no JSON number
              f"(--budget) got {self.auto_budget}; use a positive, finite number of seconds")
        check(self.method != "auto" or not self.options, "options",
              "method options (--set) need a named method; drop them with --method auto, or name the method")
        check(self.method != "auto" or not (self.init_from or self.stack_under), "method",
              "auto compares fresh adapters; with --init-from or --stack-under name the method")
        check(self.schedule in SCHEDULES, "schedule", f"got {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        check(self.head_init in HEAD_INITS, "head_init",
              f"got {self.head_init!r}; use one of {', '.join(HEAD_INITS)}")
        check(self.metric in METRICS, "metric", f"got {self.metric!r}; use one of {', '.join(METRICS)}")
        check(self.log_to is None or self.log_to in LOG_TO, "log_to",
              f"got {self.log_to!r}; use one of {', '.join(LOG_TO)}, or leave it unset")
        check(self.precision in CHOICES, "precision", f"got {self.precision!r}; use one of {', '.join(CHOICES)}")
        check(self.cache in CACHE_CHOICES, "cache", f"got {self.cache!r}; use one of {', '.join(CACHE_CHOICES)}")
        check(self.cache_max_mb is None or self.cache_max_mb > 0, "cache_max_mb",
              f"got {self.cache_max_mb}; use a positive number of megabytes, or leave it unset")
        check(bool(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device)), "device",
              f"got {self.device!r}; use auto, cpu, cuda or cuda:N")
        if self.task is not None:
            object.__setattr__(self, "task", task_name(self.task))
        if self.method in {m.name for m in all_methods()}:  # an adapter method: its options, now
            _check_method(self.method, self.options)
        # any other method is a recipe's (head, auto, contrastive, probe, ...): graftune.runs checks it and its
        # options before anything is loaded

    # --- YAML ------------------------------------------------------------------------------------------------
    def to_dict(self, *, runtime: bool = False) -> dict:
        """Every field; ``runtime=False`` drops out/resume/overwrite (what run.yaml holds)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["options"] = dict(self.options)
        return d if runtime else {k: v for k, v in d.items() if k not in _RUNTIME}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def with_defaults(self, **defaults) -> RunConfig:
        """This config with the fields of ``defaults`` filled in where unset (None): a recipe's own defaults, what
        its run trains with and writes into ``run.yaml``."""
        return self.replace(**{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def with_step_defaults(self, defaults: dict | None = None) -> RunConfig:
        """``with_defaults`` for the optimizer step: ``lr`` and ``batch_size`` (and any other field of a recipe's
        ``defaults``), from ``defaults``, else ``STEP_DEFAULTS``."""
        return self.with_defaults(**{**STEP_DEFAULTS, **(defaults or {})})

    def columns(self) -> dict:
        """The column keyword arguments of ``data.sources.load_data`` this config names."""
        return {"text_column": self.text_column, "label_column": self.label_column,
                "prompt_column": self.prompt_column, "response_column": self.response_column}

    def split_args(self) -> dict:
        """The keyword arguments of ``data.splits.make_splits`` this config asks for (without ``test``)."""
        return {"seed": self.seed if self.split_seed is None else self.split_seed, "shot_seed": self.seed,
                "test_size": self.test_size, "val_size": VAL_SIZE if self.val_size is None else self.val_size,
                "shots": self.shots,
                "test_per_class": self.test_per_class}


def is_set(cfg: RunConfig, name: str) -> bool:
    """Whether field ``name`` of ``cfg`` is set away from its default. ``lr`` and ``batch_size`` at the adapter loop's
    ``STEP_DEFAULTS`` count as unset too: every run.yaml written before they defaulted to None holds those values,
    whatever its method."""
    value = getattr(cfg, name)
    default = next(f.default for f in dataclasses.fields(cfg) if f.name == name)
    return value != default and not (name in STEP_DEFAULTS and value == STEP_DEFAULTS[name])


def _check_types(cfg: RunConfig) -> None:
    """YAML and flags hand over plain values; catch wrong kinds with a message naming the field."""
    hints = {f.name: f.type for f in dataclasses.fields(cfg)}
    for name, hint in hints.items():
        value = getattr(cfg, name)
        optional = "None" in str(hint)
        if value is None:
            check(optional, name, "missing; give it a value")
            continue
        kind = str(hint).split("|")[0].strip()
        if kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
            check(ok, name, f"got {value!r}; use a whole number")
        elif kind == "float":
            value = _numbers(value)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            check(ok, name, f"got {value!r}; use a number")
            keep_int = isinstance(value, int) and name in ("test_size", "val_size")  # a count, not a fraction
            object.__setattr__(cfg, name, value if keep_int else float(value))
        elif kind == "bool":
            check(isinstance(value, bool), name, f"got {value!r}; use true or false")
        elif kind == "str":
            check(isinstance(value, str), name, f"got {value!r}; use a string")
        elif kind == "dict":
            check(isinstance(value, dict), name, f"got {value!r}; use a mapping such as {{r: 8}}")
    # test_size and val_size are a fraction or a count; keep whole counts as int
    for name in ("test_size", "val_size"):
        value = getattr(cfg, name)
        if isinstance(value, float) and value >= 1 and value.is_integer():
            object.__setattr__(cfg, name, int(value))


def _check_method(method: str, options: dict) -> None:
    """Bad option values of an adapter method fail now, before any model or data is loaded."""
    try:
        make_config(method, **options)
    except TypeError as e:
        raise ConfigError(f"options for {method}: {e}") from None


# --- reading: YAML file + flags ----------------------------------------------------------------------------------
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _numbers(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``5e-4`` as a string (it wants ``5.0e-4``); read it as the number meant."""
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def read_yaml(path: str | Path) -> dict:
    """A config file as a dict; one-line errors for a missing file, bad YAML or unknown keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; check the --config path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"config file {path}: not valid YAML{at}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of fields (model: ..., data: ...)")
    return _numbers(data)


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """``["r=8", "targets=[query,value]"]`` -> ``{"r": 8, "targets": ["query", "value"]}`` (values read as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: write it as key=value, e.g. --set r=8")
        try:
            out[key] = _numbers(yaml.safe_load(raw)) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML; quote it") from None
    return out


def set_flag(key: str, value: Any) -> str:
    """The ``--set`` flag that gives option ``key`` the value ``value`` (the inverse of ``parse_sets``), quoted for
    a shell: ``set_flag("targets", ["query", "value"])`` -> ``--set 'targets=[query,value]'``. A targets mapping is
    written with its empty fields left out, and as a plain list when it only names modules."""
    if key == "targets" and isinstance(value, dict):
        value = {k: v for k, v in value.items() if v not in (None, [], ())}
        if set(value) == {"names"}:
            value = value["names"]
    return "--set " + shlex.quote(f"{key}={_yaml_flow(value)}")


def _yaml_flow(value: Any) -> str:
    """``value`` as one line of YAML that ``yaml.safe_load`` reads back as ``value`` (PyYAML's flow style; a lone
    scalar's document-end marker dropped)."""
    return yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip().removesuffix("\n...")


def build_config(config_file: str | Path | None = None, *, sets: list[str] | None = None,
                 **flags: Any) -> RunConfig:
    """The run config from an optional YAML file, then the flags that were given (``None`` = not given), then
    ``--set`` method options on top of the file's ``options``."""
    data = read_yaml(config_file) if config_file else {}
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config file {config_file}: unknown field(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known - set(_RUNTIME)))}")
    bad_flags = sorted(set(flags) - known)
    if bad_flags:
        raise ConfigError(f"unknown setting(s) {', '.join(bad_flags)}")
    file_method = data.get("method")
    data.update({k: v for k, v in flags.items() if v is not None})
    if data.get("options") is None:
        data["options"] = {}
    if not isinstance(data["options"], dict):
        raise ConfigError(f"options: got {data['options']!r}; use a mapping such as {{r: 8, alpha: 16}}")
    if file_method is not None and data.get("method") != file_method:
        # a flag picked another method than the file's: the file's options belong to that method, not this one
        data["options"] = {}
    data["options"] = {**data["options"], **parse_sets(sets)}
    return RunConfig(**data)
