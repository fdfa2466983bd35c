"""Classifiers exported as ONNX (``graftune export RUN_DIR --format onnx``) and run with ONNX Runtime.

An export directory is self-contained: running it builds no PyTorch model and never imports transformers (only
numpy, ``tokenizers`` and ``onnxruntime`` do the work; graftune itself still imports torch). What it holds:

=====================  =========================================================================================
``model.onnx``         the base with the adapters merged into its weights, the pooling and the classification
                       head: ``input_ids``, ``attention_mask`` (int64, batch x sequence, both axes dynamic) ->
                       ``logits`` (float32, batch x classes). Dynamic int8 weights with ``--quantize int8``.
``tokenizer.json`` ..  the base's tokenizer (``save_pretrained``); read here with the ``tokenizers`` library
``source_run.yaml``    the run's ``run.yaml``: which data and split it was trained and tested on
``graftune_onnx.json`` the manifest: label names, max length, pooling and pad id, the source run, graftune's
                       version, the opset, the sha256 of ``model.onnx`` and the export-time check
=====================  =========================================================================================

Why the tokenizer is read with ``tokenizers`` (the Rust library under transformers' fast tokenizers) and not
``AutoTokenizer``: importing transformers costs seconds, and a deployment that reads the folder from another
language has ``tokenizer.json`` readers everywhere. The export checks that both give the same token ids on the run's texts, so the two cannot drift apart silently.

The graph is traced with PyTorch's TorchScript exporter (``dynamo=False``): it exports transformers' encoders
with dynamic batch and sequence axes without the extra ``onnxscript`` dependency of the dynamo exporter. The trace
follows the Python branches taken on its example batch, so that batch has a padded row: transformers skips
building the attention mask for a batch without padding, and a graph traced that way would ignore the mask.

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graftune.errors import ArtifactError, ConfigError, DataError
from graftune.io.artifact import write_dir_atomically

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "graftune_onnx.json"
SOURCE_RUN_FILE = "source_run.yaml"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "graftune-onnx-classifier"
FORMAT_VERSION = 1
#: ONNX opset of the exported graph: 17 has LayerNormalization as one op; ONNX Runtime 1.14+ runs it
OPSET = 17
#: the export-time check: ONNX logits must be within this of PyTorch's float32 logits (absolute, any class)
TOLERANCE = 1e-3
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
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


def export_module(module, example: dict[str, Any], path: str | os.PathLike, *, opset: int = OPSET) -> None:
    """Trace ``module(input_ids, attention_mask) -> logits`` into an ONNX file with dynamic batch and sequence
    axes, and check the file with ``onnx.checker``. ``example`` must hold a padded row (see the module docstring)."""
    import onnx
    import torch

    mask = example["attention_mask"]
    if mask.shape[0] < 2 or bool(mask.bool().all()):
        raise ValueError("the example batch needs at least two rows, one of them padded")
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES} | {OUTPUT_NAME: {0: "batch"}}
    with _quiet(), torch.no_grad():
        torch.onnx.export(module, tuple(example[n] for n in INPUT_NAMES), str(path), input_names=list(INPUT_NAMES),
                          output_names=[OUTPUT_NAME], dynamic_axes=axes, opset_version=opset, dynamo=False)
    onnx.checker.check_model(str(path))


def quantize_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """ONNX Runtime's dynamic quantization: MatMul weights as signed int8, one scale per output channel;
    activations quantized per batch at run time (uint8), everything else float32. Per-channel scales keep the
    error of layers with a few large-magnitude rows small; ``reduce_range`` (7-bit weights) avoids the int16
    accumulator saturation of the u8s8 kernels on AVX2 CPUs without VNNI (ONNX Runtime's quantization guide)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         op_types_to_quantize=["MatMul"])


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_out_dir(out_dir: str | os.PathLike, *, overwrite: bool) -> Path:
    """Refuse, before any work, an ``--out`` that the export may not replace: an existing non-empty folder
    without ``--overwrite``, and with it anything but an earlier ONNX export (a user's folder is never deleted)."""
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
    return out


def write_export(out_dir: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool) -> Path:
    """Build the export in a temporary folder beside ``out_dir`` with ``write(tmp)``, then rename it into place:
    a failed check or an interrupted export leaves ``out_dir`` as it was."""
    return write_dir_atomically(check_out_dir(out_dir, overwrite=overwrite), write, markers=(MANIFEST_FILE,))


def write_manifest(folder: Path, manifest: dict) -> None:
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
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"{file}: format version {manifest['format_version']} is newer than this graftune "
                            f"reads ({FORMAT_VERSION}); upgrade graftune")
    missing = [k for k in ("label_names", "max_length", "pad_id", "sha256") if k not in manifest]
    if missing:
        raise ArtifactError(f"{file}: lacks {', '.join(missing)}; export the run again")
    return manifest


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class OnnxRun:
    """An exported classifier on ONNX Runtime: the same predictions and metrics as the run it came from
    (``graftune.evaluate.predict`` / ``score_classification``), from numpy, ``tokenizers`` and ``onnxruntime``.

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
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.label_names, self.max_length, self.pad_id = list(label_names), int(max_length), int(pad_id)
        self.multi_label, self.kind = bool(multi_label), "classification"
        self.manifest = manifest or {}
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # noqa: BLE001 (the Rust library raises a bare Exception on a malformed file)
            raise ArtifactError(f"{tokenizer_file}: not a readable tokenizer ({e}); export the run again") from None
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only: its notices about unused initializers are noise here
        self.session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])

    @classmethod
    def load(cls, path: str | os.PathLike, *, threads: int | None = None) -> OnnxRun:
        """Open an export directory; a ``model.onnx`` whose sha256 is not the manifest's (changed or truncated
        since the export) is refused."""
        path = Path(path)
        manifest = read_manifest(path)
        model = path / manifest.get("model_file", MODEL_FILE)
        if not model.is_file():
            raise ArtifactError(f"{path}: {model.name} is missing; export the run again")
        if file_sha256(model) != manifest["sha256"]:
            raise ArtifactError(f"{model}: its sha256 is not the one recorded at export (the file changed since); "
                                "export the run again")
        return cls(model, path / TOKENIZER_FILE, label_names=manifest["label_names"],
                   max_length=manifest["max_length"], pad_id=manifest["pad_id"],
                   multi_label=manifest.get("multi_label", False), threads=threads, manifest=manifest)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with the special tokens, truncated to ``max_length``: what the run's task encodes."""
        if not all(isinstance(t, str) for t in texts):
            raise DataError("an ONNX export classifies texts: pass strings")
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]

    def logits(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """Float32 logits in the order of ``texts``; batches of similar length (longest first), padded on the
        right to the batch's longest, as ``graftune.evaluate.logits_of`` does."""
        ids = self.encode(texts)
        out = np.zeros((len(ids), len(self.label_names)), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(ids[i]) for i in idx)
            input_ids = np.full((len(idx), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for row, i in enumerate(idx):
                input_ids[row, :len(ids[i])] = ids[i]
                mask[row, :len(ids[i])] = 1
            out[idx] = self.session.run([OUTPUT_NAME], {"input_ids": input_ids, "attention_mask": mask})[0]
        return out

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-logits)) if self.multi_label else _softmax(logits)

    def predict(self, texts: Sequence[str], *, batch_size: int = 32) -> list[dict]:
        """One dict per text, as ``graftune.evaluate.predict``: ``label`` (``labels`` for multi-label) and the
        ``probabilities`` of every class."""
        out = []
        for row in self.probabilities(self.logits(texts, batch_size=batch_size)):
            p = {name: round(float(v), 6) for name, v in zip(self.label_names, row)}
            if self.multi_label:
                out.append({"labels": [n for n, v in p.items() if v >= 0.5], "probabilities": p})
            else:
                out.append({"label": self.label_names[int(row.argmax())], "probabilities": p})
        return out

    def score(self, texts: Sequence[str], labels: Sequence[Any], *, batch_size: int = 32) -> dict:
        """accuracy, macro-F1, per-class P/R/F1 and the confusion matrix
        (``graftune.tasks.classification.classification_metrics``) of the exported model on ``texts``."""
        from graftune.tasks.classification import classification_metrics, encode_labels

        unseen = sorted({n for lab in labels for n in (lab if self.multi_label else (lab,))} - set(self.label_names))
        if unseen:
            raise DataError(f"labels the exported model was not trained on: {', '.join(map(str, unseen[:5]))}; "
                            f"it knows {', '.join(self.label_names)}")
        probs = self.probabilities(self.logits(texts, batch_size=batch_size))
        pred = (probs >= 0.5).astype(np.int64) if self.multi_label else probs.argmax(axis=-1)
        y = np.asarray(encode_labels(labels, self.label_names, self.multi_label)).astype(np.int64)
        return classification_metrics(y, pred, self.label_names, self.multi_label)
