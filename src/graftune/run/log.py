"""What a run tells while it runs: ``log.jsonl`` (one JSON object per event), an optional MLflow or TensorBoard
tracker, the progress bar, and the short forms of metrics that log lines carry."""

from __future__ import annotations

import json
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
            for group in ("val", "test"):
                scalars.update({f"{group}_{k}": v for k, v in (fields.get(group) or {}).items()})
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
        try:
            import mlflow
        except ImportError:
            raise ConfigError("log_to: mlflow is not installed; pip install mlflow, or drop --log-to") from None
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
        raise ConfigError("log_to: tensorboard is not installed; pip install tensorboard, or drop --log-to") from None
    writer = SummaryWriter(log_dir=str(folder / "tensorboard"))

    def log_tensorboard(kind, scalars, step):
        if kind == "close":
            writer.close()
            return
        for k, v in scalars.items():
            writer.add_scalar(f"{kind}/{k}", v, step)

    return log_tensorboard


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
