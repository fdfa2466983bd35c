"""Which versions ``graftune serve`` can serve, read from a run directory's files without loading a model, so that
``registry promote`` can say so before a server finds out (a running server logs "not serving NAME@V" and keeps the
version it had; a restarted one serves no version of the name).

This is the server's one rule (``ModelStore._prepare`` in ``serve/store.py`` calls it): one shared base per batch
with one adapter per row, so an adapter must sit at a site that leaves the sequence and the base parameters alone
and declare ``mixed_batch``; a fitted head on frozen embeddings is served only for contrastive runs; no
``--stack-under`` (two adapters per row) and no image runs (the server reads text). The serve package imports the
registry, so the rule lives here, one layer below it.
"""

from __future__ import annotations

from pathlib import Path

from graftune.config import HEAD_ONLY, build_config
from graftune.core.method import get_method
from graftune.errors import GraftuneError
from graftune.io.artifact import read_meta
from graftune.recipes.fewshot_run import CONTRASTIVE, HEAD_DIR
from graftune.recipes.transfer import UNDER_DIR

#: adapter sites that share a mixed-adapter forward without changing the sequence (LoRA, IA3, bottleneck, BitFit)
MIXABLE_SITES = ("output", "input")


#: how :func:`unservable` begins its answer for a run it cannot read (no method advice applies to that)
UNREADABLE = "it cannot be read"


def unservable(run_dir: str | Path) -> str | None:
    """Why ``graftune serve`` cannot serve the run in ``run_dir`` (a clause, without the fix), or None when it can."""
    run_dir = Path(run_dir)
    try:
        cfg = build_config(run_dir / "run.yaml")
        if (run_dir / HEAD_DIR).is_dir() and cfg.method != CONTRASTIVE:
            return (f"a --method {cfg.method} run is the frozen base's embeddings and a fitted head, with no adapter "
                    "to share the base with others")
        if (run_dir / UNDER_DIR).exists():
            return "a --stack-under run applies two adapters per row, and mixed-adapter batches take one per row"
        meta = read_meta(run_dir / "adapter")
        kind = (meta.get("extra") or {}).get("task") or cfg.task or "classification"
        if kind == "image":
            return "image runs are not served (the server reads text)"
        method = meta["method"]
        if method == HEAD_ONLY:
            return None
        m = get_method(method)
    except GraftuneError as e:  # a run this graftune cannot read is not served either
        return f"{UNREADABLE} ({str(e).split(';')[0]})"
    if m.site not in MIXABLE_SITES or not m.capabilities.mixed_batch:
        why = "change the input sequence" if m.site == "model" else "replace base parameters"
        return f"{method} adapters {why}, so they cannot share a mixed-adapter batch"
    return None
