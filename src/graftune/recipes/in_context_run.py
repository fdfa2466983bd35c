"""``graftune train --method in-context``: k labelled examples per class in a decoder LM's prompt, the label read off
by scoring each label's tokens (``recipes/in_context.py``), as a saved run. Nothing trains: the run directory holds
``in_context/in_context.json`` (the chosen examples, the instruction and settings, the label names, the base alias
and the rendered prompt), ``run.yaml``, ``metrics.json``, ``log.jsonl`` and ``data_card.json``, through the same
data path and splits as every run; ``eval`` and ``predict`` rebuild the prompt and check it is the same.

``--model`` names the decoder (``smollm2``, or a local causal-LM folder); ``--set`` takes the fields of
``InContextConfig`` (``k``, ``label_words``, ``calibrate``, ``score``, ...); ``--seed`` picks the examples and
``--max-length`` cuts each text to label. The
settings of the adapter loop do not apply and are refused away from their defaults.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import numpy as np
import torch

from graftune.config import RunConfig, is_set
from graftune.core.method import check as check_field
from graftune.data.card import data_card
from graftune.data.sources import load_data
from graftune.data.splits import make_splits
from graftune.errors import ConfigError
from graftune.recipes import in_context
from graftune.recipes.fewshot_run import check_data
from graftune.run.loaded import LoadedRun
from graftune.run.log import RunLog, progress_bar
from graftune.run.memory import PeakMemory
from graftune.run.rundir import assembled_run, start_run_dir, write_run_files
from graftune.run.scoring import score_probabilities
from graftune.speed import precision
from graftune.speed.precision import cpu_features

METHOD = "in-context"
DESCRIPTION = ("k labelled examples per class in a decoder LM's prompt (--model smollm2), labels scored, "
               "nothing trained; single-label text")
#: no adapter/ folder: the run is the prompt (``in_context/``)
HAS_ADAPTER = False
FOLDER = "in_context"
#: ``--set`` options: ``InContextConfig``'s fields but the seed (the run's ``--seed`` picks the examples)
OPTIONS = tuple(f.name for f in dataclasses.fields(in_context.InContextConfig) if f.name != "seed")
#: run-config fields that steer training, which an in-context run does not do
NOT_USED = ("epochs", "lr", "head_lr", "weight_decay", "batch_size", "grad_accum", "warmup", "schedule", "dropout",
            "head_init", "base_dropout", "clip", "patience", "metric", "cache", "cache_max_mb", "compile",
            "init_from", "stack_under", "resume")
#: texts scored per progress-bar step
CHUNK = 32


def check_config(cfg: RunConfig) -> None:
    """The task, settings that do not apply and the ``--set`` options, before anything loads."""
    check_field(cfg.task in (None, "classification"), "task",
                f"got {cfg.task}; --method in-context labels texts with a decoder LM's prompt, use another --method")
    for name in NOT_USED:
        check_field(not is_set(cfg, name), name,
                    "--method in-context trains nothing (k labelled examples go into the prompt); drop it")
    unknown = sorted(set(cfg.options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"options for in-context: unknown option(s) {', '.join(unknown)}; use {', '.join(OPTIONS)} "
                          "(--set key=value)")
    in_context.InContextConfig.from_options({**options(cfg), "seed": cfg.seed})  # bad values: one line now


def options(cfg: RunConfig) -> dict:
    """``InContextConfig`` options from the run config: ``--max-length`` cuts each text to label (unless
    ``--set max_text_tokens`` says otherwise), then the ``--set`` options."""
    return {"max_text_tokens": cfg.max_length, **cfg.options}


def train(cfg: RunConfig, *, progress: bool = True, splits: Any = None) -> dict:
    """Choose the examples, score the test split, write the run directory ``cfg.out``; return its metrics."""
    cfg = cfg.with_defaults(val_size=0)  # a validation part would only take from the prompt's pool: nothing reads it
    start_run_dir(cfg, write=False)  # --out taken: say so before loading anything
    columns = {"text_column": cfg.text_column, "label_column": cfg.label_column}
    ds = load_data(cfg.data, task=cfg.task, **columns)
    check_data(ds, METHOD)
    if splits is None:
        user_test = load_data(cfg.test, task=ds.modality, min_classes=1, **columns) if cfg.test else None
        splits = make_splits(ds, test=user_test, **cfg.split_args())
    started = time.perf_counter()
    # the whole run is measured, loading included; the log is closed (and a failed run removed) on the way out
    with assembled_run(cfg) as (_, work), PeakMemory() as memory, \
            contextlib.closing(RunLog(work / "log.jsonl", cfg, resumed=False)) as log:
        log.event("start", method=METHOD, model=cfg.model, data=cfg.data, train=len(splits.train),
                  val=len(splits.val), test=len(splits.test))
        t0 = time.perf_counter()
        fitted = in_context.fit(splits.train.inputs, splits.train.labels, ds.label_names, seed=cfg.seed,
                                model=cfg.model, **options(cfg))
        fit_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        test = score_probabilities(_proba(fitted, splits.test.inputs, progress), splits.test.labels,
                                   ds.label_names)
        scoring = time.perf_counter() - t1
        fitted.save(work / FOLDER)
        params = sum(p.numel() for p in fitted.model.parameters())
        metrics = {**test, "trainable_params": 0, "total_params": params, "adapter_bytes": 0,
                   "train_seconds": round(fit_seconds, 2), "wall_seconds": round(time.perf_counter() - started, 2),
                   "peak_rss_mb": round(memory.peak, 1), "epochs_run": 0, "best_epoch": None, "steps": 0,
                   "stopped_early": False, "epochs": 0,
                   "precision": "fp32", "method": METHOD, "task": "classification",
                   "speed": {"device": "cpu", "processes": 1, "cache": "the prompt's key/value cache, computed once",
                             "compile": None, "threads": torch.get_num_threads(), "cpu": cpu_features()},
                   METHOD: {"examples_in_prompt": len(fitted.examples), "prefix_tokens": fitted.cost.get("prefix_tokens"),
                            "test_seconds": round(scoring, 2),
                            "seconds_per_text": round(scoring / max(len(splits.test), 1), 4)}}
        write_run_files(work, cfg, metrics, splits, data_card(splits, source=ds, tokenizer=fitted.tokenizer))
        log.event("end", test={k: v for k, v in test.items() if isinstance(v, float)}, train_seconds=fit_seconds)
    return metrics


def load(run_dir, cfg: RunConfig, meta: dict, kind: str = "classification", *, merge: bool = True,
         quantize: str = "none") -> LoadedRun:
    """The run's prompt rebuilt on its decoder (the prompt must equal the saved one), ready to predict."""
    if quantize != "none":
        raise ConfigError(f"quantize {quantize}: an in-context run reads label scores off its decoder as it was "
                          "scored; drop --quantize")
    fitted = in_context.load(run_dir / FOLDER)
    return LoadedRun(cfg, "classification", None, fitted.model, None, list(fitted.label_names), False,
                     precision.choose("fp32", inference=True), meta, "none", predictor=fitted)


def _proba(fitted: in_context.InContextModel, texts, progress: bool) -> np.ndarray:
    """Probabilities of ``texts`` in chunks, with a progress bar (scoring is the slow part of this recipe)."""
    bar = progress_bar(len(texts), 0, progress, unit="text", desc="scoring")
    parts = []
    for start in range(0, len(texts), CHUNK):
        parts.append(fitted.predict_proba(list(texts[start:start + CHUNK])))
        bar.update(len(parts[-1]))
    bar.close()
    return np.concatenate(parts) if parts else np.zeros((0, len(fitted.label_names)))
