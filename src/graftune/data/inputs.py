"""Inputs to predict, read from a file with where each one came from.

``graftune predict --input FILE`` answers every input with the place it came from, so a row of output can be
matched to its line even when blank lines are skipped: a ``.txt`` holds one text per line (its 1-based line
number, blank lines counted), a ``.jsonl`` one object per line, a ``.csv``/``.tsv`` one row per record (the line
the record starts on; the header is line 1); a folder or an image file gives images (their file names).

The file is read whole and checked (exists, readable, UTF-8, not empty, the text column present) before any model
is loaded: a typo in a path should cost a second, not a model load.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graftune.errors import DataError

__all__ = ["IMAGE_SUFFIXES", "Inputs", "read_image", "read_input_file"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_FORMS = "pass a .txt (one text per line), .jsonl or .csv file"


@dataclass
class Inputs:
    """What a file gave to predict.

    Args:
        items: the texts, or the images as float (3, H, W) tensors in [0, 1].
        sources: one per item, where it came from: ``{"line": n, "text": t}`` or ``{"file": name}``.
        skipped: 1-based line numbers of the blank lines (or rows with a blank text) left out.
        images: whether ``items`` are images.
    """

    items: list[Any] = field(default_factory=list)
    sources: list[dict] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    images: bool = False

    def note(self) -> str | None:
        """``"skipped 2 blank lines: 3, 7"``, or None when nothing was skipped."""
        if not self.skipped:
            return None
        n = len(self.skipped)
        shown = ", ".join(map(str, self.skipped[:20])) + (f" (and {n - 20} more)" if n > 20 else "")
        return f"skipped {n} blank line{'s' if n > 1 else ''}: {shown}"


def read_input_file(path: str | Path, *, text_column: str = "text", images: bool | None = None) -> Inputs:
    """Read ``path`` as inputs to predict, each with its line (or file name).

    Args:
        path: a .txt, .jsonl, .csv or .tsv file of texts; or an image file or a folder of images.
        text_column: the field of a .jsonl/.csv/.tsv file that holds the text.
        images: read images (True) or texts (False); None decides from the path (a folder or an image suffix).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file; {_FORMS}")
    if images is None:
        images = path.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES
    if images:
        return _read_images(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; {_FORMS}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; re-encode it to UTF-8") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e}); check its permissions") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        got = _read_jsonl(path, text, text_column)
    elif suffix in (".csv", ".tsv"):
        got = _read_table(path, text, text_column, "\t" if suffix == ".tsv" else ",")
    else:
        got = Inputs()
        for number, line in enumerate(_lines(text), start=1):
            _add(got, number, line)
    if not got.items:
        where = f"no '{text_column}' text in any row" if suffix in (".jsonl", ".csv", ".tsv") else "no text in it"
        raise DataError(f"{path}: {where}; put one text per line")
    return got


def _lines(text: str) -> list[str]:
    """The file's lines as an editor numbers them (``str.splitlines`` would also split on form feeds and
    Unicode line separators inside a text)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":  # the newline that ends the last line starts no new one
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _add(got: Inputs, number: int, value: Any) -> None:
    text = "" if value is None else str(value)
    if text.strip():
        got.items.append(text)
        got.sources.append({"line": number, "text": text})
    else:
        got.skipped.append(number)


def _read_jsonl(path: Path, text: str, column: str) -> Inputs:
    got = Inputs()
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            got.skipped.append(number)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {number}: not valid JSON ({e.msg}); fix the line") from None
        if not isinstance(row, dict) or column not in row:
            fields = f" (fields: {', '.join(map(str, row))})" if isinstance(row, dict) else ""
            raise DataError(f"{path} line {number}: no '{column}' field{fields}; use --text-column NAME")
        _add(got, number, row[column])
    return got


def _read_table(path: Path, text: str, column: str, delimiter: str) -> Inputs:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: the file is empty; write a header row with a '{column}' column, then one "
                        "text per row") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a valid {path.suffix[1:]} file ({e}); fix the file") from None
    if column not in header:
        raise DataError(f"{path}: no '{column}' column (columns: {', '.join(header)}); use --text-column NAME")
    index = header.index(column)
    got = Inputs()
    while True:
        number = reader.line_num + 1  # the line this record starts on
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{path} line {number}: {e}; fix the row") from None
        _add(got, number, row[index] if index < len(row) else "")
    return got


def _read_images(path: Path) -> Inputs:
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() \
        else [path]
    if not files:
        raise DataError(f"{path}: no image files in the folder; pass PNG or JPEG files or a folder of them")
    names = [str(f.relative_to(path)) if path.is_dir() else str(f) for f in files]
    return Inputs([read_image(f) for f in files], [{"file": n} for n in names], images=True)


def read_image(path: str | Path) -> torch.Tensor:
    """An image file as a float (3, H, W) tensor in [0, 1]."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DataError("reading images needs Pillow: pip install pillow") from None
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not a readable image ({e}); use PNG or JPEG files") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
