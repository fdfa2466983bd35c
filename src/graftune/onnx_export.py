"""``graftune export RUN_DIR --format onnx``: a run's classifier as one ONNX graph, checked against PyTorch, and
the ``eval`` / ``predict`` of such an export (the format itself is ``graftune.io.onnx_format``).

What is exported: the run loaded as ``graftune eval`` loads it (base, adapters, head, from ``run.yaml`` and
``adapter/``), in float32, with the adapters merged into the base weights, so the graph is the plain base plus
pooling and head: no adapter code has to exist where it runs. Only adapters that merge can be exported that way
(their update is a linear change of the weights: LoRA, IA3, BitFit; a head-only run has none); the others
(bottleneck adapters, prefix and prompt tuning, parameter-copying methods) and the few-shot recipes' scikit-learn
heads are refused with the list of what is supported.

The check, before anything is written: the ONNX graph, run by ONNX Runtime, must give the logits of the PyTorch
model with the adapters *unmerged* (what training computed) within ``onnx_format.TOLERANCE`` on a few texts of
the run's test split, spread over their lengths (the longest is truncated at ``max_length``), batched and padded
as ``graftune eval`` batches them; and the exported tokenizer must give the run's token ids on every test text.
A failed check refuses the export with the difference found; the output folder is left as it was.

``quantize="int8"``: ONNX Runtime's dynamic quantization (``onnx_format.quantize_file``). Both graphs, float32 and
int8, then score the run's whole test split (rebuilt as ``graftune.evaluate.evaluate_run`` rebuilds it), and the
accuracy change is reported and recorded in the manifest; the int8 graph is the one written.
"""

from __future__ import annotations

import datetime
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graftune import __version__
from graftune.config import HEAD_ONLY, RunConfig, build_config
from graftune.core.method import all_methods, get_method
from graftune.data.sources import Dataset, load_data
from graftune.data.splits import make_splits
from graftune.errors import ArtifactError, ConfigError, DataError, GraftuneError
from graftune.evaluate import read_inputs
from graftune.io import onnx_format as fmt
from graftune.io.artifact import read_meta
from graftune.recipes.fewshot_run import CONTRASTIVE, PROBE
from graftune.run.loaded import LoadedRun
from graftune.run.scoring import logits_of
from graftune.runs import load_run
from graftune.tasks import ZOO_TASK
from graftune.zoo import load_base

#: texts of the test split the logits are compared on (spread over the lengths)
CHECK_TEXTS = 8


@dataclass
class ExportResult:
    """What ``export_onnx`` wrote: the folder and its manifest (the check and, for int8, the accuracy change)."""

    path: Path
    manifest: dict


# --- what can be exported ---------------------------------------------------------------------------------------
def supported_methods() -> list[str]:
    """The adapter methods whose runs export to ONNX: the ones declared mergeable, and head-only runs."""
    return sorted(m.name for m in all_methods() if m.capabilities.mergeable) + [HEAD_ONLY]


def _refuse(run_dir: Path, what: str) -> ArtifactError:
    return ArtifactError(f"{run_dir}: ONNX export supports text-classification runs whose adapters merge into the "
                         f"weights ({', '.join(supported_methods())}); this run is {what} (graftune eval/predict "
                         "still run it)")


def _inspect(run_dir: Path) -> tuple[RunConfig, dict]:
    """The run's config and adapter metadata, read without loading a model: a run that cannot be exported is
    refused in a moment, before the base is loaded."""
    if not (run_dir / "run.yaml").is_file():
        raise ArtifactError(f"{run_dir}: not a run directory (expected run.yaml and adapter/ written by "
                            "`graftune train --out`)")
    cfg = build_config(run_dir / "run.yaml")
    if cfg.method in (CONTRASTIVE, PROBE):
        raise _refuse(run_dir, f"a --method {cfg.method} run (its head is a scikit-learn model)")
    if not (run_dir / "adapter").is_dir():
        raise ArtifactError(f"{run_dir}: not a run directory (expected run.yaml and adapter/ written by "
                            "`graftune train --out`)")
    meta = read_meta(run_dir / "adapter")
    kind = (meta.get("extra") or {}).get("task") or cfg.task or "classification"
    if kind != "classification":
        raise _refuse(run_dir, f"a {kind} run")
    method = meta.get("method")
    if method != HEAD_ONLY:
        try:
            mergeable = get_method(method).capabilities.mergeable
        except GraftuneError:
            mergeable = False
        if not mergeable:
            raise _refuse(run_dir, f"a {method} run, whose adapter does not merge")
    return cfg, meta


def _columns(cfg: RunConfig) -> dict:
    return {"text_column": cfg.text_column, "label_column": cfg.label_column, "prompt_column": cfg.prompt_column,
            "response_column": cfg.response_column}


def run_test_split(cfg: RunConfig, kind: str = "classification") -> Dataset:
    """The run's test split, rebuilt from its config as ``graftune.evaluate.evaluate_run`` rebuilds it."""
    ds = load_data(cfg.data, task=kind, **_columns(cfg))
    test = load_data(cfg.test, task=kind, **_columns(cfg)) if cfg.test else None
    return make_splits(ds, test=test, **cfg.split_args()).test


# --- the model that is traced -------------------------------------------------------------------------------------
class _Classifier(nn.Module):
    """``(input_ids, attention_mask) -> logits``: the task's own forward (base, pooling, head), so the graph
    computes what ``graftune eval`` computes."""

    def __init__(self, run: LoadedRun):
        super().__init__()
        self.model, self.head, self.task = run.model, run.head, run.task

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.task.forward(self.model, self.head, {"input_ids": input_ids, "attention_mask": attention_mask})


def _load_fp32(run_dir: Path, cfg: RunConfig) -> LoadedRun:
    """The run with its adapters active and unmerged, all in float32. On CPUs with native bf16 ``load_run``
    stores the frozen base in bf16; the exported weights must be the original float32 ones, so they are read
    again from the base (an adapter never changes them: graftune grafts, the base stays as loaded)."""
    run = load_run(run_dir, merge=False, expect="classifier")
    if run.policy.frozen_dtype not in (None, torch.float32):
        run.model.float()
        fresh = load_base(cfg.model, task=ZOO_TASK[run.kind])
        run.model.base.load_state_dict(fresh.model.state_dict())
    if run.head is not None:
        run.head.float()
    run.model.eval()
    for name in run.model.active:
        if not run.model.info[name].method.capabilities.mergeable:  # e.g. a stacked adapter that does not merge
            raise _refuse(run_dir, f"stacked with a {run.model.info[name].method.name} adapter, which does not merge")
    return run


def _check_texts(texts: Sequence[str], lengths: Sequence[int], n: int = CHECK_TEXTS) -> list[int]:
    """Indices of up to ``n`` texts spread evenly over the lengths, the shortest and the longest included."""
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    if len(order) <= n:
        return order
    return sorted({order[round(k * (len(order) - 1) / (n - 1))] for k in range(n)})


def _example_batch(ids: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Two rows for the trace, the second one padded (see ``onnx_format``'s docstring on why)."""
    row = list(ids) if len(ids) >= 4 else (list(ids) * 4)[:4]
    short = row[: max(2, len(row) // 2)]
    input_ids = torch.full((2, len(row)), pad_id, dtype=torch.long)
    mask = torch.zeros((2, len(row)), dtype=torch.long)
    for r, seq in enumerate((row, short)):
        input_ids[r, :len(seq)] = torch.tensor(seq)
        mask[r, :len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


# --- export -------------------------------------------------------------------------------------------------------
def export_onnx(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, quantize: str = "none",
                overwrite: bool = False, opset: int = fmt.OPSET, batch_size: int = 32,
                log: Callable[[str], None] | None = None) -> ExportResult:
    """Write ``out_dir`` (see ``graftune.io.onnx_format``) from the run in ``run_dir``; refused, writing
    nothing, when the run cannot be exported, ``out_dir`` may not be replaced (``overwrite``: an earlier ONNX
    export only), or the check against PyTorch fails."""
    import onnx
    import onnxruntime

    say = log or (lambda _msg: None)
    run_dir = Path(run_dir)
    quantize = fmt.check_quantize(quantize)
    fmt.check_out_dir(out_dir, overwrite=overwrite)
    cfg, meta = _inspect(run_dir)
    say(f"loading {run_dir} (float32, adapters unmerged) and its test split...")
    run = _load_fp32(run_dir, cfg)
    test = run_test_split(cfg)
    texts = [str(t) for t in test.inputs]
    if not texts:
        raise DataError(f"{run_dir}: the run's test split is empty; nothing to check the export on")
    task = run.task
    ids = [e["input_ids"] for e in task.encode(texts)]
    picked = _check_texts(texts, [len(i) for i in ids])
    check = [texts[i] for i in picked]
    reference = logits_of(task, run.model, run.head, check, batch_size=batch_size).numpy()
    if run.model.active:
        run.model.merge(*run.model.active)

    def settings(extra: dict | None = None) -> dict:
        return {"label_names": list(run.label_names), "max_length": task.max_length, "pad_id": int(task.pad_id),
                "multi_label": bool(run.multi_label), **(extra or {})}

    def write(tmp: Path) -> None:
        say(f"exporting the merged model to ONNX (opset {opset})...")
        model_file = tmp / fmt.MODEL_FILE
        fmt.export_module(_Classifier(run).eval(), _example_batch(ids[picked[-1]], task.pad_id), model_file,
                          opset=opset)
        try:
            task.tokenizer.save_pretrained(tmp)
        except (OSError, ValueError, TypeError, NotImplementedError) as e:  # a tokenizer class that cannot save
            raise ArtifactError(f"{run_dir}: the base's tokenizer could not be saved ({e})") from None
        if not (tmp / fmt.TOKENIZER_FILE).is_file():
            raise ArtifactError(f"{run_dir}: the base's tokenizer has no {fmt.TOKENIZER_FILE} (a fast, "
                                "`tokenizers`-backed tokenizer is needed to export)")
        fp32 = fmt.OnnxRun(model_file, tmp / fmt.TOKENIZER_FILE, **settings())
        bad = sum(a != b for a, b in zip(fp32.encode(texts), ids))
        if bad:
            raise ArtifactError(f"{run_dir}: the exported tokenizer gives other token ids than the run's on {bad} of "
                                f"{len(texts)} test texts; not exported")
        diff = float(np.abs(fp32.logits(check, batch_size=batch_size) - reference).max())
        if not diff <= fmt.TOLERANCE:
            raise ArtifactError(f"{run_dir}: the ONNX logits differ from PyTorch's by {diff:.2e} (> {fmt.TOLERANCE:g}) "
                                f"on {len(check)} test texts; not exported")
        record: dict[str, Any] = {"check": {
            "reference": "PyTorch float32, adapters unmerged", "texts": len(check), "max_abs_logit_diff": diff,
            "tolerance": fmt.TOLERANCE, "passed": True, "tokenizer_texts_matched": len(texts)}}
        if quantize == "int8":
            say(f"quantizing (dynamic int8) and scoring both graphs on the {len(texts)} test texts...")
            int8_file = tmp / "model.int8.onnx"
            fmt.quantize_file(model_file, int8_file)
            int8 = fmt.OnnxRun(int8_file, tmp / fmt.TOKENIZER_FILE, **settings())
            p32, p8 = (r.probabilities(r.logits(texts, batch_size=batch_size)) for r in (fp32, int8))
            m32, m8 = fp32.score(texts, test.labels, batch_size=batch_size), int8.score(texts, test.labels,
                                                                                        batch_size=batch_size)
            record["int8"] = {
                "test_examples": len(texts), "accuracy_fp32": m32["accuracy"], "accuracy_int8": m8["accuracy"],
                "accuracy_change_points": round(100 * (m8["accuracy"] - m32["accuracy"]), 2),
                "macro_f1_fp32": m32["macro_f1"], "macro_f1_int8": m8["macro_f1"],
                "max_abs_probability_diff": float(np.abs(p8 - p32).max()),
                "max_abs_logit_diff_vs_pytorch": float(np.abs(int8.logits(check) - reference).max())}
            del fp32, int8  # the sessions hold the files open
            os.replace(int8_file, model_file)
        shutil.copyfile(run_dir / "run.yaml", tmp / fmt.SOURCE_RUN_FILE)
        extra = meta.get("extra") or {}
        manifest = {
            "format": fmt.FORMAT, "format_version": fmt.FORMAT_VERSION, "graftune_version": __version__,
            "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source_run": str(run_dir.resolve()), "adapter": meta.get("name"), "method": meta.get("method"),
            "merged": list(run.model.merged), "base_model": cfg.model, "base_fingerprint": meta.get("base_fingerprint"),
            "task": "classification", **settings(), "pooling": task.pooling,
            "inputs": list(fmt.INPUT_NAMES), "outputs": [fmt.OUTPUT_NAME], "opset": opset,
            "quantize": quantize, "model_file": fmt.MODEL_FILE, "sha256": fmt.file_sha256(model_file),
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
            "data": cfg.data, "seed": extra.get("seed", cfg.seed), **record}
        fmt.write_manifest(tmp, manifest)

    path = fmt.write_export(out_dir, write, overwrite=overwrite)
    return ExportResult(path, fmt.read_manifest(path))


def format_report(result: ExportResult) -> str:
    """The lines ``graftune export --format onnx`` prints."""
    m = result.manifest
    c = m["check"]
    size = (result.path / m["model_file"]).stat().st_size / 1e6
    lines = [f"ONNX model written to {result.path}/ ({m['quantize']}, opset {m['opset']}, {size:.1f} MB)",
             (f"check: logits within {c['max_abs_logit_diff']:.1e} of PyTorch's (tolerance {c['tolerance']:g}) on "
              f"{c['texts']} test texts; tokenizer matched on {c['tokenizer_texts_matched']}")]
    if "int8" in m:
        q = m["int8"]
        lines.append(f"int8: accuracy {q['accuracy_int8']:.3f} vs float32 ONNX {q['accuracy_fp32']:.3f} "
                     f"({q['accuracy_change_points']:+.2f} points) on the {q['test_examples']} test examples")
    return "\n".join(lines)


# --- eval and predict on an export ----------------------------------------------------------------------------------
def evaluate_export(export_dir: str | os.PathLike, *, data: str | None = None, text_column: str | None = None,
                    label_column: str | None = None, batch_size: int = 32) -> dict:
    """Metrics of an exported model on ``data`` (every example), or without it on the source run's test split
    (rebuilt from the ``source_run.yaml`` copied into the export)."""
    export_dir = Path(export_dir)
    run = fmt.OnnxRun.load(export_dir)
    source = export_dir / fmt.SOURCE_RUN_FILE
    if data is None and not source.is_file():
        raise DataError(f"{export_dir}: no {fmt.SOURCE_RUN_FILE} to rebuild the test split from; pass --data FILE")
    cfg = build_config(source) if source.is_file() else RunConfig()
    if data is None:
        ds = run_test_split(cfg)
    else:
        ds = load_data(data, task="classification", **(_columns(cfg) | {
            "text_column": text_column or cfg.text_column, "label_column": label_column or cfg.label_column}))
    metrics = run.score([str(t) for t in ds.inputs], ds.labels, batch_size=batch_size)
    metrics["format"] = "onnx"
    if run.manifest.get("quantize", "none") != "none":
        metrics["quantize"] = run.manifest["quantize"]
    return metrics


def predict_export(export_dir: str | os.PathLike, texts: Sequence[str] | None, *, input_file: str | None = None,
                   text_column: str = "text", quantize: str = "none") -> tuple[list[dict], list[str | None]]:
    """Predictions of an exported model for ``texts`` then the texts of ``input_file``, with the texts to show
    beside them (None for the file's)."""
    if quantize not in (None, "none"):
        raise ConfigError(f"{export_dir} is an ONNX export: --quantize applies to run directories; export with "
                          "--quantize int8 for an int8 model")
    texts = list(texts or [])
    if not texts and not input_file:
        raise DataError("nothing to predict: pass texts after the export folder or --input FILE")
    run = fmt.OnnxRun.load(export_dir)
    inputs = texts + (read_inputs(input_file, text_column=text_column) if input_file else [])
    return run.predict(inputs), texts + [None] * (len(inputs) - len(texts))
