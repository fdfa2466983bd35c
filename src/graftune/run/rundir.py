"""The run directory: where a run is assembled, what ``--overwrite`` may replace, and how it is put in place.

A run is built in ``.<name>.partial/`` next to ``out`` and renamed into place when complete, so a run directory is
never half-written. ``--overwrite`` replaces only a graftune run directory (one holding ``run.yaml``, or an empty
folder): an unrelated folder, a plain file, the current directory or one of its parents are refused with one line
and nothing is deleted. Every file a run writes goes through ``io.atomic``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from graftune.config import RunConfig, read_yaml
from graftune.data.checks import split_warnings
from graftune.errors import ConfigError
from graftune.io.atomic import check_creatable, make_dirs, write_file_atomically
from graftune.run.checkpoint import CHECKPOINT, checkpoint_file

#: the file every graftune run directory holds (the resolved config)
RUN_FILE = "run.yaml"


def partial_dir(out: str | Path) -> Path:
    """Where a run is assembled (and checkpointed) before it is renamed to ``out``."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def is_run_dir(path: str | Path) -> bool:
    """A directory graftune train wrote (its ``run.yaml`` is there)."""
    return (Path(path) / RUN_FILE).is_file()


def check_out(out: str | Path | None, *, overwrite: bool, what: str = "run directory",
              is_ours=is_run_dir, inputs: dict[str, str | Path | None] | None = None) -> Path:
    """``out`` checked as a folder to create, or to replace with ``overwrite``; a one-line ConfigError otherwise.

    ``is_ours``: whether an existing folder is one this kind of output wrote (``overwrite`` replaces only those,
    and empty folders). ``inputs``: ``{flag: path}`` the work reads (``--data`` ...): replacing a folder that holds
    one would delete the user's file."""
    if not out:
        raise ConfigError(f"out: missing; pass --out DIR (the {what} to write)")
    path = Path(out)
    here = Path.cwd().resolve()
    resolved = path.resolve()
    if path.name in ("", ".", "..") or resolved == here or resolved in here.parents:
        raise ConfigError(f"--out {out}: the current directory (or a folder above it) cannot be the {what}; name a "
                          "new folder, e.g. --out runs/mine")
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise ConfigError(f"--out {out} is a file, not a folder; choose another --out (nothing was changed)")
    check_creatable(path, what=what, error=ConfigError)  # a parent that is a file, a read-only disk: before any work
    if path.exists():
        ours = not any(path.iterdir()) or is_ours(path)
        if not overwrite:
            raise ConfigError(f"{out} already exists; choose another --out" + (" or pass --overwrite" if ours else
                              f" (it is not a graftune {what}, which --overwrite would not replace either)"))
        if not ours:
            raise ConfigError(f"{out} exists and is not a graftune {what}; --overwrite replaces only those, choose "
                              "another --out (nothing was deleted)")
        for flag, given in (inputs or {}).items():  # (an alias such as bbc-news is no path: exists() says so)
            if given and Path(given).exists() and resolved in (Path(given).resolve(), *Path(given).resolve().parents):
                raise ConfigError(f"--overwrite would delete {given}, which {flag} names inside {out}; move it out of "
                                  "the folder first, or choose another --out (nothing was deleted)")
    return path


def adapter_name(out: Path) -> str:
    """The saved adapter's name: the run directory's name, reduced to what adapter names allow."""
    name = re.sub(r"[^A-Za-z0-9_\-]", "-", Path(out).name).strip("-")[:60]
    if name and hasattr(nn.Module, name):  # a run directory called cpu/, train/, ...: not a usable key
        name += "-run"
    return name if name and name != "__base__" else "adapter"


def resume_config(out: str | Path) -> Path:
    """The saved config of the interrupted run in ``out``, for ``train --resume``; plain words when there is none."""
    work = partial_dir(out)
    if not checkpoint_file(work).is_file() or not (work / RUN_FILE).is_file():
        done = " (it is complete)" if (Path(out) / "metrics.json").is_file() else ""
        raise ConfigError(f"--resume: there is no interrupted run to continue in {out}{done}; start the run without "
                          "--resume")
    return work / RUN_FILE


def start_run_dir(cfg: RunConfig, *, write: bool = True) -> tuple[Path, Path]:
    """Check ``cfg.out`` (and, with --resume, the saved run); with ``write``, create the partial directory and
    write ``run.yaml`` into it. Returns ``(out, partial directory)``."""
    if cfg.resume:
        saved = resume_config(cfg.out)
        differ = {k: (v, getattr(cfg, k, None)) for k, v in read_yaml(saved).items() if getattr(cfg, k, None) != v}
        if differ:
            k, (was, now) = next(iter(differ.items()))
            raise ConfigError(f"--resume continues the saved run config, but {k} differs (saved {was!r}, given "
                              f"{now!r}); drop that flag or start a new run")
        out = Path(cfg.out)
        return out, partial_dir(out)
    out = check_out(cfg.out, overwrite=cfg.overwrite, inputs={
        "--data": cfg.data, "--test": cfg.test, "--init-from": cfg.init_from, "--stack-under": cfg.stack_under})
    work = partial_dir(out)
    if not write:
        return out, work
    if work.is_symlink() or work.exists():
        if work.is_symlink() or not work.is_dir() or (any(work.iterdir()) and not is_run_dir(work)):
            raise ConfigError(f"{work} is in the way (graftune assembles the run there, and it is not an "
                              "interrupted graftune run); move it or choose another --out (nothing was changed)")
        shutil.rmtree(work)  # an abandoned interrupted run: starting afresh replaces it
    make_dirs(work, shown=cfg.out, what="run directory", error=ConfigError)
    write_file_atomically(work / RUN_FILE, cfg.to_yaml())
    return out, work


@contextlib.contextmanager
def assembled_run(cfg: RunConfig) -> Iterator[tuple[Path, Path]]:
    """``with assembled_run(cfg) as (out, work):`` for a recipe that writes no checkpoints: the run is built in
    ``work``; an exception (Ctrl-C included) removes it, leaving no trace; success puts it in place at ``out``."""
    out, work = start_run_dir(cfg)
    try:
        yield out, work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finish_run_dir(work, out)


def finish_run_dir(work: Path, out: Path) -> None:
    """Put the assembled run in place: the checkpoint goes, an older run at ``out`` is replaced in two renames."""
    shutil.rmtree(work / CHECKPOINT, ignore_errors=True)
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        os.rename(work, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(work, out)


def write_json(path: Path, data: dict) -> None:
    """A run's JSON file (metrics.json, data_card.json, ...), written atomically."""
    write_file_atomically(path, json.dumps(data, indent=2) + "\n")


def write_run_files(work: Path, cfg: RunConfig, metrics: dict, splits, card: dict) -> None:
    """``metrics.json`` (with auto's record, the split notes and the data checks' warnings, when there are any) and
    ``data_card.json``, as every recipe writes them."""
    warnings = split_warnings(card.get("checks", {}))
    metrics.update({k: v for k, v in (("auto", cfg.auto), ("notes", splits.notes), ("warnings", warnings)) if v})
    write_json(work / "metrics.json", metrics)
    write_json(work / "data_card.json", card)
