"""Few-shot text classification with a frozen (or lightly adapted) sentence encoder.

Three strategies, cheapest first:

- **prototypes**: embed the few examples with the frozen body, average them per class, and label a new text
  by the nearest class mean (cosine similarity; probabilities are a softmax over cosine / temperature).
- **frozen embeddings + logistic regression**: the same embeddings, a scikit-learn logistic regression on top.
- **contrastive fine-tuning** (the SetFit recipe, Tunstall et al. 2022, https://arxiv.org/abs/2209.11055):
  sample pairs of examples (same class: target 1, different classes: target 0), train the body so that the
  cosine similarity of the two embeddings matches the target,

      loss = mean over pairs (cos(e(a), e(b)) - y)^2        (``loss="cosine"``, SetFit's default)

  or with a supervised contrastive loss over the texts of each batch (Khosla et al. 2020,
  https://arxiv.org/abs/2004.11362; ``loss="supcon"``), then fit a logistic regression on the adapted
  embeddings. ``body="adapter"`` trains only a grafted adapter (LoRA by default) and leaves the base untouched;
  ``body="full"`` trains a copy of every weight, as SetFit does.

What makes the adapter variant fast on a CPU (measured in ``bench/issue4_fewshot.py``):

- a pair batch names at most ``2 * batch_size`` texts but often the same text twice: each distinct text is
  embedded once per step (the gradient is the same as embedding every occurrence);
- with adapters only in the top layers, the layers below never change: their output for every training text
  is computed once (no grad) and each step runs only the top layers (``speed/cache.py``'s frozen-prefix cache,
  the one ``train()`` uses; checked against the plain forward, else not used);
- pairs are trained at a shorter ``max_length`` than the embeddings the head sees (``embed_max_length``);
- the frozen base runs in bfloat16 where the CPU multiplies bf16 natively (``graftune.speed.precision``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import nn

from graftune.core.model import AdapterModel
from graftune.errors import ConfigError, DataError
from graftune.methods.lora import LoRA
from graftune.run.schedule import make_scheduler
from graftune.speed import precision as _precision
from graftune.speed.cache import FrozenPrefixCache
from graftune.tasks import pad
from graftune.tasks.classification import POOLINGS, base_hidden, pool

BODIES = ("adapter", "full")
LOSSES = ("cosine", "supcon")
HEADS = ("logistic", "prototype")
#: windows per long text in ``embed``: on BBC News (median 416 tokens) reading 4 x 256 instead of truncating at 256
#: raised the 8-shot linear probe from 0.922 to 0.941 (3 seeds; bench/RESULTS.md, issue 4)
DEFAULT_CHUNKS = 4

# --- inputs ----------------------------------------------------------------------------------------------------


def _unwrap(model: Any, tokenizer: Any) -> tuple[nn.Module, Any, str | None]:
    """Accept a module (plain base or AdapterModel) or a zoo ``Base`` (``.model``, ``.tokenizer``, ``.pooling``)."""
    if isinstance(model, nn.Module):
        return model, tokenizer, None
    if hasattr(model, "model") and isinstance(model.model, nn.Module):
        return model.model, tokenizer if tokenizer is not None else getattr(model, "tokenizer", None), \
            getattr(model, "pooling", None)
    raise ConfigError(f"expected a model (nn.Module, AdapterModel or zoo Base), got {type(model).__name__}")


def _pad_id(tokenizer: Any) -> int:
    pad_id = tokenizer.pad_token_id
    return pad_id if pad_id is not None else (tokenizer.eos_token_id or 0)


def _tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    if tokenizer is None:
        raise ConfigError("tokenizer: none given; pass the base's tokenizer (zoo bases carry one)")
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def windows(tokenizer: Any, texts: Sequence[str], max_length: int, max_chunks: int) -> tuple[list, list, list]:
    """Each text as up to ``max_chunks`` consecutive windows of at most ``max_length`` tokens (special tokens
    included), split by the tokenizer itself (``return_overflowing_tokens``). Returns (window token ids, owning
    text index, real tokens per window). A text that fits gives one window, identical to plain truncation. The ONNX
    export of few-shot runs checks its own windows against these, token for token."""
    if tokenizer is None or max_chunks == 1:
        ids = _tokenize(tokenizer, texts, max_length)  # raises on a missing tokenizer
        return ids, list(range(len(ids))), [len(x) for x in ids]
    special = tokenizer.num_special_tokens_to_add(pair=False)
    if max_length <= special:
        raise ConfigError(f"max_length: got {max_length}; use more than the {special} special tokens")
    out = tokenizer(list(texts), truncation=True, max_length=max_length, return_overflowing_tokens=True)
    owner = out.get("overflow_to_sample_mapping")
    if owner is None:  # a tokenizer without overflow support: read the first window only
        return windows(tokenizer, texts, max_length, 1)
    parts, owners, weight, seen = [], [], [], [0] * len(texts)
    for ids, i in zip(out["input_ids"], owner):
        if seen[i] < max_chunks:
            seen[i] += 1
            parts.append(ids)
            owners.append(int(i))
            weight.append(max(len(ids) - special, 1))
    return parts, owners, weight


def _batch(tokenizer: Any, ids: Sequence[Sequence[int]], device: torch.device) -> dict[str, torch.Tensor]:
    left = getattr(tokenizer, "padding_side", "right") == "left"
    return {"input_ids": pad(ids, _pad_id(tokenizer), left=left).to(device),
            "attention_mask": pad([[1] * len(s) for s in ids], 0, left=left).to(device)}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def _check_texts(texts: Sequence[str], labels: Sequence[Any] | None = None) -> None:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise DataError("texts: expected a list of strings")
    if labels is not None and len(labels) != len(texts):
        raise DataError(f"got {len(texts)} texts but {len(labels)} labels; pass one label per text")


# --- embeddings ------------------------------------------------------------------------------------------------


@torch.no_grad()
def embed(model: nn.Module, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 256,
          pooling: str = "mean", normalize: bool = True, max_chunks: int = DEFAULT_CHUNKS) -> torch.Tensor:
    """Sentence embeddings (len(texts), hidden) as float32 on the CPU: the base's last hidden states pooled over
    real tokens (``mean`` respects the attention mask; ``last`` for decoders; ``cls``), optionally L2-normalized.

    A text longer than ``max_length`` tokens is read as up to ``max_chunks`` consecutive windows of
    ``max_length`` tokens; its embedding is the mean of the windows' embeddings (normalized first when
    ``normalize``) weighted by their token counts. ``max_chunks=1`` truncates instead. Texts that fit in one window
    are unaffected; long ones cost up to ``max_chunks`` times more.

    ``model`` is a plain base or an AdapterModel (its active adapters apply). Texts are batched by length so
    padding stays small; the result keeps the input order. Runs in eval mode and restores the previous mode.
    """
    model, tokenizer, _ = _unwrap(model, tokenizer)
    _check_texts(texts)
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling: got {pooling!r}; use one of {', '.join(POOLINGS)}")
    if not isinstance(max_chunks, int) or max_chunks < 1:
        raise ConfigError(f"max_chunks: got {max_chunks!r}; use a positive integer (1 truncates long texts)")
    if len(texts) == 0:
        raise DataError("texts: empty list; nothing to embed")
    ids, owner, weight = windows(tokenizer, texts, max_length, max_chunks)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    device, was_training = _device(model), model.training
    model.eval()
    out: list[torch.Tensor | None] = [None] * len(ids)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = _batch(tokenizer, [ids[i] for i in rows], device)
            vectors = pool(base_hidden(model, batch), batch["attention_mask"], pooling)
            for i, v in zip(rows, vectors.cpu()):
                out[i] = v
    finally:
        model.train(was_training)
    emb = torch.stack(out)
    if len(ids) != len(texts):  # some texts span several windows: token-weighted mean of normalized windows
        w = torch.tensor(weight, dtype=emb.dtype).unsqueeze(1)
        index = torch.tensor(owner)
        parts = F.normalize(emb, dim=-1) if normalize else emb
        total = torch.zeros(len(texts), emb.shape[1], dtype=emb.dtype).index_add_(0, index, parts * w)
        emb = total / torch.zeros(len(texts), 1, dtype=emb.dtype).index_add_(0, index, w)
    return F.normalize(emb, dim=-1) if normalize else emb


# --- prototype head --------------------------------------------------------------------------------------------


class PrototypeClassifier:
    """Nearest class mean by cosine similarity: ``p(c | x) = softmax_c(cos(x, mean_c) / temperature)``, where
    ``mean_c`` is the mean of the L2-normalized embeddings of class c (Snell et al. 2017,
    https://arxiv.org/abs/1703.05175, with cosine instead of squared Euclidean distance).

    Args:
        temperature: softmax temperature over cosine similarities (smaller: sharper probabilities).
    """

    def __init__(self, temperature: float = 0.05):
        if not temperature > 0:
            raise ConfigError(f"temperature: got {temperature!r}; use a positive number (e.g. 0.05)")
        self.temperature = temperature

    def fit(self, embeddings: torch.Tensor | np.ndarray, labels: Sequence[Any]) -> PrototypeClassifier:
        emb = F.normalize(torch.as_tensor(np.asarray(embeddings), dtype=torch.float32), dim=-1)
        labels = np.asarray(labels)
        if len(labels) != len(emb):
            raise DataError(f"got {len(emb)} embeddings but {len(labels)} labels")
        self.classes_ = np.unique(labels)
        if len(self.classes_) < 2:
            raise DataError("prototypes need at least two classes")
        means = torch.stack([emb[torch.as_tensor(labels == c)].mean(0) for c in self.classes_])
        self.prototypes_ = F.normalize(means, dim=-1)
        return self

    def similarities(self, embeddings: torch.Tensor | np.ndarray) -> np.ndarray:
        emb = F.normalize(torch.as_tensor(np.asarray(embeddings), dtype=torch.float32), dim=-1)
        return (emb @ self.prototypes_.T).numpy()

    def predict_proba(self, embeddings: torch.Tensor | np.ndarray) -> np.ndarray:
        return torch.softmax(torch.from_numpy(self.similarities(embeddings)) / self.temperature, dim=-1).numpy()

    def predict(self, embeddings: torch.Tensor | np.ndarray) -> np.ndarray:
        return self.classes_[self.similarities(embeddings).argmax(axis=1)]


def make_head(head: str, head_c: float):
    """An unfitted head over embeddings: nearest class mean (``prototype``) or logistic regression (``logistic``,
    inverse regularization ``head_c``)."""
    if head == "prototype":
        return PrototypeClassifier()
    if head == "logistic":
        return LogisticRegression(C=head_c, max_iter=2000)
    raise ConfigError(f"head: got {head!r}; use one of {', '.join(HEADS)}")


# --- the fitted model ------------------------------------------------------------------------------------------


@dataclass
class FewShotModel:
    """A body (frozen, adapted or fine-tuned) plus a fitted head. ``predict`` returns the original labels.

    ``report`` records what was done and how long it took (seconds per phase, pairs, steps, cache use).
    """

    model: nn.Module
    tokenizer: Any
    head: Any
    max_length: int = 256
    pooling: str = "mean"
    adapter: str | None = None
    batch_size: int = 32
    report: dict = field(default_factory=dict)
    max_chunks: int = DEFAULT_CHUNKS
    #: a ``speed.precision.Precision`` whose autocast every ``embed`` runs under (``train --method probe`` embeds
    #: as ``graftune compare`` does); None: no autocast, the weights' own dtype
    precision: Any = None

    @property
    def classes(self) -> list:
        return list(self.head.classes_)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        options = {"batch_size": self.batch_size, "max_length": self.max_length, "pooling": self.pooling,
                   "max_chunks": self.max_chunks}
        with contextlib.nullcontext() if self.precision is None else self.precision.autocast():
            if self.adapter is None or not isinstance(self.model, AdapterModel):
                return embed(self.model, self.tokenizer, texts, **options)
            previous = self.model.active
            self.model.set_active(self.adapter)
            try:
                return embed(self.model, self.tokenizer, texts, **options)
            finally:
                self.model.set_active(*previous)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), len(classes)) probabilities, columns in ``classes`` order."""
        return self.head.predict_proba(self.embed(texts).numpy())

    def predict(self, texts: Sequence[str]) -> list:
        return list(self.head.predict(self.embed(texts).numpy()))


def frozen_fit(model: Any, tokenizer: Any, texts: Sequence[str], labels: Sequence[Any], *, head: str = "logistic",
               max_length: int = 256, pooling: str | None = None, batch_size: int = 32,
               head_c: float = 1.0, max_chunks: int = DEFAULT_CHUNKS) -> FewShotModel:
    """Embed ``texts`` with the frozen body and fit a head on them: ``prototype`` (nearest class mean) or
    ``logistic`` (scikit-learn logistic regression, inverse regularization ``head_c``). Long texts are read as
    up to ``max_chunks`` windows of ``max_length`` tokens (``embed``)."""
    module, tokenizer, default_pooling = _unwrap(model, tokenizer)
    _check_texts(texts, labels)
    pooling = pooling or default_pooling or "mean"
    t0 = time.perf_counter()
    emb = embed(module, tokenizer, texts, batch_size=batch_size, max_length=max_length, pooling=pooling,
                max_chunks=max_chunks)
    t1 = time.perf_counter()
    fitted = make_head(head, head_c).fit(emb.numpy(), np.asarray(labels))
    t2 = time.perf_counter()
    report = {"strategy": f"frozen+{head}", "examples": len(texts), "max_length": max_length,
              "max_chunks": max_chunks, "embed_seconds": t1 - t0, "head_seconds": t2 - t1, "seconds": t2 - t0}
    return FewShotModel(module, tokenizer, fitted, max_length, pooling, None, batch_size, report, max_chunks)


# --- contrastive pairs -----------------------------------------------------------------------------------------


def sample_pairs(labels: Sequence[Any], iterations: int, seed: int = 0) -> np.ndarray:
    """Balanced, seeded pairs for contrastive training: for every example, ``iterations`` positive partners
    (same class) and ``iterations`` negative partners (another class). Returns an int array (pairs, 3) of
    ``(i, j, target)`` rows (target 1 for same class, 0 otherwise), shuffled; 2 * iterations * len(labels) rows.

    Partners are drawn by walking a shuffled list of candidates and reshuffling when it runs out, so every
    candidate is used before any is repeated. An example alone in its class is its own positive partner (as in
    SetFit, whose positives include self-pairs).
    """
    if iterations < 1:
        raise ConfigError(f"iterations: got {iterations!r}; use a positive number of pairs per example (e.g. 20)")
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) < 2:
        raise DataError("contrastive training needs examples of at least two classes")
    rng = np.random.default_rng(seed)
    index = np.arange(len(labels))
    rows = []
    for i in index:
        same = index[(labels == labels[i]) & (index != i)]
        positives = same if len(same) else np.array([i])
        negatives = index[labels != labels[i]]
        for candidates, target in ((positives, 1), (negatives, 0)):
            reps = math.ceil(iterations / len(candidates))
            drawn = np.concatenate([rng.permutation(candidates) for _ in range(reps)])[:iterations]
            rows += [(i, j, target) for j in drawn]
    pairs = np.asarray(rows, dtype=np.int64)
    return pairs[rng.permutation(len(pairs))]


def cosine_pair_loss(u: torch.Tensor, v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SetFit's default: mean squared error between cos(u, v) and the pair's target (1 same class, 0 not)."""
    return F.mse_loss(F.cosine_similarity(u, v, dim=-1), target.to(u.dtype))


def supcon_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020): for each anchor with at least one other example of its
    class in the batch, the mean over those positives p of ``-log softmax_j(cos(a, j) / t)[p]`` (j over every
    other example of the batch)."""
    z = F.normalize(embeddings.float(), dim=-1)
    sim = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    has = positive.any(1)
    if not has.any():
        return z.sum() * 0.0
    per_anchor = -(log_prob.masked_fill(~positive, 0.0).sum(1)[has] / positive.sum(1)[has])
    return per_anchor.mean()


# --- contrastive training --------------------------------------------------------------------------------------
#: the adapter's step: 64 pairs at a learning rate of 3e-3. SetFit's 16 pairs at 1e-3 (graftune's recipe until
#: session 11) train 4x the steps for the same pairs in about twice the time; over 9 data sets x 3 seeds the larger
#: steps scored -0.3 points at 8 shots (worst -1.5, trec) and +0.3 over 8 at 16 shots (worst -0.7, sms-spam), and
#: auto's regret at 8 shots stayed 0.5 points (bench/RESULTS.md, "Session 11").
PAIRS_PER_STEP = 64
PAIR_LR = 3e-3
#: a step's distinct texts are encoded longest first in groups of this many rows, each padded to its own longest
#: text, instead of one batch padded to the step's longest: the same loss and gradient (only which dropout mask a
#: row draws changes) without computing the padding. Over 9 data sets x 3 seeds at 8 shots: 0.80x the training time
#: (trec 0.78x, trec-fine 0.71x; long texts, all cut at max_length, about 1.0x), accuracy +0.2 points (noise); 12-16
#: rows were best, 8 gained less (bench/RESULTS.md, "Session 12"). Packing rows with no padding at all
#: (transformers' DataCollatorWithFlattening) needs flash-attention kernels, which CPU builds of torch lack.
GROUP_ROWS = 16


def _prefix_cache(am: AdapterModel, tokenizer: Any, ids: list[list[int]],
                  device: torch.device) -> tuple[FrozenPrefixCache | None, str]:
    """The frozen layers below the adapter, computed once per text and attached, if replaying them reproduces
    the plain forward (call under the training autocast)."""
    cache = FrozenPrefixCache(am)
    if not cache.enabled:
        return None, f"off ({cache.note})"
    am.eval()
    dtype = next(am.base.parameters()).dtype
    ok, detail = cache.verify(lambda b: base_hidden(am, b), _batch(tokenizer, ids[:4], device),
                              rtol=2e-2 if dtype != torch.float32 or torch.is_autocast_enabled(device.type) else 1e-4)
    if not ok:
        return None, f"off ({detail})"
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    cache.fill(_batch(tokenizer, [ids[i] for i in order[s:s + 64]], device) for s in range(0, len(order), 64))
    cache.attach()
    return cache, cache.note


def _unique_name(model: AdapterModel, name: str) -> str:
    out, k = name, 1
    while out in model.info:
        k += 1
        out = f"{name}-{k}"
    return out


def contrastive_fit(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[Any],
    *,
    body: str = "adapter",
    method: str = "lora",
    method_options: dict | None = None,
    iterations: int = 20,
    epochs: int = 1,
    lr: float | None = None,
    batch_size: int = PAIRS_PER_STEP,
    seed: int = 0,
    max_length: int = 128,
    embed_max_length: int = 256,
    embed_max_chunks: int = DEFAULT_CHUNKS,
    loss: str = "cosine",
    temperature: float = 0.1,
    head: str = "logistic",
    head_c: float = 1.0,
    pooling: str | None = None,
    precision: str = "auto",
    cache: bool = True,
    group_rows: int = GROUP_ROWS,
    base_dropout: bool = True,
    adapter_name: str = "fewshot",
    on_step: Callable[[dict], None] | None = None,
) -> FewShotModel:
    """Contrastive few-shot training of an adapter (or of the whole body), then a head on the adapted embeddings.

    Args:
        model: a base (``nn.Module``), an ``AdapterModel`` (a new adapter is added to it) or a zoo ``Base``.
        tokenizer: the base's tokenizer (None: taken from a zoo ``Base``).
        texts, labels: the few labelled examples (2 to 64 per class is the intended range).
        body: ``adapter`` trains a new adapter of ``method``; ``full`` trains a copy of every weight (SetFit).
        method: the adapter method for ``body="adapter"`` (any registered method).
        method_options: that method's options; default for LoRA: r=8, alpha=16 on query/key/value and the
            attention output of the top 2 layers (``top_k_layers=2``), which lets the lower layers be cached.
        iterations: positive and negative partners per example (SetFit's ``num_iterations``).
        epochs: passes over the pairs.
        lr: AdamW learning rate; default ``PAIR_LR`` for adapters, 2e-5 for the full body (SetFit's).
        batch_size: pairs per step (``PAIRS_PER_STEP``).
        seed: seeds pair sampling, adapter initialization and dropout.
        max_length: tokens per text while training on pairs (shorter is faster).
        embed_max_length: tokens per text for the embeddings the head is fitted on and predicts from.
        embed_max_chunks: long texts are embedded (for the head) as up to this many windows of
            ``embed_max_length`` tokens (``embed``); pairs are trained on the first ``max_length`` tokens only.
        loss: ``cosine`` (MSE between cosine similarity and 1/0, SetFit's default) or ``supcon``.
        temperature: the supervised contrastive loss's temperature.
        head: ``logistic`` (scikit-learn, inverse regularization ``head_c``) or ``prototype``.
        pooling: ``mean``, ``last`` or ``cls``; default: the zoo base's, else ``mean``.
        precision: ``auto``, ``fp32`` or ``bf16`` (``graftune.speed.precision``), applied as ``train()`` does:
            bf16 casts the base's frozen weights to bfloat16 in place (trainable ones, the full body's copies
            included, stay float32) and runs every step under the policy's autocast.
        cache: compute the frozen layers below the adapter once (used only where it reproduces the plain forward).
        group_rows: a step's distinct texts are encoded longest first in groups of this many (``GROUP_ROWS``).
        base_dropout: with ``body="adapter"``, the frozen base's own dropout is active while training (SetFit's
            way); False runs it as at inference, as ``train()``'s adapter loop does. The full body always trains
            with its dropout.
        adapter_name: name of the new adapter (made unique if taken).
        on_step: called after every step with ``{"step", "steps", "loss", "lr"}``.
    """
    module, tokenizer, default_pooling = _unwrap(model, tokenizer)
    _check_texts(texts, labels)
    pooling = pooling or default_pooling or "mean"
    if body not in BODIES:
        raise ConfigError(f"body: got {body!r}; use one of {', '.join(BODIES)}")
    if loss not in LOSSES:
        raise ConfigError(f"loss: got {loss!r}; use one of {', '.join(LOSSES)}")
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling: got {pooling!r}; use one of {', '.join(POOLINGS)}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("max_length", max_length),
                        ("embed_max_length", embed_max_length), ("embed_max_chunks", embed_max_chunks),
                        ("group_rows", group_rows)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}: got {value!r}; use a positive integer")
    make_head(head, head_c)  # validate before any training
    labels = list(labels)
    classes, y = np.unique(np.asarray(labels), return_inverse=True)
    pairs = sample_pairs(y, iterations, seed)  # raises on a single class

    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # seeded init and dropout; the caller's RNG is left as it was
        torch.manual_seed(seed)
        am = module if isinstance(module, AdapterModel) else AdapterModel(module)
        name = _unique_name(am, adapter_name)
        if body == "full":
            am.add_adapter(name, "full")
            lr = 2e-5 if lr is None else lr
        else:
            options = dict(method_options) if method_options is not None else default_options(method, am.family)
            am.add_adapter(name, method, **options)
            lr = PAIR_LR if lr is None else lr
        previous_active = am.active
        am.set_active(name)
        am.set_trainable(name)
        # as train() does: frozen weights cast once (trainable ones stay float32), steps under the policy's autocast
        policy = _precision.choose(precision, _device(am))
        _precision.apply(am.base, policy)
        params = am.trainable_parameters()

        # every text tokenized once; each step pads only its own rows (or reads the cache)
        device = _device(am)
        ids = _tokenize(tokenizer, texts, max_length)
        full = _batch(tokenizer, ids, device)
        prefix, cache_note = (None, "off (cache=False)")
        if cache and body == "adapter":
            with policy.autocast():
                prefix, cache_note = _prefix_cache(am, tokenizer, ids, device)
        left = getattr(tokenizer, "padding_side", "right") == "left"
        lengths = full["attention_mask"].sum(1)

        def encode_group(rows: torch.Tensor) -> torch.Tensor:
            # the attached cache serves the layers below the adapter from memory
            mask = full["attention_mask"][rows]
            width = int(mask.sum(1).max())
            keep = slice(mask.shape[1] - width, None) if left else slice(0, width)
            batch = {"input_ids": full["input_ids"][rows][:, keep], "attention_mask": mask[:, keep]}
            return pool(base_hidden(am, batch), batch["attention_mask"], pooling)

        def encode(rows: torch.Tensor) -> torch.Tensor:
            # longest first, in groups of group_rows, each padded to its own longest; embeddings in ``rows``' order
            if len(rows) <= group_rows:
                return encode_group(rows)
            order = torch.argsort(lengths[rows], descending=True, stable=True)
            parts = torch.cat([encode_group(rows[order[s:s + group_rows]]) for s in range(0, len(rows), group_rows)])
            return torch.empty_like(parts).index_copy(0, order, parts)

        optimizer = torch.optim.AdamW(params, lr=lr)
        steps_per_epoch = math.ceil(len(pairs) / batch_size)
        total = steps_per_epoch * epochs
        scheduler = make_scheduler(optimizer, total)
        y_t = torch.as_tensor(y, device=device)
        order_rng = np.random.default_rng(seed + 1)
        am.train()
        if body == "adapter" and not base_dropout:
            am.base.eval()
        step, losses, distinct = 0, [], 0
        try:
            for epoch in range(epochs):
                epoch_pairs = pairs if epoch == 0 else pairs[order_rng.permutation(len(pairs))]
                for start in range(0, len(epoch_pairs), batch_size):
                    chunk = torch.as_tensor(epoch_pairs[start:start + batch_size], device=device)
                    # each distinct text of the batch is embedded once; pairs index into those embeddings
                    uniq, inverse = torch.unique(chunk[:, :2], return_inverse=True)
                    distinct += len(uniq)
                    with policy.autocast():
                        emb = encode(uniq).float()
                    if loss == "cosine":
                        value = cosine_pair_loss(emb[inverse[:, 0]], emb[inverse[:, 1]], chunk[:, 2].float())
                    else:
                        value = supcon_loss(emb, y_t[uniq], temperature)
                    optimizer.zero_grad(set_to_none=True)
                    value.backward()
                    optimizer.step()
                    scheduler.step()
                    losses.append(float(value.detach()))
                    step += 1
                    if on_step is not None:
                        on_step({"step": step, "steps": total, "loss": losses[-1], "lr": scheduler.get_last_lr()[0]})
        finally:
            if prefix is not None:
                prefix.detach()
            am.eval()
            am.set_trainable()
            am.set_active(*previous_active)
        prefix = None  # free the cached hidden states
    t1 = time.perf_counter()

    fitted = FewShotModel(am, tokenizer, None, embed_max_length, pooling, name, 32, max_chunks=embed_max_chunks)
    emb = fitted.embed(texts)
    fitted.head = make_head(head, head_c).fit(emb.numpy(), np.asarray(labels))
    t2 = time.perf_counter()
    fitted.report = {
        "strategy": f"contrastive-{body}", "method": "full" if body == "full" else method, "adapter": name,
        "examples": len(texts), "classes": len(classes), "pairs": len(pairs), "steps": total,
        "texts_embedded_per_step": distinct / max(step, 1), "lr": lr, "loss": loss,
        "first_loss": losses[0] if losses else None, "last_loss": float(np.mean(losses[-10:])) if losses else None,
        "precision": policy.name, "cache": cache_note,
        "trainable_params": sum(p.numel() for p in params), "max_length": max_length,
        "embed_max_length": embed_max_length, "embed_max_chunks": embed_max_chunks, "train_seconds": t1 - t0,
        "head_seconds": t2 - t1,
        "seconds": t2 - t0,
    }
    return fitted


def default_options(method: str, family: str) -> dict:
    """Fast defaults: LoRA on every attention projection (LoRA's ``attention`` targets for the family) of the top
    two layers only (the rest can be cached)."""
    if method != "lora":
        return {}
    options: dict = {"r": 8, "alpha": 16.0, "top_k_layers": 2}
    spec = LoRA.attention_presets.get(family)
    if spec is not None:
        options["targets"] = {"names": list(spec.names)}
    return options
