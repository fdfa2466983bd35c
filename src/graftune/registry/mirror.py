"""``--mlflow URI``: mirror registry versions and the promoted alias to MLflow's model registry, for teams that
already look there. Optional (the ``tracking`` extra): without mlflow, or with an MLflow that does not answer, the
flag is refused in one line before anything changes. The graftune registry stays the source of truth (the gate,
rollback and audit live there); MLflow gets a copy of each version's files as a run's artifacts, a model version
tagged with the graftune reference, and the alias ``promoted`` moved on promote and rollback."""

from __future__ import annotations

from graftune.errors import GraftuneError
from graftune.registry.store import Version
from graftune.run.log import check_mlflow as _check

ALIAS = "promoted"
TAG = "graftune_version"
EXPERIMENT = "graftune-registry"  # the MLflow experiment that holds the mirrored versions' runs


class MirrorError(GraftuneError):
    """The graftune registry changed, but MLflow did not follow."""


def check_mlflow(uri: str | None) -> None:
    """Refuse ``--mlflow`` up front, so that nothing half-happens, when mlflow is not installed or its model
    registry at ``uri`` does not answer."""
    if uri:
        _check(uri, "--mlflow", registry=True)


def _client(uri: str):
    # the client alone, not mlflow.set_tracking_uri + mlflow.start_run: no process-wide MLflow state changes (a
    # process that also logs a training with --log-to keeps its own tracking URI)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def mirror_version(uri: str | None, v: Version) -> str | None:
    """Log ``v``'s files and metrics as an MLflow run and register them as a version of the model ``v.name``;
    returns the MLflow version number (None without ``uri``)."""
    if not uri:
        return None
    try:
        return _mirror(uri, v)
    except Exception as e:  # noqa: BLE001 (after the check above, MLflow failing midway: say what landed where)
        raise MirrorError(f"{v.ref} is in the graftune registry, but MLflow at {uri} failed while mirroring it "
                          f"({' '.join(str(e).split())[:160]}); promote it with --mlflow later to mirror it") from None


def _mirror(uri: str, v: Version) -> str:
    client = _client(uri)
    found = _find(client, v)
    if found is not None:
        return found
    if not client.search_registered_models(f"name = '{v.name}'"):
        client.create_registered_model(v.name)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    run = client.create_run(experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT),
                            run_name=v.ref)
    run_id = run.info.run_id
    for key, value in {"graftune_ref": v.ref, "method": v.method, "task": v.task, "base_model": v.base_model}.items():
        client.log_param(run_id, key, value)
    for key, value in v.metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            client.log_metric(run_id, key, float(value))
    client.log_artifacts(run_id, str(v.path), artifact_path="model")
    client.set_terminated(run_id)
    mv = client.create_model_version(v.name, f"{run.info.artifact_uri}/model", run_id=run_id,
                                     tags={TAG: str(v.version)})
    return str(mv.version)


def mirror_alias(uri: str | None, v: Version) -> None:
    """Point MLflow's ``promoted`` alias of ``v.name`` at the MLflow version mirroring ``v`` (mirrored now if it
    was pushed without ``--mlflow``)."""
    if not uri:
        return
    number = mirror_version(uri, v)
    try:
        _client(uri).set_registered_model_alias(v.name, ALIAS, number)
    except Exception as e:  # noqa: BLE001
        raise MirrorError(f"{v.ref} is promoted in the graftune registry, but MLflow at {uri} failed to move the "
                          f"'{ALIAS}' alias ({' '.join(str(e).split())[:160]}); promote it with --mlflow again "
                          "to retry") from None


def _find(client, v: Version) -> str | None:
    for mv in client.search_model_versions(f"name = '{v.name}'"):
        if (mv.tags or {}).get(TAG) == str(v.version):
            return str(mv.version)
    return None
