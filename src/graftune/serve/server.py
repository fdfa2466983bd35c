"""What ``graftune serve`` and ``graftune drift`` call: assemble the store, the sources and the app, run uvicorn;
resolve a served name's version and compare its drift summary."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import torch
import uvicorn
from prometheus_client import disable_created_metrics

from graftune.errors import ConfigError
from graftune.registry import Registry, default_root, open_registry
from graftune.registry.servable import unservable
from graftune.registry.store import check_name, missing_registry
from graftune.serve.app import MergedSource, Settings, Source, StaticSource, create_app
from graftune.serve.drift import BUCKET_S, KEEP_S, DriftTracker, Window, drift_report, parse_duration
from graftune.serve.schemas import Limits
from graftune.serve.store import ModelStore

log = logging.getLogger("graftune.serve")

#: --log-level values (uvicorn's names, less its "trace", which Python's logging does not know)
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def drift_folder(registry_root: str | Path | None) -> Path:
    """Where served-input summaries live by default: a folder next to the registry, ``<registry>-drift``."""
    root = default_root(registry_root).absolute()
    return root.with_name(f"{root.name}-drift")


def parse_runs(runs: Sequence[str]) -> dict[str, Path]:
    """``["news=runs/news", ...]`` -> ``{"news": Path("runs/news")}``, with one-line errors."""
    out: dict[str, Path] = {}
    for item in runs:
        name, eq, folder = item.partition("=")
        name = name.strip()
        if not eq or not name or not folder.strip():
            raise ConfigError(f"--run {item!r}: write NAME=RUN_DIR (e.g. --run news=runs/news)")
        try:  # the names the registry takes: a served name is a URL's and a drift folder's part
            check_name(name)
        except ConfigError as e:
            raise ConfigError(f"--run {item!r}: {e}") from None
        if name in out:
            raise ConfigError(f"--run: the name {name!r} is given twice; give each served name once")
        if not (Path(folder) / "run.yaml").is_file():
            raise ConfigError(f"--run {item}: {folder} is not a run directory (no run.yaml); pass a `graftune train "
                              "--out` folder")
        out[name] = Path(folder)
    return out


def build_source(registry: str | None, runs: Sequence[str]) -> tuple[Source, Path | None]:
    """The registry (when ``--registry`` is given, or when no ``--run`` is), plus fixed ``--run`` directories. The
    registry must exist: serving an empty one made up on the spot (a mistyped folder) would serve nothing."""
    static = parse_runs(runs)
    if registry is None and static:
        return StaticSource(static), None
    root = default_root(registry).absolute()
    if not Registry(root, missing_ok=True).exists():  # the same line as every registry command, and serve's other way
        raise ConfigError(f"{missing_registry(root)}; or serve run directories with --run NAME=RUN_DIR")
    reg = Registry(root)
    return (MergedSource(reg, StaticSource(static)) if static else reg), reg.root


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before any model loads (uvicorn binds only after its startup, which loads
    every model): a port in use is refused in one line at once."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port: got {port}; use a port between 1 and 65535")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart reuses the port at once
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); stop what uses "
                          "the port or pick another --port") from None
    return sock


def serve(*, registry: str | None = None, runs: Sequence[str] = (), host: str = "127.0.0.1", port: int = 8000,
          max_batch: int = 32, max_wait_ms: float = 5.0, api_key: str | None = None, drift_dir: str | None = None,
          poll_s: float = 1.0, limits: Limits | None = None, threads: int | None = None,
          log_level: str = "info", drift_bucket: str | None = None, drift_keep: str | None = None) -> None:
    """Run the server until interrupted (uvicorn, one process: the models live in it). ``drift_bucket`` and
    ``drift_keep`` are durations ("1h", "7d"): the width of the drift summaries' time buckets and how long they
    are kept."""
    # every option is checked, and the port bound, before anything loads: a mistake costs one line, not a start
    settings = Settings(max_batch=max_batch, max_wait_ms=max_wait_ms, poll_s=poll_s, api_key=api_key,
                        limits=limits or Limits())
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads: got {threads}; use 1 or more torch CPU threads (leave it out for torch's "
                          "default)")
    if log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"--log-level: got {log_level!r}; use {', '.join(LOG_LEVELS)}")
    log_level = log_level.lower()
    source, reg_root = build_source(registry, runs)
    folder = Path(drift_dir) if drift_dir else (drift_folder(reg_root) if reg_root else Path("graftune-drift"))
    tracker = DriftTracker(folder, bucket_s=parse_duration(drift_bucket, option="--drift-bucket") if drift_bucket
                           else BUCKET_S, keep_s=parse_duration(drift_keep, option="--drift-keep") if drift_keep
                           else KEEP_S)
    sock = bind(host, port)
    if threads is not None:
        torch.set_num_threads(threads)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    disable_created_metrics()  # the *_created series double the output and say nothing here
    store = ModelStore(observer=tracker)
    app = create_app(store, source, settings, tracker=tracker)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("listening on %s without --api-key: anyone who can reach it can use it", host)
    log.info("drift summaries go to %s", folder)
    # uvicorn says where it listens only when it binds the socket itself: said here, with the address bound
    bound_host, bound_port = sock.getsockname()[:2]
    log.info("listening on http://%s:%d (POST /v1/predict or /v1/generate, GET /v1/adapters, /health, /metrics); "
             "requests are answered once the models have loaded",
             f"[{bound_host}]" if ":" in bound_host else bound_host, bound_port)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with sock:
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False)
        uvicorn.Server(config).run(sockets=[sock])


def check_drift(name: str, *, registry: str | None = None, run: str | None = None, version: int | None = None,
                drift_dir: str | None = None, alpha: float = 0.01, split: str = "train", since: str | None = None,
                last: int | None = None, everything: bool = False) -> dict:
    """``graftune drift NAME``: the promoted version of ``name`` (or ``version``) in the registry, or a ``--run``
    directory served as NAME (version 1), against what the server recorded for it in the window ``since`` (a
    duration, "6h"; default the last 24 hours), or the newest ``last`` inputs, or ``everything`` kept."""
    if split not in ("train", "val", "test"):
        raise ConfigError(f"--split: got {split!r}; use train, val or test")
    window = Window.parse(since, last, everything)
    if run is not None:
        if not (Path(run) / "run.yaml").is_file():
            raise ConfigError(f"--run {run}: not a run directory (no run.yaml)")
        folder = Path(drift_dir) if drift_dir else Path("graftune-drift")
        _check_served(f"{name}@{version or 1}", run, "--run")
        return drift_report(name, str(version or 1), run, folder, alpha=alpha, split=split, window=window)
    reg = open_registry(registry)  # a mistyped --registry is refused, not created empty
    if version is None:
        version = reg.promoted_version(name)
        if version is None:
            raise ConfigError(f"{name!r} has no promoted version in {reg.root}; pass --version N or promote one")
    v = reg.show(name, version)
    _check_served(v.ref, v.path, "the version")
    folder = Path(drift_dir) if drift_dir else drift_folder(reg.root)
    return drift_report(name, str(v.version), v.path, folder, alpha=alpha, split=split, window=window)


def _check_served(ref: str, run_dir: str | Path, what: str) -> None:
    """Drift compares what a server recorded: a version `graftune serve` refuses has nothing recorded, and the
    "serve it with `graftune serve`" of an empty window would send the user to a server that refuses it."""
    why = unservable(run_dir)
    if why:
        raise ConfigError(f"{ref}: `graftune serve` cannot serve {what} ({why}), so no served inputs of it are "
                          "recorded to judge; drift watches a served LoRA, IA3, bottleneck, head-only or contrastive "
                          "run (`graftune predict` reads this one)")
