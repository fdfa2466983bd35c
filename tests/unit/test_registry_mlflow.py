"""``--mlflow URI``: versions mirrored to MLflow's model registry (once each), the ``promoted`` alias following
promote and rollback. Skipped where mlflow is not installed (it is an optional extra, not a dependency)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from graftune.cli import app
from tests.registry_helpers import registry_runs

mlflow = pytest.importorskip("mlflow")


def test_mirror_versions_and_the_promoted_alias(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps the file store behind this switch
    runs = registry_runs(tmp_path / "runs")
    uri = (tmp_path / "mlruns").as_uri()
    flags = ["--registry", str(tmp_path / "reg"), "--mlflow", uri]
    runner = CliRunner()
    for run in ("good", "good2"):
        result = runner.invoke(app, ["registry", "push", str(runs[run]), "--name", "news", *flags])
        assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=uri)
    versions = client.search_model_versions("name = 'news'")
    assert sorted(v.tags["graftune_version"] for v in versions) == ["1", "2"]
    for ref, expected in (("news@1", "1"), ("news@2", "2")):
        assert runner.invoke(app, ["registry", "promote", ref, *flags]).exit_code == 0
        assert client.get_model_version_by_alias("news", "promoted").tags["graftune_version"] == expected
    assert runner.invoke(app, ["registry", "rollback", "news", *flags]).exit_code == 0
    assert client.get_model_version_by_alias("news", "promoted").tags["graftune_version"] == "1"
    assert len(client.search_model_versions("name = 'news'")) == 2  # promote/rollback mirror nothing twice
