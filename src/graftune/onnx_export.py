"""``graftune export RUN_DIR --format onnx``: a run's classifier as one ONNX graph, checked against PyTorch, and
the ``eval`` / ``predict`` of such an export (the format itself is ``graftune.io.onnx_format``).

What is exported: the run loaded as ``graftune eval`` loads it (base, adapters, head, from ``run.yaml`` and
``adapter/``), in float32, with the adapters merged into the base weights, so the graph is the plain base plus
pooling and head: no adapter code has to exist where it runs. Text classifiers (a transformer encoder) and image
classifiers (a CNN: ``efficientnet-lite0``) both export. Only adapters that merge can be exported that way (their
update is a linear change of the weights: LoRA, including LoRA on convolutions, IA3, BitFit; a head-only run has
none); the others (bottleneck and convolutional adapters, prefix and prompt tuning, parameter-copying methods) are
refused with the list of what is supported.

Few-shot runs (``--method contrastive``, LoRA by default, and ``--method probe``, the frozen base) export too: their
graph is the base (the adapter merged) and the pooling, giving a window's embedding; the windows of long texts, the
normalization and the head (a logistic regression or class prototypes, as the linear map whose softmax is its
probabilities) run in numpy (``onnx_format.OnnxFewShotRun``). Their check compares probabilities with the run's own
``FewShotModel.predict_proba`` (float32, adapter unmerged) on the check texts plus one text made longer than
``max_chunks`` windows, and the export's windows with the ones ``recipes.fewshot`` reads, token for token, on every
test text and that long one.

The check, before anything is written: the ONNX graph, run by ONNX Runtime, must give the logits of the PyTorch
model with the adapters *unmerged* (what training computed) within ``onnx_format.TOLERANCE`` on a few examples of
the run's test split. Text: texts spread over their lengths (the longest is truncated at ``max_length``), batched
and padded as ``graftune eval`` batches them; and the exported tokenizer must give the run's token ids on every
test text. Images: the export's numpy preprocessing (``io.image_preprocess``) must give the pixels of the run's
torch transform within ``PIXEL_TOLERANCE`` on every test image, and the logits are compared from raw images
through each side's own preprocessing. A failed check refuses the export with the difference found; the output
folder is left as it was. A BERT text graph is traced with eager attention and fused by ONNX Runtime's transformer
optimizer (``onnx_format.optimize_file``) before the check, so the check covers the fused graph.

``quantize="int8"``: for text, ONNX Runtime's dynamic quantization (``onnx_format.quantize_file``); for images, its
static quantization, calibrated on the run's training images (``onnx_format.quantize_static_file``: dynamic
quantization of convolutions is slow and inaccurate in ONNX Runtime). Both graphs, float32 and int8, then score the
run's whole test split (rebuilt as ``graftune.evaluate.evaluate_run`` rebuilds it), and the accuracy change is
reported and recorded in the manifest; the int8 graph is the one written.
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
from safetensors.numpy import save_file as save_numpy
from torch import nn

from graftune import __version__
from graftune.config import HEAD_ONLY, RunConfig, build_config
from graftune.core.method import all_methods, get_method
from graftune.data.inputs import Inputs, read_image
from graftune.data.sources import Dataset
from graftune.data.splits import CARD_FILE, Splits, run_splits
from graftune.errors import ArtifactError, ConfigError, DataError, GraftuneError
from graftune.evaluate import read_scored
from graftune.io import onnx_format as fmt
from graftune.io.artifact import read_meta
from graftune.io.image_preprocess import ImagePreprocess
from graftune.recipes import fewshot, fewshot_run
from graftune.recipes.fewshot import FewShotModel, PrototypeClassifier
from graftune.recipes.fewshot_run import PROBE
from graftune.run.loaded import LoadedRun
from graftune.run.scoring import logits_of
from graftune.runs import RECIPES, load_run
from graftune.tasks import ZOO_TASK
from graftune.tasks.classification import base_hidden, pool
from graftune.zoo import ImageTransform, load_base

#: examples of the test split the logits are compared on (texts spread over the lengths)
CHECK_TEXTS = 8
#: the export's numpy preprocessing must give the torch transform's pixels within this (absolute, any pixel)
PIXEL_TOLERANCE = 1e-4
#: training images that calibrate the activation ranges of a static int8 image graph (at most)
CALIBRATION_IMAGES = 256
#: the tasks that export
TASKS = ("classification", "image")
#: transformers model types whose text graphs ONNX Runtime's BERT optimizer fuses (``onnx_format.optimize_file``);
#: others export unfused, as traced
FUSED_MODEL_TYPES = ("bert",)


@dataclass
class ExportResult:
    """What ``export_onnx`` wrote: the folder and its manifest (the check and, for int8, the accuracy change)."""

    path: Path
    manifest: dict


# --- what can be exported ---------------------------------------------------------------------------------------
def supported_methods() -> list[str]:
    """The methods whose runs export to ONNX: the adapter methods declared mergeable, head-only runs and the
    recipes that load as few-shot runs (``fewshot_run.load``: probe, and contrastive, which exports when its adapter
    is one of the mergeable methods), read from the registry and the recipe table so the list cannot drift."""
    fewshot_recipes = sorted(name for name, recipe in RECIPES.items() if recipe.load is fewshot_run.load)
    return sorted(m.name for m in all_methods() if m.capabilities.mergeable) + [HEAD_ONLY, *fewshot_recipes]


def _refuse(run_dir: Path, what: str) -> ArtifactError:
    return ArtifactError(f"{run_dir}: ONNX export supports text and image classification runs whose adapters merge "
                         f"into the weights ({', '.join(supported_methods())}); this run is {what} (graftune "
                         "eval/predict still run it)")


def _inspect(run_dir: Path) -> tuple[RunConfig, dict]:
    """The run's config and adapter metadata, read without loading a model: a run that cannot be exported is
    refused in a moment, before the base is loaded."""
    if not (run_dir / "run.yaml").is_file():
        raise ArtifactError(f"{run_dir}: not a run directory (expected run.yaml and adapter/ written by "
                            "`graftune train --out`)")
    cfg = build_config(run_dir / "run.yaml")
    if cfg.method == PROBE:  # no adapter: the frozen base and a head (load_run checks head/)
        return cfg, {"extra": {"task": "classification"}}
    if not (run_dir / "adapter").is_dir():
        raise ArtifactError(f"{run_dir}: not a run directory (expected run.yaml and adapter/ written by "
                            "`graftune train --out`)")
    meta = read_meta(run_dir / "adapter")
    kind = (meta.get("extra") or {}).get("task") or cfg.task or "classification"
    if kind not in TASKS:
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


# --- the model that is traced -------------------------------------------------------------------------------------
class _Classifier(nn.Module):
    """``(input_ids, attention_mask) -> logits``: the task's own forward (base, pooling, head), so the graph
    computes what ``graftune eval`` computes."""

    def __init__(self, run: LoadedRun):
        super().__init__()
        self.model, self.head, self.task = run.model, run.head, run.task

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.task.forward(self.model, self.head, {"input_ids": input_ids, "attention_mask": attention_mask})


class _Embedder(nn.Module):
    """``(input_ids, attention_mask) -> embedding``: a few-shot run's window pooled as ``recipes.fewshot.embed``
    pools it (not normalized: that, and the windows, happen in numpy)."""

    def __init__(self, model: nn.Module, pooling: str):
        super().__init__()
        self.model, self.pooling = model, pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = base_hidden(self.model, {"input_ids": input_ids, "attention_mask": attention_mask})
        return pool(hidden, attention_mask, self.pooling)


class _ImageClassifier(nn.Module):
    """``pixels -> logits``: the image task's own forward (the CNN's pooled features, the head)."""

    def __init__(self, run: LoadedRun):
        super().__init__()
        self.model, self.head, self.task = run.model, run.head, run.task

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.task.forward(self.model, self.head, {"pixels": pixels})


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
    if run.fewshot is not None:  # its embeddings in float32 without autocast; its adapter is what gets merged
        run.fewshot.precision = None
        run.model.set_active(*[name for name in (run.fewshot.adapter,) if name is not None])
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
    export only) or cannot be created (checked before any work), or the check against PyTorch fails."""
    import onnx
    import onnxruntime

    say = log or (lambda _msg: None)
    run_dir = Path(run_dir)
    quantize = fmt.check_quantize(quantize)
    fmt.check_out_dir(out_dir, overwrite=overwrite)
    cfg, meta = _inspect(run_dir)
    say(f"loading {run_dir} (float32, adapters unmerged) and its test split...")
    run = _load_fp32(run_dir, cfg)
    splits = run_splits(cfg, run.kind, run_dir=run_dir)  # checked against its data card
    if not splits.test.inputs:
        raise DataError(f"{run_dir}: the run's test split is empty; nothing to check the export on")
    export = _ExportImage(run, splits, run_dir) if run.kind == "image" else _ExportText(run, splits, run_dir)

    def write(tmp: Path) -> None:
        say(f"exporting the merged model to ONNX (opset {opset})...")
        fields = export.write(tmp, opset=opset, quantize=quantize, batch_size=batch_size, say=say)
        shutil.copyfile(run_dir / "run.yaml", tmp / fmt.SOURCE_RUN_FILE)
        if (run_dir / CARD_FILE).is_file():  # its split fingerprints: eval on the export checks the rebuilt test
            shutil.copyfile(run_dir / CARD_FILE, tmp / CARD_FILE)
        extra = meta.get("extra") or {}
        model_file = tmp / fmt.MODEL_FILE
        manifest = {
            "format": fmt.FORMAT, "format_version": fmt.FORMAT_VERSION,
            "graftune_version": __version__,
            "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source_run": str(run_dir.resolve()), "adapter": meta.get("name"), "method": meta.get("method"),
            "merged": list(run.model.merged), "base_model": cfg.model, "base_fingerprint": meta.get("base_fingerprint"),
            "task": run.kind, "label_names": list(run.label_names), "multi_label": bool(run.multi_label),
            **fields["settings"], "outputs": [fmt.OUTPUT_NAME if run.fewshot is None else fmt.EMBEDDING_OUTPUT],
            "opset": opset, "quantize": quantize,
            "model_file": fmt.MODEL_FILE, "sha256": fmt.file_sha256(model_file),
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
            "data": cfg.data, "seed": extra.get("seed", cfg.seed), **fields["record"]}
        fmt.write_manifest(tmp, manifest)

    path = fmt.write_export(out_dir, write, overwrite=overwrite)
    return ExportResult(path, fmt.read_manifest(path))


#: what an export check compares with PyTorch -> its key in the manifest's check: logits, or for a few-shot run the
#: probabilities (its scikit-learn head gives no logits)
DIFF_KEYS = {"logits": "max_abs_logit_diff", "probabilities": "max_abs_probability_diff"}


def _outputs(onnx_run: fmt.OnnxClassifier, inputs: list, compared: str, batch_size: int) -> np.ndarray:
    logits = onnx_run.logits(inputs, batch_size=batch_size)
    return onnx_run.probabilities(logits) if compared == "probabilities" else logits


def _int8_record(fp32: fmt.OnnxClassifier, int8: fmt.OnnxClassifier, test: Dataset, check: list, reference: np.ndarray,
                 batch_size: int, compared: str = "logits") -> dict:
    """Both graphs on the whole test split: the accuracy change the int8 graph costs."""
    inputs = list(test.inputs)
    p32, p8 = (r.probabilities(r.logits(inputs, batch_size=batch_size)) for r in (fp32, int8))
    m32, m8 = (r.score(inputs, test.labels, batch_size=batch_size) for r in (fp32, int8))
    return {"test_examples": len(inputs), "accuracy_fp32": m32["accuracy"], "accuracy_int8": m8["accuracy"],
            "accuracy_change_points": round(100 * (m8["accuracy"] - m32["accuracy"]), 2),
            "macro_f1_fp32": m32["macro_f1"], "macro_f1_int8": m8["macro_f1"],
            "max_abs_probability_diff": float(np.abs(p8 - p32).max()),
            f"{DIFF_KEYS[compared]}_vs_pytorch": float(np.abs(_outputs(int8, check, compared, batch_size)
                                                              - reference).max())}


def _check_outputs(run_dir: Path, onnx_run: fmt.OnnxClassifier, check: list, reference: np.ndarray, what: str,
                   batch_size: int, compared: str = "logits") -> float:
    diff = float(np.abs(_outputs(onnx_run, check, compared, batch_size) - reference).max())
    if not diff <= fmt.TOLERANCE:
        raise ArtifactError(f"{run_dir}: the ONNX {compared} differ from PyTorch's by {diff:.2e} (> {fmt.TOLERANCE:g}) "
                            f"on {len(check)} test {what}; not exported")
    return diff


# --- few-shot runs: the head as a linear map, the check texts, the windows --------------------------------------
def _linear_head(head: Any, label_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """A few-shot head as ``(weight, bias)``, one row per label name, such that ``softmax(e @ weight.T + bias)`` is
    its ``predict_proba`` on L2-normalized embeddings ``e``: a logistic regression's ``coef_`` and ``intercept_``
    (two classes: its one row is ``classes_[1]``'s logit against 0 for ``classes_[0]``, the sigmoid it computes), a
    prototype head's class means over its temperature. A label the head never saw gets bias -inf: probability 0,
    as ``fewshot_run.predict_rows`` gives it."""
    if isinstance(head, PrototypeClassifier):
        coef = head.prototypes_.numpy() / np.float32(head.temperature)
        intercept = np.zeros(len(coef), dtype=coef.dtype)
    else:
        coef, intercept = np.asarray(head.coef_), np.asarray(head.intercept_)
        if len(head.classes_) == 2 and len(coef) == 1:
            coef, intercept = np.concatenate([np.zeros_like(coef), coef]), np.concatenate([[0], intercept])
    row = {str(c): j for j, c in enumerate(head.classes_)}
    weight = np.zeros((len(label_names), coef.shape[1]), dtype=np.float32)
    bias = np.full(len(label_names), -np.inf, dtype=np.float32)
    for i, name in enumerate(label_names):
        if name in row:
            weight[i], bias[i] = coef[row[name]], intercept[row[name]]
    return weight, bias


def _long_text(fitted: FewShotModel, texts: list[str]) -> str:
    """The check texts joined and repeated past ``max_chunks`` windows of ``max_length`` tokens: a text whose
    windows are read, weighted and, past ``max_chunks``, dropped."""
    joined = " ".join(texts)
    tokens = len(fitted.tokenizer(joined, add_special_tokens=False)["input_ids"])
    return " ".join([joined] * (fitted.max_length * (fitted.max_chunks + 1) // max(tokens, 1) + 1))


class _ExportText:
    """The text side of an export: the graph, the tokenizer, their checks, dynamic int8. A few-shot run's graph
    gives embeddings, its head is written beside it and its windows are checked too."""

    def __init__(self, run: LoadedRun, splits: Splits, run_dir: Path):
        self.run, self.test, self.run_dir = run, splits.test, run_dir

    def write(self, tmp: Path, *, opset: int, quantize: str, batch_size: int, say: Callable[[str], None]) -> dict:
        run, task, run_dir, fitted = self.run, self.run.task, self.run_dir, self.run.fewshot
        texts = [str(t) for t in self.test.inputs]
        ids = [e["input_ids"] for e in task.encode(texts)]
        picked = _check_texts(texts, [len(i) for i in ids])
        check = [texts[i] for i in picked]
        settings: dict[str, Any] = {"max_length": task.max_length, "pad_id": int(task.pad_id)}
        if fitted is None:
            compared, output, module = "logits", fmt.OUTPUT_NAME, _Classifier(run)
            reference = logits_of(task, run.model, run.head, check, batch_size=batch_size).numpy()
        else:
            compared, output, module = "probabilities", fmt.EMBEDDING_OUTPUT, _Embedder(run.model, fitted.pooling)
            check.append(_long_text(fitted, check))
            reference = fewshot_run.outputs(fitted, check, run.label_names)[1]  # as `predict` maps them
            settings["max_length"] = fitted.max_length
            settings["embedding"] = {"max_chunks": fitted.max_chunks,
                                     "special_tokens": fitted.tokenizer.num_special_tokens_to_add(pair=False),
                                     "normalize": True}
            weight, bias = _linear_head(fitted.head, run.label_names)
            save_numpy({"weight": weight, "bias": bias}, str(tmp / fmt.HEAD_FILE))
            settings["head"] = {"file": fmt.HEAD_FILE, "sha256": fmt.file_sha256(tmp / fmt.HEAD_FILE),
                                "kind": "prototype" if isinstance(fitted.head, PrototypeClassifier) else "logistic",
                                "recipe": run.cfg.method, "classes": [str(c) for c in fitted.classes]}
        if run.model.active:
            run.model.merge(*run.model.active)
        model_file = tmp / fmt.MODEL_FILE
        config = run.model.base.config
        fuse, fused = getattr(config, "model_type", None) in FUSED_MODEL_TYPES, {}
        if fuse:  # the optimizer recognizes the eager attention's pattern, not an SDPA trace's
            run.model.base.set_attn_implementation("eager")
        fmt.export_module(module.eval(), _example_batch(ids[picked[-1]], task.pad_id), model_file, opset=opset,
                          output=output)
        if fuse:
            say("fusing attention, layer norms and GELU (ONNX Runtime's transformer optimizer)...")
            fused = fmt.optimize_file(model_file, num_heads=config.num_attention_heads,
                                      hidden_size=config.hidden_size)
        try:
            task.tokenizer.save_pretrained(tmp)
        except (OSError, ValueError, TypeError, NotImplementedError) as e:  # a tokenizer class that cannot save
            raise ArtifactError(f"{run_dir}: the base's tokenizer could not be saved ({e})") from None
        if not (tmp / fmt.TOKENIZER_FILE).is_file():
            raise ArtifactError(f"{run_dir}: the base's tokenizer has no {fmt.TOKENIZER_FILE} (a fast, "
                                "`tokenizers`-backed tokenizer is needed to export)")

        def runner(file: Path) -> fmt.OnnxRun:
            common = {"label_names": run.label_names, "max_length": settings["max_length"],
                      "pad_id": settings["pad_id"], "threads": torch.get_num_threads()}
            if fitted is None:
                return fmt.OnnxRun(file, tmp / fmt.TOKENIZER_FILE, multi_label=run.multi_label, **common)
            return fmt.OnnxFewShotRun(file, tmp / fmt.TOKENIZER_FILE, tmp / fmt.HEAD_FILE, **common,
                                      max_chunks=settings["embedding"]["max_chunks"],
                                      special_tokens=settings["embedding"]["special_tokens"])

        fp32 = runner(model_file)
        bad = sum(a != b for a, b in zip(fp32.encode(texts), ids))
        if bad:
            raise ArtifactError(f"{run_dir}: the exported tokenizer gives other token ids than the run's on {bad} of "
                                f"{len(texts)} test texts; not exported")
        check_record: dict[str, Any] = {}
        if fitted is not None:
            check_record["windows_matched"] = self._check_windows(fp32, fitted, texts + check[-1:])
        diff = _check_outputs(run_dir, fp32, check, reference, "texts", batch_size, compared)
        record: dict[str, Any] = {"check": {
            "reference": "PyTorch float32, adapters unmerged" + ("" if fitted is None else ", the few-shot head"),
            "compared": compared, "texts": len(check), DIFF_KEYS[compared]: diff, "tolerance": fmt.TOLERANCE,
            "passed": True, "tokenizer_texts_matched": len(texts), **check_record}}
        if quantize == "int8":
            say(f"quantizing (dynamic int8) and scoring both graphs on the {len(texts)} test texts...")
            int8_file = tmp / "model.int8.onnx"
            fmt.quantize_file(model_file, int8_file)
            int8 = runner(int8_file)
            record["int8"] = _int8_record(fp32, int8, self.test, check, reference, batch_size, compared)
            del fp32, int8  # the sessions hold the files open
            os.replace(int8_file, model_file)
        return {"settings": {**settings, "pooling": task.pooling if fitted is None else fitted.pooling,
                             "inputs": list(fmt.INPUT_NAMES), "fused": fused},
                "record": record}

    def _check_windows(self, onnx_run: fmt.OnnxFewShotRun, fitted: FewShotModel, texts: list[str]) -> int:
        """The export's windows of ``texts`` against the ones ``recipes.fewshot`` embeds, token for token (and
        their owners and weights); refused on any difference. Returns how many windows matched."""
        # the reference is the function fitted.embed reads its windows with, so the two cannot drift apart
        theirs = fewshot.windows(fitted.tokenizer, texts, fitted.max_length, fitted.max_chunks)
        if onnx_run.windows(texts) != tuple(theirs):
            raise ArtifactError(f"{self.run_dir}: the exported tokenizer splits the {len(texts)} check texts into "
                                "other windows than the run's; not exported")
        return len(theirs[0])


class _ExportImage:
    """The image side of an export: the graph, the preprocessing recorded as data and checked against the run's
    torch transform, static int8 calibrated on the training images."""

    def __init__(self, run: LoadedRun, splits: Splits, run_dir: Path):
        self.run, self.splits, self.run_dir = run, splits, run_dir
        transform = run.task.transform
        if not isinstance(transform, ImageTransform):
            raise _refuse(run_dir, f"an image run whose transform ({type(transform).__name__}) is not graftune's "
                          "resize-crop-normalize, which the export reproduces")
        self.preprocess = ImagePreprocess(transform.size, transform.crop, transform.mean, transform.std)

    def _check_preprocess(self, images: list) -> float:
        """The largest pixel difference between the numpy preprocessing and the run's torch transform, over every
        image given; refused beyond ``PIXEL_TOLERANCE``."""
        worst = 0.0
        for image in images:
            torch_pixels = self.run.task.transform(image).numpy()
            worst = max(worst, float(np.abs(self.preprocess.one(image) - torch_pixels).max()))
        if not worst <= PIXEL_TOLERANCE:
            raise ArtifactError(f"{self.run_dir}: the export's image preprocessing differs from the run's transform "
                                f"by {worst:.2e} (> {PIXEL_TOLERANCE:g}) on its {len(images)} test images; not "
                                "exported")
        return worst

    def write(self, tmp: Path, *, opset: int, quantize: str, batch_size: int, say: Callable[[str], None]) -> dict:
        run, task, run_dir, test = self.run, self.run.task, self.run_dir, self.splits.test
        images = list(test.inputs)
        pixel_diff = self._check_preprocess(images)
        picked = _check_texts(images, [int(np.prod(x.shape[-2:])) for x in images])
        check = [images[i] for i in picked]
        reference = logits_of(task, run.model, run.head, check, batch_size=batch_size).numpy()
        if run.model.active:
            run.model.merge(*run.model.active)
        model_file = tmp / fmt.MODEL_FILE
        example = {fmt.IMAGE_INPUT: torch.from_numpy(self.preprocess(check[:2] if len(check) > 1 else check * 2))}
        fmt.export_module(_ImageClassifier(run).eval(), example, model_file, opset=opset)

        def runner(file: Path) -> fmt.OnnxImageRun:
            return fmt.OnnxImageRun(file, preprocess=self.preprocess, label_names=run.label_names,
                                    multi_label=run.multi_label, threads=torch.get_num_threads())

        fp32 = runner(model_file)
        diff = _check_outputs(run_dir, fp32, check, reference, "images", batch_size)
        record: dict[str, Any] = {"check": {
            "reference": "PyTorch float32, adapters unmerged, the run's torch transform", "images": len(check),
            "max_abs_logit_diff": diff, "tolerance": fmt.TOLERANCE, "passed": True,
            "preprocess_images_matched": len(images), "max_abs_pixel_diff": pixel_diff,
            "pixel_tolerance": PIXEL_TOLERANCE}}
        if quantize == "int8":
            train = list(self.splits.train.inputs)[:CALIBRATION_IMAGES]
            if not train:
                raise DataError(f"{run_dir}: the run's training split is empty; no images to calibrate int8 with")
            say(f"quantizing (static int8, calibrated on {len(train)} training images) and scoring both graphs on "
                f"the {len(images)} test images...")
            int8_file = tmp / "model.int8.onnx"
            fmt.quantize_static_file(model_file, int8_file,
                                     (self.preprocess(train[i:i + 16]) for i in range(0, len(train), 16)))
            int8 = runner(int8_file)
            record["int8"] = {"method": "static", "calibration_images": len(train),
                              **_int8_record(fp32, int8, test, check, reference, batch_size)}
            del fp32, int8  # the sessions hold the files open
            os.replace(int8_file, model_file)
        return {"settings": {"preprocess": self.preprocess.to_dict(), "inputs": [fmt.IMAGE_INPUT]}, "record": record}


def format_report(result: ExportResult) -> str:
    """The lines ``graftune export --format onnx`` prints."""
    m = result.manifest
    c = m["check"]
    size = (result.path / m["model_file"]).stat().st_size / 1e6
    weights = "float32" if m["quantize"] == "none" else m["quantize"]  # the manifest keeps --quantize's value
    lines = [f"ONNX model written to {result.path}/ ({weights}, opset {m['opset']}, {size:.1f} MB)"]
    if m.get("task") == "image":
        lines.append(f"check: logits within {c['max_abs_logit_diff']:.1e} of PyTorch's (tolerance {c['tolerance']:g}) "
                     f"on {c['images']} test images; preprocessing within {c['max_abs_pixel_diff']:.1e} of the run's "
                     f"transform on {c['preprocess_images_matched']}")
    else:
        compared = c.get("compared", "logits")
        windows = f" (windows: {c['windows_matched']})" if "windows_matched" in c else ""
        lines.append(f"check: {compared} within {c[DIFF_KEYS[compared]]:.1e} of PyTorch's (tolerance "
                     f"{c['tolerance']:g}) on {c['texts']} test texts; tokenizer matched on "
                     f"{c['tokenizer_texts_matched']}{windows}")
    if "int8" in m:
        q = m["int8"]
        how = f" (static, calibrated on {q['calibration_images']} training images)" if q.get("method") == "static" \
            else ""
        lines.append(f"int8{how}: accuracy {q['accuracy_int8']:.3f} vs float32 ONNX {q['accuracy_fp32']:.3f} "
                     f"({q['accuracy_change_points']:+.2f} points) on the {q['test_examples']} test examples")
    return "\n".join(lines)


# --- eval and predict on an export ----------------------------------------------------------------------------------
def _no_quantize(export_dir: Any, quantize: str | None) -> None:
    """--quantize is for run directories: an export is quantized (or not) when it is made."""
    if quantize not in (None, "none"):
        raise ConfigError(f"{export_dir} is an ONNX export: --quantize applies to run directories; export with "
                          "--quantize int8 for an int8 model")


def evaluate_export(export_dir: str | os.PathLike, *, data: str | None = None, text_column: str | None = None,
                    label_column: str | None = None, batch_size: int = 32, quantize: str | None = None) -> dict:
    """Metrics of an exported model on ``data`` (every example: a file, an image folder or an alias such as
    ``digits``), or without it on the source run's test split (rebuilt from the ``source_run.yaml`` copied into
    the export, and checked against the fingerprints of the run's data card copied beside it)."""
    export_dir = Path(export_dir)
    _no_quantize(export_dir, quantize)
    run = fmt.OnnxClassifier.load(export_dir, threads=torch.get_num_threads())  # as torch's (speed/threads.py)
    source = export_dir / fmt.SOURCE_RUN_FILE
    if data is None and not source.is_file():
        raise DataError(f"{export_dir}: no {fmt.SOURCE_RUN_FILE} to rebuild the test split from; pass --data FILE")
    cfg = build_config(source) if source.is_file() else RunConfig()
    if data is None:
        ds = run_splits(cfg, run.kind, run_dir=export_dir, parts=("test",),  # against the copied data card
                        fix="pass --data TEST_FILE (or export a run retrained on it)").test
    else:
        ds = read_scored(data, kind=run.kind, multi_label=run.multi_label, **(cfg.columns() | {
            "text_column": text_column or cfg.text_column, "label_column": label_column or cfg.label_column}))
    inputs = list(ds.inputs) if run.kind == "image" else [str(t) for t in ds.inputs]
    metrics = run.score(inputs, ds.labels, batch_size=batch_size)
    metrics["format"] = "onnx"
    if run.manifest.get("quantize", "none") != "none":
        metrics["quantize"] = run.manifest["quantize"]
    return metrics


def predict_export(export_dir: str | os.PathLike, args: Sequence[str], given: Inputs | None = None, *,
                   quantize: str = "none") -> tuple[list[dict], bool]:
    """Predictions of an exported model for ``args`` (texts, or image files for an image export) then the items of
    ``given`` (what ``data.inputs.read_input_file`` read from ``--input``), and whether the export classifies
    images."""
    _no_quantize(export_dir, quantize)
    args = list(args or [])
    if not args and not (given and given.items):
        raise DataError("nothing to predict: pass texts (or image files) after the export folder or --input FILE")
    run = fmt.OnnxClassifier.load(export_dir, threads=torch.get_num_threads())  # as torch's (speed/threads.py)
    images = run.kind == "image"
    if given is not None and given.images != images:
        raise DataError("--input holds images, but this ONNX export classifies text: pass a .txt (one text per "
                        "line), .jsonl or .csv file" if given.images else "--input is a text file, but this ONNX "
                        "export classifies images: pass image files or a folder of them")
    inputs = [read_image(a) for a in args] if images else args
    return run.predict(inputs + (given.items if given else [])), images
