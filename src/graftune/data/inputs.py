"""Inputs to predict, read from a file with where each one came from.

``graftune predict --input FILE`` answers every input with the place it came from, so a row of output can be
matched to its line even when blank lines are skipped: a ``.txt`` holds one text per line (its 1-based line
number, blank lines counted), a ``.jsonl`` one object per line, a ``.csv``/``.tsv`` one row per record (the line
the record starts on; the header is line 1), a ``.json`` a list of records (record N, from 0), a ``.parquet`` /
``.arrow`` table rows (row N, from 0); a folder or an image file gives images (their file names). Files of records
are parsed by ``data.sources.read_records``, as training data is.

The file is read whole and checked (exists, readable, UTF-8, not empty, the text column present) before any model
is loaded: a typo in a path should cost a second, not a model load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graftune.data.sources import check_not_nested, count_of, decode_text, match_column, read_records
from graftune.errors import DataError

__all__ = ["IMAGE_SUFFIXES", "Inputs", "read_image", "read_input_file"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_SAVE_AS = "a .txt (one text per line), .csv, .jsonl, .json or .parquet file"
_FORMS = f"pass {_SAVE_AS}"
RECORD_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".arrow")
#: files that are not text, though a user may hold texts in them: refused by name, not as "not UTF-8"
_BINARY = (".xlsx", ".xls", ".docx", ".doc", ".pdf", ".odt", ".ods", ".zip", ".gz", ".pkl", ".npy")


@dataclass
class Inputs:
    """What a file gave to predict.

    Args:
        items: the texts, or the images as float (3, H, W) tensors in [0, 1].
        sources: one per item, where it came from: ``{"line": n, "text": t}`` or ``{"file": name}``.
        skipped: what was left out blank: 1-based line numbers, or ``"record N"`` / ``"row N"`` (from 0) for a
            .json or a table.
        images: whether ``items`` are images.
    """

    items: list[Any] = field(default_factory=list)
    sources: list[dict] = field(default_factory=list)
    skipped: list[int | str] = field(default_factory=list)
    images: bool = False

    def note(self) -> str | None:
        """``"skipped 2 blank lines (lines 3, 7)"`` (``"skipped 1 blank text (record 1)"`` for a .json or a table),
        or None when nothing was skipped."""
        if not self.skipped:
            return None
        n = len(self.skipped)
        shown = ", ".join(map(str, self.skipped[:20])) + (f" and {n - 20} more" if n > 20 else "")
        if all(isinstance(s, int) for s in self.skipped):
            return f"skipped {count_of(n, 'blank line')} ({'lines' if n > 1 else 'line'} {shown})"
        return f"skipped {count_of(n, 'blank text')} ({shown})"


def read_input_file(path: str | Path, *, text_column: str = "text", images: bool | None = None) -> Inputs:
    """Read ``path`` as inputs to predict, each with its line (or record, row, file name).

    Args:
        path: a .txt (or any other text file: one text per line); a .csv, .tsv, .jsonl, .json, .parquet or .arrow
            file of records, read as training data is (``data.sources.read_records``); or an image file or a
            folder of images.
        text_column: the field of a file of records that holds the text.
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
    suffix = path.suffix.lower()
    if suffix in RECORD_SUFFIXES:
        got = _read_records(path, text_column)
    else:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"{path}: cannot read it ({e.strerror or e}); check its permissions") from None
        if suffix in _BINARY:
            raise DataError(f"{path}: a {suffix} file is not text; save the texts as {_SAVE_AS}")
        got = Inputs()
        for number, line in enumerate(_lines(decode_text(data, str(path))), start=1):
            _add(got, {"line": number}, line)
    if not got.items:
        where = f"no '{text_column}' text in any row" if suffix in RECORD_SUFFIXES else "no text in it"
        raise DataError(f"{path}: {where}; put one text per line")
    return got


def _lines(text: str) -> list[str]:
    """The file's lines as an editor numbers them (``str.splitlines`` would also split on form feeds and
    Unicode line separators inside a text)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":  # the newline that ends the last line starts no new one
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _add(got: Inputs, where: dict, value: Any) -> None:
    text = "" if value is None else str(value)
    if text.strip():
        got.items.append(text)
        got.sources.append({**where, "text": text})
    else:
        kind, number = next(iter(where.items()))
        got.skipped.append(number if kind == "line" else f"{kind} {number}")


def _read_records(path: Path, column: str) -> Inputs:
    """A file of records: the text of each (``line N`` of a .csv/.tsv/.jsonl, ``record N`` of a .json, ``row N``
    of a .parquet/.arrow), blank ones skipped."""
    try:
        rows, locs, columns, _ = read_records(path, str(path))
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e}); check its permissions") from None
    found = match_column(column, columns)
    if found not in columns:
        raise DataError(f"{path}: no '{column}' column (columns: {', '.join(map(str, columns))}); use "
                        "--text-column NAME")
    got = Inputs()
    for row, loc in zip(rows, locs):
        kind, number = loc.split(" ", 1)
        if found not in row:
            raise DataError(f"{path} {loc}: no '{found}' field (fields: {', '.join(map(str, row))}); use "
                            "--text-column NAME")
        check_not_nested(row.get(found), found, f"{path} {loc}")
        _add(got, {kind: int(number)}, row.get(found))
    return got


def _read_images(path: Path) -> Inputs:
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() \
        else [path]
    if not files:
        raise DataError(f"{path}: no image files in the folder; pass PNG or JPEG files or a folder of them")
    if path.is_dir() and not any(f.suffix.lower() in IMAGE_SUFFIXES for f in files):
        raise DataError(f"{path}: a folder is read as images (for image runs), but it holds none; to classify "
                        f"texts {_FORMS}")
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
