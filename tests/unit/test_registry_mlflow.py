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


@pytest.mark.parametrize(("uri", "says"), [
    ("file", "MLFLOW_ALLOW_FILE_STORE=true"),  # mlflow 3's folder store, switched off
    ("http://127.0.0.1:{port}", "Connection refused"),  # no server there (MLflow alone would retry for ~4 min)
    ("sqlite:///{tmp}/x.db", "needs the full mlflow package"),  # mlflow-skinny has no database store
])
def test_an_mlflow_that_does_not_answer_is_refused_before_the_push(tmp_path, monkeypatch, uri, says):
    import socket
    import time

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = (tmp_path / "mlruns").as_uri() if uri == "file" else uri.format(port=port, tmp=tmp_path)
    runs = registry_runs(tmp_path / "runs")
    started = time.monotonic()
    result = CliRunner().invoke(app, ["registry", "push", str(runs["good"]), "--name", "news",
                                      "--registry", str(tmp_path / "reg"), "--mlflow", uri])
    assert result.exit_code == 2, result.output
    assert says in result.output and "--mlflow" in result.output and "Traceback" not in result.output
    assert time.monotonic() - started < 60
    listed = CliRunner().invoke(app, ["registry", "list", "--registry", str(tmp_path / "reg")])
    assert "news@" not in listed.output  # nothing landed


def test_log_to_mlflow_without_a_store_is_refused_before_training(tmp_path, monkeypatch):
    from graftune.config import RunConfig
    from graftune.errors import ConfigError
    from graftune.runs import train
    from tests.train_helpers import bert_folder, topic_csv, train_args

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    cfg = RunConfig(**train_args(bert_folder(tmp_path / "bert"), topic_csv(tmp_path / "t.csv"), tmp_path / "run",
                                 log_to="mlflow"))
    with pytest.raises(ConfigError, match="--log-to mlflow: .* MLFLOW_ALLOW_FILE_STORE=true"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()
