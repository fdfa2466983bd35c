"""In-context few-shot classification with a decoder LM (SmolLM2): no training, k labelled examples in the prompt.

The recipe (Brown et al. 2020, https://arxiv.org/abs/2005.14165, "few-shot" in-context learning), as a chat:

    system     Classify each text into one of these categories: a, b, c. Answer with the category only.
    user       <example 1 text>          assistant  <its label>
    ...        (k examples per class, balanced, chosen and shuffled with a seed)
    user       <the text to label>       assistant  ?

The label is chosen by **scoring**, never by free generation: for every label name (or its `label_words`
spelling) the log-probability of its answer tokens, end-of-turn marker included (so `sport` does not win by
being a prefix of `sports`), given the prompt and the text. `score="sum"` is the answer's exact log-probability;
`"mean"` divides by its token count (a length-bias heuristic). The scores, soft-maxed over the labels, are the
probabilities. `calibrate=True` divides by the probabilities the prompt gives a content-free text ("N/A", "")
(contextual calibration, Zhao et al. 2021, https://arxiv.org/abs/2102.09690), against a model's bias to
one label.

What makes it cheap: the prefix (instruction + examples) is the same for every text, so its key/value cache is
computed once. Each text then costs ONE forward over its own tokens plus every label's answer tokens: the
answers hang off the text as branches of a tree, each with its own positions, seeing the prefix, the text and
its own earlier tokens only (a 4-D attention mask), so N texts cost N short forwards. `label_scores(...,
use_cache=False)` computes the same scores the plain way (one full forward per text and label) as a check.

The saved model is data only (`in_context.json`: the chosen examples, the instruction and settings, the label
names, the base alias and the rendered prompt prefix); `load` rebuilds the prompt and checks it is the same.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graftune.core import virtual_tokens
from graftune.errors import ArtifactError, ConfigError, DataError, ModelError
from graftune.io.atomic import write_dir_atomically
from graftune.zoo import Base, load_base

__all__ = ["FILE", "FORMAT", "InContextConfig", "InContextModel", "fit", "load", "select_examples"]

FILE = "in_context.json"
FORMAT = "graftune-in-context"
VERSION = 1
SCORES = ("sum", "mean")
DEFAULT_INSTRUCTION = ("Classify each text into one of these categories: {labels}. "
                       "Answer with the category only.")
#: content-free texts for `calibrate` (Zhao et al. use "N/A", "[MASK]" and the empty string)
CONTENT_FREE = ("N/A", "", "[MASK]")
#: a chat layout for tokenizers without a chat template (plain decoders such as GPT-2)
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant:{% endif %}")
_SLOT = "\u2063GRAFTUNE-TEXT\u2063"  # stands for the text while the template is rendered once


@dataclass(frozen=True)
class InContextConfig:
    """How the prompt is built and read.

    Args:
        k: examples per class in the prompt (fewer where a class has fewer; 0: zero-shot).
        seed: picks and orders the examples.
        instruction: the system message; `{labels}` becomes the comma-separated label words.
        label_words: how each label name is written in the prompt and scored (e.g. `{"HUM": "person"}`);
            names missing from it are written as they are.
        max_example_tokens: each example text is cut to this many tokens (long articles would fill the context).
        max_text_tokens: each text to label is cut to this many tokens.
        score: `sum` (the answer's log-probability) or `mean` (per answer token).
        calibrate: divide by the probabilities of content-free texts (see the module docstring).
        texts_per_forward: texts packed into one forward (speed only: the scores are those of one text at a time,
            to float rounding).
    """

    k: int = 8
    seed: int = 0
    instruction: str = DEFAULT_INSTRUCTION
    label_words: dict[str, str] | None = None
    max_example_tokens: int = 64
    max_text_tokens: int = 256
    score: str = "sum"
    calibrate: bool = False
    texts_per_forward: int = 8

    def __post_init__(self):
        for name in ("k", "max_example_tokens", "max_text_tokens", "texts_per_forward"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "k" else 1):
                raise ConfigError(f"in-context {name}={value!r}: use an integer >= {0 if name == 'k' else 1}")
        if self.score not in SCORES:
            raise ConfigError(f"in-context score={self.score!r}: use one of {', '.join(SCORES)}")
        if not isinstance(self.instruction, str):
            raise ConfigError("in-context instruction must be a string (it may hold {labels})")
        if self.label_words is not None and not (
                isinstance(self.label_words, dict)
                and all(isinstance(v, str) and v.strip() for v in self.label_words.values())):
            raise ConfigError("in-context label_words must map label names to non-empty words, e.g. {HUM: person}")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> InContextConfig:
        """A config from `--set key=value` options; an unknown key names the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown in-context option {unknown[0]!r}: use {', '.join(sorted(known))}")
        return cls(**options)


def select_examples(labels: Sequence[str], label_names: Sequence[str], k: int, seed: int) -> list[int]:
    """Indices of up to `k` examples per class (all of a class that has fewer), in a seeded shuffled order.

    Balanced, and interleaved: a prompt that lists one class last tends to pull answers towards it.
    """
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {name: [] for name in label_names}
    for i, label in enumerate(labels):
        by_class[label].append(i)
    chosen = [int(i) for name in label_names for i in rng.permutation(by_class[name])[:k]]
    return [chosen[i] for i in rng.permutation(len(chosen))]


@dataclass
class InContextModel:
    """A prompt of labelled examples on a frozen decoder, and the scorer that reads labels off it.

    Build one with `fit` or `load`. `predict_proba(texts)` gives (len(texts), len(label_names)) probabilities,
    columns in `label_names` order; `cost` reports the prefix size and the seconds per text of the last call.
    """

    model: nn.Module
    tokenizer: Any
    label_names: list[str]
    examples: list[tuple[str, str]]
    config: InContextConfig
    model_alias: str | None = None
    cost: dict = field(default_factory=dict)

    def __post_init__(self):
        self._template = getattr(self.tokenizer, "chat_template", None) or PLAIN_TEMPLATE
        self._specials = not getattr(self.tokenizer, "chat_template", None)
        self._cache_arg = virtual_tokens.cache_argument(self.model)
        words = dict(self.config.label_words or {})
        unknown = sorted(set(words) - set(self.label_names))
        if unknown:
            raise ConfigError(f"in-context label_words names {unknown[0]!r}, which is not a label: "
                              f"use {', '.join(self.label_names)}")
        self.label_words = [" ".join(words.get(n, n).split()) for n in self.label_names]
        if len(set(self.label_words)) < len(self.label_words):
            raise ConfigError("in-context label words must differ from each other: two labels are written alike")
        self._build_prompt()
        self._bias = np.zeros(len(self.label_names))
        if self.config.calibrate:
            self._bias = self.label_scores(list(CONTENT_FREE)).mean(axis=0)

    # --- the prompt ------------------------------------------------------------------------------------------
    def _render(self, messages: list[dict], generation: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self._template, tokenize=False,
                                                  add_generation_prompt=generation)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _cut(self, text: str, max_tokens: int) -> str:
        ids = self._ids(text.strip())
        return text.strip() if len(ids) <= max_tokens else self.tokenizer.decode(ids[:max_tokens]).strip()

    def _build_prompt(self) -> None:
        """Render the prefix, the per-text wrapper and every label's answer tokens from the chat template.

        The pieces are the differences between renders of growing conversations, so each is exactly what the
        template puts there; they are tokenized separately and concatenated, the same way on every path.
        """
        cfg = self.config
        system = cfg.instruction.replace("{labels}", ", ".join(self.label_words))
        messages = [{"role": "system", "content": system}] if system else []
        for text, label in self.examples:
            messages.append({"role": "user", "content": self._cut(text, cfg.max_example_tokens)})
            messages.append({"role": "assistant", "content": self.label_words[self.label_names.index(label)]})
        self.prompt_prefix = self._render(messages, generation=False) if messages else ""
        asked = self._render([*messages, {"role": "user", "content": _SLOT}], generation=True)
        if not asked.startswith(self.prompt_prefix) or asked.count(_SLOT) != 1:
            raise ModelError("the tokenizer's chat template does not extend a conversation by appending turns; "
                             "use a chat model such as smollm2 or a tokenizer without a chat template")
        self._before, self._after = asked[len(self.prompt_prefix):].split(_SLOT)
        self._answers = []
        for word in self.label_words:
            answered = self._render([*messages, {"role": "user", "content": _SLOT},
                                     {"role": "assistant", "content": word}], generation=False)
            if not answered.startswith(asked):
                raise ModelError("the tokenizer's chat template renders an answer differently from its generation "
                                 "prompt; use a chat model such as smollm2")
            # the answer and its end-of-turn marker; trailing whitespace belongs to the next turn
            self._answers.append(self._ids(answered[len(asked):].rstrip()))
        prefix = self.tokenizer(self.prompt_prefix, add_special_tokens=self._specials)["input_ids"]
        self.prefix_ids = prefix
        limit = getattr(self.model.config, "max_position_embeddings", None)
        longest = (len(prefix) + len(self._ids(self._before + self._after)) + cfg.max_text_tokens
                   + 2 + max(len(a) for a in self._answers))
        if limit and longest > limit:
            raise ConfigError(f"the in-context prompt needs up to {longest} tokens but the model reads {limit}; "
                              f"lower k ({cfg.k}), max_example_tokens ({cfg.max_example_tokens}) or "
                              f"max_text_tokens ({cfg.max_text_tokens})")
        t0, c0 = time.perf_counter(), time.process_time()
        self._prefix_kv = None
        if prefix:
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor([prefix], device=self._device), use_cache=True)
            cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
            self._prefix_kv = [(k, v) for k, v, *_ in cache]
        self.cost = {"prefix_tokens": len(prefix), "prefix_seconds": time.perf_counter() - t0,
                     "prefix_cpu_seconds": time.process_time() - c0, "examples": len(self.examples)}

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def text_ids(self, text: str) -> list[int]:
        """The tokens that follow the prefix for one text: its user turn and the assistant's header."""
        return self._ids(self._before + self._cut(text, self.config.max_text_tokens) + self._after)

    # --- scoring ---------------------------------------------------------------------------------------------
    def label_scores(self, texts: Sequence[str], *, use_cache: bool = True) -> np.ndarray:
        """(len(texts), len(label_names)) answer log-probabilities (`sum`) or per-token means (`mean`), before
        calibration. `use_cache=False` runs one full, uncached forward per text and label: the reference."""
        out = np.zeros((len(texts), len(self.label_names)))
        ids = [self.text_ids(str(text)) for text in texts]
        step = self.config.texts_per_forward
        with torch.inference_mode():
            for first in range(0, len(ids), step if use_cache else 1):
                group = ids[first:first + step] if use_cache else ids[first:first + 1]
                per_text = self._tree_logps(group) if use_cache else [self._plain_logps(group[0])]
                for row, logps in enumerate(per_text, start=first):
                    for col, lp in enumerate(logps):
                        out[row, col] = float(lp.sum() if self.config.score == "sum" else lp.mean())
        return out

    def _plain_logps(self, ids: list[int]) -> list[torch.Tensor]:
        start = len(self.prefix_ids) + len(ids)
        result = []
        for answer in self._answers:
            seq = torch.tensor([self.prefix_ids + ids + answer], device=self._device)
            logits = self.model(input_ids=seq, use_cache=False).logits[0].float()
            logp = torch.log_softmax(logits[start - 1:start - 1 + len(answer)], dim=-1)
            result.append(logp.gather(1, torch.tensor(answer, device=logp.device)[:, None])[:, 0])
        return result

    def _tree_logps(self, group: list[list[int]]) -> list[list[torch.Tensor]]:
        """One forward over the cached prefix for several texts, each packed as a tree: the text's tokens, then
        each answer's tokens (all but its last) as a branch.

        A text at positions P ... P+T-1 (P = prefix length) sees the prefix and its own earlier tokens; branch b
        sits at positions P+T ... and sees the prefix, the whole text and its own earlier tokens only. So every
        branch computes what a separate sequence prefix + text + answer_b would, and the texts packed together
        never see each other. Each answer's first token is predicted by its text's last position. Packing
        several texts makes the weight matrices' reads (the cost of a short forward on a CPU) serve them all.
        """
        from transformers import DynamicCache

        p = len(self.prefix_ids)
        branches = [a[:-1] for a in self._answers]
        tokens, positions, trees = [], [], []  # trees: (offset of the text, its length, branch offsets)
        for ids in group:
            at, t = len(tokens), len(ids)
            tokens += ids
            positions += range(p, p + t)
            starts = []
            for b in branches:
                starts.append(len(tokens))
                tokens += b
                positions += range(p + t, p + t + len(b))
            trees.append((at, t, starts))
        q = len(tokens)
        allowed = torch.zeros(q, p + q, dtype=torch.bool)
        allowed[:, :p] = True
        for at, t, starts in trees:
            allowed[at:at + t, p + at:p + at + t] = torch.ones(t, t, dtype=torch.bool).tril()
            for start, b in zip(starts, branches):
                allowed[start:start + len(b), p + at:p + at + t] = True
                allowed[start:start + len(b), p + start:p + start + len(b)] = torch.ones(
                    len(b), len(b), dtype=torch.bool).tril()
        dtype, device = next(self.model.parameters()).dtype, self._device
        mask = torch.zeros(1, 1, q, p + q, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        # the positions whose next-token distribution is read: each text's last token and every branch token
        keep = []
        for at, t, starts in trees:
            keep += [at + t - 1, *range(at + t, (starts[-1] + len(branches[-1])) if starts else at + t)]
        row_of = {pos: row for row, pos in enumerate(keep)}
        # a fresh cache per forward over the stored prefix tensors (the forward appends; they stay unchanged)
        cache = DynamicCache(ddp_cache_data=self._prefix_kv) if self._prefix_kv else DynamicCache()
        logits = self.model(input_ids=torch.tensor([tokens], device=device), attention_mask=mask.to(device),
                            position_ids=torch.tensor([positions], device=device), use_cache=True,
                            logits_to_keep=torch.tensor(keep, device=device),
                            **{self._cache_arg: cache}).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        result = []
        for at, t, starts in trees:
            per_answer = []
            for answer, start in zip(self._answers, starts):
                rows = [row_of[at + t - 1]] + [row_of[start + j] for j in range(len(answer) - 1)]
                per_answer.append(logp[torch.tensor(rows, device=logp.device),
                                       torch.tensor(answer, device=logp.device)])
            result.append(per_answer)
        return result

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), len(label_names)) probabilities; updates `cost` with this call's seconds per text."""
        t0, c0 = time.perf_counter(), time.process_time()
        scores = self.label_scores(texts) - self._bias
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        n = max(len(texts), 1)
        # CPU seconds too: on a shared machine wall time also counts the other processes' turns
        self.cost.update(texts=len(texts), seconds=seconds, seconds_per_text=seconds / n, cpu_seconds_per_text=cpu / n)
        scores = scores - scores.max(axis=1, keepdims=True)
        probs = np.exp(scores)
        return probs / probs.sum(axis=1, keepdims=True)

    def predict(self, texts: Sequence[str]) -> list[str]:
        return [self.label_names[i] for i in self.predict_proba(texts).argmax(axis=1)]

    # --- data-only persistence -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        cfg = asdict(self.config)
        return {"format": FORMAT, "version": VERSION, "model": self.model_alias, "label_names": self.label_names,
                "config": cfg, "examples": [{"text": t, "label": lab} for t, lab in self.examples],
                "prompt_prefix": self.prompt_prefix, "prefix_tokens": len(self.prefix_ids)}

    def save(self, directory: str | Path) -> Path:
        """Write `directory/in_context.json` (data only), atomically; an unrelated folder is never replaced."""
        text = json.dumps(self.to_dict(), ensure_ascii=False, indent=1)
        return write_dir_atomically(directory, lambda tmp: (tmp / FILE).write_text(text, encoding="utf-8"),
                                    markers=(FILE,))


def _resolve(model: str | Base | nn.Module, tokenizer: Any) -> tuple[nn.Module, Any, str | None]:
    if isinstance(model, str):
        base = load_base(model, task="causal-lm")
        return base.model, base.tokenizer, base.name
    if isinstance(model, Base):
        return model.model, model.tokenizer, model.name
    if tokenizer is None:
        raise ModelError("in-context scoring needs the model's tokenizer: pass tokenizer=... or a zoo alias")
    return model, tokenizer, None


def fit(texts: Sequence[str], labels: Sequence[str], label_names: Sequence[str] | None = None, *, k: int = 8,
        seed: int = 0, model: str | Base | nn.Module = "smollm2", tokenizer: Any = None,
        config: InContextConfig | None = None, **options: Any) -> InContextModel:
    """Choose `k` examples per class (seeded, balanced) and build the prompt; nothing is trained.

    Args:
        texts, labels: the labelled pool (single-label text).
        label_names: the classes, in probability-column order; default: the sorted distinct labels.
        k, seed: examples per class and the seed that picks and orders them.
        model: a zoo alias (default `smollm2`), a loaded `Base`, or a causal LM module (then pass `tokenizer`).
        config: every other setting (`InContextConfig`); `options` override its fields by name.
    """
    if len(texts) != len(labels):
        raise DataError(f"{len(texts)} texts but {len(labels)} labels; give one label per text")
    names = list(label_names) if label_names is not None else sorted({str(lab) for lab in labels})
    if len(names) < 2:
        raise DataError("in-context classification needs at least 2 label names")
    unseen = sorted({str(lab) for lab in labels} - set(names))
    if unseen:
        raise DataError(f"label {unseen[0]!r} is not among the label names {', '.join(names)}; add it or drop it")
    base_cfg = asdict(config) if config is not None else {}
    cfg = InContextConfig.from_options({**base_cfg, "k": k, "seed": seed, **options})
    chosen = select_examples([str(lab) for lab in labels], names, cfg.k, cfg.seed)
    module, tok, alias = _resolve(model, tokenizer)
    return InContextModel(module, tok, names, [(str(texts[i]), str(labels[i])) for i in chosen], cfg, alias)


def load(directory: str | Path, *, model: str | Base | nn.Module | None = None,
         tokenizer: Any = None) -> InContextModel:
    """An `InContextModel` from `directory/in_context.json` on its base (the saved alias unless `model` is given);
    the prompt is rebuilt and must equal the saved one (else another chat template or tokenizer is in use)."""
    path = Path(directory) / FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{directory} holds no {FILE}: pass a directory written by InContextModel.save") from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} is not readable JSON ({e}); save the model again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not an in-context model file (format {FORMAT!r})")
    if data.get("version") != VERSION:
        raise ArtifactError(f"{path} has version {data.get('version')!r}; this graftune reads version {VERSION}")
    if model is None:
        if not data.get("model"):
            raise ArtifactError(f"{path} was fitted on a model passed in code: pass the same model to load()")
        model = data["model"]
    module, tok, alias = _resolve(model, tokenizer)
    try:
        cfg = InContextConfig.from_options(data["config"])
        examples = [(str(e["text"]), str(e["label"])) for e in data["examples"]]
        names = [str(n) for n in data["label_names"]]
    except (KeyError, TypeError) as e:
        raise ArtifactError(f"{path} is incomplete ({e}); save the model again") from None
    fitted = InContextModel(module, tok, names, examples, cfg, alias or data.get("model"))
    if fitted.prompt_prefix != data.get("prompt_prefix"):
        raise ArtifactError(f"{path}: the prompt rebuilt with this model's tokenizer differs from the saved one; "
                            f"load it with the model it was fitted on ({data.get('model')})")
    return fitted

