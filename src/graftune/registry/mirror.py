"""``--mlflow URI``: mirror registry versions and the promoted alias to MLflow's model registry, for teams that
already look there. Optional: mlflow is not a dependency of graftune; without it the flag is refused in one line
before anything changes. The graftune registry stays the source of truth (the gate, rollback and audit live
there); MLflow gets a copy of each version's files as a run's artifacts, a model version tagged with the graftune
reference, and the alias ``promoted`` moved on promote and rollback."""

from __future__ import annotations

import importlib.util

from graftune.errors import ConfigError
from graftune.registry.store import Version

ALIAS = "promoted"
TAG = "graftune_version"


def check_mlflow(uri: str | None) -> None:
    """Refuse ``--mlflow`` up front when mlflow is not installed (so nothing half-happens)."""
    if uri and importlib.util.find_spec("mlflow") is None:
        raise ConfigError("--mlflow needs the mlflow package: pip install mlflow (or drop --mlflow)")


def _client(uri: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    return mlflow, MlflowClient(tracking_uri=uri)


def mirror_version(uri: str | None, v: Version) -> str | None:
    """Log ``v``'s files and metrics as an MLflow run and register them as a version of the model ``v.name``;
    returns the MLflow version number (None without ``uri``)."""
    if not uri:
        return None
    check_mlflow(uri)
    mlflow, client = _client(uri)
    found = _find(client, v)
    if found is not None:
        return found
    if not client.search_registered_models(f"name = '{v.name}'"):
        client.create_registered_model(v.name)
    with mlflow.start_run(run_name=v.ref) as run:
        mlflow.log_params({"graftune_ref": v.ref, "method": v.method, "task": v.task, "base_model": v.base_model})
        mlflow.log_metrics({k: float(x) for k, x in v.metrics.items()
                            if isinstance(x, (int, float)) and not isinstance(x, bool)})
        mlflow.log_artifacts(str(v.path), artifact_path="model")
        source = f"{run.info.artifact_uri}/model"
    mv = client.create_model_version(v.name, source, run_id=run.info.run_id, tags={TAG: str(v.version)})
    return str(mv.version)


def mirror_alias(uri: str | None, v: Version) -> None:
    """Point MLflow's ``promoted`` alias of ``v.name`` at the MLflow version mirroring ``v`` (mirrored now if it
    was pushed without ``--mlflow``)."""
    if not uri:
        return
    number = mirror_version(uri, v)
    _, client = _client(uri)
    client.set_registered_model_alias(v.name, ALIAS, number)


def _find(client, v: Version) -> str | None:
    for mv in client.search_model_versions(f"name = '{v.name}'"):
        if (mv.tags or {}).get(TAG) == str(v.version):
            return str(mv.version)
    return None
