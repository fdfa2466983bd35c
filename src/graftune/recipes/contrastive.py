"""``graftune train --method contrastive``: the SetFit recipe as a saved run. ``contrastive_fit``
(``recipes/fewshot.py``) trains a LoRA adapter on pairs of training texts (same class: cosine 1, other class: 0)
and fits a scikit-learn logistic regression on the adapted, L2-normalized, window-averaged embeddings. The run
directory gets ``adapter/`` (the LoRA adapter, no task head) and ``head/`` (``recipes/fewshot_run.py``: the shared
run writer, head format and reloading of both few-shot recipes).

Mapping of the run config: ``lr`` and ``batch_size`` (pairs per step; unset: ``STEP_DEFAULTS``), ``seed``,
``precision`` and ``cache`` (``off``: no frozen-prefix cache) pass through to ``contrastive_fit``; ``max_length``
is the embedding length the head reads (``embed_max_length``), and pairs train on ``min(128, max_length)``
tokens, as ``graftune compare`` runs it.
``--set`` takes ``OPTIONS``. Settings of the adapter loop (``--epochs``, ``--patience``, ...) do not apply and are
refused away from their defaults, as are warm starts and stacking.
"""

from __future__ import annotations

import math
from typing import Any

from graftune.core.method import check as check_option
from graftune.core.method import make_config
from graftune.errors import ConfigError
from graftune.recipes import fewshot_run
from graftune.recipes.fewshot import LOSSES, PAIR_LR, PAIRS_PER_STEP, contrastive_fit, default_options
from graftune.recipes.fewshot_run import CONTRASTIVE, check, check_positive
from graftune.run.log import progress_bar

METHOD = CONTRASTIVE
DESCRIPTION = "SetFit: pairs train LoRA, then a logistic regression; single-label text"

#: ``--set`` options of contrastive: ``contrastive_fit``'s own keyword arguments ...
FIT_OPTIONS = ("iterations", "epochs", "loss", "temperature", "head_c", "embed_max_chunks")

#: ... and the options of its LoRA adapter (default: r=8, alpha=16, attention projections of the top 2 layers)
LORA_OPTIONS = ("r", "alpha", "top_k_layers")

OPTIONS = FIT_OPTIONS + LORA_OPTIONS

#: ``--lr`` and ``--batch-size`` (pairs per step) when unset: ``contrastive_fit``'s own
STEP_DEFAULTS = {"lr": PAIR_LR, "batch_size": PAIRS_PER_STEP}

#: tokens per text while training on pairs, at most (the head reads ``max_length``), as ``graftune compare`` does
PAIR_MAX_LENGTH = 128


def _check_contrastive_options(opts: dict) -> None:
    check_positive(opts, ("iterations", "epochs", "embed_max_chunks"), integer=True)
    check_positive(opts, ("temperature", "head_c"), integer=False)
    check_option(opts.get("loss", "cosine") in LOSSES, "loss",
                 f"got {opts.get('loss')!r}; use one of {', '.join(LOSSES)}")
    try:
        make_config("lora", **{k: opts[k] for k in LORA_OPTIONS if k in opts})
    except TypeError as e:
        raise ConfigError(f"options for contrastive: {e}") from None


def fit_arguments(cfg: Any, *, family: str | None, pooling: str | None, adapter_name: str = "fewshot") -> dict:
    """The keyword arguments of ``contrastive_fit`` (besides model, tokenizer, texts, labels) that ``cfg`` asks
    for, on a base of ``family`` with the zoo's ``pooling``."""
    opts = cfg.options
    lora = {**default_options("lora", family), **{k: opts[k] for k in LORA_OPTIONS if k in opts}}
    return {"body": "adapter", "method": "lora", "method_options": lora, "lr": cfg.lr, "batch_size": cfg.batch_size,
            "seed": cfg.seed, "max_length": min(PAIR_MAX_LENGTH, cfg.max_length), "embed_max_length": cfg.max_length,
            "precision": cfg.precision, "cache": cfg.cache != "off", "pooling": pooling, "head": "logistic",
            "adapter_name": adapter_name, **{k: opts[k] for k in FIT_OPTIONS if k in opts}}


def _fit(cfg: Any, model: Any, base: Any, splits: Any, log: Any, progress: bool, name: str,
         policy: Any) -> tuple[Any, dict]:
    """``contrastive_fit`` with a progress bar and a log line per step; returns the model and what the run
    reports of it."""
    fit_args = fit_arguments(cfg, family=base.family, pooling=base.pooling, adapter_name=name)
    epochs = fit_args.get("epochs", 1)  # contrastive_fit's default
    bar = None

    def on_step(info: dict) -> None:
        nonlocal bar
        if bar is None:
            bar = progress_bar(info["steps"], 0, progress)
        per_epoch = info["steps"] // epochs
        log.event("step", epoch=math.ceil(info["step"] / per_epoch), step=info["step"], loss=info["loss"],
                  lr=info["lr"])
        bar.update(1)
        bar.set_postfix_str(f"loss {info['loss']:.4f}", refresh=False)

    fitted = contrastive_fit(model, base.tokenizer, splits.train.inputs, splits.train.labels, on_step=on_step,
                             **fit_args)
    if bar is not None:
        bar.close()
    report = fitted.report
    details = {k: report[k] for k in ("pairs", "loss", "first_loss", "last_loss", "lr", "max_length",
                                      "embed_max_length", "embed_max_chunks", "train_seconds", "head_seconds",
                                      "texts_embedded_per_step")}
    return fitted, {"epochs": epochs, "steps": report["steps"], "precision": report["precision"],
                    "cache": report["cache"], "adapter_params": int(report["trainable_params"]),
                    "seconds": report["seconds"], "last_loss": report["last_loss"], "details": details}


def check_config(cfg: Any) -> None:
    """Everything that can be refused before data or a model is loaded (the task, settings that do not apply,
    the ``--set`` options and their values)."""
    check(cfg, OPTIONS)
    _check_contrastive_options(cfg.options)


def train(cfg: Any, *, progress: bool = True, splits: Any = None) -> dict:
    """Write the run directory ``cfg.out`` of a contrastive run; return its metrics."""
    return fewshot_run.train(cfg.with_step_defaults(STEP_DEFAULTS), _fit, progress=progress, splits=splits)


load = fewshot_run.load
