"""The one atomic write of graftune: a file or a directory is assembled next to its destination and renamed into
place, so a crash or an error never leaves a half-written file at the destination (an existing one stays as it
was until the rename). Artifacts, run directories, checkpoints, results and metrics all write through here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from graftune.errors import ArtifactError


def write_file_atomically(path: str | os.PathLike, data: str | bytes | Callable[[Path], None]) -> Path:
    """Write ``data`` (text, bytes, or a function that writes the file it is given) to a temporary file next to
    ``path``, flush it to disk and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_dir_atomically(path: str | os.PathLike, write: Callable[[Path], None],
                         markers: tuple[str, ...]) -> Path:
    """Build a directory with ``write(tmp_dir)`` next to ``path``, then rename it into place.

    An existing ``path`` is replaced only if it is an empty directory or holds one of ``markers`` (files that mark
    an earlier artifact of the same kind): a user's unrelated folder is never deleted. If ``write`` fails, ``path``
    is left as it was.
    """
    path = Path(path)
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or any((path / m).exists()
                                                                             for m in markers))):
        raise ArtifactError(f"{path} exists and is not a directory graftune wrote (no {' or '.join(markers)} in it); "
                            "refusing to overwrite it (choose another output path or remove it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)
        write(tmp)
        for f in tmp.iterdir():
            fsync(f)
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def fsync(path: Path) -> None:
    """Flush a file (or a directory entry) to disk where the file system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync directories
        pass
    finally:
        os.close(fd)
