"""``graftune train --method probe``: the frozen-encoder baseline of ``graftune compare``'s ``linear-probe`` and
``prototypes`` as a saved run. ``frozen_fit`` (``recipes/fewshot.py``) embeds the training texts with the frozen
base as ``compare`` does (the run's precision policy for inference: frozen weights cast, embeddings under its
autocast) and fits a logistic regression (``--set head=logistic``, the default) or takes the class means
(``head=prototype``). Nothing trains by gradient; there is no adapter, so the run directory has ``head/`` and no
``adapter/`` (``recipes/fewshot_run.py`` writes and reloads it).

``max_length`` and ``precision`` pass through; ``--set`` takes ``PROBE_OPTIONS``. Settings of the adapter loop
(``--epochs``, ``--lr``, ``--batch-size``, ``--cache``, ...) do not apply and are refused away from their defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from graftune.core.method import check as check_option
from graftune.recipes import fewshot_run
from graftune.recipes.fewshot import DEFAULT_CHUNKS, HEADS, frozen_fit
from graftune.recipes.fewshot_run import check, check_positive
from graftune.speed import precision

METHOD = fewshot_run.PROBE
DESCRIPTION = "frozen whole-text embeddings + logistic regression or class means; single-label text"
#: no adapter/ folder: the frozen base and a fitted head/
HAS_ADAPTER = False

#: ``--set`` options of probe: ``frozen_fit``'s head (``logistic`` or ``prototype``), its ``head_c`` (logistic only)
#: and ``max_chunks`` (windows read per long text)
PROBE_OPTIONS = ("head", "head_c", "max_chunks")


def _check_probe_options(opts: dict) -> None:
    head = opts.get("head", "logistic")
    check_option(head in HEADS, "head", f"got {head!r}; use one of {', '.join(HEADS)}")
    check_option(head == "logistic" or "head_c" not in opts, "head_c",
                 "sets the logistic regression's inverse regularization; drop it with head=prototype")
    check_positive(opts, ("max_chunks",), integer=True)
    check_positive(opts, ("head_c",), integer=False)


def probe_arguments(cfg: Any, *, pooling: str | None) -> dict:
    """The keyword arguments of ``frozen_fit`` (besides model, tokenizer, texts, labels) that ``cfg`` asks for."""
    opts = cfg.options
    return {"head": opts.get("head", "logistic"), "max_length": cfg.max_length, "pooling": pooling,
            "head_c": opts.get("head_c", 1.0), "max_chunks": opts.get("max_chunks", DEFAULT_CHUNKS)}


def _fit(cfg: Any, model: Any, base: Any, splits: Any, log: Any, progress: bool, name: str,
         policy: Any) -> tuple[Any, dict]:
    """``frozen_fit`` on the frozen base, embedding as ``compare._Frozen`` does: the frozen weights cast to the
    inference policy's dtype, embeddings under its autocast (kept by the ``FewShotModel`` for every later embed)."""
    args = probe_arguments(cfg, pooling=base.pooling)
    precision.apply(model.base, policy)
    with policy.autocast():
        fitted = frozen_fit(model, base.tokenizer, splits.train.inputs, splits.train.labels, **args)
    fitted = dataclasses.replace(fitted, precision=policy)
    report = fitted.report
    details = {"head": args["head"], "head_c": args["head_c"] if args["head"] == "logistic" else None,
               **{k: report[k] for k in ("examples", "max_length", "max_chunks", "embed_seconds", "head_seconds")}}
    return fitted, {"epochs": 0, "steps": 0, "precision": policy.name, "adapter_params": 0,
                    "cache": "off (nothing trains: each training text is embedded once)",
                    "seconds": report["seconds"], "last_loss": None, "details": details}


def check_config(cfg: Any) -> None:
    """Everything that can be refused before data or a model is loaded."""
    check(cfg, PROBE_OPTIONS)
    _check_probe_options(cfg.options)


def train(cfg: Any, *, progress: bool = True, splits: Any = None) -> dict:
    """Write the run directory ``cfg.out`` of a probe run; return its metrics."""
    return fewshot_run.train(cfg, _fit, progress=progress, splits=splits)


load = fewshot_run.load
