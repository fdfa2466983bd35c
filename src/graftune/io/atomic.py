"""The one atomic write of graftune: a file or a directory is assembled next to its destination and renamed into
place, so a crash or an error never leaves a half-written file at the destination (an existing one stays as it
was until the rename). Artifacts, run directories, checkpoints, results and metrics all write through here.

A write killed before its rename (SIGKILL, power loss) leaves its temporary ``.NAME.tmp-XXXXXXXX`` folder or
``.NAME.XXXXXXXX.tmp`` file beside the destination. The next write to the same destination removes such leftovers:
only names of exactly that pattern, only ones no live write holds (each write keeps an exclusive ``flock`` on its
temporary until it is renamed; the kernel drops the lock when the process dies, SIGKILL included) and only ones
older than ``STALE_AFTER_S`` (a write that has just created its temporary has not locked it yet). Where ``fcntl``
does not exist (Windows) nothing is removed: a live write could not be told from a dead one. Not removed either:
a ``.NAME.old-XXXXXXXX`` folder, the previous copy a replacing write moves aside between its two renames; killed
in that instant, it may be the only copy left, so it stays for the user to rename back.

A destination whose folder cannot be created (a parent that is a file, no permission, a read-only disk) is refused
in one line (:func:`check_creatable` before any work, and in the write itself), not with an ``OSError``.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from graftune.errors import ArtifactError, GraftuneError

try:
    import fcntl
except ImportError:  # Windows: no flock, so no way to tell a live write's temporary from a dead one's
    fcntl = None

#: a temporary must be at least this old (seconds since its last change) to be removed as a dead write's
STALE_AFTER_S = 60.0
#: the characters of ``tempfile``'s random names (8 of them in each temporary name)
_RANDOM = "[a-z0-9_]{8}"


# --- destinations that cannot be created ---------------------------------------------------------------------------
def cannot_create(shown: str | os.PathLike, what: str, reason: str, flag: str | None = "--out") -> str:
    """The one line for a destination that cannot be created: ``shown`` as the user gave it, ``what`` it was to
    hold, ``reason`` the OS's words (``Not a directory``), ``flag`` the option that named it (None: a path given in
    code)."""
    if flag:
        return f"{flag} {shown}: cannot create the {what} there ({reason}); choose another {flag}"
    return f"{shown}: cannot create the {what} there ({reason}); choose another path"


def check_creatable(path: str | os.PathLike, *, what: str, flag: str | None = "--out",
                    error: type[GraftuneError] = ArtifactError) -> Path:
    """``path``, refused (``error`` with :func:`cannot_create`'s line) when it could not be written by renaming a
    folder or file into place: the nearest folder above it that exists must be a directory this process may
    create entries in. Creates nothing, so it can run before any work."""
    path = Path(path)
    nearest = Path(os.path.abspath(path)).parent
    while not (nearest.exists() or nearest.is_symlink()):
        nearest = nearest.parent
    if not nearest.is_dir():
        raise error(cannot_create(path, what, os.strerror(errno.ENOTDIR), flag))
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise error(cannot_create(path, what, os.strerror(errno.EACCES), flag))
    return path


def make_dirs(path: str | os.PathLike, *, shown: str | os.PathLike, what: str, flag: str | None = "--out",
              error: type[GraftuneError] = ArtifactError) -> Path:
    """``mkdir -p path``; an ``OSError`` (a parent that is a file, no permission, a read-only disk) becomes
    ``error`` with :func:`cannot_create`'s line about ``shown``."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file where a folder of the path should be
        raise error(cannot_create(shown, what, os.strerror(errno.ENOTDIR), flag)) from None
    except OSError as e:
        raise error(cannot_create(shown, what, e.strerror or str(e), flag)) from None
    return path


# --- leftovers of killed writes --------------------------------------------------------------------------------------
def _lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive flock on ``path`` (a live write's mark on its temporary), or None
    where flock does not exist."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed writes to ``path`` left beside it (see the module docstring): names of
    exactly ``.NAME.tmp-XXXXXXXX`` (a folder) or ``.NAME.XXXXXXXX.tmp`` (a file), not locked by a live write and
    older than ``STALE_AFTER_S``. Returns what was removed."""
    path = Path(path)
    if fcntl is None or not path.parent.is_dir():
        return []
    name = re.escape(path.name)
    pattern = re.compile(rf"\.{name}\.tmp-{_RANDOM}|\.{name}\.{_RANDOM}\.tmp")
    removed = []
    try:
        entries = [e for e in os.scandir(path.parent) if pattern.fullmatch(e.name)]
    except OSError:
        return []
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
            if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)) or \
                    time.time() - info.st_mtime < STALE_AFTER_S:
                continue
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live write holds it
            os.close(fd)
            continue
        try:
            if stat.S_ISDIR(info.st_mode):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


# --- the writes ----------------------------------------------------------------------------------------------------
def write_file_atomically(path: str | os.PathLike, data: str | bytes | Callable[[Path], None]) -> Path:
    """Write ``data`` (text, bytes, or a function that writes the file it is given) to a temporary file next to
    ``path``, flush it to disk and rename it over ``path``."""
    path = Path(path)
    make_dirs(path.parent, shown=path, what="file", flag=None)
    remove_stale_temporaries(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise ArtifactError(cannot_create(path, "file", e.strerror or str(e), None)) from None
    tmp, lock = Path(name), None
    try:
        lock = _lock(tmp)
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
    finally:
        _unlock(lock)
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
    make_dirs(path.parent, shown=path, what="folder", flag=None)
    remove_stale_temporaries(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        raise ArtifactError(cannot_create(path, "folder", e.strerror or str(e), None)) from None
    lock = None
    try:
        lock = _lock(tmp)
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
    finally:
        _unlock(lock)
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
