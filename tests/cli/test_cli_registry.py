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


def test_a_damaged_version_a_changed_label_set_and_the_notes(runs, tmp_path):
    """QA: one removed version folder breaks no other name and can be deleted even when promoted; a candidate with
    another label set is refused in one line; promote says when `graftune serve` cannot serve the version and that
    a --reason without --force is only recorded."""
    import shutil

    from tests.registry_helpers import relabelled_run

    root = tmp_path / "reg"
    flag = ["--registry", str(root)]
    for name in ("news", "trec"):
        ok("push", str(runs["good"]), "--name", name, *flag)
    promoted = ok("promote", "news@1", "--reason", "first model", *flag).splitlines()
    assert "note: `graftune serve` cannot serve news@1: a --method probe run" in promoted[1]
    assert promoted[2].startswith("note: --reason recorded in the audit log")
    ok("promote", "trec@1", *flag)
    shutil.rmtree(root / "versions" / "news" / "1")
    listed = ok("list", *flag).splitlines()
    assert listed[0].split()[:3] == ["*", "news@1", "DAMAGED:"] and "registry delete news@1" in listed[0]
    assert listed[1].startswith("* trec@1") and "probe classification" in listed[1]
    assert [r["damaged"] is not None for r in json.loads(ok("list", *flag, "--json"))] == [True, False]
    assert ok("show", "trec", *flag).startswith("* trec@1") and "DAMAGED" in ok("show", "news", *flag)
    assert "registry delete news@1" in one_line_error(runner.invoke(app, ["registry", "show", "news@1", *flag]))
    assert "no earlier promotion left" in one_line_error(runner.invoke(app, ["registry", "rollback", "news", *flag]))
    assert ok("delete", "news@1", *flag).splitlines() == [
        "deleted news@1", "note: news@1 was the promoted (damaged) version; news has no promoted version now"]
    assert "delete    news@1  was promoted, damaged: news@1: its folder" in ok("log", "news", *flag)
    assert ok("list", *flag).splitlines()[0].startswith("* trec@1")
    ok("push", str(relabelled_run(runs, "cli-renamed", {"tech": "science"})), "--name", "trec", *flag)
    text = one_line_error(runner.invoke(app, ["registry", "promote", "trec@2", *flag]))
    assert "trec@2's labels differ from trec@1's (promoted): added science; removed tech" in text


def test_promote_reads_a_data_file_with_other_column_names(runs, tmp_path):
    flags = ["--registry", str(tmp_path / "reg")]
    ok("push", str(runs["good"]), "--name", "news", *flags)
    ok("push", str(runs["good2"]), "--name", "news", *flags)
    ok("promote", "news@1", *flags)
    rows = runs["test"].read_text().splitlines()
    other = tmp_path / "wrongcols.csv"
    other.write_text("\n".join(["body,topic"] + rows[1:]) + "\n")
    refused = runner.invoke(app, ["registry", "promote", "news@2", "--data", str(other), *flags])
    assert refused.exit_code == 2 and "--text-column" in refused.output  # the flag it names exists
    out = ok("promote", "news@2", "--data", str(other), "--text-column", "body", "--label-column", "topic", *flags)
    assert "promoted" in out


def test_a_mistyped_registry_is_refused_and_nothing_is_created(runs, tmp_path, monkeypatch):
    """QA: `--registry typo` on list/show/log/promote/drift made index.sqlite, versions/ and .tmp/ there, and then
    `graftune serve --registry typo` served 0 adapters. Only push creates a registry; every other command says so in
    one line (exit 2) and leaves the path as it was. The default location reads as empty before the first push."""
    typo = tmp_path / "typo"
    for args in (["registry", "list"], ["registry", "show", "news"], ["registry", "show", "news@1"],
                 ["registry", "log"], ["registry", "promote", "news@1"], ["registry", "rollback", "news"],
                 ["registry", "delete", "news@1"], ["drift", "news"]):
        error = one_line_error(runner.invoke(app, [*args, "--registry", str(typo)]))
        assert f"no registry at {typo} (nothing has been pushed there" in error and "--registry" in error, args
        assert not typo.exists(), args
    error = one_line_error(runner.invoke(app, ["serve", "--registry", str(typo)]))
    assert f"no registry at {typo} (nothing has been pushed there" in error and "--run NAME=RUN_DIR" in error
    assert not typo.exists()  # still refused, not served empty
    monkeypatch.setenv("GRAFTUNE_REGISTRY", str(typo))
    assert "no registry at" in one_line_error(runner.invoke(app, ["registry", "list"])) and not typo.exists()
    # a refused push leaves nothing either; a good one creates the registry
    assert "not a run directory" in one_line_error(runner.invoke(app, ["registry", "push", str(tmp_path), "--name",
                                                                      "news"]))
    assert not typo.exists()
    monkeypatch.delenv("GRAFTUNE_REGISTRY")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr("graftune.registry.store.platformdirs", None)
    assert ok("list").strip() == "(no versions: `graftune registry push RUN_DIR --name NAME` adds one)"
    assert ok("log").strip() == "(no entries)" and not (tmp_path / "xdg").exists()
    assert "no versions of 'news'" in one_line_error(runner.invoke(app, ["registry", "show", "news"]))
    ok("push", str(runs["good"]), "--name", "news")
    assert ok("list").startswith("  news@1") and (tmp_path / "xdg" / "graftune" / "registry" / "index.sqlite").is_file()


def test_list_and_show_flag_a_version_with_a_file_edited_or_deleted(runs, tmp_path):
    """QA: metrics.json edited or head/head.json deleted inside a version: list and show NAME said nothing."""
    root = tmp_path / "reg"
    flag = ["--registry", str(root)]
    for _ in range(3):
        ok("push", str(runs["good"]), "--name", "news", *flag)
    ok("promote", "news@1", *flag)
    metrics = root / "versions" / "news" / "1" / "metrics.json"
    metrics.chmod(stat.S_IRUSR | stat.S_IWUSR)
    metrics.write_text(metrics.read_text().replace("0.", "1.", 1))
    (root / "versions" / "news" / "2" / "head" / "head.json").unlink()
    listed = ok("list", *flag).splitlines()
    assert listed[0].startswith("* news@1  DAMAGED: ") and "metrics.json changed since push" in listed[0]
    assert listed[1].startswith("  news@2  DAMAGED: ") and "head.json is missing" in listed[1]
    assert "registry delete news@2" in listed[1] and "DAMAGED" not in listed[2]
    rows = json.loads(ok("list", *flag, "--json"))
    assert [(r["promoted"], r["damaged"] is not None) for r in rows] == [(True, True), (False, True), (False, False)]
    assert [line.split()[:3] for line in ok("show", "news", *flag).splitlines()[:2]] == [
        ["*", "news@1", "DAMAGED:"], ["news@2", "DAMAGED:", str(root / "versions" / "news" / "2" / "head" /
                                                                 "head.json")]]
