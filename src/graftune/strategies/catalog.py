"""The catalog of adaptation strategies ``graftune compare`` runs, and how each one runs on given splits.

- ``linear-probe``: frozen encoder, pooled features, scikit-learn logistic regression;
- ``prototypes``: frozen encoder, nearest class mean by cosine similarity (Snell et al. 2017);
- ``contrastive``: SetFit-style contrastive training of a LoRA adapter, then logistic regression (text only;
  ``recipes/fewshot.py``);
- ``lora-top2``, ``ia3``, ``lora``, ``bottleneck``, ``prefix``, ``topk``, ``full``: the adapter loop
  (``recipes/adapter.py``) with that method and a classification head (LP-FT: the head starts at the
  logistic-regression fit).

Every strategy of one (shots, seed) sees the very same splits (``make_compare_splits``); augmentation
(``augment_train``) adds EDA copies for text and small crops and rotations for images, never to the test set.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graftune.config import RunConfig
from graftune.core.model import AdapterModel
from graftune.data.augment.image import random_crop, rotate
from graftune.data.augment.text import eda
from graftune.data.sources import Dataset, count_of, load_data
from graftune.data.splits import make_splits
from graftune.errors import ConfigError, DataError
from graftune.recipes import in_context
from graftune.recipes.contrastive import PAIR_MAX_LENGTH
from graftune.recipes.fewshot import DEFAULT_CHUNKS, contrastive_fit, embed, make_head
from graftune.recipes.fewshot_run import predict_rows, score
from graftune.run.scoring import features_of, probability_rows, score_probabilities
from graftune.speed import precision
from graftune.tasks import MODALITY_TASK, ZOO_TASK, build_task
from graftune.tasks.classification import classification_metrics, encode_labels
from graftune.zoo import load_base


@dataclass(frozen=True)
class Strategy:
    """One way to adapt: how it runs (``features``, ``contrastive``, ``in-context`` or ``train``), the method and
    its settings.

    ``cost`` is a rough cost per training example relative to LoRA, used only to estimate a strategy's time
    before it has run once (afterwards its own measured time is used). ``default``: part of a comparison that names
    no ``--strategies`` (the in-context baseline loads a second model, SmolLM2: asked for by name)."""

    name: str
    kind: str
    method: str | None = None
    options: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    cost: float = 1.0
    description: str = ""
    default: bool = True

#: how ``graftune train`` spells the strategies whose names are not methods of their own
AS_RUN = {"linear-probe": "--method probe", "prototypes": "--method probe --set head=prototype",
          "lora-top2": "--method lora --set r=8 --set alpha=16 --set top_k_layers=2"}

#: cheapest first: under a budget the baselines always run
STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("linear-probe", "features", description="frozen encoder + logistic regression (whole texts: up to 4 "
             f"windows; as a run: train {AS_RUN['linear-probe']})", cost=0.05),
    Strategy("prototypes", "features", description="frozen encoder + nearest class mean (whole texts: up to 4 "
             f"windows; as a run: train {AS_RUN['prototypes']})", cost=0.05),
    Strategy("contrastive", "contrastive", method="lora", description="contrastive few-shot (LoRA adapter, SetFit "
             "recipe) + logistic regression", cost=1.0),
    Strategy("lora-top2", "train", "lora", {"r": 8, "alpha": 16, "top_k_layers": 2}, cost=0.4,
             description="LoRA r=8 in the top 2 layers (the frozen layers below are computed once and cached)"),
    Strategy("ia3", "train", "ia3", settings={"lr": 1e-2}, description="IA3 scaling vectors"),
    Strategy("lora", "train", "lora", {"r": 8, "alpha": 16}, description="LoRA r=8"),
    Strategy("bottleneck", "train", "bottleneck", description="bottleneck adapters"),
    Strategy("prefix", "train", "prefix", description="prefix tuning"),
    Strategy("topk", "train", "topk", {"top_k_layers": 2}, settings={"lr": 1e-4}, cost=1.2,
             description="fine-tune the top 2 layers"),
    Strategy("full", "train", "full", settings={"lr": 5e-5}, cost=2.5, description="full fine-tuning"),
    Strategy("in-context", "in-context", description="SmolLM2 with 8 labelled examples per class in its prompt, "
             "labels scored and calibrated (nothing trained; as a run: train --method in-context --model smollm2 "
             "--set calibrate=true)", cost=1.0,
             default=False),
)}
#: the decoder the in-context strategy prompts, whatever encoder the comparison adapts
IN_CONTEXT_MODEL = "smollm2"

#: train() settings shared by every ``train`` strategy (each may override some); ``settings=`` overrides these
TRAIN_DEFAULTS = {"epochs": 10, "lr": 2e-3, "head_lr": 1e-2, "batch_size": 16, "val_size": 0, "patience": 0,
                  "max_length": 256}

AUGMENT_COPIES = 4  # new examples per training example when augmenting


def load_compare_data(data: Any, test: Any, text_column: str, label_column: str):
    ds = data if isinstance(data, Dataset) else load_data(str(data), text_column=text_column,
                                                          label_column=label_column)
    if ds.modality not in ("text", "image") or ds.multi_label:
        raise DataError(f"{ds.origin}: compare handles single-label text or image classification; got "
                        f"{'multi-label ' if ds.multi_label else ''}{ds.modality} data")
    user_test = None
    if test is not None:
        user_test = test if isinstance(test, Dataset) else load_data(str(test), text_column=text_column,
                                                                     label_column=label_column, task=ds.modality,
                                                                     min_classes=1)  # scored, not trained on
    return ds, user_test


def test_per_class_for(ds, shots: Sequence[int]) -> int:
    """Test examples per class: up to 100, leaving every class at least max(shots) for training; one where the
    smallest class has room for no more (a stratified carve holds at least one out, as train's does)."""
    smallest = min(ds.counts().values())
    n = min(100, smallest - max(shots))
    if n < 1:
        raise DataError(f"{ds.origin}: the smallest class has {count_of(smallest, 'example')}, too few for "
                        f"{max(shots)} shots plus a test set; lower --shots or pass --test")
    return n


def fitting_shots(ds, shots: Sequence[int], reserve: int = 2) -> tuple[list[int], str | None]:
    """The shot counts of ``shots`` that leave ``reserve`` examples of every class for the test set (0: a separate
    test file), and a sentence naming those dropped; when none fits, the largest count that does (a small file
    still gets a comparison), and when none fits beside ``reserve``, beside a test set of one a class (a class of
    2 examples: 1 shot, 1 test example, as train's carve splits it). ``graftune compare`` without ``--shots``
    compares at these."""
    counts = ds.counts()
    smallest = min(counts.values())
    room = smallest - reserve
    if room < 1 and reserve > 1:
        reserve, room = 1, smallest - 1
    kept = [k for k in shots if k <= room] or ([room] if room >= 1 else [])
    if not kept:
        raise DataError(f"{ds.origin}: the smallest class has {count_of(smallest, 'example')}, too few for training "
                        "examples plus a test set; add examples or pass --test FILE")
    dropped = [k for k in shots if k not in kept]
    if not dropped:
        return kept, None
    small = min(counts, key=counts.get)
    return kept, (f"shots {', '.join(map(str, dropped))} skipped: the smallest class ({small}, "
                  f"{count_of(smallest, 'example')}) leaves room for at most {room} a class"
                  f"{' beside a test set' if reserve else ''}; comparing at {', '.join(map(str, kept))} (--shots to "
                  "choose)")


def make_compare_splits(ds, *, shots: int, seed: int, test_per_class: int | None, user_test=None):
    """The splits of one (shots, seed): the test set does not depend on ``seed`` or ``shots``."""
    return make_splits(ds, seed=0, shot_seed=seed, shots=shots, val_size=0, test=user_test,
                       test_per_class=None if user_test is not None else test_per_class)


def augment_train(train, *, seed: int):
    """The training examples plus AUGMENT_COPIES new ones each (EDA for text; crops and small rotations for
    images, which keep digits and objects valid: no flips)."""
    if train.modality == "text":
        new = eda(train.inputs, train.labels, n_per_example=AUGMENT_COPIES, seed=seed)
        return train.__class__(**{**train.__dict__, "inputs": list(train.inputs) + new.texts,
                                  "labels": list(train.labels) + list(new.labels)})
    gen = torch.Generator().manual_seed(seed)
    images = torch.stack([x.float() for x in train.inputs])
    inputs, labels = list(train.inputs), list(train.labels)
    for _ in range(AUGMENT_COPIES):
        pad = max(1, images.shape[-1] // 14)
        x, _, _ = random_crop(images, padding=pad, generator=gen)
        x, _, _ = rotate(x, degrees=10.0, generator=gen)
        inputs += list(x.to(train.inputs[0].dtype).unbind(0))
        labels += list(train.labels)
    return train.__class__(**{**train.__dict__, "inputs": inputs, "labels": labels})


class Frozen:
    """The frozen base, its task and a cache of test features: shared by the ``features`` strategies.

    ``windows``: text is embedded as ``fewshot.frozen_fit`` does it (L2-normalized mean embeddings; a text longer
    than ``max_length`` tokens is read as up to ``fewshot.DEFAULT_CHUNKS`` windows), so the baselines see whole
    texts, as the contrastive strategy does. Without it (``--method auto``'s head candidate) the features are those
    the task head of ``train --method head`` reads: the pooled first ``max_length`` tokens."""

    def __init__(self, model: str, ds, max_length: int, *, windows: bool = True):
        started = time.perf_counter()
        kind = MODALITY_TASK[ds.modality]
        base = load_base(model, task=ZOO_TASK[kind])
        base.check_max_length(max_length)
        self.task = build_task(kind, base, label_names=ds.label_names, max_length=max_length)
        self.model = AdapterModel(base.model, family=base.family)
        self.policy = precision.choose("auto", inference=True)
        precision.apply(self.model.base, self.policy)
        self.windows = windows and ds.modality == "text"
        self.max_length = max_length
        self._test: dict[str, np.ndarray] = {}
        #: one-time costs (loading, embedding the test set): not charged to any run's estimate
        self.setup_seconds = time.perf_counter() - started

    def features(self, inputs) -> np.ndarray:
        if not self.windows:
            return features_of(self.task, self.model, inputs, policy=self.policy).numpy()
        with self.policy.autocast():
            return embed(self.model, self.task.tokenizer, list(inputs), max_length=self.max_length,
                         pooling=self.task.pooling, max_chunks=DEFAULT_CHUNKS).numpy()

    def test_features(self, test, key: str) -> np.ndarray:
        if key not in self._test:
            started = time.perf_counter()
            self._test[key] = self.features(test.inputs)
            self.setup_seconds += time.perf_counter() - started
        return self._test[key]


def run_features(strategy: Strategy, frozen: Frozen, splits, test_key: str) -> dict:
    names = frozen.task.label_names
    started = time.perf_counter()
    x = frozen.features(splits.train.inputs)
    y = np.asarray(encode_labels(splits.train.labels, names, False))
    # the heads of fewshot.frozen_fit (and so of `train --method probe`)
    clf = make_head("prototype" if strategy.name == "prototypes" else "logistic", 1.0).fit(x, y)
    # class means are computed, not trained
    trainable = int(clf.coef_.size + clf.intercept_.size) if strategy.name != "prototypes" else 0
    seconds = time.perf_counter() - started
    pred = clf.predict(frozen.test_features(splits.test, test_key))
    m = classification_metrics(np.asarray(encode_labels(splits.test.labels, names, False)), pred, names)

    def predict(texts):
        proba = np.zeros((len(texts), len(names)))
        proba[:, clf.classes_] = clf.predict_proba(frozen.features(texts))
        return probability_rows(proba, names)

    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "trainable_params": trainable,
            "train_seconds": round(seconds, 2), "predict": predict, "predicted": [names[int(i)] for i in pred]}


def run_contrastive(strategy: Strategy, model: str, splits, seed: int, settings: dict) -> dict:
    if splits.train.modality != "text":
        raise NotApplicable("text only (contrastive pairs of sentence embeddings)")
    base = load_base(model, task="text-classification")  # a fresh base: the adapter and bf16 cast stay in it
    fitted = contrastive_fit(base, None, splits.train.inputs, splits.train.labels, method=strategy.method,
                             seed=seed, embed_max_length=settings.get("max_length", 256),
                             max_length=min(PAIR_MAX_LENGTH, settings.get("max_length", 256)))
    m = score(fitted, splits.test.inputs, splits.test.labels, splits.test.label_names, predictions=True)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "predicted": m["predicted"],
            "trainable_params": int(fitted.report["trainable_params"]),
            "train_seconds": round(fitted.report["seconds"], 2),
            "predict": lambda texts: predict_rows(fitted, list(texts), splits.test.label_names)}


def run_in_context(strategy: Strategy, splits, seed: int, settings: dict) -> dict:
    """The in-context baseline on the run's splits: k=8 examples per class from the training examples in
    SmolLM2's prompt, the test set scored by constrained label scoring."""
    if splits.train.modality != "text":
        raise NotApplicable("text only (labelled examples in a language model's prompt)")
    started = time.perf_counter()
    # calibrated: on TREC and BBC News (8 shots) it helped 2 of 3 prompt variants, by up to 18 points
    # (bench/issue14_in_context.py, bench/RESULTS.md)
    fitted = in_context.fit(splits.train.inputs, splits.train.labels, splits.train.label_names, seed=seed,
                            model=IN_CONTEXT_MODEL, max_text_tokens=settings.get("max_length", 256), calibrate=True)
    fit_seconds = time.perf_counter() - started
    t0 = time.perf_counter()
    m = score_probabilities(fitted.predict_proba(list(splits.test.inputs)), splits.test.labels,
                            splits.train.label_names, predictions=True)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "trainable_params": 0, "predicted": m["predicted"],
            "train_seconds": round(fit_seconds, 2),
            "seconds_per_text": round((time.perf_counter() - t0) / max(len(splits.test), 1), 4),
            "predict": lambda texts: probability_rows(fitted.predict_proba(list(texts)), splits.train.label_names)}


def run_train(strategy: Strategy, model: str, data_spec: str, splits, seed: int, settings: dict, work: Path,
               columns: dict, train_fn: Callable) -> dict:
    merged = {**TRAIN_DEFAULTS, **strategy.settings, **settings}
    cfg = RunConfig(model=model, data=data_spec, method=strategy.method, options=dict(strategy.options),
                    seed=seed, shots=splits.shots, out=str(work), overwrite=True, **columns, **merged)
    m = train_fn(cfg, progress=False, splits=splits)
    card = work / "data_card.json"
    test_fp = json.loads(card.read_text())["splits"]["test"]["fingerprint"] if card.is_file() else None
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "trainable_params": int(m["trainable_params"]),
            "train_seconds": m["train_seconds"], "run_test_fingerprint": test_fp, "predicted": m.get("predicted")}


class NotApplicable(Exception):
    pass


def run_strategy(strategy: Strategy, *, model: str, data_spec: str, splits, seed: int, settings: dict, work: Path,
                 columns: dict, train_fn: Callable, frozen: Callable[[], Frozen], test_key: str) -> dict:
    """One run of ``strategy`` on ``splits``, whatever its kind: the one dispatch of ``compare`` and ``bench``.
    ``frozen``: gives the frozen base of the feature strategies (loaded on first use, kept by the caller)."""
    if strategy.kind == "features":
        return run_features(strategy, frozen(), splits, test_key)
    if strategy.kind == "contrastive":
        return run_contrastive(strategy, model, splits, seed, settings)
    if strategy.kind == "in-context":
        return run_in_context(strategy, splits, seed, settings)
    return run_train(strategy, model, data_spec, splits, seed, settings, work, columns, train_fn)


#: RunConfig fields a comparison sets itself (per strategy, shots and seed), and those of causal-LM runs (prompt and
#: response columns, generation length), which no strategy of a comparison of classifiers uses: not settings
_NOT_SETTINGS = ("model", "data", "method", "options", "seed", "shots", "out", "resume", "overwrite", "text_column",
                 "label_column", "test", "test_size", "test_per_class", "val_size", "split_seed", "task", "auto",
                 "auto_budget", "init_from", "stack_under", "prompt_column", "response_column", "max_new_tokens")


def check_settings(settings: dict | None) -> dict:
    """The train() settings of a comparison (``--set epochs=3``), checked now rather than in every run."""
    settings = dict(settings or {})
    known = [f.name for f in fields(RunConfig) if f.name not in _NOT_SETTINGS]
    bad = sorted(k for k in settings if k not in known)
    if bad:
        raise ConfigError(f"--set {', '.join(bad)}: not a setting of a comparison's strategies; use some of "
                          f"{', '.join(known)}")
    RunConfig(model="-", data="-", **{**TRAIN_DEFAULTS, **settings})  # bad values: one-line ConfigError
    return settings
