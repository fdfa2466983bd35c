"""What a run tells while it runs: ``log.jsonl`` (one JSON object per event), an optional MLflow or TensorBoard
tracker, the progress bar, and the short forms of metrics that log lines carry."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from tqdm.auto import tqdm

from graftune.config import RunConfig
from graftune.errors import ConfigError


class RunLog:
    """log.jsonl (one JSON object per event), and optionally MLflow or TensorBoard."""

    def __init__(self, path: Path, cfg: RunConfig, *, resumed: bool):
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close(), open for the whole run)
        self.tracker = tracker(cfg, path.parent) if cfg.log_to else None
        if resumed:
            self.event("resume")

    def event(self, kind: str, **fields) -> None:
        self.file.write(json.dumps({"event": kind, "time": round(time.time(), 3), **fields}) + "\n")
        self.file.flush()
        if self.tracker is not None:
            step = fields.get("step") or fields.get("epoch") or 0
            scalars = {k: v for k, v in fields.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")}
            for group in ("val", "test"):  # metric dicts; the start event gives these splits' sizes as numbers
                if isinstance(fields.get(group), dict):
                    scalars.update({f"{group}_{k}": v for k, v in fields[group].items()})
            self.tracker(kind, scalars, step)

    def close(self) -> None:
        self.file.close()
        if self.tracker is not None:
            self.tracker("close", {}, 0)


class NullLog:
    """The log of a rank other than 0: every event is dropped (rank 0 writes log.jsonl)."""

    def event(self, kind: str, **fields) -> None:
        pass

    def close(self) -> None:
        pass


def tracker(cfg: RunConfig, folder: Path):
    """A function (event, scalars, step) for MLflow or TensorBoard; a clear error if the package is missing."""
    if cfg.log_to == "mlflow":
        check_mlflow(None, "--log-to mlflow")
        import mlflow

        run = mlflow.start_run()
        mlflow.log_params({k: str(v) for k, v in cfg.to_dict().items()})

        def log_mlflow(kind, scalars, step):
            if kind == "close":
                mlflow.end_run()
                return
            mlflow.log_metrics({f"{kind}/{k}": float(v) for k, v in scalars.items()}, step=step)

        log_mlflow.run = run
        return log_mlflow
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--log-to tensorboard needs tensorboard: pip install 'graftune[tracking]' (or drop "
                          "it)") from None
    writer = SummaryWriter(log_dir=str(folder / "tensorboard"))

    def log_tensorboard(kind, scalars, step):
        if kind == "close":
            writer.close()
            return
        for k, v in scalars.items():
            writer.add_scalar(f"{kind}/{k}", v, step)

    return log_tensorboard


def check_mlflow(uri: str | None, option: str, *, registry: bool = False) -> None:
    """Refuse ``option`` in one line, before anything is written, when mlflow is not installed or its store at
    ``uri`` (MLflow's own default when None: MLFLOW_TRACKING_URI, else a local database) does not answer. One try
    with a 10 s timeout: MLflow's own HTTP retries wait about 4 minutes for a server that is down."""
    try:
        import mlflow
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError(f"{option} needs mlflow: pip install 'graftune[tracking]' (or drop it)") from None
    target = uri or mlflow.get_tracking_uri()
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        client = MlflowClient(tracking_uri=target, registry_uri=target if registry else None)
        client.search_registered_models(max_results=1) if registry else client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 (MLflow raises many types here: store URIs, connections, permissions)
        text = " ".join(str(e).split())
        where = f"MLflow at {target}" if uri else f"MLflow's default store ({target})"
        server = "a server URI (http://HOST:5000)" if uri else "MLFLOW_TRACKING_URI to a server (http://HOST:5000)"
        if "MLFLOW_ALLOW_FILE_STORE" in text:
            problem = f"{where} is a folder, which MLflow 3 opens only with MLFLOW_ALLOW_FILE_STORE=true"
            fix = f"set that, or {'give' if uri else 'set'} {server}"
        elif target.startswith(("sqlite:", "postgresql:", "mysql:", "mssql:")):
            problem = f"{where} is a database, which needs the full mlflow package"
            fix = f"pip install mlflow, or {'give' if uri else 'set'} {server}"
        else:
            cause = re.search(r"\[Errno -?\d+\] [^'\")]+", text)  # a refused or unknown host, else MLflow's words
            problem = f"{where} does not answer ({cause.group(0) if cause else text[:100]})"
            fix = "check the URI and that the server is up"
        raise ConfigError(f"{option}: {problem}; {fix}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def progress_bar(total: int, done: int, enabled: bool, *, unit: str = "step", desc: str | None = None):
    """A tqdm bar on stderr (a no-op object when not ``enabled``); it disappears when closed."""
    return tqdm(total=total, initial=done, disable=not enabled, unit=unit, desc=desc, dynamic_ncols=True,
                leave=False)


def postfix(epoch: int, epochs: int, loss: float, state: dict, metric: str) -> str:
    best = state.get("best")
    shown = "" if best is None else f" best {metric} {(-best if metric == 'loss' else best):.3f}"
    return f"epoch {epoch + 1}/{epochs} loss {loss:.4f}{shown}"


def brief(metrics: dict | None) -> dict | None:
    """The scalar metrics only (for log lines)."""
    if metrics is None:
        return None
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
