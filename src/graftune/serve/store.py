"""The model store: one frozen base in memory per base fingerprint, every served adapter grafted onto it.

A served name points at an :class:`Entry` (one version of one run: its adapter under an internal key, its task head,
label names). Many entries share one :class:`Slot` (a base model wrapped in an ``AdapterModel``), so 32 adapters on
MiniLM cost one MiniLM plus 32 small adapters, and a batch whose rows use different adapters runs as ONE forward
(``AdapterModel.routed(adapter_names)``: the engine's batched routing), each row then read by its own adapter's head.
Generation works the same way: prompts for any mix of causal-LM adapters on one base run as ONE batched greedy
generation (``AdapterModel.generate(adapter_names=...)``), each row routed to its own adapter at every decoding step.

Threading: everything that runs or changes a model runs on the store's single worker thread (``submit``), so a
forward never sees an adapter being attached or deleted halfway. Following a promote or rollback loads the new
version under a NEW internal key, switches the name's pointer, and deletes the old adapter only once no request
that holds it is still in flight (``acquire``/``release`` count them): requests in flight never fail.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftune.config import HEAD_ONLY, build_config
from graftune.core.model import AdapterModel
from graftune.errors import GraftuneError
from graftune.io.artifact import base_fingerprint, check_fingerprint, load_adapter, read_meta
from graftune.recipes import fewshot_run
from graftune.recipes.adapter import load_head
from graftune.recipes.fewshot import FewShotModel
from graftune.registry.servable import UNREADABLE, unservable
from graftune.speed import precision
from graftune.tasks import ZOO_TASK, build_task
from graftune.tasks.classification import base_hidden, pool, probabilities
from graftune.zoo import load_base

log = logging.getLogger("graftune.serve")



class ServeError(GraftuneError):
    """A run the server cannot serve, or a request it cannot answer (one line, naming the fix)."""


class UnknownAdapter(ServeError):
    pass


class NotServed(UnknownAdapter):
    """A name the source asks for whose version the store refused at load (a probe run, a damaged version)."""


class PromptTooLong(ServeError):
    """A prompt with more tokens than its adapter takes (answered 422; the rest of its batch runs)."""


@dataclass
class Slot:
    """One base in memory and the adapters on it. ``key`` is the base fingerprint (and the zoo task: an encoder
    body and a causal-LM body of the same weights are two models)."""

    key: str
    kind: str
    model: AdapterModel
    tokenizer: Any
    policy: precision.Precision
    base_info: Any = None  # the zoo Base (tokenizer, pooling, sizes): tasks are built from it
    entries: set[str] = field(default_factory=set)  # internal adapter keys on this base


@dataclass
class Entry:
    """One served version of a name. ``key``: the adapter's internal name on the slot's model (None for a head-only
    run, whose rows take the bare base)."""

    name: str
    version: str
    run_dir: Path
    kind: str
    method: str
    key: str | None
    slot: Slot
    task: Any
    head: nn.Module | None
    label_names: list[str]
    multi_label: bool
    max_new_tokens: int = 64
    #: a contrastive run: its adapter on the slot's model read as ``graftune predict`` reads it (windows of the
    #: whole text, pooled, normalized; the fitted logistic regression), instead of ``task``'s pooling and ``head``
    fewshot: FewShotModel | None = None
    inflight: int = 0
    retired: bool = False

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "kind": self.kind, "method": self.method,
                "labels": self.label_names, "base": self.slot.key[:12], "run_dir": str(self.run_dir)}


@dataclass
class Rows:
    """One request's share of a batch: its entry, its inputs (texts or prompts) and, for generation, the most tokens
    its answers may have (None: the run's own ``max_new_tokens``)."""

    entry: Entry
    inputs: list[str]
    max_new_tokens: int | None = None


class ModelStore:
    """Bases, entries and the worker thread that runs them. ``observer`` (a drift tracker) is told about every
    classified row: ``observer.observe(entry, features, texts, input_ids, predicted)``."""

    def __init__(self, *, observer: Any = None):
        self.slots: dict[str, Slot] = {}
        self.entries: dict[str, Entry] = {}  # served name -> its current entry
        self.observer = observer
        self._lock = threading.Lock()  # entries, in-flight counts, retirement
        self._sync_lock = threading.Lock()  # one sync at a time
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="graftune-model")
        self._counter = 0
        self.failed: dict[str, str] = {}  # name@version -> why it was refused (logged once)
        #: served name -> (name@version, how it was asked for, why refused) for a name asked for whose version could
        #: not be loaded and that serves no other: a request for it is told why, not "unknown adapter"
        self.refused: dict[str, tuple[str, str, str]] = {}

    # --- the worker thread -------------------------------------------------------------------------------------
    def submit(self, fn, *args, **kwargs) -> Future:
        """Run ``fn`` on the worker thread (the only thread that runs or changes models)."""
        return self._worker.submit(fn, *args, **kwargs)

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    # --- requests ----------------------------------------------------------------------------------------------
    def acquire(self, name: str) -> Entry:
        """The entry serving ``name``, held until ``release``: its adapter is not deleted while held."""
        with self._lock:
            entry = self.entries.get(name)
            if entry is None:
                served = ", ".join(sorted(self.entries)) or "none"
                if name in self.refused:
                    label, asked, why = self.refused[name]
                    raise NotServed(f"adapter {name!r} is {asked} ({label}) but this server cannot serve it: {why}; "
                                    f"served: {served}")
                raise UnknownAdapter(f"unknown adapter {name!r}; served: {served}")
            entry.inflight += 1
            return entry

    def release(self, entry: Entry) -> None:
        with self._lock:
            entry.inflight -= 1
            drop = entry.retired and entry.inflight == 0
        if drop:
            self.submit(self._drop, entry)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self.entries)

    def describe(self) -> list[dict]:
        with self._lock:
            return [self.entries[n].describe() for n in sorted(self.entries)]

    @torch.inference_mode()
    def classify(self, batch: Sequence[Rows]) -> list[list[dict]]:
        """Predictions for every request of ``batch``: ONE forward per base, whatever the mix of adapters. Runs on
        the worker thread (the batcher submits it)."""
        out: list[list[dict] | None] = [None] * len(batch)
        for i, rows in enumerate(batch):
            if rows.entry.fewshot is not None:  # its own embedding path: whole texts in windows (one entry a call)
                out[i] = self._classify_fewshot(rows)
        for idx in _by_slot(batch):
            slot = batch[idx[0]].entry.slot
            examples, names, owner = [], [], []
            for i in idx:
                entry = batch[i].entry
                for e in entry.task.encode(batch[i].inputs):
                    examples.append(e)
                    names.append(entry.key)
                    owner.append(i)
            collated = batch[idx[0]].entry.task.collate(examples)
            inputs = {"input_ids": collated["input_ids"], "attention_mask": collated["attention_mask"]}
            with slot.policy.autocast(), slot.model.routed(names):
                features = _features(slot.model, inputs, batch[idx[0]].entry.task.pooling)
            start = 0
            for i in idx:
                entry, n = batch[i].entry, len(batch[i].inputs)
                feats = features[start:start + n]
                logits = entry.head(feats.to(next(entry.head.parameters()).dtype)).float()
                out[i] = _predictions(probabilities(logits, entry.multi_label), entry)
                if self.observer is not None:
                    ids = [examples[j]["input_ids"] for j in range(start, start + n)]
                    self.observer.observe(entry, feats, batch[i].inputs, ids, out[i])
                start += n
        return out  # type: ignore[return-value]

    def _classify_fewshot(self, rows: Rows) -> list[dict]:
        """A contrastive run's answers: its ``FewShotModel`` on the shared base (the worker thread is the only one
        to switch the active adapter, so no mixed forward sees it), exactly as ``graftune predict`` reads it."""
        entry = rows.entry
        embeddings = entry.fewshot.embed(rows.inputs)
        answers = fewshot_run.predict_rows(entry.fewshot, rows.inputs, entry.label_names, embeddings)
        if self.observer is not None:
            ids = [e["input_ids"] for e in entry.task.encode(rows.inputs)]
            self.observer.observe(entry, embeddings, rows.inputs, ids, answers)
        return answers

    @torch.inference_mode()
    def generate(self, batch: Sequence[Rows]) -> list[list[str] | PromptTooLong]:
        """Greedy answers for every request of ``batch`` (causal-LM entries): ONE batched generation per base,
        whatever the mix of adapters. Prompts are left-padded, each row is routed to its own adapter at every
        decoding step and stops at its own end token or its request's ``max_new_tokens``; in fp32 the answers are
        those of each request generated alone (in bf16 rounding depends on the batch's shape: an answer can turn at
        a near-tie). A request with a prompt longer than its adapter takes gets a :class:`PromptTooLong` instead
        of answers, before anything is generated. Runs on the worker thread (the batcher submits it)."""
        out: list[list[str] | PromptTooLong | None] = [None] * len(batch)
        for idx in _by_slot(batch):
            slot, task = batch[idx[0]].entry.slot, batch[idx[0]].entry.task  # one base: one tokenizer, pad and end
            prompts, names, limits, kept = [], [], [], []
            for i in idx:
                entry, limit = batch[i].entry, batch[i].max_new_tokens or batch[i].entry.max_new_tokens
                ids = [entry.task.prompt_ids(text) for text in batch[i].inputs]
                refusal = _too_long(entry, ids, limit)
                if refusal is not None:
                    out[i] = refusal
                    continue
                kept.append(i)
                prompts += ids
                names += [entry.key] * len(ids)
                limits += [limit] * len(ids)
            if not prompts:
                continue
            with slot.policy.autocast():
                answers = task.generate_ids(slot.model, prompts, max_new_tokens=limits, adapter_names=names,
                                            batch_size=len(prompts))
            start = 0
            for i in kept:
                n = len(batch[i].inputs)
                out[i] = [batch[i].entry.task.decode(a) for a in answers[start:start + n]]
                start += n
        return out  # type: ignore[return-value]

    # --- following the registry --------------------------------------------------------------------------------
    def sync(self, wanted: Mapping[str, tuple]) -> dict:
        """Serve exactly ``wanted`` (name -> (version, run directory[, check[, asked]])); ``check()``, when given,
        runs before loading (the registry's hash verification); ``asked`` says how the name was asked for, in a
        request's refusal ("promoted", the default, or "given with --run"). New versions are loaded beside the old
        ones and switched in; a version that cannot be served is logged and skipped, and the name keeps its old
        version if it had one (a name with none answers requests with why). Returns ``{"loaded": [...],
        "removed": [...], "failed": {...}}``. Call from any thread but the worker's (it waits for the worker)."""
        with self._sync_lock:
            with self._lock:
                current = {n: e.version for n, e in self.entries.items()}
            report: dict[str, Any] = {"loaded": [], "removed": [], "failed": {}}
            for name, (version, run_dir, *rest) in sorted(wanted.items()):
                version = str(version)
                if current.get(name) == version:
                    continue
                label = f"{name}@{version}"
                check, asked = (rest + [None, None])[:2]
                try:
                    if check is not None:
                        check()
                    plan = self._prepare(name, version, Path(run_dir))
                    entry = self.submit(self._attach, plan).result()
                except Exception as e:  # one version that cannot be served never stops the others
                    why = str(e) if isinstance(e, GraftuneError) else f"unexpected {type(e).__name__}: {e}"
                    report["failed"][label] = why
                    if self.failed.get(label) != why:  # once, not at every sync
                        log.warning("not serving %s: %s", label, why, exc_info=not isinstance(e, GraftuneError))
                    self.failed[label] = why
                    with self._lock:
                        self.refused[name] = (label, asked or "promoted", why.removeprefix("not served: "))
                    continue
                with self._lock:
                    self.refused.pop(name, None)
                self._switch(name, entry)
                report["loaded"].append(label)
                log.info("serving %s (%s, %s)", label, entry.method, run_dir)
            with self._lock:
                for name in set(self.refused) - set(wanted):
                    del self.refused[name]
            for name in sorted(set(current) - set(wanted)):
                self._switch(name, None)
                report["removed"].append(name)
                log.info("no longer serving %s", name)
            return report

    def _switch(self, name: str, entry: Entry | None) -> None:
        with self._lock:
            old = self.entries.pop(name, None)
            if entry is not None:
                self.entries[name] = entry
            drop = old is not None and old.inflight == 0
            if old is not None:
                old.retired = True
        if drop:
            self.submit(self._drop, old)

    def _drop(self, entry: Entry) -> None:
        """Delete a retired entry's adapter (worker thread: between forwards). An emptied base is unloaded."""
        slot = entry.slot
        if entry.key is not None and entry.key in slot.model.info:
            slot.model.delete_adapter(entry.key)
            slot.entries.discard(entry.key)
        with self._lock:
            in_use = any(e.slot is slot for e in self.entries.values())
        if not in_use and not slot.entries:
            self.slots.pop(slot.key, None)

    def _prepare(self, name: str, version: str, run_dir: Path) -> dict:
        """Everything that does not touch a served model: read and check the run, load a new base if needed."""
        if not (run_dir / "run.yaml").is_file():
            raise ServeError(f"{run_dir}: not a run directory (no run.yaml); push a `graftune train --out` directory")
        why = unservable(run_dir)  # the one rule, shared with `registry promote`'s note
        if why:
            fix = ("check the run directory, or push the run again" if why.startswith(UNREADABLE) else
                   "serve a contrastive, LoRA, IA3 or bottleneck run, or use `graftune predict`")
            raise ServeError(f"not served: {why}; {fix}")
        cfg = build_config(run_dir / "run.yaml")
        fewshot = None
        if (run_dir / fewshot_run.HEAD_DIR).is_dir():  # contrastive runs: a fitted head/ on adapted embeddings
            fewshot = fewshot_run.load_head(run_dir / fewshot_run.HEAD_DIR, cfg.method)  # (head, head.json)
        meta = read_meta(run_dir / "adapter")
        kind = (meta.get("extra") or {}).get("task") or cfg.task or "classification"
        fp = meta["base_fingerprint"]
        slot_key = hashlib.sha256(f"{fp.get('structure')}:{fp.get('values')}:{ZOO_TASK[kind]}".encode()).hexdigest()
        slot = self.slots.get(slot_key)
        if slot is None:
            base = load_base(cfg.model, task=ZOO_TASK[kind])
            model = AdapterModel(base.model, family=base.family)
            policy = precision.choose(cfg.precision, inference=True)
            precision.apply(model.base, policy)
            model.eval()
            check_fingerprint(fp, base_fingerprint(model), f"run {run_dir}")
            slot = Slot(slot_key, kind, model, base.tokenizer, policy, base)
        label_names = list(meta.get("label_names") or [])
        multi_label = bool((meta.get("extra") or {}).get("multi_label", False))
        task = build_task(kind, slot.base_info, label_names=label_names, multi_label=multi_label,
                          max_length=cfg.max_length, dropout=cfg.dropout)
        if fewshot is not None:
            label_names = label_names or list(fewshot[1].get("label_names") or [])
            head = None
        else:
            head = None if kind == "causal-lm" else load_head(task, run_dir)
        return {"name": name, "version": version, "run_dir": run_dir, "kind": kind, "method": cfg.method if fewshot
                else meta["method"], "slot": slot, "task": task, "head": head, "label_names": label_names,
                "multi_label": multi_label, "max_new_tokens": cfg.max_new_tokens, "fewshot": fewshot}

    def _attach(self, plan: dict) -> Entry:
        """Worker thread: graft the adapter under a fresh internal key and register its base."""
        slot: Slot = plan["slot"]
        key = None
        if plan["method"] != HEAD_ONLY:
            self._counter += 1
            key = f"{re.sub(r'[^A-Za-z0-9_-]', '_', plan['name'])[:48]}-{self._counter}"
            load_adapter(slot.model, plan["run_dir"] / "adapter", name=key)
            slot.entries.add(key)
        self.slots.setdefault(slot.key, slot)
        fewshot = None
        if plan["fewshot"] is not None:  # as fewshot_run.load rebuilds it, on the shared base
            head, head_meta = plan["fewshot"]
            fewshot = fewshot_run.fewshot_model(slot.model, slot.tokenizer, head, head_meta, key, slot.policy,
                                                plan["method"])
        return Entry(plan["name"], plan["version"], plan["run_dir"], plan["kind"], plan["method"], key, slot,
                     plan["task"], plan["head"], plan["label_names"], plan["multi_label"], plan["max_new_tokens"],
                     fewshot)


def _by_slot(batch: Sequence[Rows]) -> list[list[int]]:
    """The batch's request indices grouped by base (one forward each), in order of arrival; few-shot entries'
    requests are left out (``ModelStore._classify_fewshot`` answers them)."""
    groups: dict[str, list[int]] = {}
    for i, rows in enumerate(batch):
        if rows.entry.fewshot is None:
            groups.setdefault(rows.entry.slot.key, []).append(i)
    return list(groups.values())


def _too_long(entry: Entry, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> PromptTooLong | None:
    """A prompt and its answer must fit the run's max_length, as training pairs did: the bound on the work one
    request can ask for (characters alone do not bound tokens, and a base's positions end somewhere)."""
    found = entry.task.first_too_long(prompts, max_new_tokens)
    if found is None:
        return None
    i, tokens, room = found
    fix = "shorten it or ask for fewer max_new_tokens" if room > 0 else "ask for fewer max_new_tokens"
    return PromptTooLong(f"inputs[{i}]: the prompt is {tokens} tokens; adapter {entry.name} takes at most {room} (its "
                         f"max_length {entry.task.max_length} minus max_new_tokens {max_new_tokens}); {fix}")


def _features(model: AdapterModel, inputs: dict, pooling: str) -> torch.Tensor:
    """Pooled float32 features of the (routed) model, as the task's head reads them."""
    return pool(base_hidden(model, inputs), inputs["attention_mask"], pooling)


def _predictions(probs: torch.Tensor, entry: Entry) -> list[dict]:
    """Rows in ``graftune predict``'s format (see ``graftune.evaluate.predict``)."""
    out = []
    for row in probs:
        p = {n: round(float(v), 6) for n, v in zip(entry.label_names, row)}
        if entry.multi_label:
            out.append({"labels": [n for n, v in p.items() if v >= 0.5], "probabilities": p})
        else:
            out.append({"label": entry.label_names[int(row.argmax())], "probabilities": p})
    return out
