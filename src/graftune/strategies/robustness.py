"""Robustness of a trained text classifier: accuracy under noise, and a greedy character-level attack.

``robustness(RUN_DIR)`` scores the run's own test split (rebuilt from run.yaml exactly as ``evaluate_run`` does)
or ``data``:

- **perturbation curves**: accuracy after each of four seeded perturbations at each strength ``s`` in
  ``STRENGTHS``: ``char_noise`` (each non-space character, with probability s, is deleted, substituted or gets
  a letter inserted before it: typos), ``word_drop`` (each word dropped with probability s), ``word_swap``
  (round(s x words) swaps of two neighbouring words) and ``case`` (each word, with probability s, upper- or
  lower-cased; an uncased tokenizer such as MiniLM's does not see it, which the curve then shows).
  Perturbations are seeded per (seed, perturbation, strength, example): reruns give the same texts.
- **greedy attack** (black box, in the spirit of DeepWordBug, Gao et al. 2018, https://arxiv.org/abs/1801.04354):
  on up to ``attack_sample`` test examples the model gets right, score each of the first ``scan_words`` words
  by how much deleting it lowers the true label's probability (one query each), then, most important word
  first, apply the one character edit (swap, delete, substitute, insert; 4 candidates, one query each) that
  lowers the true label's probability most, one edit per word, until the prediction changes or ``budget`` edits
  are spent. At most 1 + scan_words + 4 x budget queries per text. The success rate is the fraction of attacked
  texts whose label changed; ``success_at[k]`` the fraction changed within k edits.

The result goes into the run's metrics.json under ``robustness`` (temp file + ``os.replace``: never half
written). Text classifiers only: image runs and causal-LM runs are refused with the reason (the
perturbations are edits of text; a causal-LM run has no label to flip).
"""

from __future__ import annotations

import json
import random
import re
import string
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graftune.data.splits import run_splits
from graftune.errors import DataError
from graftune.evaluate import load_run, predict, read_scored
from graftune.io.atomic import write_file_atomically

PERTURBATIONS = ("char_noise", "word_drop", "word_swap", "case")
STRENGTHS = (0.05, 0.1, 0.2)
BUDGET = 10
ATTACK_SAMPLE = 40
SCAN_WORDS = 64
_LETTERS = string.ascii_lowercase


# --- perturbations (pure, seeded) ------------------------------------------------------------------------------
def _rng(seed: int, *parts: Any) -> random.Random:
    """A generator seeded by a string: the same on every machine and Python run (no hash randomization)."""
    return random.Random(":".join(str(p) for p in (seed, *parts)))


def char_noise(text: str, strength: float, rng: random.Random) -> str:
    out = []
    for ch in text:
        if ch.isspace() or rng.random() >= strength:
            out.append(ch)
            continue
        op = rng.randrange(3)
        if op == 0:  # delete
            continue
        if op == 1:  # substitute
            out.append(rng.choice(_LETTERS))
        else:  # insert before
            out.extend((rng.choice(_LETTERS), ch))
    return "".join(out)


def word_drop(text: str, strength: float, rng: random.Random) -> str:
    words = text.split()
    kept = [w for w in words if rng.random() >= strength]
    return " ".join(kept or words[:1])


def word_swap(text: str, strength: float, rng: random.Random) -> str:
    words = text.split()
    for _ in range(round(strength * len(words)) if len(words) > 1 else 0):
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def case_change(text: str, strength: float, rng: random.Random) -> str:
    return " ".join((w.upper() if rng.random() < 0.5 else w.lower()) if rng.random() < strength else w
                    for w in text.split())


PERTURB: dict[str, Callable[[str, float, random.Random], str]] = {
    "char_noise": char_noise, "word_drop": word_drop, "word_swap": word_swap, "case": case_change}


def perturb(texts: Sequence[str], name: str, strength: float, *, seed: int = 0) -> list[str]:
    """``texts`` with perturbation ``name`` at ``strength``, each seeded by (seed, name, strength, its index)."""
    fn = PERTURB[name]
    return [fn(t, strength, _rng(seed, name, strength, i)) for i, t in enumerate(texts)]


# --- the attack ------------------------------------------------------------------------------------------------
def _char_edits(word: str, rng: random.Random) -> list[str]:
    """Four one-character edits of ``word``: swap two neighbours, delete, substitute, insert."""
    i = rng.randrange(len(word))
    j = rng.randrange(max(len(word) - 1, 1))
    swapped = word[:j] + word[j + 1:j + 2] + word[j] + word[j + 2:] if len(word) > 1 else word + word
    letter = rng.choice([c for c in _LETTERS if c != word[i].lower()])
    return [swapped, word[:i] + word[i + 1:], word[:i] + letter + word[i + 1:], word[:i] + letter + word[i:]]


def greedy_attack(texts: Sequence[str], labels: Sequence[str], predict_fn: Callable[[list[str]], list[dict]], *,
                  budget: int = BUDGET, scan_words: int = SCAN_WORDS, seed: int = 0) -> dict:
    """Attack each text (the rule is in the module docstring). ``predict_fn(texts)`` is the black box: one row
    per text with its predicted ``label`` and ``probabilities`` per class (``evaluate.predict``'s rows).
    ``labels`` are the true ones; every text should start out classified right. Returns the success rate,
    ``success_at`` per edit count, edits and queries used, and a few examples (before, after)."""
    pieces = [re.split(r"(\s+)", t) for t in texts]  # words at even positions, whitespace kept at odd ones
    queries = np.zeros(len(texts), dtype=int)
    order: list[list[int]] = []
    start = [row["probabilities"][y] for row, y in zip(predict_fn(list(texts)), labels)]
    queries += 1
    for k, parts in enumerate(pieces):  # importance: the drop in p(true) when a word is deleted
        slots = [i for i in range(0, len(parts), 2) if parts[i]][:scan_words]
        variants = ["".join(parts[:i] + [""] + parts[i + 1:]) for i in slots]
        drop = np.array([start[k] - row["probabilities"][labels[k]] for row in predict_fn(variants)])
        queries[k] += len(variants)
        order.append([slots[i] for i in np.argsort(-drop, kind="stable")])
    edits = np.zeros(len(texts), dtype=int)
    success = np.zeros(len(texts), dtype=bool)
    after = [labels[k] for k in range(len(texts))]
    for step in range(budget):
        active = [k for k in range(len(texts)) if not success[k] and step < len(order[k])]
        if not active:
            break
        candidates = []
        for k in active:
            slot = order[k][step]
            for variant in _char_edits(pieces[k][slot], _rng(seed, "attack", k, step)):
                candidates.append("".join(pieces[k][:slot] + [variant] + pieces[k][slot + 1:]))
        rows = predict_fn(candidates)
        for n, k in enumerate(active):
            mine = rows[4 * n:4 * n + 4]
            best = int(np.argmin([r["probabilities"][labels[k]] for r in mine]))
            slot = order[k][step]
            pieces[k][slot] = _char_edits(pieces[k][slot], _rng(seed, "attack", k, step))[best]
            edits[k] += 1
            queries[k] += 4
            after[k] = mine[best]["label"]
            success[k] = after[k] != labels[k]
    attacked = max(len(texts), 1)
    return {
        "attacked": len(texts), "success_rate": round(float(success.sum()) / attacked, 4),
        "success_at": {str(b): round(float((success & (edits <= b)).sum()) / attacked, 4) for b in range(1, budget + 1)},
        "mean_edits_when_successful": round(float(edits[success].mean()), 2) if success.any() else None,
        "queries": int(queries.sum()), "max_queries_per_text": int(queries.max()) if len(texts) else 0,
        "examples": [{"before": _short(texts[k]), "after": _short("".join(pieces[k])), "label": labels[k],
                      "predicted_after": after[k], "edits": int(edits[k])} for k in np.flatnonzero(success)[:3]],
    }


def _short(text: str, n: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= n else flat[:n - 3] + "..."


# --- on a run directory ------------------------------------------------------------------------------------------
def _test_split(run: Any, run_dir: str | Path, data: str | None) -> Any:
    """``data``'s every row, as ``graftune eval --data`` reads it; else the run's test split, checked against its
    data card (a data file changed since training is refused, not scored)."""
    if data is not None:
        return read_scored(data, kind=run.kind, multi_label=run.multi_label, **run.cfg.columns())
    return run_splits(run.cfg, run.kind, run_dir=run_dir, parts=("test",),
                      fix="pass --data TEST_FILE (or retrain)").test


def robustness(run_dir: str | Path, *, data: str | None = None, strengths: Sequence[float] = STRENGTHS,
               perturbations: Sequence[str] = PERTURBATIONS, sample: int | None = None, budget: int = BUDGET,
               attack_sample: int = ATTACK_SAMPLE, scan_words: int = SCAN_WORDS, seed: int = 0,
               batch_size: int = 32, write: bool = True, progress: Callable[[str], None] | None = None) -> dict:
    """Perturbation curves and the greedy attack on ``run_dir``'s test split (or ``data``); written into its
    metrics.json under ``robustness`` unless ``write=False``. The arguments are :func:`measure`'s."""
    check_options(strengths, perturbations)
    run = load_run(run_dir, expect="classifier")
    if run.kind != "classification":
        raise DataError(f"{run_dir} is an {run.kind} run: the robustness checks edit text, so they apply to text "
                        "classifiers only (not applicable to image or causal-LM runs)")
    if run.multi_label:
        raise DataError(f"{run_dir} is multi-label: robustness measures single-label accuracy (not applicable)")
    started = time.perf_counter()
    ds = _test_split(run, run_dir, data)
    unseen = sorted(set(ds.labels) - set(run.label_names))
    if unseen:
        raise DataError(f"{ds.origin}: labels the run was not trained on: {', '.join(unseen[:5])}")
    result = measure(lambda batch: predict(run, batch, batch_size=batch_size), ds.inputs, ds.labels,
                     strengths=strengths, perturbations=perturbations, sample=sample, budget=budget,
                     attack_sample=attack_sample, scan_words=scan_words, seed=seed, progress=progress)
    result = {"data": data or "the run's test split", **result, "seconds": round(time.perf_counter() - started, 1)}
    if write:
        write_metrics(Path(run_dir), result)
    return result


def check_options(strengths: Sequence[float], perturbations: Sequence[str]) -> None:
    """Refuse unknown perturbations and strengths outside (0, 1] (before any model loads)."""
    unknown = sorted(set(perturbations) - set(PERTURB))
    if unknown:
        raise DataError(f"unknown perturbation {unknown[0]!r}: use {', '.join(PERTURBATIONS)}")
    if any(not 0 < s <= 1 for s in strengths):
        raise DataError(f"strengths {list(strengths)}: each must be in (0, 1]")


def measure(predict_fn: Callable[[list[str]], list[dict]], texts: Sequence[str], labels: Sequence[str], *,
            strengths: Sequence[float] = STRENGTHS, perturbations: Sequence[str] = PERTURBATIONS,
            sample: int | None = None, budget: int = BUDGET, attack_sample: int = ATTACK_SAMPLE,
            scan_words: int = SCAN_WORDS, seed: int = 0, progress: Callable[[str], None] | None = None) -> dict:
    """Perturbation curves and the greedy attack on any black box: ``predict_fn(texts)`` gives one row per text
    with its ``label`` and ``probabilities`` per class (``evaluate.predict``'s rows). ``graftune robustness``
    calls it on a run; ``graftune compare --robustness`` on each strategy's model.

    Args:
        sample: score at most this many of ``texts`` (the first of a seeded shuffle); None: all of them.
        budget: character edits the attack may make per text. attack_sample: texts attacked at most (among
            those the model gets right, in the same seeded order). scan_words: words ranked by importance.
    """
    order = np.random.RandomState(seed).permutation(len(texts))
    order = order[:sample] if sample else order
    texts, labels = [texts[i] for i in order], [labels[i] for i in order]
    queries = [0]

    def counted(batch: list[str]) -> list[dict]:
        queries[0] += len(batch)
        return predict_fn(batch) if batch else []

    def predicted(batch: list[str]) -> list[str]:
        return [r["label"] for r in counted(batch)]

    def accuracy(batch: list[str]) -> float:
        return round(float(np.mean([p == y for p, y in zip(predicted(batch), labels)])), 4)

    say = progress or (lambda _msg: None)
    clean_pred = predicted(texts)
    clean = round(float(np.mean([p == y for p, y in zip(clean_pred, labels)])), 4)
    say(f"clean accuracy {clean:.3f} on {len(texts)} examples")
    curves: dict[str, dict[str, float]] = {}
    for name in perturbations:
        curves[name] = {}
        for s in strengths:
            curves[name][str(s)] = accuracy(perturb(texts, name, s, seed=seed))
            say(f"{name} {s}: {curves[name][str(s)]:.3f}")
    right = [k for k in range(len(texts)) if clean_pred[k] == labels[k]][:attack_sample]
    attack = greedy_attack([texts[k] for k in right], [labels[k] for k in right], counted, budget=budget,
                           scan_words=scan_words, seed=seed) if budget > 0 and right else None
    if attack is not None:
        attack.update({"budget": budget, "scan_words": scan_words,
                       "sample": f"the first {len(right)} correctly classified test examples (seeded order)"})
        say(f"attack: {attack['success_rate']:.3f} of {attack['attacked']} texts flipped within {budget} edits")
    return {"examples": len(texts), "seed": seed, "clean_accuracy": clean, "strengths": [float(s) for s in strengths],
            "accuracy": curves, "attack": attack, "queries": queries[0]}


def write_metrics(run_dir: Path, result: dict) -> None:
    """metrics.json with ``robustness`` set, written to a temp file in the same folder and renamed over it."""
    path = run_dir / "metrics.json"
    metrics = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    metrics["robustness"] = result
    write_file_atomically(path, json.dumps(metrics, indent=2) + "\n")


def format_table(result: dict) -> str:
    """The curves as a table (rows: perturbations, columns: strengths) and the attack in one line."""
    strengths = result["strengths"]
    lines = [f"clean accuracy {result['clean_accuracy']:.3f} on {result['examples']} examples ({result['data']})", "",
             f"{'accuracy under':<14} " + " ".join(f"{s:>7g}" for s in strengths)]
    for name, row in result["accuracy"].items():
        lines.append(f"{name:<14} " + " ".join(f"{row[str(s)]:>7.3f}" for s in strengths))
    attack = result["attack"]
    lines.append("")
    if attack is None:
        lines.append("attack: not run (no correctly classified example, or budget 0)")
    else:
        mean = attack["mean_edits_when_successful"]
        if mean is None:  # no text flipped: there is no mean to give
            flipped, how = "none", ""
        else:
            flipped, how = f"{attack['success_rate']:.1%}", f"mean {mean} edits when it worked; "
        lines.append(f"greedy character attack: {flipped} of {attack['attacked']} texts flipped within "
                     f"{attack['budget']} character edits ({how}{attack['queries']} queries)")
    return "\n".join(lines)
