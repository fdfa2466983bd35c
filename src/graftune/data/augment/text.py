"""Text augmentation for few-shot training sets: word edits, character noise, neighbour substitution, and new
examples written by a small language model.

Every function takes the training texts and labels (never the validation or test split: an augmented copy of a
test text in train inflates the score) and a seed, and returns a :class:`TextAugmented`: the NEW examples only
(add them to the originals yourself), the index of the original each one came from, and a short record for the
report.

- ``eda``: Easy Data Augmentation (Wei & Zou 2019, https://arxiv.org/abs/1901.11196): each new text gets one
  operation, random swap, deletion or insertion of about ``p`` of its words, or substitution when
  ``neighbours`` are given. EDA's synonyms come from WordNet, which is not shipped here: insertion copies a
  neighbour of a word of the text (or the word itself without neighbours).
- ``char_noise``: typos: swap, drop, insert or replace one character in about ``p`` of the words.
- ``neighbour_substitute``: replace about ``p`` of the words by one of their nearest neighbours in the base
  model's own input-embedding matrix (:class:`EmbeddingNeighbours`). Neighbours in that space are words used in
  similar contexts: often synonyms or siblings ("football" -> "soccer", "rugby"), sometimes antonyms
  ("rise" -> "fall"), so the label can change; check a few in the record.
- ``synthesize_with_lm``: few-shot prompts to an instruction-tuned decoder (SmolLM2 is shipped) asking for new
  texts of each class, optionally kept only when a classifier labels them as the intended class.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from graftune.errors import ConfigError, DataError

# Words that carry little topic information: never substituted (as in EDA).
STOPWORDS = frozenset({
    "a", "about", "above", "after", "again", "against", "all", "am", "an", "and", "any", "are", "as", "at", "be",
    "because", "been", "before", "being", "below", "between", "both", "but", "by", "can", "could", "did", "do",
    "does", "doing", "down", "during", "each", "few", "for", "from", "further", "had", "has", "have", "having", "he",
    "her", "here", "hers", "herself", "him", "himself", "his", "how", "i", "if", "in", "into", "is", "it", "its",
    "itself", "just", "me", "more", "most", "my", "myself", "no", "nor", "not", "now", "of", "off", "on", "once",
    "only", "or", "other", "our", "ours", "ourselves", "out", "over", "own", "same", "she", "should", "so", "some",
    "such", "than", "that", "the", "their", "theirs", "them", "themselves", "then", "there", "these", "they", "this",
    "those", "through", "to", "too", "under", "until", "up", "very", "was", "we", "were", "what", "when", "where",
    "which", "while", "who", "whom", "why", "will", "with", "would", "you", "your", "yours", "yourself", "yourselves",
    "said", "says", "also"
})

_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*[A-Za-z]$")


@dataclass
class TextAugmented:
    """New examples: ``texts[i]`` has label ``labels[i]`` and came from original ``source[i]`` (-1: generated)."""

    texts: list[str]
    labels: list
    source: list[int]
    record: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)


def _check(texts: Sequence[str], labels: Sequence[Any], n_per_example: int) -> None:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise DataError("texts: expected a list of strings")
    if len(texts) != len(labels):
        raise DataError(f"got {len(texts)} texts but {len(labels)} labels; pass one label per text")
    if not isinstance(n_per_example, int) or n_per_example < 1:
        raise ConfigError(f"n_per_example: got {n_per_example!r}; use a positive integer")


def _check_p(name: str, p: float) -> None:
    if not 0 <= p <= 1:
        raise ConfigError(f"{name}: got {p!r}; use a fraction in [0, 1]")


def _match_case(new: str, old: str) -> str:
    if old.isupper() and len(old) > 1:
        return new.upper()
    if old[:1].isupper():
        return new[:1].upper() + new[1:]
    return new


def _examples(pairs: list[tuple[str, str]], k: int = 3) -> list[dict]:
    return [{"before": a[:200], "after": b[:200]} for a, b in pairs[:k]]


# --- word-level operations (EDA) -------------------------------------------------------------------------------


def random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    """Swap two random positions, ``n`` times."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_delete(words: list[str], p: float, rng: random.Random) -> list[str]:
    """Drop each word with probability ``p``; at least one word always stays, and at least one goes."""
    if len(words) < 2:
        return list(words)
    keep = [w for w in words if rng.random() >= p]
    if len(keep) == len(words):  # nothing dropped: drop one, so the operation always changes the text
        i = rng.randrange(len(words))
        keep = words[:i] + words[i + 1:]
    return keep or [rng.choice(words)]


def random_insert(words: list[str], n: int, rng: random.Random,
                  related: Callable[[str], list[str]] | None = None) -> list[str]:
    """Insert ``n`` words at random positions: a neighbour of a random word of the text (``related``), or a copy
    of that word when it has none."""
    out = list(words)
    if not out:
        return out
    for _ in range(n):
        word = rng.choice(words)
        options = related(word) if related is not None else []
        out.insert(rng.randrange(len(out) + 1), rng.choice(options) if options else word)
    return out


def _substitute(words: list[str], p: float, rng: random.Random, related: Callable[[str], list[str]],
                at_least_one: bool = True) -> list[str]:
    """Replace each content word that has neighbours with probability ``p`` by one of them (case kept)."""
    out = list(words)
    candidates = []
    for i, w in enumerate(words):
        core = w.strip(".,;:!?\"()[]")
        if _WORD.match(core) and core.lower() not in STOPWORDS:
            candidates.append((i, w, core))
    chosen = [c for c in candidates if rng.random() < p]
    if not chosen and at_least_one and candidates:
        chosen = [rng.choice(candidates)]
    for i, w, core in chosen:
        options = related(core)
        if options:
            out[i] = w.replace(core, _match_case(rng.choice(options), core), 1)
    return out


def eda(texts: Sequence[str], labels: Sequence[Any], *, n_per_example: int = 4, p: float = 0.1,
        ops: Sequence[str] = ("swap", "delete", "insert"), neighbours: EmbeddingNeighbours | None = None,
        seed: int = 0) -> TextAugmented:
    """EDA: ``n_per_example`` new texts per text, each made by ONE operation drawn from ``ops`` (``swap``,
    ``delete``, ``insert``, and ``substitute`` which needs ``neighbours``), changing about ``p`` of the words
    (at least one)."""
    _check(texts, labels, n_per_example)
    _check_p("p", p)
    known = ("swap", "delete", "insert", "substitute")
    bad = [o for o in ops if o not in known]
    if bad or not ops:
        raise ConfigError(f"ops: got {list(ops)!r}; use some of {', '.join(known)}")
    if "substitute" in ops and neighbours is None:
        raise ConfigError("ops: 'substitute' needs neighbours=EmbeddingNeighbours(model, tokenizer)")
    related = neighbours.words if neighbours is not None else None
    rng = random.Random(seed)
    out_texts, out_labels, source, used, changed, pairs = [], [], [], dict.fromkeys(ops, 0), [], []
    for i, (text, label) in enumerate(zip(texts, labels)):
        words = text.split()
        n = max(1, round(p * len(words)))
        for _ in range(n_per_example):
            op = rng.choice(list(ops))
            if op == "swap":
                new = random_swap(words, n, rng)
            elif op == "delete":
                new = random_delete(words, p, rng)
            elif op == "insert":
                new = random_insert(words, n, rng, related)
            else:
                new = _substitute(words, p, rng, related)
            used[op] += 1
            new_text = " ".join(new)
            out_texts.append(new_text)
            out_labels.append(label)
            source.append(i)
            changed.append(_changed_fraction(words, new))
            pairs.append((text, new_text))
    record = {"op": "eda", "p": p, "n_per_example": n_per_example, "seed": seed, "ops": used,
              "new": len(out_texts), "mean_changed_words": _mean(changed), "examples": _examples(pairs)}
    return TextAugmented(out_texts, out_labels, source, record)


def _changed_fraction(before: list[str], after: list[str]) -> float:
    """1 - (words of ``before`` found, in order, in ``after``) / len(before): a cheap edit measure."""
    if not before:
        return 0.0
    from difflib import SequenceMatcher

    same = sum(b.size for b in SequenceMatcher(None, before, after, autojunk=False).get_matching_blocks())
    return 1 - same / len(before)


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


# --- character noise -------------------------------------------------------------------------------------------


def _typo(word: str, rng: random.Random) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = rng.randrange(len(word))
    kind = rng.choice(("swap", "drop", "insert", "replace")) if len(word) > 2 else rng.choice(("insert", "replace"))
    if kind == "swap":
        i = min(i, len(word) - 2)
        if word[i] == word[i + 1]:
            kind = "replace"
        else:
            return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == "drop":
        return word[:i] + word[i + 1:]
    if kind == "insert":
        return word[:i] + rng.choice(letters) + word[i:]
    new = rng.choice([c for c in letters if c != word[i].lower()])
    return word[:i] + (new.upper() if word[i].isupper() else new) + word[i + 1:]


def char_noise(texts: Sequence[str], labels: Sequence[Any], *, p: float = 0.05, n_per_example: int = 1,
               seed: int = 0) -> TextAugmented:
    """Typos in about ``p`` of the alphabetic words (at least one per text): swap two neighbouring letters, drop,
    insert or replace one letter."""
    _check(texts, labels, n_per_example)
    _check_p("p", p)
    rng = random.Random(seed)
    out_texts, out_labels, source, changed, pairs = [], [], [], [], []
    for i, (text, label) in enumerate(zip(texts, labels)):
        words = text.split()
        eligible = [k for k, w in enumerate(words) if w.isalpha() and len(w) > 1]
        for _ in range(n_per_example):
            picked = [k for k in eligible if rng.random() < p] or (eligible and [rng.choice(eligible)]) or []
            new = list(words)
            for k in picked:
                new[k] = _typo(words[k], rng)
            new_text = " ".join(new)
            out_texts.append(new_text)
            out_labels.append(label)
            source.append(i)
            changed.append(_changed_fraction(words, new))
            pairs.append((text, new_text))
    record = {"op": "char_noise", "p": p, "n_per_example": n_per_example, "seed": seed, "new": len(out_texts),
              "mean_changed_words": _mean(changed), "examples": _examples(pairs)}
    return TextAugmented(out_texts, out_labels, source, record)


# --- embedding-space neighbours --------------------------------------------------------------------------------


def _word_of(token: str, wordpiece: bool) -> str | None:
    """The whole word a vocabulary entry stands for, or None for subword pieces and special tokens.

    WordPiece (BERT): ``##`` marks a continuation; anything else is a word start. SentencePiece (``▁word``) and
    byte-level BPE (``Ġword``) mark word starts instead; unmarked entries there are continuations.
    """
    if wordpiece:
        word = None if token.startswith("##") else token
    elif token[:1] in ("▁", "Ġ"):
        word = token[1:]
    else:
        word = None
    if word is None or not word.isalpha() or len(word) < 2 or not word.isascii():
        return None
    return word


def _same_stem(a: str, b: str) -> bool:
    a, b = a.lower(), b.lower()
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n >= min(4, min(len(a), len(b)) - 1)


class EmbeddingNeighbours:
    """Nearest neighbours of whole words in a model's input-embedding matrix (cosine similarity).

    Only vocabulary entries that are whole alphabetic words take part (no ``##`` pieces, no special tokens, no
    punctuation or numbers), and a query must itself be one such entry (else it has no neighbours). The
    normalized matrix of those rows is built on first use; each word's neighbours are computed once and cached.

    Args:
        model: a base, an AdapterModel or a zoo ``Base`` (its ``get_input_embeddings()`` is read, never changed).
        tokenizer: its tokenizer (the vocabulary).
        k: neighbours kept per word.
        min_similarity: neighbours below this cosine similarity are dropped.
        distinct_stems: skip neighbours that are forms of the same word (``film`` -> ``films``, ``filmmaker``):
            those sharing a prefix with the query of min(4, shorter length - 1) letters or more.
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, k: int = 5, min_similarity: float = 0.3,
                 distinct_stems: bool = True):
        if not isinstance(model, nn.Module) and hasattr(model, "model"):
            tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
            model = model.model
        model = getattr(model, "base", model)
        if tokenizer is None:
            raise ConfigError("tokenizer: none given; pass the model's tokenizer")
        if not callable(getattr(model, "get_input_embeddings", None)) or model.get_input_embeddings() is None:
            raise ConfigError(f"{type(model).__name__} has no input embeddings; neighbours need a text model")
        if not isinstance(k, int) or k < 1:
            raise ConfigError(f"k: got {k!r}; use a positive integer")
        self.model, self.tokenizer, self.k, self.min_similarity = model, tokenizer, k, min_similarity
        self.distinct_stems = distinct_stems
        self.lowercase = bool(getattr(tokenizer, "do_lower_case", False))
        self._matrix: torch.Tensor | None = None
        self._words: list[str] = []
        self._row: dict[str, int] = {}
        self._cache: dict[str, list[tuple[str, float]]] = {}

    def _build(self) -> None:
        vocab = self.tokenizer.get_vocab()
        wordpiece = any(t.startswith("##") for t in vocab)
        special = set(getattr(self.tokenizer, "all_special_tokens", []))
        weight = self.model.get_input_embeddings().weight
        rows, ids = {}, []
        for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
            word = _word_of(token, wordpiece) if token not in special else None
            if word is None or idx >= weight.shape[0]:
                continue
            key = word.lower() if self.lowercase else word
            if key not in rows:
                rows[key] = len(ids)
                ids.append(idx)
        with torch.no_grad():
            m = weight.detach()[torch.tensor(ids, dtype=torch.long, device=weight.device)].float().cpu()
        self._matrix = torch.nn.functional.normalize(m, dim=-1)
        self._words = list(rows)
        self._row = rows

    def neighbours(self, word: str) -> list[tuple[str, float]]:
        """Up to ``k`` (word, cosine similarity) pairs, most similar first; [] for words not in the vocabulary."""
        if self._matrix is None:
            self._build()
        key = word.lower() if self.lowercase else word
        if key not in self._cache:
            row = self._row.get(key)
            if row is None:
                self._cache[key] = []
            else:
                sims = self._matrix @ self._matrix[row]
                sims[row] = -2.0
                top = torch.topk(sims, min(self.k * 8 if self.distinct_stems else self.k, len(sims) - 1))
                found = [(self._words[i], round(float(s), 4)) for s, i in
                         zip(top.values.tolist(), top.indices.tolist()) if s >= self.min_similarity]
                if self.distinct_stems:
                    found = [(w, s) for w, s in found if not _same_stem(key, w)]
                self._cache[key] = found[:self.k]
        return self._cache[key]

    def words(self, word: str) -> list[str]:
        """The neighbour words alone."""
        return [w for w, _ in self.neighbours(word)]


def neighbour_substitute(texts: Sequence[str], labels: Sequence[Any], neighbours: EmbeddingNeighbours, *,
                         p: float = 0.15, n_per_example: int = 1, seed: int = 0) -> TextAugmented:
    """Replace about ``p`` of the content words (not stop words; at least one per text) by a random one of their
    embedding-space neighbours, keeping capitalization."""
    _check(texts, labels, n_per_example)
    _check_p("p", p)
    rng = random.Random(seed)
    out_texts, out_labels, source, changed, pairs, swaps = [], [], [], [], [], []
    for i, (text, label) in enumerate(zip(texts, labels)):
        words = text.split()
        for _ in range(n_per_example):
            new = _substitute(words, p, rng, neighbours.words)
            new_text = " ".join(new)
            out_texts.append(new_text)
            out_labels.append(label)
            source.append(i)
            changed.append(_changed_fraction(words, new))
            pairs.append((text, new_text))
            swaps += [(a, b) for a, b in zip(words, new) if a != b][:2]
    record = {"op": "neighbour_substitute", "p": p, "k": neighbours.k, "n_per_example": n_per_example,
              "seed": seed, "new": len(out_texts), "mean_changed_words": _mean(changed),
              "substitutions": [f"{a} -> {b}" for a, b in swaps[:10]], "examples": _examples(pairs)}
    return TextAugmented(out_texts, out_labels, source, record)


# --- synthetic examples from a language model ------------------------------------------------------------------


def _shorten(text: str, max_words: int) -> str:
    words = text.split()
    return " ".join(words[:max_words]) + (" ..." if len(words) > max_words else "")


def build_prompt(label: str, examples: Sequence[str], *, max_words: int = 60) -> list[dict]:
    """Chat messages asking for one new text of class ``label``, shown a few ``examples`` of it."""
    shown = "\n".join(f"Example {k + 1}: {_shorten(t, max_words)}" for k, t in enumerate(examples))
    return [
        {"role": "system", "content": "You write short, realistic texts for a data set."},
        {"role": "user", "content": f"Here are texts of the category \"{label}\".\n{shown}\n\nWrite one new text "
                                    f"of the category \"{label}\", different from the examples. Answer with the text "
                                    f"only."},
    ]


def _clean(text: str) -> str:
    text = text.strip().strip('"').strip()
    text = re.sub(r"^(example \d+|new text|text)\s*:\s*", "", text, flags=re.IGNORECASE)
    return " ".join(text.split())


def _hf_generate(model: nn.Module, tokenizer: Any, prompts: list[list[dict]], *, max_new_tokens: int,
                 temperature: float, top_p: float, batch_size: int) -> list[str]:
    """Sample one completion per chat prompt with a Hugging Face causal LM (left padding, new tokens only)."""
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in prompts]
    else:  # a tokenizer without a chat template: a plain completion prompt
        texts = ["\n".join(m["content"] for m in msgs) + "\n" for msgs in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(texts), batch_size):
            ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[start:start + batch_size]]
            width = max(len(s) for s in ids)
            input_ids = torch.full((len(ids), width), pad_id if pad_id is not None else 0, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for r, s in enumerate(ids):
                input_ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
                mask[r, width - len(s):] = 1
            with torch.no_grad():
                gen = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                     temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                     pad_token_id=pad_id)
            out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return out


def synthesize_with_lm(generator_model: nn.Module | Callable[[list[list[dict]]], list[str]], tokenizer: Any,
                       examples_by_class: dict[str, Sequence[str]], n_per_class: int, seed: int = 0,
                       filter_model: Callable[[list[str]], Sequence[Any]] | None = None, *,
                       shots_in_prompt: int = 3, max_new_tokens: int = 120, temperature: float = 0.8,
                       top_p: float = 0.95, max_words_in_prompt: int = 60, batch_size: int = 8,
                       min_words: int = 5) -> TextAugmented:
    """Ask a decoder LM for ``n_per_class`` new texts of each class, from few-shot chat prompts.

    Args:
        generator_model: a causal LM (plain, AdapterModel or zoo ``Base``) used with ``tokenizer`` and its chat
            template, or any callable taking a list of chat-message lists and returning one string per prompt.
        tokenizer: the LM's tokenizer (None for a callable generator, or taken from a zoo ``Base``).
        examples_by_class: class name -> its training texts; each prompt shows ``shots_in_prompt`` of them
            (a seeded draw per prompt, shortened to ``max_words_in_prompt`` words).
        n_per_class: prompts per class (each yields at most one new text).
        seed: seeds the example draws and the sampling.
        filter_model: a classifier (texts -> labels); a generated text is kept only when it is labelled as the
            class it was asked for. Without one, every non-empty, new text is kept: read the record's samples.
        min_words: shorter generations are dropped.

    Returns the kept texts, their intended labels (``source`` is -1) and a record: generated, kept and rejected
    counts per class, and a few rejected texts with the label the filter gave them.
    """
    if not isinstance(n_per_class, int) or n_per_class < 1:
        raise ConfigError(f"n_per_class: got {n_per_class!r}; use a positive integer")
    if not examples_by_class or any(len(v) == 0 for v in examples_by_class.values()):
        raise DataError("examples_by_class: give at least one training text for every class")
    if not isinstance(generator_model, nn.Module) and hasattr(generator_model, "model"):
        tokenizer = tokenizer if tokenizer is not None else getattr(generator_model, "tokenizer", None)
        generator_model = generator_model.model
    if isinstance(generator_model, nn.Module) and tokenizer is None:
        raise ConfigError("tokenizer: a model generator needs its tokenizer")
    rng = random.Random(seed)
    prompts, intended = [], []
    for label, texts in examples_by_class.items():
        for _ in range(n_per_class):
            shown = rng.sample(list(texts), min(shots_in_prompt, len(texts)))
            prompts.append(build_prompt(label, shown, max_words=max_words_in_prompt))
            intended.append(label)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(generator_model, nn.Module):
            raw = _hf_generate(generator_model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, batch_size=batch_size)
        else:
            raw = list(generator_model(prompts))
    if len(raw) != len(prompts):
        raise DataError(f"the generator returned {len(raw)} texts for {len(prompts)} prompts")
    seen = {" ".join(t.split()).lower() for texts in examples_by_class.values() for t in texts}
    candidates, dropped = [], {"empty_or_short": 0, "duplicate": 0}
    for text, label in zip(raw, intended):
        text = _clean(text)
        if len(text.split()) < min_words:
            dropped["empty_or_short"] += 1
            continue
        key = text.lower()
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        candidates.append((text, label))
    predicted = list(filter_model([t for t, _ in candidates])) if filter_model and candidates else None
    kept, rejected = [], []
    for k, (text, label) in enumerate(candidates):
        if predicted is not None and predicted[k] != label:
            rejected.append({"intended": label, "predicted": predicted[k], "text": text[:200]})
        else:
            kept.append((text, label))
    per_class = {c: {"asked": n_per_class, "kept": sum(1 for _, lab in kept if lab == c),
                     "rejected_by_filter": sum(1 for r in rejected if r["intended"] == c)} for c in examples_by_class}
    record = {"op": "synthesize_with_lm", "seed": seed, "asked": len(prompts), "kept": len(kept),
              "dropped": dropped, "filtered": filter_model is not None, "per_class": per_class,
              "rejected_samples": rejected[:5], "kept_samples": [t[:200] for t, _ in kept[:3]]}
    return TextAugmented([t for t, _ in kept], [lab for _, lab in kept], [-1] * len(kept), record)
