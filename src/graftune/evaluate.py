"""Evaluation, prediction and generation on a finished run directory (``graftune eval / predict / generate``).

A run directory is loaded back by ``runs.load_run`` (its recipe rebuilds the model from ``run.yaml`` and what it
saved); the metrics are those ``run.scoring`` computes while a run trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from graftune.data.checks import empty_texts_removed, split_warnings
from graftune.data.inputs import (  # noqa: F401 (read_image: re-exported)
    read_image,
    read_input_file,
)
from graftune.data.sources import ALIASES, Dataset, example_places, load_data
from graftune.data.splits import run_splits
from graftune.errors import DataError
from graftune.recipes.fewshot_run import predict_rows, score
from graftune.run.loaded import LoadedRun
from graftune.run.scoring import (
    group_metrics,
    logits_of,
    probability_rows,
    score_causal_lm,
    score_classification,
    score_probabilities,
)
from graftune.runs import load_run
from graftune.tasks.classification import probabilities


def evaluate_run(run_dir: str | Path, *, data: str | None = None, text_column: str | None = None,
                 label_column: str | None = None, prompt_column: str | None = None,
                 response_column: str | None = None, batch_size: int = 32, generate: bool = True,
                 quantize: str | None = None, group_column: str | None = None) -> dict:
    """Metrics of a run on ``data`` (every row, read by :func:`read_scored`), or, without ``data``, on the run's own
    test split (rebuilt from run.yaml: same data, seed and split settings; refused when the data file has changed
    since, see ``data.splits.run_splits``). ``quantize="int8"``: see :func:`load_run`; the metrics
    then say ``"quantize": "int8"``.

    ``group_column``: a column of the scored file (``data``, or the run's test file, or its data file when the
    test split was carved from it: each test example keeps its group through the split); the metrics then hold
    ``groups``, ``run.scoring.group_metrics`` of the predictions (kept from the same pass)."""
    run = load_run(run_dir, quantize=quantize)
    cfg = run.cfg
    if group_column is not None and (run.kind == "causal-lm" or run.multi_label):
        raise DataError(f"--group-column: per-group accuracy needs one label per example; this is a "
                        f"{'causal-LM' if run.kind == 'causal-lm' else 'multi-label'} run (not applicable)")
    columns = {"text_column": text_column or cfg.text_column, "label_column": label_column or cfg.label_column,
               "prompt_column": prompt_column or cfg.prompt_column,
               "response_column": response_column or cfg.response_column}
    if data is None:
        for name in ("data", "test"):  # run.yaml from before paths were recorded absolute, or edited by hand
            value = getattr(cfg, name)
            if value and not Path(value).is_absolute() and not Path(value).exists() and value not in ALIASES:
                raise DataError(f"run.yaml names {name} {value} relative to the folder the run was trained in: run "
                                "eval from there, or pass --data FILE")
        ds = run_splits(cfg, run.kind, run_dir=run_dir, parts=("test",), group_column=group_column,
                        fix="pass --data TEST_FILE (or retrain)").test
    else:
        ds = read_scored(data, kind=run.kind, multi_label=run.multi_label, group_column=group_column, **columns)
    quantized = {"quantize": run.quantize} if run.quantize != "none" else {}
    if run.kind == "causal-lm":
        return score_causal_lm(run.task, run.model, ds.inputs, batch_size=min(batch_size, 8), policy=run.policy,
                               generate=generate, max_new_tokens=cfg.max_new_tokens) | quantized
    unseen = sorted({n for lab in ds.labels for n in (lab if ds.multi_label else (lab,))} - set(run.label_names))
    if unseen:
        raise DataError(f"{ds.origin}: labels the run was not trained on: {', '.join(unseen[:5])}; "
                        f"it knows {', '.join(run.label_names)}")
    keep = group_column is not None  # the per-example predictions, for the per-group metrics
    if run.predictor is not None:
        metrics = score_probabilities(run.predictor.predict_proba(list(ds.inputs)), ds.labels, run.label_names,
                                      predictions=keep)
    elif run.fewshot is not None:  # contrastive/probe: at the saved embedding batch size (padding as in training)
        metrics = score(run.fewshot, ds.inputs, ds.labels, run.label_names, predictions=keep)
    else:
        metrics = score_classification(run.task, run.model, run.head, ds.inputs, ds.labels, batch_size=batch_size,
                                       policy=run.policy, predictions=keep) | quantized
    if keep:
        metrics["groups"] = {"column": group_column, **group_metrics(ds.labels, metrics.pop("predicted"), ds.groups,
                                                                     run.label_names)}
    # rows of --data dropped for an empty text, said as train says them (the run's own split: said when it trained)
    warnings = split_warnings({"empty_texts_removed": empty_texts_removed(ds)}) if data is not None else []
    return metrics | ({"warnings": warnings} if warnings else {})


def read_scored(data: str, *, kind: str, multi_label: bool, group_column: str | None = None,
                **columns: str) -> Dataset:
    """Every row of ``data`` to score a run on, its labels read as the run reads them.

    Duplicates are kept: a test file's rows are its test examples, and dropping some would score fewer than the
    file holds (training deduplicates so that a text cannot land in train and test at once; scoring has no such
    risk). Scoring is not training: a file of one class will do.

    A file is multi-label as soon as one label cell holds "|" or a list (``data.sources``). For a multi-label run
    every cell is a set of labels, a single name a set of one. A single-label run refuses a row with several
    labels (or none) in one line naming it; a file whose every row holds one label, however written (``["a"]``),
    is read as single-label."""
    ds = load_data(data, task=kind, min_classes=1, dedup=False, group_column=group_column,
                   multi_label=True if multi_label else None, **columns)
    if ds.modality == "pairs" or ds.multi_label == multi_label:
        return ds
    if multi_label:  # a built-in alias: single-label whatever is asked
        return replace(ds, labels=[[label] for label in ds.labels], multi_label=True)
    bad = next((i for i, names in enumerate(ds.labels) if len(names) != 1), None)
    if bad is None:
        return replace(ds, labels=[names[0] for names in ds.labels], multi_label=False)
    held = f"several labels ('{'|'.join(ds.labels[bad])}')" if ds.labels[bad] else "no label"
    raise DataError(f"this run is single-label; {_row_place(data, ds, bad)} "
                    f"holds {held}: score it on a file with one label per row")


def _row_place(data: str, ds: Dataset, index: int) -> str:
    """Where example ``index`` of ``data`` (read without dedup: the file's records in order) is, as ``data.sources``
    and ``predict --input`` name it: 'FILE line N' (CSV/TSV/JSONL), 'FILE record N' (JSON), 'FILE row N' (Parquet);
    else 'FILE example N' (counting from 1): ``data.sources.example_places``."""
    return f"{data} {example_places(data, ds)[index]}"


def predict(run: LoadedRun, inputs: Sequence[Any], *, batch_size: int = 32) -> list[dict]:
    """One dict per input: ``label`` (or ``labels`` for multi-label) and ``probabilities`` per class."""
    if run.kind == "causal-lm":
        raise DataError("this run is a causal-LM run: use `graftune generate RUN_DIR \"prompt\"`")
    if run.predictor is not None:
        return probability_rows(run.predictor.predict_proba(list(inputs)), run.label_names)
    if run.fewshot is not None:
        return predict_rows(run.fewshot, list(inputs), run.label_names)
    logits = logits_of(run.task, run.model, run.head, list(inputs), batch_size=batch_size, policy=run.policy)
    probs = probabilities(logits, run.multi_label)
    out = []
    for row in probs:
        p = {name: round(float(v), 6) for name, v in zip(run.label_names, row)}
        if run.multi_label:
            out.append({"labels": [n for n, v in p.items() if v >= 0.5], "probabilities": p})
        else:
            out.append({"label": run.label_names[int(row.argmax())], "probabilities": p})
    return out


def generate(run: LoadedRun, prompts: Sequence[str], *, max_new_tokens: int | None = None) -> list[str]:
    """Greedy answers of a causal-LM run to ``prompts``."""
    if run.kind != "causal-lm":
        raise DataError("this run is a classifier: use `graftune predict RUN_DIR TEXT` (generate is for causal-LM "
                        "runs)")
    limit = max_new_tokens or run.cfg.max_new_tokens
    blank = next((i for i, p in enumerate(prompts) if not str(p).strip()), None)
    if blank is not None:  # the model would answer nothing in particular, fluently
        raise DataError(f"prompt {blank + 1} is empty; pass the text to answer")
    ids = [run.task.prompt_ids(p) for p in prompts]
    found = run.task.first_too_long(ids, limit)
    if found is not None:  # refused, as the server refuses it: the run was trained on pairs of max_length tokens
        i, tokens, room = found
        fits = run.task.max_length - tokens  # the answer room this prompt would leave
        fix = (f"shorten it, or pass --max-new-tokens {fits} or fewer" if fits > 0 else
               f"shorten it below {run.task.max_length} tokens")
        raise DataError(f"prompt {i + 1} is {tokens} tokens; this run takes at most {room} (its max_length "
                        f"{run.task.max_length} minus max_new_tokens {limit}); {fix}")
    with run.policy.autocast():
        answers = run.task.generate_ids(run.model, ids, max_new_tokens=limit)
    return [run.task.decode(a) for a in answers]


def read_inputs(path: str | Path, *, kind: str = "classification", text_column: str = "text") -> list[Any]:
    """Inputs to predict: a .txt file (one text per line), a .jsonl/.csv/.tsv file (the text column), or for
    image runs a list of image files / a folder of them. Blank lines are left out; ``data.inputs.read_input_file``
    also says which line each input came from and which lines were skipped."""
    return read_input_file(path, images=kind == "image", text_column=text_column).items
