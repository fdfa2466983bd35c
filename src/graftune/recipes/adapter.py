"""The adapter training loop, readable top to bottom: ``train(cfg)`` loads a base, the data and its splits, grafts
one adapter (or none: ``--method head`` trains the head alone), trains the adapter and the task head with AdamW,
and writes the run directory; ``load(run_dir, cfg, meta)`` loads such a run back for prediction. The entry point
``graftune.runs`` dispatches every adapter method and ``head`` here.

What the loop does, in order, per epoch: length-bucketed batches in a seeded order (padding stays small), optional
gradient accumulation, gradient clipping, one AdamW step (no weight decay on biases and norms) and one scheduler
step (warm-up, then linear or cosine decay); then the val metric, the best epoch's weights kept in memory, early
stopping, and a checkpoint (``run.checkpoint``). At the end the best weights are restored and scored on the test
split.

The run directory is assembled by ``run.rundir`` (never half-written). ``--resume`` continues from the last
checkpoint and ends with the same weights and metrics as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.linear_model import LogisticRegression
from torch import nn

from graftune.config import HEAD_ONLY, VAL_SIZE, RunConfig
from graftune.core.model import AdapterModel
from graftune.data.card import data_card
from graftune.data.sources import load_data
from graftune.data.splits import make_splits
from graftune.errors import ConfigError
from graftune.io import artifact
from graftune.io.artifact import load_adapter, read_head_state
from graftune.io.atomic import write_dir_atomically
from graftune.recipes.transfer import apply_transfer, load_stack
from graftune.run.checkpoint import checkpoint_file, load_weights, read_checkpoint, restore, weights, write_checkpoint
from graftune.run.loaded import LoadedRun
from graftune.run.log import NullLog, RunLog, brief, postfix, progress_bar
from graftune.run.memory import PeakMemory
from graftune.run.rundir import adapter_name, finish_run_dir, start_run_dir, write_run_files
from graftune.run.schedule import make_scheduler
from graftune.run.scoring import features_of, score_split
from graftune.speed import distributed, precision
from graftune.speed import quantize as quantization
from graftune.speed.cache import frozen_prefix_for_training
from graftune.speed.compilation import compile_layers
from graftune.speed.device import DeviceTask
from graftune.speed.device import resolve as resolve_device
from graftune.speed.precision import cpu_features
from graftune.tasks import MODALITY_TASK, ZOO_TASK, batches, build_task
from graftune.tasks.classification import encode_labels
from graftune.zoo import load_base

#: what ``graftune methods`` says of ``--method head``, the one recipe of this loop that is not an adapter method
DESCRIPTION = "the task head alone, on the frozen base"


def check_config(cfg: RunConfig) -> None:
    """Nothing beyond ``RunConfig``'s own checks: the adapter method and its options are validated there."""


def train(cfg: RunConfig, *, progress: bool = True, splits=None) -> dict:
    """Train as ``cfg`` says, write the run directory ``cfg.out``, return its metrics (also in metrics.json); a
    single-label classifier's also hold ``predicted``, the label predicted for each test example in order (not
    written: callers that score held-out examples, like ``--method auto``'s folds, pair them example by example).

    ``splits``: ready-made ``data.splits.Splits`` of ``cfg.data`` used instead of splitting it here (the comparison
    harness, ``strategies/compare.py``, gives every strategy the very same splits, augmented train included)."""
    cfg = cfg.with_step_defaults({"val_size": VAL_SIZE})  # run.yaml records the rate, batch and val that trained
    # --- where it runs: CPU or CUDA; one process, or one of several under torchrun / accelerate launch --------------
    device = resolve_device(cfg.device, local_rank=distributed.local_rank(),
                            local_processes=distributed.local_world_size())
    info = distributed.init_from_env("nccl" if device.type == "cuda" else "gloo")
    main = info.rank == 0  # only rank 0 writes the run directory
    out, work = start_run_dir(cfg, write=main)
    distributed.barrier()  # the other ranks wait until rank 0 has prepared it
    resume = read_checkpoint(work) if cfg.resume else None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    memory = PeakMemory().__enter__()  # closed in ``finally``: the whole run, loading included
    try:
        # --- data: load, split (seeded), check -----------------------------------------------------------------
        columns = {"text_column": cfg.text_column, "label_column": cfg.label_column,
                   "prompt_column": cfg.prompt_column, "response_column": cfg.response_column}
        ds = load_data(cfg.data, task=cfg.task, **columns)
        user_test = load_data(cfg.test, task=cfg.task or ds.modality, min_classes=1,  # scored, not trained on
                              **columns) if cfg.test else None
        if splits is None:
            splits = make_splits(ds, test=user_test, **cfg.split_args())
        kind = cfg.task or MODALITY_TASK[ds.modality]
        if kind == "causal-lm" and cfg.method == HEAD_ONLY:
            raise ConfigError("method: head trains a classification head; a causal-LM run needs an adapter method")

        # --- model: frozen base + one adapter (or none) + the task head -----------------------------------------
        torch.manual_seed(cfg.seed)
        base = load_base(cfg.model, task=ZOO_TASK[kind])
        base.check_max_length(cfg.max_length)
        task = build_task(kind, base, label_names=ds.label_names, multi_label=ds.multi_label,
                          max_length=cfg.max_length, dropout=cfg.dropout)
        model = AdapterModel(base.model, family=base.family)
        name = adapter_name(out)
        if cfg.method != HEAD_ONLY:
            model.add_adapter(name, cfg.method, **cfg.options)
            model.set_active(name)
            model.set_trainable(name)
        head = task.build_head()
        transfer = apply_transfer(cfg, model, name, head, ds.label_names, work if main else None)  # rank 0 writes
        model.to(device)
        if head is not None:
            head.to(device)
        policy = precision.choose(cfg.precision, device)
        precision.apply(model.base, policy)
        # on CUDA the task's batches go to the device; scoring gets classification logits back on the CPU
        run_task = DeviceTask(task, device) if device.type == "cuda" else task
        score_task = DeviceTask(task, device, outputs_on_cpu=kind != "causal-lm") if device.type == "cuda" else task
        train_examples = task.encode(splits.train.inputs, splits.train.labels)
        lengths = [task.length(e) for e in train_examples]

        if head is not None and cfg.head_init == "probe" and resume is None and transfer.get("init_head") != "loaded":
            # LP-FT: start the head at the logistic-regression fit on the starting features, so the first
            # gradient steps refine the adapter instead of pushing random-head errors into it. Fitted before the cache is
            # attached, so its features are computed the same way with and without the cache (a logistic fit turns
            # rounding-level feature differences into visible weight differences)
            init_head_from_probe(score_task, model, head, splits.train, policy=policy, seed=cfg.seed)
        # --- speed: the frozen lower layers once per example, torch.compile -------------------------------------
        val_examples = task.encode(splits.val.inputs) if len(splits.val) else []
        cache, cache_note = frozen_prefix_for_training(cfg.cache, model, run_task, head,
                                                       [train_examples, val_examples], policy=policy,
                                                       base_dropout=cfg.base_dropout, kind=kind,
                                                       max_mb=cfg.cache_max_mb)
        compile_note = _compile(model, run_task, head, train_examples, policy, cache) if cfg.compile else None
        adapter_params = model.trainable_parameters()
        head_params = list(head.parameters()) if head is not None else []
        # DistributedDataParallel over the adapter + head when launched as several processes; else a plain call
        runner = distributed.wrap(model, head, run_task.forward, info)

        # --- optimizer and schedule ------------------------------------------------------------------------------
        steps_per_epoch = math.ceil(len(train_examples) / cfg.batch_size)
        total_steps = steps_per_epoch * cfg.epochs
        optimizer = torch.optim.AdamW(_param_groups(adapter_params, head_params, cfg), lr=cfg.lr)
        scheduler = _scheduler(cfg, optimizer, total_steps)
        scaler = torch.amp.GradScaler(device.type, enabled=policy.name == "fp16")  # fp16 (CUDA) needs loss scaling

        # --- state that a checkpoint carries --------------------------------------------------------------------
        state: dict[str, Any] = {"epoch": 0, "step": 0, "best": None, "best_epoch": None, "bad_epochs": 0,
                                 "stopped": False}
        best_weights: dict[str, torch.Tensor] | None = None
        if resume is not None:
            best_weights = restore(resume, model, name, head, optimizer, scheduler, state, scaler=scaler)
        log = RunLog(work / "log.jsonl", cfg, resumed=resume is not None) if main else NullLog()
        if resume is None:
            log.event("start", method=cfg.method, model=cfg.model, data=cfg.data, precision=policy.name,
                      train=len(splits.train), val=len(splits.val), test=len(splits.test), steps=total_steps)
        speed = {"device": str(device), "processes": info.world_size, "cache": cache_note, "compile": compile_note,
                 "threads": torch.get_num_threads(), "cpu": cpu_features()}
        log.event("speed", **speed)

        # --- the loop ---------------------------------------------------------------------------------------------
        bar = progress_bar(total_steps, state["step"], progress and main)
        metric = "loss" if kind == "causal-lm" else cfg.metric
        loop_started, loop_cpu = time.perf_counter(), time.process_time()
        for epoch in range(state["epoch"], cfg.epochs):
            if state["stopped"]:  # resumed after the early stop's checkpoint
                break
            model.train()
            if not cfg.base_dropout:
                # the frozen base computes as at inference (no dropout, batch-norm statistics fixed); only the
                # adapter's and the head's dropout are active
                model.base.eval()
            if head is not None:
                head.train()
            # a fresh generator per epoch: the data order depends on (seed, epoch) only, so resuming repeats it
            order = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            epoch_loss, seen = 0.0, 0
            for idx in batches(train_examples, lengths, cfg.batch_size, generator=order):
                # every rank draws the same global batch and computes its own piece of it; loss_weight makes the
                # averaged gradient that of the global-batch mean. A rank whose piece is empty still joins the
                # gradient all-reduce, with one row at weight 0
                mine = distributed.shard(idx, info)
                weight = distributed.loss_weight(len(mine), len(idx), info) if mine else 0.0
                mine = mine or idx[:1]
                parts = _micro_batches(mine, cfg.grad_accum)
                step_loss = 0.0
                for j, part in enumerate(parts):
                    batch = run_task.collate([train_examples[i] for i in part])
                    last = j == len(parts) - 1  # DDP all-reduces once, after the last micro-batch
                    with runner.no_sync() if info.distributed and not last else contextlib.nullcontext():
                        with policy.autocast():
                            logits = runner(batch)
                        loss = task.loss(logits.float(), batch) * (len(part) / len(mine) * weight)
                        scaler.scale(loss).backward()
                    step_loss += loss.detach().item()
                step_loss = distributed.all_mean(step_loss, info)
                if cfg.clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(adapter_params + head_params, cfg.clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                epoch_loss, seen = epoch_loss + step_loss * len(idx), seen + len(idx)
                log.event("step", epoch=epoch + 1, step=state["step"], loss=step_loss, lr=scheduler.get_last_lr()[0])
                bar.update(1)
                bar.set_postfix_str(postfix(epoch, cfg.epochs, step_loss, state, metric), refresh=False)

            # --- validate, keep the best weights, maybe stop ---------------------------------------------------
            val = (score_split(kind, score_task, model, head, splits.val, cfg, policy, generate=False)
                   if len(splits.val) else None)
            val = distributed.broadcast(val, info)  # rank 0's score decides for every rank (best epoch, stopping)
            state["epoch"] = epoch + 1
            if val is not None:
                score = -val["loss"] if metric == "loss" else val[metric]
                if state["best"] is None or score > state["best"]:
                    state.update(best=score, best_epoch=epoch + 1, bad_epochs=0)
                    best_weights = weights(model, name, head, cfg)
                else:
                    state["bad_epochs"] += 1
            log.event("epoch", epoch=epoch + 1, train_loss=epoch_loss / max(seen, 1),
                      val=brief(val), seconds=time.perf_counter() - started)
            state["stopped"] = bool(cfg.patience and state["bad_epochs"] >= cfg.patience)
            if main:
                write_checkpoint(work, model, name, head, optimizer, scheduler, state, best_weights, cfg,
                                  scaler=scaler)
            if state["stopped"]:
                log.event("early_stop", epoch=epoch + 1, best_epoch=state["best_epoch"])
                break
        bar.close()

        # --- restore the best epoch, test, write the run directory ----------------------------------------------
        if best_weights is not None:
            load_weights(best_weights, model, name, head)
        train_seconds = time.perf_counter() - loop_started
        train_cpu = time.process_time() - loop_cpu  # all threads: wall x cores when the machine is otherwise idle
        if cache is not None:
            speed["cache_stats"] = cache.stats()
            log.event("cache", **speed["cache_stats"])
            cache.detach()  # test examples are seen once: nothing to reuse
            cache.clear()
        if not main:
            return _end_processes(info, None)  # rank 0 tests and writes; the others take its metrics
        test = score_split(kind, score_task, model, head, splits.test, cfg, policy, generate=True,
                           show="testing" if progress else None, predictions=True)
        sizes = _sizes(model, name, head, cfg)
        extra = {"task": kind, "multi_label": ds.multi_label, "base_model": cfg.model, "pooling": base.pooling}
        adapter_bytes = _save_artifact(model, name, head, ds.label_names, extra, work / "adapter", cfg)
        metrics = {**{k: v for k, v in test.items() if k not in ("samples", "predicted")}, **sizes,
                   "adapter_bytes": adapter_bytes,
                   "train_seconds": round(train_seconds, 2), "train_cpu_seconds": round(train_cpu, 2),
                   "wall_seconds": round(time.perf_counter() - started, 2), "peak_rss_mb": round(memory.peak, 1),
                   "epochs_run": state["epoch"], "best_epoch": state["best_epoch"], "steps": state["step"],
                   "stopped_early": state["stopped"], "epochs": cfg.epochs,
                   "precision": policy.name, "method": cfg.method, "task": kind, "speed": speed}
        if "samples" in test:
            metrics["samples"] = test["samples"]
        if transfer:
            metrics["transfer"] = transfer
        write_run_files(work, cfg, metrics, splits, data_card(splits, source=ds, tokenizer=base.tokenizer))
        if "predicted" in test:  # returned, not written: what a caller scoring held-out examples needs (auto)
            metrics = {**metrics, "predicted": test["predicted"]}
        log.event("end", test=brief(test), train_seconds=train_seconds)
        log.close()
    except BaseException:
        # keep an interrupted run that has a checkpoint (--resume continues it); anything else leaves no trace
        if main and not checkpoint_file(work).exists():
            shutil.rmtree(work, ignore_errors=True)
        if info.owned:
            distributed.cleanup()
        raise
    finally:
        memory.__exit__(None, None, None)
    finish_run_dir(work, out)
    return _end_processes(info, metrics)


# --- the run directory ----------------------------------------------------------------------------------------






def load(run_dir: Path, cfg: RunConfig, meta: dict, kind: str, *, merge: bool = True,
         quantize: str = "none") -> LoadedRun:
    """A run of this recipe (``run.yaml`` + ``adapter/``) on its base model, in eval mode: the adapter (and a frozen
    adapter stacked under it) loaded, merged into the weights where every active adapter can merge; with
    ``quantize="int8"`` merged into float32 weights whose Linear layers then become dynamic int8."""
    label_names = list(meta.get("label_names") or [])
    multi_label = bool((meta.get("extra") or {}).get("multi_label", False))
    base = load_base(cfg.model, task=ZOO_TASK[kind])
    model = AdapterModel(base.model, family=base.family)
    task = build_task(kind, base, label_names=label_names, multi_label=multi_label, max_length=cfg.max_length,
                      dropout=cfg.dropout)
    active = load_stack(model, run_dir, meta.get("name"))  # a frozen adapter stacked under the trained one
    if meta["method"] != HEAD_ONLY:
        active.append(load_adapter(model, run_dir / "adapter").name)
    model.set_active(*active)
    head = None if kind == "causal-lm" else load_head(task, run_dir)
    # int8 layers take float32 only: the rest of an int8 model stays float32, without autocast
    policy = precision.choose("fp32" if quantize == "int8" else cfg.precision, inference=True)
    precision.apply(model.base, policy)
    if merge and model.active and all(model.info[n].method.capabilities.mergeable for n in model.active):
        model.merge(*model.active)
    if quantize == "int8":
        quantization.quantize_int8(model)
    model.eval()
    return LoadedRun(cfg, kind, task, model, head, label_names, multi_label, policy, meta, quantize)


def load_head(task, run_dir: Path) -> nn.Module:
    """The trained task head of a run (its tensors in ``adapter/``), built by ``task`` and in eval mode."""
    state, _ = read_head_state(Path(run_dir) / "adapter")
    head = task.build_head()
    head.load_state_dict(state)
    return head.eval()


def _save_artifact(model, name: str, head: nn.Module | None, label_names: list[str], extra: dict, path: Path,
                   cfg: RunConfig) -> int:
    """adapter/ via io.artifact; a head-only run writes the same format with method ``head`` and no adapter
    tensors (``read_head_state`` reads it)."""
    if cfg.method != HEAD_ONLY:
        artifact.save_adapter(model, name, path, head=head, label_names=label_names, extra=extra)
    else:
        state = {artifact.HEAD_PREFIX + k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        meta = {"format": artifact.FORMAT, "format_version": artifact.FORMAT_VERSION, "name": name,
                "method": HEAD_ONLY, "config": {}, "targets": [], "family": model.family,
                "base_fingerprint": artifact.base_fingerprint(model), "label_names": label_names,
                "head": {"class": type(head).__name__, "in_features": head.in_features,
                         "num_labels": head.num_labels}, "extra": extra}

        def write(tmp: Path) -> None:
            save_file(state, tmp / artifact.TENSORS_FILE)
            (tmp / artifact.META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

        write_dir_atomically(path, write, markers=(artifact.META_FILE,))
    return (path / artifact.TENSORS_FILE).stat().st_size


def _sizes(model, name: str, head: nn.Module | None, cfg: RunConfig) -> dict:
    base_total = sum(p.numel() for p in model.base.parameters())
    adapter = sum(p.numel() for p in model.adapters[name].parameters()) if cfg.method != HEAD_ONLY else 0
    head_n = sum(p.numel() for p in head.parameters()) if head is not None else 0
    if cfg.method != HEAD_ONLY and model.info[name].method.site == "params":
        base_total -= adapter  # the swapped-in copies stand in base modules: not counted twice
    return {"trainable_params": adapter + head_n, "total_params": base_total + adapter + head_n}


def init_head_from_probe(task, model, head: nn.Module, train_ds, *, policy, seed: int = 0) -> None:
    """Set ``head.linear`` to a logistic regression fitted on the model's pooled features of ``train_ds``
    (Kumar et al. 2022, LP-FT, https://arxiv.org/abs/2202.10054). Multi-label: one binary fit per label."""
    x = features_of(task, model, train_ds.inputs, policy=policy).numpy()
    y = np.asarray(encode_labels(train_ds.labels, task.label_names, task.multi_label))
    weight = np.zeros((len(task.label_names), x.shape[1]), dtype=np.float64)
    bias = np.zeros(len(task.label_names), dtype=np.float64)
    if task.multi_label:
        for j in range(y.shape[1]):
            if 0 < y[:, j].sum() < len(y):  # a label always (or never) on: leave it at zero
                fit = LogisticRegression(max_iter=2000, random_state=seed).fit(x, y[:, j])
                weight[j], bias[j] = fit.coef_[0], fit.intercept_[0]
    else:
        fit = LogisticRegression(max_iter=2000, random_state=seed).fit(x, y)
        classes = list(fit.classes_)
        coef = fit.coef_ if len(classes) > 2 else np.concatenate([-fit.coef_, fit.coef_]) / 2
        intercept = fit.intercept_ if len(classes) > 2 else np.concatenate([-fit.intercept_, fit.intercept_]) / 2
        for row, c in enumerate(classes):
            weight[c], bias[c] = coef[row], intercept[row]
    with torch.no_grad():
        head.linear.weight.copy_(torch.from_numpy(weight))
        head.linear.bias.copy_(torch.from_numpy(bias))


# --- speed and processes ----------------------------------------------------------------------------------------
def _compile(model, task, head, examples: list, policy, cache) -> str:
    """torch.compile the layers that run every step (those above the cached ones); a check call compiles them
    at once (forward and backward, in eval mode so no dropout draws from the seeded generator)."""
    def check():
        modes = [(m, m.training) for m in [*model.modules(), *(head.modules() if head is not None else [])]]
        model.eval()
        if head is not None:
            head.eval()
        try:
            with policy.autocast():
                out = task.forward(model, head, task.collate(examples[:2]))
            out.float().sum().backward()
        finally:
            for m, mode in modes:
                m.training = mode
            for p in [*model.trainable_parameters(), *(head.parameters() if head is not None else [])]:
                p.grad = None

    return compile_layers(model.base, start=cache.start if cache is not None else 0, check=check)[1]


def _end_processes(info: distributed.DistInfo, metrics: dict | None) -> dict:
    """Every rank returns rank 0's metrics; leave the process group if ``train()`` joined it."""
    metrics = distributed.broadcast(metrics, info)
    if info.owned:
        distributed.cleanup()
    return metrics


# --- optimizer, schedule, batches -------------------------------------------------------------------------------
def _param_groups(adapter_params: list, head_params: list, cfg: RunConfig) -> list[dict]:
    """Weight decay on matrices only: biases, norms and other vectors are not decayed (they set offsets and
    scales, not capacity). The head may have its own learning rate."""
    groups = []
    for params, lr in ((adapter_params, cfg.lr), (head_params, cfg.head_lr or cfg.lr)):
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups += [{"params": decay, "weight_decay": cfg.weight_decay, "lr": lr},
                   {"params": no_decay, "weight_decay": 0.0, "lr": lr}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError(f"method {cfg.method}: nothing to train (no trainable parameters)")
    return groups


def _scheduler(cfg: RunConfig, optimizer, total_steps: int):
    return make_scheduler(optimizer, total_steps, cfg.warmup, cfg.schedule)


def _micro_batches(idx: list[int], parts: int) -> list[list[int]]:
    size = math.ceil(len(idx) / parts)
    return [idx[i:i + size] for i in range(0, len(idx), size)]






# --- weights and checkpoints --------------------------------------------------------------------------------------










# --- logging and progress -----------------------------------------------------------------------------------------








