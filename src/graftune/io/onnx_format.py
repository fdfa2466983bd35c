"""Classifiers exported as ONNX (``graftune export RUN_DIR --format onnx``) and run with ONNX Runtime.

An export directory is self-contained: running it builds no PyTorch model and never imports transformers (only
numpy, ``tokenizers`` and ``onnxruntime`` do the work; graftune itself still imports torch). What it holds:

=====================  =========================================================================================
``model.onnx``         the base with the adapters merged into its weights, the pooling and the classification
                       head. Text: ``input_ids``, ``attention_mask`` (int64, batch x sequence, both axes dynamic)
                       -> ``logits`` (float32, batch x classes); a BERT's layers fused into ONNX Runtime's
                       contrib operators (:func:`optimize_file`); dynamic int8 MatMul and Attention weights
                       with ``--quantize int8``. Images: ``pixels`` (float32, batch x 3 x size x size, the batch
                       axis dynamic) -> ``logits``; static int8 (QDQ, calibrated) with ``--quantize int8``.
``tokenizer.json`` ..  text: the base's tokenizer (``save_pretrained``); read here with the ``tokenizers`` library
``source_run.yaml``    the run's ``run.yaml``: which data and split it was trained and tested on
``head.safetensors``   few-shot runs only (see below): the head as ``weight`` (labels x hidden) and ``bias``
``graftune_onnx.json`` the manifest: the task, label names, for text the max length, pooling and pad id, for images
                       the preprocessing (``image_preprocess.ImagePreprocess``), the source run, graftune's
                       version, the opset, the export-time check, the sha256 of every other file (``files``)
                       and of its own content (``manifest_sha256``)
=====================  =========================================================================================

A few-shot run (``--method contrastive`` or ``probe``) classifies from sentence embeddings
(``recipes.fewshot.embed``), read over several windows of a long text, then a scikit-learn head; its graph is the
base (the contrastive adapter merged) and the pooling, ``input_ids``, ``attention_mask`` -> ``embedding`` (float32,
batch x hidden, not normalized), and :class:`OnnxFewShotRun` does the rest in numpy: the windows, their
normalization and token-weighted mean, and the head, kept as the linear map whose softmax is the head's
probabilities. Its manifest adds ``embedding`` (windows per text, special tokens per window) and ``head``.

Why the tokenizer is read with ``tokenizers`` (the Rust library under transformers' fast tokenizers) and not
``AutoTokenizer``: importing transformers costs seconds, and a deployment that reads the folder from another
language has ``tokenizer.json`` readers everywhere. The export checks that both give the same token ids on the run's
texts, so the two cannot drift apart silently. Images are prepared in numpy (``image_preprocess``: the resize, crop
and normalization of ``zoo.ImageTransform``), checked against the torch transform on the run's test images.

The graph is traced with PyTorch's TorchScript exporter (``dynamo=False``): it exports transformers' encoders
with dynamic batch and sequence axes without the extra ``onnxscript`` dependency of the dynamo exporter. The trace
follows the Python branches taken on its example batch, so a text example batch has a padded row: transformers
skips building the attention mask for a batch without padding, and a graph traced that way would ignore the mask.

Integrity: since ``format_version`` 4 (every kind of export) the manifest records the sha256 of every file of the
export (``files``: the graph, the tokenizer's files, the head, ``source_run.yaml``) and of its own content
(``manifest_sha256``: every other field as canonical JSON), and :meth:`OnnxClassifier.load` refuses an export where
any of them changed: an edited label name, pad id or vocabulary would otherwise give wrong answers without an error.
Older exports (1: text, 2: images, 3: few-shot; only the graph and the head were hashed) still load. Whatever the
version, the manifest's fields are checked for type and range (label names against the graph's output width, the
pad id against the tokenizer's vocabulary) and refused in one line. A graftune that reads only older versions asks
to be upgraded instead of misreading the export.

This module is the format (write, read, run). Loading a run, checking the export against PyTorch and scoring
the int8 change live in ``graftune.onnx_export``, one layer up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graftune.errors import ArtifactError, ConfigError, DataError
from graftune.io.artifact import write_dir_atomically
from graftune.io.atomic import check_creatable
from graftune.io.image_preprocess import ImagePreprocess

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "graftune_onnx.json"
SOURCE_RUN_FILE = "source_run.yaml"
TOKENIZER_FILE = "tokenizer.json"
HEAD_FILE = "head.safetensors"
FORMAT = "graftune-onnx-classifier"
#: the newest manifest this graftune reads (and the one it writes): 1 text classifiers, 2 image classifiers, 3
#: few-shot text classifiers, 4 any of them with every file and the manifest itself hashed
FORMAT_VERSION = 4
#: manifests from this version on hold ``files`` and ``manifest_sha256`` (see the module docstring)
HASHED_SINCE = 4
#: ONNX opset of the exported graph: 17 has LayerNormalization as one op; ONNX Runtime 1.14+ runs it
OPSET = 17
#: the export-time check: ONNX logits must be within this of PyTorch's float32 logits (absolute, any class)
TOLERANCE = 1e-3
INPUT_NAMES = ("input_ids", "attention_mask")
IMAGE_INPUT = "pixels"
OUTPUT_NAME = "logits"
#: the output of a few-shot run's graph: a window's pooled embedding
EMBEDDING_OUTPUT = "embedding"
QUANTIZE_CHOICES = ("none", "int8")


def check_quantize(quantize: str | None) -> str:
    quantize = quantize or "none"
    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"--quantize: got {quantize!r}; use one of {', '.join(QUANTIZE_CHOICES)}")
    return quantize


# --- writing ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet():
    """The exporters' deprecation, tracer and pre-processing notices are advice to the exporter's author (us),
    not to the user running ``graftune export``: keep them off the terminal."""
    quant_log = logging.getLogger("onnxruntime.quantization")
    root_level, quant_level = logging.getLogger().level, quant_log.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger().setLevel(logging.ERROR)
        quant_log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger().setLevel(root_level)
            quant_log.setLevel(quant_level)


def export_module(module, example: dict[str, Any], path: str | os.PathLike, *, opset: int = OPSET,
                  output: str = OUTPUT_NAME) -> None:
    """Trace ``module`` into an ONNX file and check it with ``onnx.checker``. Text: ``module(input_ids,
    attention_mask) -> output`` (``logits``, or a few-shot run's ``embedding``) with dynamic batch and sequence
    axes, ``example`` holding a padded row (see the module docstring). Images: ``module(pixels) -> logits`` with a
    dynamic batch axis."""
    import onnx
    import torch

    if IMAGE_INPUT in example:
        names, axes = [IMAGE_INPUT], {IMAGE_INPUT: {0: "batch"}, output: {0: "batch"}}
    else:
        mask = example["attention_mask"]
        if mask.shape[0] < 2 or bool(mask.bool().all()):
            raise ValueError("the example batch needs at least two rows, one of them padded")
        names = list(INPUT_NAMES)
        axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES} | {output: {0: "batch"}}
    with _quiet(), torch.no_grad():
        torch.onnx.export(module, tuple(example[n] for n in names), str(path), input_names=names,
                          output_names=[output], dynamic_axes=axes, opset_version=opset, dynamo=False)
    onnx.checker.check_model(str(path))


def optimize_file(path: str | os.PathLike, *, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Rewrite the text graph at ``path`` with ONNX Runtime's transformer optimizer (``onnxruntime.transformers.
    optimizer``, model type "bert"): each layer's self-attention becomes one ``Attention`` node (the three
    projections in one MatMul, scores, mask and softmax in one kernel), the embeddings' sum and layer norm one
    ``EmbedLayerNormalization``, each residual add + layer norm one ``SkipLayerNormalization``, the bias + GELU one
    ``BiasGelu``. Returns how many of each it fused.

    The attention keeps the raw 2-D ``attention_mask`` (``use_raw_attention_mask``): the optimizer's BERT default
    turns the mask into one end position per row, which is only right for masks that are ones then zeros; with
    the raw mask the graph computes what PyTorch computes for any mask. These are ONNX Runtime contrib operators
    (domain ``com.microsoft``): the graph runs in ONNX Runtime, not in other ONNX runtimes. The fused Attention
    replaces both the unfused float32 attention and the ``Where``/``IsNaN`` guards of an SDPA trace, and gives
    dynamic int8 one more operator to quantize (``QAttention``, see :func:`quantize_file`)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.use_raw_attention_mask(True)
    with _quiet():
        model = optimize_model(str(path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                               opt_level=0, optimization_options=options)
        model.save_model_to_file(str(path))
    return {op: n for op, n in model.get_fused_operator_statistics().items() if n}


def quantize_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """ONNX Runtime's dynamic quantization: MatMul weights (and the fused ``Attention`` projections of a graph
    :func:`optimize_file` wrote, as ``QAttention``) as signed int8, one scale per output channel; activations
    quantized per batch at run time (uint8), everything else float32. Per-channel scales keep the error of layers
    with a few large-magnitude rows small; ``reduce_range`` (7-bit weights) avoids the int16 accumulator saturation
    of the u8s8 kernels on AVX2 CPUs without VNNI (ONNX Runtime's quantization guide). ``DefaultTensorType``: shape
    inference cannot type the outputs of contrib operators, whose tensors here are all float32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         op_types_to_quantize=["MatMul", "Attention"],
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def quantize_static_file(src: str | os.PathLike, dst: str | os.PathLike, calibration: Iterable[np.ndarray]) -> None:
    """ONNX Runtime's static quantization, for image graphs: weights as signed int8 with one scale per output
    channel, activations as uint8 with scales fixed beforehand from the ranges ``calibration`` (batches of
    ``pixels``) produces (MinMax), written as QuantizeLinear/DequantizeLinear pairs (QDQ) that ONNX Runtime fuses
    into int8 kernels. Every operator ONNX Runtime can quantize is (Conv, the Clip of ReLU6, the residual Add,
    pooling, Gemm): quantizing the convolutions alone fixes their output ranges before the clip and cost 20 points
    on the digits run (bench/RESULTS.md, Session 7). Dynamic quantization, the text path, is no good for CNNs: ONNX
    Runtime runs its ConvInteger with a generic kernel, slower than float32, and per-batch activation ranges over
    whole feature maps cost most of the accuracy."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {IMAGE_INPUT: batch}

    with _quiet():
        quantize_static(str(src), str(dst), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_out_dir(out_dir: str | os.PathLike, *, overwrite: bool) -> Path:
    """Refuse, before any work, an ``--out`` that the export may not replace: an existing non-empty folder
    without ``--overwrite``, and with it anything but an earlier ONNX export (a user's folder is never deleted);
    or one that cannot be created (under a file, on a read-only disk)."""
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise ArtifactError(f"--out {out} is a file; choose a folder path that does not exist yet")
        if any(out.iterdir()):
            if not overwrite:
                raise ArtifactError(f"--out {out} exists; pass --overwrite to replace an earlier ONNX export there, "
                                    "or choose another folder")
            if not (out / MANIFEST_FILE).is_file():
                raise ArtifactError(f"--out {out} exists and is not an ONNX export; refusing to replace it even "
                                    "with --overwrite (choose another folder or remove it)")
    return check_creatable(out, what="ONNX export folder")


def write_export(out_dir: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool) -> Path:
    """Build the export in a temporary folder beside ``out_dir`` with ``write(tmp)``, then rename it into place:
    a failed check or an interrupted export leaves ``out_dir`` as it was."""
    return write_dir_atomically(check_out_dir(out_dir, overwrite=overwrite), write, markers=(MANIFEST_FILE,))


def manifest_sha256(manifest: dict) -> str:
    """The sha256 of a manifest's content: every field but ``manifest_sha256``, as canonical JSON (sorted keys, no
    spaces), so reformatting the file keeps it and changing any value does not."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write the manifest of the export assembled in ``folder``, written last: it records the sha256 of every other
    file there (``files``) and of its own content (``manifest_sha256``)."""
    files = {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST_FILE}
    manifest = {**manifest, "files": files}
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


# --- reading and running ----------------------------------------------------------------------------------------
def is_onnx_export(path: str | os.PathLike) -> bool:
    """True for a folder written by ``graftune export --format onnx`` (it holds the manifest); a run directory,
    a file or a missing path is not one."""
    p = Path(path)
    return p.is_dir() and (p / MANIFEST_FILE).is_file()


def read_manifest(path: str | os.PathLike) -> dict:
    file = Path(path) / MANIFEST_FILE
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{file}: not a readable manifest ({e}); export the run again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{file}: not a graftune ONNX manifest (format {FORMAT!r}); export the run again")
    version = manifest.get("format_version", 0)
    if not _is_int(version) or version < 1:
        raise ArtifactError(f"{file}: format_version is {_shown(version)}, not a version number; export the run again")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{file}: format version {version} is newer than this graftune reads ({FORMAT_VERSION}); "
                            "upgrade graftune")
    if version >= HASHED_SINCE and manifest.get("manifest_sha256") != manifest_sha256(manifest):
        raise ArtifactError(f"{file}: its content is not what was exported (manifest_sha256 does not match: a label "
                            "name, setting or hash was edited since); export the run again")
    needed = ("label_names", "preprocess", "sha256") if manifest.get("task") == "image" else (
        "label_names", "max_length", "pad_id", "sha256") + (("embedding", "head") if "head" in manifest else ())
    needed += ("files",) if version >= HASHED_SINCE else ()
    missing = [k for k in needed if k not in manifest]
    if missing:
        raise ArtifactError(f"{file}: lacks {', '.join(missing)}; export the run again")
    _check_fields(manifest, file)
    return manifest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_file_name(name: Any) -> bool:
    """A path inside the export folder: relative, no ``..``."""
    return isinstance(name, str) and bool(name) and not Path(name).is_absolute() and ".." not in Path(name).parts \
        and "\\" not in name


def _check_fields(manifest: dict, file: Path) -> None:
    """The types and ranges of the fields the runners read; one line naming the field otherwise."""
    def bad(field: str, value: Any, expected: str) -> ArtifactError:
        return ArtifactError(f"{file}: {field} is {_shown(value)}; expected {expected}; export the run again")

    labels = manifest["label_names"]
    if not (isinstance(labels, list) and labels and all(isinstance(n, str) for n in labels)):
        raise bad("label_names", labels, "a non-empty list of label names")
    if len(set(labels)) != len(labels):
        raise bad("label_names", labels, "distinct label names")
    if not isinstance(manifest.get("multi_label", False), bool):
        raise bad("multi_label", manifest["multi_label"], "true or false")
    if not _is_file_name(manifest.get("model_file", MODEL_FILE)):
        raise bad("model_file", manifest["model_file"], "a file name inside the export")
    files = manifest.get("files", {})
    if not (isinstance(files, dict) and all(_is_file_name(k) and isinstance(v, str) for k, v in files.items())):
        raise bad("files", files, "file names inside the export and their sha256")
    if manifest.get("task") == "image":
        return
    for field, least in (("max_length", 1), ("pad_id", 0)):
        if not _is_int(manifest[field]) or manifest[field] < least:
            raise bad(field, manifest[field], f"an integer of at least {least}")
    if "head" in manifest:
        head, emb = manifest["head"], manifest["embedding"]
        if not (isinstance(head, dict) and _is_file_name(head.get("file")) and isinstance(head.get("sha256"), str)):
            raise bad("head", head, "the head's file and sha256")
        if not (isinstance(emb, dict) and _is_int(emb.get("max_chunks")) and emb["max_chunks"] >= 1
                and _is_int(emb.get("special_tokens")) and 0 <= emb["special_tokens"] < manifest["max_length"]):
            raise bad("embedding", emb, f"max_chunks of at least 1 and special_tokens below max_length "
                      f"({manifest['max_length']})")


def _unchanged(file: Path, sha256: str) -> Path:
    """``file``, refused when missing or when its sha256 is not the one the manifest recorded at export."""
    if not file.is_file():
        raise ArtifactError(f"{file.parent}: {file.name} is missing; export the run again")
    if file_sha256(file) != sha256:
        raise ArtifactError(f"{file}: its sha256 is not the one recorded at export (the file changed since); "
                            "export the run again")
    return file


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class OnnxClassifier:
    """What every exported classifier does on ONNX Runtime once it has logits: probabilities, predictions and
    metrics, the same as the run it came from (``graftune.evaluate.predict`` / ``score_classification``).
    :meth:`load` opens an export folder as the runner of its task: :class:`OnnxRun` (text),
    :class:`OnnxFewShotRun` (a few-shot run's text) or :class:`OnnxImageRun`."""

    kind = "classification"
    #: the graph's output this runner reads
    output = OUTPUT_NAME

    def __init__(self, model_file: str | os.PathLike, *, label_names: Sequence[str], multi_label: bool = False,
                 threads: int | None = None, manifest: dict | None = None):
        import onnxruntime as ort

        self.label_names, self.multi_label = list(label_names), bool(multi_label)
        self.manifest = manifest or {}
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only: its notices about unused initializers are noise here
        self.session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        shape = {o.name: o.shape for o in self.session.get_outputs()}.get(self.output)
        if shape is None:
            raise ArtifactError(f"{model_file}: the graph has no {self.output!r} output; export the run again")
        width, (expected, what) = shape[-1] if len(shape) == 2 else None, self._width()
        if _is_int(width) and width != expected:  # a symbolic width is not checked
            raise ArtifactError(f"{model_file}: the graph's {self.output} has {width} columns, but there are "
                                f"{expected} {what}; export the run again")

    def _width(self) -> tuple[int, str]:
        """How many columns the graph's output must have, and what they are."""
        return len(self.label_names), "label names"

    @staticmethod
    def load(path: str | os.PathLike, *, threads: int | None = None) -> OnnxRun | OnnxFewShotRun | OnnxImageRun:
        """Open an export directory; a file whose sha256 is not the manifest's (changed or truncated since the
        export: since format version 4 any file of the export, before it only ``model.onnx`` and
        ``head.safetensors``), or an edited manifest, is refused."""
        path = Path(path)
        manifest = read_manifest(path)
        model_name = manifest.get("model_file", MODEL_FILE)
        hashed = manifest["files"] if manifest["format_version"] >= HASHED_SINCE else {}
        if hashed:
            needed = [model_name] + ([] if manifest.get("task") == "image" else [TOKENIZER_FILE]) + (
                [manifest["head"]["file"]] if "head" in manifest else [])
            unhashed = [n for n in needed if n not in hashed]
            if unhashed:
                raise ArtifactError(f"{path / MANIFEST_FILE}: files lacks the sha256 of {', '.join(unhashed)}; export "
                                    "the run again")
            for name, sha256 in hashed.items():
                _unchanged(path / name, sha256)

        def unchanged(name: str, sha256: str) -> Path:  # each file is hashed once: those in files just were
            return path / name if name in hashed else _unchanged(path / name, sha256)

        model = unchanged(model_name, manifest["sha256"])
        common = {"label_names": manifest["label_names"], "threads": threads, "manifest": manifest}
        if manifest.get("task") == "image":
            try:
                preprocess = ImagePreprocess.from_dict(manifest["preprocess"])
            except (ValueError, KeyError, TypeError) as e:
                raise ArtifactError(f"{path / MANIFEST_FILE}: its preprocessing is not readable ({e}); upgrade "
                                    "graftune or export the run again") from None
            return OnnxImageRun(model, preprocess=preprocess, multi_label=manifest.get("multi_label", False),
                                **common)
        text = {"max_length": manifest["max_length"], "pad_id": manifest["pad_id"]}
        if "head" in manifest:
            head, emb = manifest["head"], manifest["embedding"]  # their fields: checked by read_manifest
            windows = {"max_chunks": emb["max_chunks"], "special_tokens": emb["special_tokens"]}
            return OnnxFewShotRun(model, path / TOKENIZER_FILE, unchanged(head["file"], head["sha256"]), **windows,
                                  **text, **common)
        return OnnxRun(model, path / TOKENIZER_FILE, multi_label=manifest.get("multi_label", False), **text, **common)

    def logits(self, inputs: Sequence[Any], *, batch_size: int = 32) -> np.ndarray:
        raise NotImplementedError

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-logits)) if self.multi_label else _softmax(logits)

    def predict(self, inputs: Sequence[Any], *, batch_size: int = 32) -> list[dict]:
        """One dict per input, as ``graftune.evaluate.predict``: ``label`` (``labels`` for multi-label) and the
        ``probabilities`` of every class."""
        out = []
        for row in self.probabilities(self.logits(inputs, batch_size=batch_size)):
            p = {name: round(float(v), 6) for name, v in zip(self.label_names, row)}
            if self.multi_label:
                out.append({"labels": [n for n, v in p.items() if v >= 0.5], "probabilities": p})
            else:
                out.append({"label": self.label_names[int(row.argmax())], "probabilities": p})
        return out

    def score(self, inputs: Sequence[Any], labels: Sequence[Any], *, batch_size: int = 32) -> dict:
        """accuracy, macro-F1, per-class P/R/F1 and the confusion matrix
        (``graftune.tasks.classification.classification_metrics``) of the exported model on ``inputs``."""
        from graftune.tasks.classification import classification_metrics, encode_labels

        unseen = sorted({n for lab in labels for n in (lab if self.multi_label else (lab,))} - set(self.label_names))
        if unseen:
            raise DataError(f"labels the exported model was not trained on: {', '.join(map(str, unseen[:5]))}; "
                            f"it knows {', '.join(self.label_names)}")
        probs = self.probabilities(self.logits(inputs, batch_size=batch_size))
        pred = (probs >= 0.5).astype(np.int64) if self.multi_label else probs.argmax(axis=-1)
        y = np.asarray(encode_labels(labels, self.label_names, self.multi_label)).astype(np.int64)
        return classification_metrics(y, pred, self.label_names, self.multi_label)


class OnnxRun(OnnxClassifier):
    """An exported text classifier: texts tokenized with ``tokenizers``, batched as graftune batches them.

    Args:
        model_file: the ONNX graph (``input_ids``, ``attention_mask`` -> ``logits``).
        tokenizer_file: a ``tokenizers`` JSON file (``tokenizer.json``).
        label_names: class names; logit i is class ``label_names[i]``.
        max_length: texts are truncated to this many tokens (with the special tokens), as in training.
        pad_id: the token id of padding (masked out; any id gives the same logits).
        multi_label: independent sigmoid per label instead of a softmax.
        threads: ONNX Runtime's intra-op threads (None: its default, one per physical core).
    """

    def __init__(self, model_file: str | os.PathLike, tokenizer_file: str | os.PathLike, *, label_names: Sequence[str],
                 max_length: int, pad_id: int, multi_label: bool = False, threads: int | None = None,
                 manifest: dict | None = None):
        from tokenizers import Tokenizer

        self.max_length, self.pad_id = int(max_length), int(pad_id)
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # noqa: BLE001 (the Rust library raises a bare Exception on a malformed file)
            raise ArtifactError(f"{tokenizer_file}: not a readable tokenizer ({e}); export the run again") from None
        vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if not 0 <= self.pad_id < vocab:
            raise ArtifactError(f"{tokenizer_file}: pad_id {self.pad_id} is not one of its {vocab} token ids; export "
                                "the run again")
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        super().__init__(model_file, label_names=label_names, multi_label=multi_label, threads=threads,
                         manifest=manifest)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with the special tokens, truncated to ``max_length``: what the run's task encodes."""
        return [e.ids for e in self._encodings(texts)]

    def _encodings(self, texts: Sequence[str]) -> list:
        if not all(isinstance(t, str) for t in texts):
            raise DataError("an ONNX export of a text run classifies texts: pass strings")
        return self.tokenizer.encode_batch(list(texts), add_special_tokens=True)

    def logits(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """Float32 logits in the order of ``texts``; batches of similar length (longest first), padded on the
        right to the batch's longest, as ``graftune.evaluate.logits_of`` does."""
        return self.run_graph(self.encode(texts), batch_size=batch_size)

    def run_graph(self, ids: Sequence[Sequence[int]], *, batch_size: int = 32) -> np.ndarray:
        """The graph's output (float32, one row per sequence of token ids, in their order), on batches of similar
        length (longest first) padded on the right to the batch's longest."""
        out: np.ndarray | None = None
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(ids[i]) for i in idx)
            input_ids = np.full((len(idx), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for row, i in enumerate(idx):
                input_ids[row, :len(ids[i])] = ids[i]
                mask[row, :len(ids[i])] = 1
            result = self.session.run([self.output], {"input_ids": input_ids, "attention_mask": mask})[0]
            if out is None:
                out = np.zeros((len(ids), result.shape[1]), dtype=np.float32)
            out[idx] = result
        return out if out is not None else np.zeros((0, len(self.label_names)), dtype=np.float32)


class OnnxFewShotRun(OnnxRun):
    """An exported few-shot text classifier (``--method contrastive`` or ``probe``): the graph gives a window's
    pooled embedding, and the rest of ``recipes.fewshot.embed`` and the head run here in numpy. A text longer than
    ``max_length`` tokens is read as up to ``max_chunks`` consecutive windows (the tokenizer's overflow, special
    tokens in each); the text's embedding is the mean of its windows' L2-normalized embeddings weighted by their
    real tokens, L2-normalized; its logits are ``embedding @ weight.T + bias``, whose softmax is the head's
    ``predict_proba``.

    Args:
        model_file: the ONNX graph (``input_ids``, ``attention_mask`` -> ``embedding``).
        tokenizer_file: a ``tokenizers`` JSON file (``tokenizer.json``).
        head_file: safetensors with ``weight`` (labels x hidden) and ``bias`` (labels), rows in ``label_names``
            order (a class the head never saw: bias -inf, probability 0).
        label_names: class names.
        max_length: tokens per window, special tokens included.
        pad_id: the token id of padding.
        max_chunks: windows read per text, at most.
        special_tokens: special tokens in each window (not counted in its weight).
        threads: as :class:`OnnxRun`.
    """

    output = EMBEDDING_OUTPUT

    def __init__(self, model_file: str | os.PathLike, tokenizer_file: str | os.PathLike,
                 head_file: str | os.PathLike, *, label_names: Sequence[str], max_length: int, pad_id: int,
                 max_chunks: int, special_tokens: int, threads: int | None = None, manifest: dict | None = None):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        self.max_chunks, self.special_tokens = int(max_chunks), int(special_tokens)
        try:
            head = load_file(str(head_file))
        except (OSError, SafetensorError) as e:
            raise ArtifactError(f"{head_file}: not a readable head ({e}); export the run again") from None
        self.weight, self.bias = head.get("weight"), head.get("bias")
        rows = len(label_names)
        if (self.weight is None or self.bias is None or self.weight.ndim != 2 or self.weight.shape[0] != rows
                or self.bias.shape != (rows,) or self.max_chunks < 1 or self.special_tokens < 0):
            raise ArtifactError(f"{head_file}: expected weight ({rows} x hidden) and bias ({rows}) for the "
                                f"{rows} labels; export the run again")
        super().__init__(model_file, tokenizer_file, label_names=label_names, max_length=max_length, pad_id=pad_id,
                         threads=threads, manifest=manifest)

    def _width(self) -> tuple[int, str]:
        return self.weight.shape[1], "columns in the head's weight"

    def windows(self, texts: Sequence[str]) -> tuple[list[list[int]], list[int], list[int]]:
        """(window token ids, owning text index, real tokens per window), as ``recipes.fewshot`` splits texts: up
        to ``max_chunks`` windows a text; one that fits gives one window, its plain truncation."""
        windows, owners, weights = [], [], []
        for i, e in enumerate(self._encodings(texts)):
            for w in ([e] + list(e.overflowing))[:self.max_chunks]:
                windows.append(w.ids)
                owners.append(i)
                weights.append(max(len(w.ids) - self.special_tokens, 1))
        return windows, owners, weights

    def embeddings(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """(len(texts), hidden) L2-normalized text embeddings, as ``recipes.fewshot.embed`` gives them."""
        ids, owners, weights = self.windows(texts)
        if not ids:
            return np.zeros((0, self.weight.shape[1]), dtype=np.float32)
        parts = _normalize(self.run_graph(ids, batch_size=batch_size)) * np.asarray(weights, np.float32)[:, None]
        total = np.zeros((len(texts), parts.shape[1]), dtype=np.float32)
        np.add.at(total, owners, parts)
        return _normalize(total)

    def logits(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """Float32 logits (one per label) in the order of ``texts``: the head on their embeddings."""
        return self.embeddings(texts, batch_size=batch_size) @ self.weight.T + self.bias


def _normalize(x: np.ndarray) -> np.ndarray:
    """Rows over their L2 norm (at least 1e-12), as ``torch.nn.functional.normalize``."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class OnnxImageRun(OnnxClassifier):
    """An exported image classifier: images prepared in numpy (``preprocess``) as the run's transform prepares
    them, then the graph (``pixels`` -> ``logits``).

    Args:
        model_file: the ONNX graph.
        preprocess: the run's image preprocessing (recorded in the manifest).
        label_names, multi_label, threads: as :class:`OnnxRun`.
    """

    kind = "image"

    def __init__(self, model_file: str | os.PathLike, *, preprocess: ImagePreprocess, label_names: Sequence[str],
                 multi_label: bool = False, threads: int | None = None, manifest: dict | None = None):
        self.preprocess = preprocess
        super().__init__(model_file, label_names=label_names, multi_label=multi_label, threads=threads,
                         manifest=manifest)

    def pixels(self, images: Sequence[Any]) -> np.ndarray:
        """float32 (N, 3, size, size): the images as the graph takes them."""
        if any(isinstance(x, str | bytes) for x in images):
            raise DataError("an ONNX export of an image run classifies images: pass image files or arrays, not text")
        try:
            return self.preprocess(list(images))
        except ValueError as e:
            raise DataError(f"not an image the export can read: {e}") from None

    def logits(self, images: Sequence[Any], *, batch_size: int = 32) -> np.ndarray:
        """Float32 logits in the order of ``images``, ``batch_size`` images per run of the graph."""
        out = np.zeros((len(images), len(self.label_names)), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            batch = self.pixels(images[start:start + batch_size])
            out[start:start + len(batch)] = self.session.run([OUTPUT_NAME], {IMAGE_INPUT: batch})[0]
        return out
