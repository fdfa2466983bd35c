"""Versions on disk and the SQLite index: push, list, show, promote (through the gate), rollback, delete, audit.

Layout of a registry folder (nothing to start: the index is a file, opened per call; the first push creates it,
and nothing else does, so a mistyped path is refused instead of becoming an empty registry)::

    ROOT/index.sqlite           versions, the promotion history, the audit log, a change counter (WAL mode)
    ROOT/versions/NAME/N/       one immutable version: a run directory (run.yaml, adapter/ or head/,
                                metrics.json, data_card.json) + version.json (who, when, sha256 of every file)
    ROOT/.tmp/                  versions being assembled; never listed

Why it survives faults:
- a version is assembled in ``.tmp/`` and renamed into ``versions/`` inside the transaction that inserts its row,
  so a push killed midway leaves at most an unlisted folder: the index is the truth, and a folder without a row
  is an orphan that the next push of that number replaces (``.tmp/`` leftovers older than an hour are removed);
- version numbers come from a counter row updated under SQLite's write lock (``BEGIN IMMEDIATE``), so two pushes
  at once, from two processes, get distinct numbers; numbers are never reused, even after a delete;
- every stored file's sha256 is in version.json and version.json's own sha256 is in the index: ``verify`` (which
  ``show``, ``promote``, ``rollback`` and ``load`` call) re-hashes them and refuses a changed file in one line.
The stored files are made read-only as a further guard.

The index needs a local file system (SQLite's WAL does not work over NFS); several processes on one machine, e.g.
a server reading while a CLI promotes, are fine.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import shutil
import sqlite3
import stat
import time
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from graftune.config import build_config
from graftune.data.sources import ALIASES as DATA_ALIASES
from graftune.errors import ArtifactError, ConfigError, GraftuneError
from graftune.registry.gate import (
    ALPHA,
    GateResult,
    correctness,
    data_file,
    gate_numbers,
    metric_name,
    paired_test,
    recorded_test_split,
    unseen_labels,
)
from graftune.registry.servable import unservable
from graftune.run.loaded import LoadedRun
from graftune.runs import load_run
from graftune.zoo import list_models

try:  # the user's data folder, the platform's way, when platformdirs is there; XDG otherwise
    import platformdirs
except ImportError:  # pragma: no cover - depends on the environment
    platformdirs = None

INDEX = "index.sqlite"
VERSIONS = "versions"
TMP = ".tmp"
VERSION_FILE = "version.json"
FORMAT = "graftune-registry-version"
#: what a pushed version leaves out of the run directory: the training log and checkpoints are not the model
SKIPPED = {"log.jsonl", ".checkpoint"}
#: run.yaml fields that may name a local path relative to where training ran; a version stores them absolute
PATH_FIELDS = ("model", "data", "test", "init_from", "stack_under")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: ``.tmp/`` entries older than this are leftovers of a killed push
STALE_TMP_S = 3600
#: ``list`` (and ``show NAME``) re-hash a stored file up to this size, and compare a larger one's size with the one
#: recorded at push. What a version holds: run.yaml, metrics.json, data_card.json, adapter.json (kilobytes: the files
#: a person edits by hand) and the adapter's tensors, 0.1-2 MB for LoRA, IA3, bottleneck or a probe head on the
#: bases up to BERT-base size; so the usual version is re-hashed whole, at a few milliseconds. Only top-k or full
#: fine-tuning stores copies of base weights (90 MB for MiniLM, 500+ MB for a 135M causal LM): hashing those at every
#: ``list`` would cost seconds per version, so there a size check (truncation, a file swapped for another) stands in,
#: and ``show NAME@V``, ``promote`` and ``load`` re-hash every byte as before
QUICK_HASH_BYTES = 4 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL, version INTEGER NOT NULL, created TEXT NOT NULL, who TEXT, meta_sha256 TEXT NOT NULL,
    PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, last INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS promotions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, who TEXT, name TEXT NOT NULL, version INTEGER,
    action TEXT NOT NULL, forced INTEGER NOT NULL DEFAULT 0, reason TEXT, detail TEXT);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO state (key, value) VALUES ('generation', 0);
"""


def default_root(explicit: str | Path | None = None) -> Path:
    """``--registry DIR`` if given, else ``$GRAFTUNE_REGISTRY``, else ``graftune/registry`` in the user's data
    folder (platformdirs' when installed, else ``$XDG_DATA_HOME`` or ``~/.local/share``)."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("GRAFTUNE_REGISTRY"):
        return Path(os.environ["GRAFTUNE_REGISTRY"]).expanduser()
    if platformdirs is not None:
        return Path(platformdirs.user_data_dir("graftune", appauthor=False)) / "registry"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "graftune" / "registry"


def open_registry(explicit: str | Path | None = None) -> Registry:
    """The registry a command works on, as :func:`default_root` finds it. A folder named by ``--registry DIR`` or
    ``$GRAFTUNE_REGISTRY`` must hold one (a typo is refused in one line, not made into an empty registry); the
    default location, which no one types, reads as an empty registry until the first push (``registry list`` on a
    fresh account lists nothing, and creates nothing)."""
    named = bool(explicit) or bool(os.environ.get("GRAFTUNE_REGISTRY"))
    return Registry(default_root(explicit), missing_ok=not named)


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``"news@3"`` -> ``("news", 3)``; ``"news"`` -> ``("news", None)``."""
    name, at, number = ref.strip().partition("@")
    check_name(name)
    if not at:
        return name, None
    if not number.isdigit() or int(number) < 1:
        raise ConfigError(f"{ref!r}: a version is NAME@N with N a number from 1 (e.g. {name}@3)")
    return name, int(number)


def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise ConfigError(f"{name!r}: a registry name is 1-64 letters, digits, '.', '_' or '-', starting with a "
                          "letter or digit (e.g. news-classifier)")
    return name


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def who() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no user name here (a container without a passwd entry): still record something
        return f"uid:{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Version:
    """One immutable version: ``path`` is a run directory (``graftune.evaluate.load_run(version.path)`` loads it).

    Attributes mirror ``path/version.json``: ``task`` (classification, image or causal-lm), ``method``, the base
    model (as run.yaml names it, local paths made absolute) and its fingerprint (from adapter.json; None for a
    probe run, which has no adapter), a summary of metrics.json, a reference to the data card, and ``files``:
    ``{relative path: sha256}`` of every stored file but version.json (whose hash the index keeps), and ``sizes``, their
    sizes in bytes (recorded since this field exists; empty for older versions).

    ``damaged`` is set (to the one-line reason) on a version whose folder or version.json is gone or unreadable:
    :meth:`Registry.list` and :meth:`Registry.promoted` return such a version (name, number, who and when from the
    index, the rest empty) rather than fail for every name; :meth:`Registry.verify` and :meth:`Registry.load`
    raise for it. :meth:`Registry.list` also sets it on a version with a file changed, missing or added since push
    (its quick check: :data:`QUICK_HASH_BYTES`), the other fields then read from version.json."""

    name: str
    version: int
    path: Path
    created: str
    who: str
    task: str
    method: str
    label_names: list[str] = field(default_factory=list)
    base_model: str | None = None
    base_fingerprint: dict | None = None
    metrics: dict = field(default_factory=dict)
    data_card: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)
    source: str | None = None
    resolved_paths: dict = field(default_factory=dict)
    #: why the version cannot be used (its folder or version.json gone or unreadable, or for :meth:`Registry.list` a
    #: file changed, missing or added), for a version returned instead of failing; None when it read fine
    damaged: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["path"] = str(self.path)
        out["ref"] = self.ref
        return out

    @classmethod
    def read(cls, path: Path) -> Version:
        """The version stored in ``path``; a one-line ArtifactError (what is wrong, and the way out) when its folder
        or version.json is gone or unreadable."""
        meta, problem = _read_meta(path)
        if problem is not None:
            ref = f"{path.parent.name}@{path.name}"
            raise ArtifactError(f"{ref}: {problem}; {damaged_fix(ref)}")
        return cls.from_meta(path, meta)

    @classmethod
    def from_meta(cls, path: Path, meta: dict) -> Version:
        """The version in ``path`` described by ``meta`` (version.json's fields)."""
        keys = {f for f in cls.__dataclass_fields__ if f not in ("path", "damaged")}
        return cls(path=path, **{k: v for k, v in meta.items() if k in keys})


def damaged_fix(ref: str) -> str:
    """The way out of a damaged version, for its one-line error."""
    return f"the version is not usable: `graftune registry delete {ref}` removes it (even when promoted)"


def _read_meta(path: Path) -> tuple[dict, None] | tuple[None, str]:
    """``(version.json's fields, None)``, or ``(None, what is wrong)`` when the version's folder or version.json is
    missing or unreadable (damaged after push: the index still lists the version)."""
    file = path / VERSION_FILE
    if not path.is_dir():
        return None, f"its folder {path} is missing (removed after push)"
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"{file} is missing (removed after push)"
    except OSError as e:
        return None, f"{file} cannot be read ({e.strerror})"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, f"{file} is not valid JSON (changed after push)"
    required = ("name", "version", "created", "who", "task", "method")
    if not isinstance(meta, dict) or any(k not in meta for k in required):
        return None, f"{file} is not a version description (changed after push)"
    return meta, None


def missing_registry(root: Path) -> str:
    """The one line for a folder that holds no registry (a mistyped --registry, most often)."""
    return (f"no registry at {root} (nothing has been pushed there: no {INDEX}); check --registry / "
            "$GRAFTUNE_REGISTRY, or push a run first (`graftune registry push RUN_DIR --name NAME`)")


#: how long a registry call waits for another process's lock before it gives up
LOCK_WAIT_S = 60.0


def _wal(db: sqlite3.Connection) -> None:
    """Put the index in WAL mode (readers never wait for a writer). Processes opening a new index at once race to
    change its journal mode, and SQLite answers that race with "database is locked" at once, without waiting on the
    busy timeout (measured: 5 of 160 connections failed, 4 processes opening each of 40 fresh files together; 0 of 160
    with this retry). So the change is retried until the timeout."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class Registry:
    """A folder of versions with its SQLite index (see the module docstring). Safe to share between processes
    and threads: every call opens its own connection, and every change is one transaction.

    Only :meth:`push` creates a registry. Every other call on a folder without one raises a one-line ArtifactError
    (:func:`missing_registry`) and creates nothing, so a mistyped path is refused rather than made into an empty
    registry that a server then serves. ``missing_ok``: read such a folder as an empty registry instead (no
    versions, no log; a change still refuses): how the CLI reads the default location before the first push."""

    def __init__(self, root: str | Path, *, missing_ok: bool = False):
        self.root = Path(root).expanduser().absolute()
        self.missing_ok = missing_ok
        if self.exists():  # an index written by an older graftune gets the tables it lacks
            self._add_tables()

    def exists(self) -> bool:
        """Whether a registry is there (its index): false until the first push."""
        return (self.root / INDEX).is_file()

    def _create(self) -> None:
        """Make the folders and the index (push, the one call that creates a registry). The tables are added even
        when the index is there: another process's first push may have made the file and not yet its tables
        (each statement is ``IF NOT EXISTS``, in one transaction that waits for that push's)."""
        try:
            (self.root / VERSIONS).mkdir(parents=True, exist_ok=True)
            (self.root / TMP).mkdir(exist_ok=True)
        except OSError as e:
            raise ArtifactError(f"registry {self.root}: cannot create it ({e.strerror}); pass --registry DIR with a "
                                "writable folder") from None
        self._add_tables(create=True)

    def _add_tables(self, *, create: bool = False) -> None:
        with self._transaction(create=create) as db:
            for statement in _SCHEMA.split(";"):  # not executescript: it would commit the open transaction
                if statement.strip():
                    db.execute(statement)

    # --- the index ----------------------------------------------------------------------------------------------
    def _connect(self, *, create: bool = False) -> sqlite3.Connection:
        if not create and not self.exists():  # sqlite3.connect would create the file: a typo became a registry
            raise ArtifactError(missing_registry(self.root))
        try:
            db = sqlite3.connect(self.root / INDEX, timeout=LOCK_WAIT_S, isolation_level=None)
            _wal(db)
        except sqlite3.Error as e:
            raise ArtifactError(f"registry {self.root}: cannot open {INDEX} ({e}); pass --registry DIR with a "
                                "writable local folder") from None
        db.row_factory = sqlite3.Row
        return db

    @contextmanager
    def _transaction(self, *, create: bool = False) -> Iterator[sqlite3.Connection]:
        """One change = one transaction, holding the write lock from its start (BEGIN IMMEDIATE) so a read
        followed by a write (the next version number, the promoted version) cannot interleave with another's."""
        with closing(self._connect(create=create)) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        if self.missing_ok and not self.exists():  # an empty registry: every query finds nothing
            return []
        with closing(self._connect()) as db:
            try:
                return db.execute(sql, args).fetchall()
            except sqlite3.OperationalError as e:
                # the default location while its first push is creating the index: the file is there, its tables
                # not yet; still an empty registry
                if self.missing_ok and "no such table" in str(e):
                    return []
                raise

    @staticmethod
    def _bump(db: sqlite3.Connection) -> None:
        db.execute("UPDATE state SET value = value + 1 WHERE key = 'generation'")

    @staticmethod
    def _audit(db: sqlite3.Connection, name: str, version: int | None, action: str, *, forced: bool = False,
               reason: str | None = None, detail: dict | None = None) -> None:
        db.execute("INSERT INTO audit (at, who, name, version, action, forced, reason, detail) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (now(), who(), name, version, action, int(forced), reason,
                    json.dumps(detail, sort_keys=True) if detail else None))

    def _folder(self, name: str, version: int) -> Path:
        return self.root / VERSIONS / name / str(version)

    def _row(self, name: str, version: int | None) -> sqlite3.Row:
        check_name(name)
        if version is None:
            rows = self._read("SELECT * FROM versions WHERE name = ? ORDER BY version DESC LIMIT 1", (name,))
            if not rows:
                raise ArtifactError(f"registry {self.root}: no versions of {name!r}; `graftune registry push "
                                    f"RUN_DIR --name {name}` adds one")
        else:
            rows = self._read("SELECT * FROM versions WHERE name = ? AND version = ?", (name, version))
            if not rows:
                raise ArtifactError(f"registry {self.root}: no version {name}@{version}; `graftune registry list` "
                                    "shows what is there")
        return rows[0]

    # --- reading ------------------------------------------------------------------------------------------------
    def generation(self) -> int:
        """A counter that grows with every push, promote, rollback and delete: one cheap query, for a server to
        poll and reload :meth:`promoted` only when it changed."""
        rows = self._read("SELECT value FROM state WHERE key = 'generation'")
        return int(rows[0][0]) if rows else 0

    def list(self, name: str | None = None) -> list[Version]:
        """Every version (of ``name``, if given), by name then number, quickly checked: a version whose folder or
        version.json is gone or unreadable, or with a file missing, added or changed since push, comes back with
        ``damaged`` set (changed: re-hashed up to :data:`QUICK_HASH_BYTES` a file, a larger one's size compared;
        ``show`` re-hashes everything)."""
        rows = self._read("SELECT name, version, created, who, meta_sha256 FROM versions "
                          "WHERE (? IS NULL OR name = ?) ORDER BY name, version", (name, name))
        return [self._version_at(r, check=True) for r in rows]

    def _version_at(self, row: sqlite3.Row, *, check: bool = False) -> Version:
        """The version of an index row: read from its folder, or, when that cannot be read, a Version with
        ``damaged`` set and what the index knows (name, number, when, who). ``check``: also the quick check of its
        files (:meth:`_problem`), ``damaged`` set when it finds one."""
        path = self._folder(row["name"], row["version"])
        ref = f"{row['name']}@{row['version']}"
        meta, problem = _read_meta(path)
        if problem is None:
            v = Version.from_meta(path, meta)
            problem = self._problem(v, row["meta_sha256"], quick=True) if check else None
            return v if problem is None else replace(v, damaged=f"{problem}; {damaged_fix(ref)}")
        return Version(name=row["name"], version=row["version"], path=path, created=row["created"] or "",
                       who=row["who"] or "", task="", method="", damaged=f"{problem}; {damaged_fix(ref)}")

    def show(self, name: str, version: int | None = None) -> Version:
        """One version (the latest of ``name`` when ``version`` is None), verified: a file changed since push
        raises a one-line ArtifactError."""
        row = self._row(name, version)
        v = Version.read(self._folder(row["name"], row["version"]))
        self._verify(v, row["meta_sha256"])
        return v

    def verify(self, version: Version) -> None:
        """Re-hash every stored file of ``version`` (and version.json against the index); raise a one-line
        ArtifactError naming the first file that changed, went missing or appeared since push."""
        self._verify(version, self._row(version.name, version.version)["meta_sha256"])

    def _verify(self, v: Version, meta_sha256: str) -> None:
        if v.damaged:
            raise ArtifactError(f"{v.ref}: {v.damaged}")
        problem = self._problem(v, meta_sha256)
        if problem is not None:
            raise ArtifactError(f"{v.ref}: {problem}; {damaged_fix(v.ref)}")

    @staticmethod
    def _problem(v: Version, meta_sha256: str, *, quick: bool = False) -> str | None:
        """The first file of ``v`` that changed, went missing or appeared since push (what is wrong with it), or
        None. version.json is always re-hashed against the index (it is small and holds every other hash); the other
        files too, unless ``quick``: then a file over :data:`QUICK_HASH_BYTES` has its size compared with the one
        recorded at push instead (versions pushed before sizes were recorded: only that it is there)."""
        meta_file = v.path / VERSION_FILE
        if not meta_file.is_file():
            return f"{meta_file} is missing (removed after push)"
        if sha256_file(meta_file) != meta_sha256:
            return f"{meta_file} changed since push (sha256 differs)"
        for rel, digest in v.files.items():
            file = v.path / rel
            if not file.is_file():
                return f"{file} is missing (removed after push)"
            size = file.stat().st_size
            if rel in v.sizes and size != v.sizes[rel]:
                return f"{file} changed since push (size {size} bytes, {v.sizes[rel]} at push)"
            if (not quick or size <= QUICK_HASH_BYTES) and sha256_file(file) != digest:
                return f"{file} changed since push (sha256 differs)"
        for file in sorted(p for p in v.path.rglob("*") if p.is_file()):
            rel = file.relative_to(v.path).as_posix()
            if rel != VERSION_FILE and rel not in v.files:
                return f"{file} was added after push"
        return None

    def promoted(self) -> dict[str, Version]:
        """``{name: the promoted Version}`` for every name that has one (not verified: :meth:`load` or
        :meth:`verify` before serving). One damaged version does not hide the others: a promoted version whose
        folder or version.json is gone or unreadable is in the mapping with ``damaged`` set (the reason), and
        :meth:`verify` raises a one-line ArtifactError for it; the good ones are
        ``{n: v for n, v in reg.promoted().items() if not v.damaged}``."""
        rows = self._read("SELECT p.name, p.version, v.created, v.who FROM promotions p LEFT JOIN versions v "
                          "ON v.name = p.name AND v.version = p.version WHERE p.id = "
                          "(SELECT max(id) FROM promotions WHERE name = p.name) ORDER BY p.name")
        return {r["name"]: self._version_at(r) for r in rows}

    def promoted_version(self, name: str) -> int | None:
        rows = self._read("SELECT version FROM promotions WHERE name = ? ORDER BY id DESC LIMIT 1", (name,))
        return rows[0][0] if rows else None

    def load(self, name: str, version: int | None = None) -> LoadedRun:
        """The promoted version of ``name`` (or ``version``), verified, then loaded with ``load_run``."""
        if version is None:
            version = self.promoted_version(name)
            if version is None:
                raise ArtifactError(f"{name!r} has no promoted version; `graftune registry promote {name}@N` first")
        return load_run(self.show(name, version).path)

    def log(self, name: str | None = None) -> list[dict]:
        """The audit log (of ``name``, if given), oldest first: push, promote, refused, rollback, delete, with
        who, when, whether forced, the reason and the gate's numbers."""
        rows = self._read("SELECT * FROM audit WHERE (? IS NULL OR name = ?) ORDER BY id", (name, name))
        out = []
        for r in rows:
            entry = dict(r)
            entry["forced"] = bool(entry["forced"])
            entry["detail"] = json.loads(entry["detail"]) if entry["detail"] else None
            out.append(entry)
        return out

    # --- push ---------------------------------------------------------------------------------------------------
    def push(self, run_dir: str | Path, name: str) -> Version:
        """Store a copy of ``run_dir`` (without its training log and checkpoints) as the next version of
        ``name``; local paths in its run.yaml (model, data) are stored absolute so the version loads and its test
        split rebuilds from anywhere."""
        check_name(name)
        run_dir = Path(run_dir)
        if not (run_dir / "run.yaml").is_file() or not any((run_dir / d).is_dir() for d in ("adapter", "head")):
            raise ArtifactError(f"{run_dir}: not a run directory (expected run.yaml and adapter/ or head/ written by "
                                "`graftune train --out`)")
        cfg = build_config(run_dir / "run.yaml")
        self._create()  # after the run is checked: a refused push leaves no registry behind
        self._clean_tmp()
        work = self.root / TMP / f"{name}-{uuid.uuid4().hex[:12]}"
        try:
            files = _copy_run(run_dir, work)
            resolved = _resolve_paths(work / "run.yaml", run_dir)
            files["run.yaml"] = sha256_file(work / "run.yaml")
            sizes = {rel: (work / rel).stat().st_size for rel in files}
            meta = _describe(work, cfg, files, resolved) | {"sizes": sizes, "source": str(run_dir.resolve())}
            with self._transaction() as db:
                row = db.execute("SELECT last FROM counters WHERE name = ?", (name,)).fetchone()
                number = (row[0] if row else 0) + 1
                meta = {"format": FORMAT, "format_version": 1, "name": name, "version": number, "created": now(),
                        "who": who()} | meta
                (work / VERSION_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
                _read_only(work)
                target = self._folder(name, number)
                if target.exists():  # an orphan: a push killed between its rename and its commit
                    _remove_tree(target)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(work, target)
                db.execute("INSERT INTO versions (name, version, created, who, meta_sha256) VALUES (?, ?, ?, ?, ?)",
                           (name, number, meta["created"], meta["who"], sha256_file(target / VERSION_FILE)))
                db.execute("INSERT INTO counters (name, last) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET "
                           "last = excluded.last", (name, number))
                self._audit(db, name, number, "push", detail={"source": meta["source"]})
                self._bump(db)
        finally:
            if work.exists():
                _remove_tree(work)
        return Version.read(target)

    def _clean_tmp(self) -> None:
        cutoff = time.time() - STALE_TMP_S
        for entry in (self.root / TMP).iterdir():
            try:
                if entry.stat().st_mtime < cutoff:
                    _remove_tree(entry)
            except OSError:  # another process removed it first
                pass

    # --- promote / rollback / delete ----------------------------------------------------------------------------
    def promote(self, name: str, version: int, *, data: str | None = None, force: bool = False,
                reason: str | None = None, alpha: float = ALPHA, text_column: str | None = None,
                label_column: str | None = None, prompt_column: str | None = None,
                response_column: str | None = None) -> GateResult:
        """Make ``name@version`` the promoted version, through the regression gate (``registry/gate.py``): the
        candidate and the promoted version are scored on the same held-out data (the candidate's test split as
        recorded at push, or every example of ``data``, read with the candidate's column settings unless the
        ``*_column`` arguments name others) and the candidate is refused when it is worse beyond sampling noise
        (one-sided exact McNemar test at ``alpha``: a candidate exactly as good is refused at most ``alpha`` of
        the time). A refusal returns ``accepted=False`` and is audited. A candidate whose label set differs from
        the promoted version's, or that is another kind of run, raises ConfigError. ``force`` (with ``reason``)
        promotes anyway (a changed label set too, not another kind of run), recorded with who, when and why; a
        ``reason`` without ``force`` is recorded and overrides nothing. The first promotion of a name has no gate.
        A version ``graftune serve`` cannot serve is promoted with a note saying so."""
        if force and not (reason or "").strip():
            raise ConfigError("--force needs --reason TEXT: the audit log records why a gate was overridden")
        if not 0 < alpha < 0.5:
            raise ConfigError(f"alpha {alpha}: use a significance level between 0 and 0.5 (default 0.05)")
        columns = {k: v for k, v in (("text_column", text_column), ("label_column", label_column),
                                     ("prompt_column", prompt_column), ("response_column", response_column)) if v}
        if columns and data is None:
            flags = ", ".join("--" + k.replace("_", "-") for k in columns)
            raise ConfigError(f"{flags} name the columns of a --data FILE: pass --data FILE too (the recorded test "
                              "split is read with the run's own columns)")
        reason = reason.strip() if reason and reason.strip() else None
        candidate = self.show(name, version)
        current = self.promoted_version(name)
        if current == version:
            return GateResult(name, version, accepted=True, gated=False, incumbent=current,
                                   message=f"{candidate.ref} is already the promoted version; nothing changed")
        if current is None:
            result = GateResult(name, version, accepted=True, gated=False, forced=False, reason=reason,
                                     message=f"{candidate.ref} promoted (the first promotion of {name}: no gate)")
        else:
            try:
                incumbent = self.show(name, current)
            except ArtifactError as e:  # a damaged promoted version must not block promoting a good one
                if not force:
                    raise ArtifactError(f"{e} (--force --reason TEXT promotes {candidate.ref} without the gate)") \
                        from None
                incumbent = None
                result = GateResult(name, version, accepted=True, gated=False, forced=True, reason=reason,
                                    incumbent=current, notes=[f"gate not run: {e}"],
                                    message=f"{candidate.ref} promoted with --force without the gate ({e})")
            if incumbent is not None:
                result = self._gate(candidate, incumbent, data=data, force=force, reason=reason, alpha=alpha,
                                    columns=columns)
        if result.accepted and (why := unservable(candidate.path)):
            kept = (f"a running server keeps serving {name}@{current} and a restarted one serves no version of "
                    f"{name}" if current is not None else f"a server serves no version of {name}")
            result.notes.append(f"`graftune serve` cannot serve {candidate.ref}: {why}; {kept} (it logs 'not "
                                f"serving {candidate.ref}'). `graftune predict` and `graftune eval` read it")
        if reason and not force:
            result.notes.append(f"--reason recorded in the audit log (`graftune registry log {name}`); without "
                                "--force it overrides nothing")
        detail = {k: v for k, v in result.to_dict().items() if k not in ("name", "version", "reason", "forced")}
        with self._transaction() as db:
            row = db.execute("SELECT version FROM promotions WHERE name = ? ORDER BY id DESC LIMIT 1",
                             (name,)).fetchone()
            if (row[0] if row else None) != current:
                raise ArtifactError(f"{name}: its promoted version changed while the gate ran (now "
                                    f"{name}@{row[0] if row else '-'}); run promote again")
            if not db.execute("SELECT 1 FROM versions WHERE name = ? AND version = ?", (name, version)).fetchone():
                raise ArtifactError(f"{candidate.ref} was deleted while the gate ran; nothing changed")
            if result.accepted:
                db.execute("INSERT INTO promotions (name, version) VALUES (?, ?)", (name, version))
                self._bump(db)
            self._audit(db, name, version, "promote" if result.accepted else "refused", forced=result.forced,
                        reason=reason, detail=detail)
        return result

    def _gate(self, candidate: Version, incumbent: Version, *, data: str | None, force: bool, reason: str | None,
              alpha: float, columns: dict[str, str]) -> GateResult:
        ref = candidate.ref
        if candidate.task != incumbent.task:
            raise ConfigError(f"{ref} is a {candidate.task} run and {incumbent.ref} (promoted) a {incumbent.task} "
                              "run: they cannot be compared; push it under another name")
        notes: list[str] = []
        relabelled = candidate.task != "causal-lm" and _label_change(candidate, incumbent)
        if relabelled and not force:
            raise ConfigError(f"{ref}'s labels differ from {incumbent.ref}'s (promoted): {relabelled}. Promoting it "
                              f"changes what {candidate.name} answers: push it under another name, or --force "
                              "--reason TEXT if the change is intended (recorded)")
        if relabelled:
            notes.append(f"label set changed (--force): {relabelled}")
        try:
            if data is not None:
                held = data_file(data, build_config(candidate.path / "run.yaml"), candidate.task, columns,
                                 multi_label=bool(candidate.data_card.get("multi_label")))
            else:
                held = recorded_test_split(candidate.path, candidate.task, ref)
        except GraftuneError as e:
            if not force:
                raise
            return GateResult(candidate.name, candidate.version, accepted=True, gated=False, forced=True,
                              reason=reason, incumbent=incumbent.version, notes=[*notes, f"gate not run: {e}"],
                              message=f"{ref} promoted with --force without the gate ({e})")
        multi = bool(candidate.data_card.get("multi_label"))
        unseen = unseen_labels(held, candidate.label_names, multi) if held.kind != "causal-lm" else []
        if unseen:
            raise ConfigError(f"{held.origin}: labels {ref} was not trained on: {', '.join(unseen[:5])}; it knows "
                              f"{', '.join(candidate.label_names)}")
        missing = unseen_labels(held, incumbent.label_names, multi) if held.kind != "causal-lm" else []
        if missing:
            notes.append(f"{incumbent.ref} was not trained on label(s) {', '.join(missing[:5])}: it gets those "
                         "examples wrong")
        ours, theirs = candidate.data_card.get("test_fingerprint"), incumbent.data_card.get("test_fingerprint")
        if data is None and ours and theirs and ours != theirs:
            notes.append(f"{incumbent.ref} was scored on another test split at training: it may have trained on "
                         "some of these examples (pass --data FILE with data neither saw)")
        stats = paired_test(correctness(candidate.path, held), correctness(incumbent.path, held),
                                 alpha=alpha)
        metric = metric_name(held.kind)
        refused = stats["refused"]
        b, c = stats["discordant"]
        numbers = gate_numbers(stats, ref, incumbent.ref, metric, held.origin, alpha)
        if not refused and stats["difference"] < 0:  # let through, but worse on these examples: say so plainly
            drop = -100 * stats["difference"]
            exact = (f"; the normal approximation's tolerance ({100 * stats['tolerance']:.1f}) is too narrow with "
                     "so few, and the exact test decides" if drop > 100 * stats["tolerance"] and stats["se"] > 0
                     else "")
            notes.append(f"{ref} is {drop:.1f} points below {incumbent.ref} here, but the two disagree on only "
                         f"{b + c} of {stats['examples']} examples: too few to tell that from noise (exact McNemar "
                         f"p={stats['p_value']:.3g} >= {alpha:g}{exact}). The gate cannot catch drops of this size "
                         "on so few examples; --data FILE with more held-out examples tightens it")
        if not refused:
            message = f"{ref} promoted: {numbers}"
        elif force:
            message = f"{ref} promoted with --force over the gate's refusal: {numbers}"
        else:
            message = (f"{ref} refused: worse than {incumbent.ref} beyond sampling noise: {numbers}; "
                       "--force --reason TEXT promotes it anyway (recorded)")
        return GateResult(candidate.name, candidate.version, accepted=not refused or force, gated=True,
                               message=message, incumbent=incumbent.version,
                               forced=force and (refused or bool(relabelled)),
                               reason=reason, refused=refused, metric=metric, examples=stats["examples"],
                               data=held.origin, candidate_score=stats["candidate"],
                               incumbent_score=stats["incumbent"], difference=stats["difference"], se=stats["se"],
                               tolerance=stats["tolerance"], p_value=stats["p_value"], alpha=alpha,
                               discordant=(b, c), notes=notes)

    def rollback(self, name: str) -> Version:
        """Promote again the most recent earlier promotion of ``name`` that is another version than the current
        one, still in the registry and intact (repeatable: each rollback goes one further back). Damaged versions
        on the way are passed over (the audit row lists them); the rolled-back version stays in the registry.
        Returns the version now promoted."""
        check_name(name)
        top = self._read("SELECT id, version FROM promotions WHERE name = ? ORDER BY id DESC LIMIT 1", (name,))
        if not top:
            raise ArtifactError(f"{name!r} has no promoted version to roll back from")
        current = top[0]["version"]
        row, target, skipped = self._earlier_promotion(name, current)
        if target is None:
            passed = f"; damaged, passed over: {', '.join(f'{name}@{v}' for v in skipped)}" if skipped else ""
            raise ArtifactError(f"{name}: no earlier promotion left to roll back to ({name}@{current} is promoted"
                                f"{passed}); `graftune registry promote {name}@N` promotes another version")
        detail: dict[str, Any] = {"from": current}
        if skipped:
            detail["skipped_damaged"] = skipped
        with self._transaction() as db:
            now_top = db.execute("SELECT id FROM promotions WHERE name = ? ORDER BY id DESC LIMIT 1",
                                 (name,)).fetchone()
            if now_top is None or now_top[0] != top[0]["id"]:
                raise ArtifactError(f"{name}: its promoted version changed meanwhile; run rollback again")
            # the promotions after the target go: the current one (every later repeat of it) and damaged ones
            db.execute("DELETE FROM promotions WHERE name = ? AND id > ?", (name, row["id"]))
            self._audit(db, name, target.version, "rollback", detail=detail)
            self._bump(db)
        return target

    def _earlier_promotion(self, name: str, current: int) -> tuple[sqlite3.Row | None, Version | None, dict]:
        """The most recent promotion of ``name`` that rollback can go back to: not ``current`` again, still in the
        registry, intact (verified). Returns its promotions row and Version (both None when there is none) and
        the damaged versions passed over, ``{"N": why}``."""
        rows = self._read("SELECT p.id, p.version FROM promotions p JOIN versions v ON v.name = p.name AND "
                          "v.version = p.version WHERE p.name = ? AND p.version != ? ORDER BY p.id DESC",
                          (name, current))
        skipped: dict[str, str] = {}
        for row in rows:
            if str(row["version"]) in skipped:
                continue
            try:
                return row, self.show(name, row["version"]), skipped
            except ArtifactError as e:
                skipped[str(row["version"])] = str(e)
        return None, None, skipped

    def delete(self, name: str, version: int) -> Version | None:
        """Remove ``name@version`` (its row, its place in the promotion history, its folder). Its number is not
        reused. Never the promoted version while it is intact (promote another or roll back first); a DAMAGED
        promoted version (a file changed, missing or added since push, its folder gone) can be deleted, and the
        name then goes back to its most recent earlier promotion that is intact, as :meth:`rollback` would (a
        running server switches to it), or has no promoted version when there is none. Both are audited (a
        ``delete`` row with the damage, a ``rollback`` row). Returns the version promoted after a damaged promoted
        version's delete (None when none is), else None."""
        self._row(name, version)
        damage = target = row = None
        skipped: dict = {}
        was_top = self._read("SELECT id, version FROM promotions WHERE name = ? ORDER BY id DESC LIMIT 1", (name,))
        if was_top and was_top[0]["version"] == version:
            try:
                self.show(name, version)
            except ArtifactError as e:
                damage = str(e)
            else:
                raise ArtifactError(f"{name}@{version} is the promoted version: promote another version or roll back "
                                    "first")
            row, target, skipped = self._earlier_promotion(name, version)
        with self._transaction() as db:
            top = db.execute("SELECT id, version FROM promotions WHERE name = ? ORDER BY id DESC LIMIT 1",
                             (name,)).fetchone()
            if damage is None and top is not None and top["version"] == version:
                raise ArtifactError(f"{name}@{version} is the promoted version: promote another version or roll back "
                                    "first")
            if damage is not None and (top is None or top["id"] != was_top[0]["id"]):
                raise ArtifactError(f"{name}: its promoted version changed meanwhile; run delete again")
            db.execute("DELETE FROM versions WHERE name = ? AND version = ?", (name, version))
            db.execute("DELETE FROM promotions WHERE name = ? AND version = ?", (name, version))
            if damage is None:
                self._audit(db, name, version, "delete")
            else:  # the promotions after the fallback go too: they are this version's or damaged ones
                db.execute("DELETE FROM promotions WHERE name = ? AND id > ?", (name, row["id"] if row else 0))
                self._audit(db, name, version, "delete", detail={"damaged": damage, "was_promoted": True})
                if target is not None:
                    detail = {"from": version} | ({"skipped_damaged": skipped} if skipped else {})
                    self._audit(db, name, target.version, "rollback", detail=detail)
            self._bump(db)
        _remove_tree(self._folder(name, version))  # a crash here leaves an orphan folder: never listed
        return target


# --- helpers ------------------------------------------------------------------------------------------------------
def _copy_run(run_dir: Path, work: Path) -> dict[str, str]:
    """Copy the files of ``run_dir`` that make the model (not its log, checkpoints or hidden files) to ``work``;
    return ``{relative path: sha256}`` of the copies."""
    files: dict[str, str] = {}
    for src in sorted(run_dir.rglob("*")):
        rel = src.relative_to(run_dir)
        if any(part in SKIPPED or part.startswith(".") for part in rel.parts) or rel.as_posix() == VERSION_FILE:
            continue
        if src.is_file():
            dst = work / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            files[rel.as_posix()] = sha256_file(dst)
    return files


def _resolve_paths(run_yaml: Path, run_dir: Path) -> dict[str, list[str]]:
    """Rewrite relative local paths in ``run_yaml`` (model folder, data files) as absolute ones, looked up from
    the working directory, then the run directory's parent, then the run directory. Aliases and hub ids stay.
    Returns ``{field: [as written, as stored]}``; the file is rewritten only when something changed."""
    raw = yaml.safe_load(run_yaml.read_text(encoding="utf-8")) or {}
    models = {m.alias for m in list_models()}
    resolved: dict[str, list[str]] = {}
    for key in PATH_FIELDS:
        value = raw.get(key)
        if not isinstance(value, str) or not value.strip():
            continue
        if (key == "model" and value.strip().lower() in models) or (key in ("data", "test") and value in DATA_ALIASES):
            continue
        path = Path(value).expanduser()
        if path.is_absolute():
            continue
        for base in (Path.cwd(), run_dir.parent, run_dir):
            if (base / path).exists():
                raw[key] = str((base / path).resolve())
                resolved[key] = [value, raw[key]]
                break
    if resolved:
        run_yaml.write_text(yaml.safe_dump(raw, sort_keys=False, default_flow_style=False), encoding="utf-8")
    return resolved


def _describe(work: Path, cfg, files: dict, resolved: dict) -> dict:
    """version.json's description of the run in ``work``: task, method, labels, base, metrics, data card."""
    adapter = _json(work / "adapter" / "adapter.json")
    extra = adapter.get("extra") or {}
    card = _json(work / "data_card.json")
    metrics = _json(work / "metrics.json")
    label_names = adapter.get("label_names") or card.get("label_names") or sorted(metrics.get("per_class") or {})
    model = resolved.get("model", [None, cfg.model])[1]
    test = (card.get("splits") or {}).get("test") or {}
    return {
        "task": extra.get("task") or cfg.task or "classification",
        "method": cfg.method,
        "label_names": list(label_names),
        "base_model": model,
        "base_fingerprint": adapter.get("base_fingerprint"),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None},
        "data_card": {"file": "data_card.json" if card else None, "origin": card.get("origin"),
                      "sha256": card.get("sha256"), "multi_label": bool(card.get("multi_label")),
                      "test_examples": test.get("examples"), "test_fingerprint": test.get("fingerprint")},
        "files": files,
        "resolved_paths": resolved,
    }


def _label_change(candidate: Version, incumbent: Version) -> str:
    """How the candidate's label set differs from the promoted version's ("added X; removed Y"), or "" when it does
    not (or when either recorded none). Order does not matter: answers are label names."""
    ours, theirs = set(candidate.label_names), set(incumbent.label_names)
    if not ours or not theirs or ours == theirs:
        return ""
    parts = [f"{what} {', '.join(sorted(labels)[:8])}{' ...' if len(labels) > 8 else ''}"
             for what, labels in (("added", ours - theirs), ("removed", theirs - ours)) if labels]
    return "; ".join(parts)


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{path}: not valid JSON; the run directory is damaged: train it again") from None
    return data if isinstance(data, dict) else {}


def _read_only(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            p.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


def _remove_tree(folder: Path) -> None:
    """Remove a registry-owned folder (its read-only files go with it: removal needs the folder's write bit); one
    already gone (a damaged version) is fine."""
    if folder.exists():
        shutil.rmtree(folder)
