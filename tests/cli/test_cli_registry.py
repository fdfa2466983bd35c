"""``graftune registry push|list|show|promote|rollback|delete|log`` on tiny probe runs: the gate's refusal prints both
numbers and the difference and exits 1, ``--force --reason`` is recorded, user errors are one line and exit 2."""

from __future__ import annotations

import importlib.util
import json
import stat

import pytest
from typer.testing import CliRunner

from graftune.cli import app
from tests.registry_helpers import registry_runs
from tests.train_helpers import one_line_error

runner = CliRunner()
#: without mlflow installed, --mlflow is refused before anything changes
NO_MLFLOW = [] if importlib.util.find_spec("mlflow") else [(["push", ".", "--name", "news", "--mlflow", "file:x"],
                                                              "needs the mlflow package")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return registry_runs(tmp_path_factory.mktemp("cli-registry-runs"))


def ok(*args: str) -> str:
    result = runner.invoke(app, ["registry", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_push_list_show_promote_rollback_delete(runs, tmp_path):
    root = str(tmp_path / "reg")
    flag = ["--registry", root]
    pushed = json.loads(ok("push", str(runs["bad"]), "--name", "news", *flag, "--json"))
    assert pushed["ref"] == "news@1" and pushed["method"] == "probe" and "head/head.safetensors" in pushed["files"]
    assert ok("push", str(runs["good"]), "--name", "news", *flag).startswith("pushed news@2: probe classification")
    ok("push", str(runs["bad"]), "--name", "news", *flag)
    assert "first promotion" in ok("promote", "news@1", *flag)
    better = ok("promote", "news@2", *flag)
    assert better.startswith("news@2 promoted: accuracy") and "news@1, promoted" in better
    refused = runner.invoke(app, ["registry", "promote", "news@3", *flag])
    assert refused.exit_code == 1, refused.output
    line = refused.stdout.strip()
    assert line.startswith("news@3 refused: worse than news@2 beyond sampling noise: accuracy ") and "\n" not in line
    assert "points, tolerance" in line and "--force --reason" in line
    listed = ok("list", *flag).splitlines()
    assert listed[1].startswith("* news@2") and listed[0].startswith("  news@1") and listed[-1] == "(* promoted)"
    rows = json.loads(ok("list", "news", *flag, "--json"))
    assert [(r["version"], r["promoted"]) for r in rows] == [(1, False), (2, True), (3, False)]
    one_line_error(runner.invoke(app, ["registry", "promote", "news@3", "--force", *flag]))  # --reason needed
    forced = ok("promote", "news@3", "--force", "--reason", "relabelled data", *flag)
    assert forced.startswith("news@3 promoted with --force over the gate's refusal")
    detail = ok("show", "news@3", *flag)
    assert detail.startswith("news@3  (promoted)") and "sha256 verified" in detail and "FORCED" in detail
    assert "reason: relabelled data" in detail
    log = ok("log", "news", *flag)
    assert "refused   news@3" in log and "promote   news@3  FORCED; reason: relabelled data" in log
    assert ok("rollback", "news", *flag).strip() == "news: rolled back from @3 to news@2"
    assert "error: news@2 is the promoted version" in one_line_error(
        runner.invoke(app, ["registry", "delete", "news@2", *flag]))
    assert ok("delete", "news@3", *flag).strip() == "deleted news@3"
    overview = ok("show", "news", *flag)
    assert "news@3" not in overview.split("log:")[0] and "delete    news@3" in overview
    shown = json.loads(ok("show", "news", *flag, "--json"))
    assert shown["promoted"] == 2 and [v["version"] for v in shown["versions"]] == [1, 2]


def test_env_registry_and_one_line_errors(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("GRAFTUNE_REGISTRY", str(tmp_path / "env-reg"))
    ok("push", str(runs["good"]), "--name", "news")
    assert (tmp_path / "env-reg" / "versions" / "news" / "1" / "run.yaml").is_file()
    for args, message in ((["show", "news@9"], "no version news@9"), (["show", "nope"], "no versions of 'nope'"),
                          (["promote", "news"], "promote needs a version"), (["show", "news@x"], "NAME@N"),
                          (["push", str(tmp_path), "--name", "news"], "not a run directory"),
                          (["rollback", "news"], "no promoted version"), *NO_MLFLOW):
        assert message in one_line_error(runner.invoke(app, ["registry", *args]))
    head = tmp_path / "env-reg" / "versions" / "news" / "1" / "head" / "head.json"
    head.chmod(stat.S_IRUSR | stat.S_IWUSR)
    head.write_text(head.read_text() + " ")
    text = one_line_error(runner.invoke(app, ["registry", "show", "news@1"]))
    assert "head.json changed since push" in text
    assert "head.json changed since push" in one_line_error(runner.invoke(app, ["registry", "promote", "news@1"]))
    assert "push      news@1" in ok("show", "news")  # the overview and log still show a damaged name
