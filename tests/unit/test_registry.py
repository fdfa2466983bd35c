"""The registry (``graftune.registry``): hashed immutable versions that are run directories, the regression gate on
promote, rollback, delete, the audit log, and the faults: two pushes at once, a push killed midway, a file changed
after push, test data gone or changed."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import stat
from pathlib import Path

import pytest
import yaml

from graftune.errors import ArtifactError, ConfigError, DataError
from graftune.evaluate import evaluate_run, load_run, predict
from graftune.registry import Registry, default_root, open_registry, paired_test, parse_ref
from graftune.registry.gate import gate_numbers
from graftune.registry.store import TMP, VERSION_FILE
from tests.registry_helpers import registry_runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return registry_runs(tmp_path_factory.mktemp("registry-runs"))


@pytest.fixture
def reg(tmp_path):
    return Registry(tmp_path / "registry")


def one_line(error: Exception) -> str:
    text = str(error)
    assert "\n" not in text and text, text
    return text


def writable(path: Path) -> None:
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)


def set_paths(run_dir: Path, **fields: str) -> None:
    """Point ``run_dir``'s run.yaml at other paths (relative ones: as a run written before run.yaml stored them
    absolute, or a hand-edited config)."""
    file = run_dir / "run.yaml"
    cfg = yaml.safe_load(file.read_text())
    cfg.update(fields)
    file.write_text(yaml.safe_dump(cfg, sort_keys=False))


# --- versions -----------------------------------------------------------------------------------------------------
def test_push_stores_a_run_directory_that_loads_from_anywhere(runs, reg, tmp_path, monkeypatch):
    source = tmp_path / "copy-of-good"
    shutil.copytree(runs["good"], source)
    set_paths(source, model="bert", data="train.csv", test="test.csv")
    monkeypatch.chdir(runs["root"])  # where the run was trained: its relative paths resolve from here
    v = reg.push(source, "news")
    assert (v.name, v.version, v.ref) == ("news", 1, "news@1") and v.path == reg.root / "versions" / "news" / "1"
    assert v.task == "classification" and v.method == "probe" and v.label_names == ["money", "sport", "tech"]
    assert sorted(v.files) == ["data_card.json", "head/head.json", "head/head.safetensors", "metrics.json", "run.yaml"]
    assert not (v.path / "log.jsonl").exists() and (source / "log.jsonl").is_file()
    assert v.resolved_paths["data"] == ["train.csv", str(runs["train"])]
    assert v.resolved_paths["test"] == ["test.csv", str(runs["test"])]
    assert v.base_model == str(runs["bert"]) and v.source == str(source.resolve())
    meta = json.loads((v.path / VERSION_FILE).read_text())
    assert meta["who"] and meta["created"].endswith("Z") and meta["metrics"]["accuracy"] == v.metrics["accuracy"]
    assert not os.access(v.path / "metrics.json", os.W_OK) or os.geteuid() == 0  # read-only (root ignores it)
    assert not (v.path / "metrics.json").stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    # the stored copy is a run directory on its own: the source and the working directory may go (the source,
    # with its relative paths, loads only from where it was trained)
    texts = ["goal match team", "bank share price"]
    expected = predict(load_run(source), texts)
    shutil.rmtree(source)
    monkeypatch.chdir(tmp_path)
    assert predict(load_run(v.path), texts) == expected
    assert evaluate_run(v.path)["accuracy"] == pytest.approx(v.metrics["accuracy"])
    assert predict(reg.load("news", 1), texts) == predict(load_run(v.path), texts)


def test_numbers_grow_and_are_never_reused(runs, reg):
    assert [reg.push(runs["good"], "news").version for _ in range(2)] == [1, 2]
    assert reg.push(runs["bad"], "other").version == 1  # per name
    reg.delete("news", 2)
    assert reg.push(runs["good"], "news").version == 3
    assert [v.ref for v in reg.list()] == ["news@1", "news@3", "other@1"]
    assert [v.ref for v in reg.list("news")] == ["news@1", "news@3"]
    assert reg.show("news").version == 3 and not (reg.root / "versions" / "news" / "2").exists()
    with pytest.raises(ArtifactError, match="no version news@2"):
        reg.show("news", 2)


def test_refuses_what_is_not_a_run_or_a_name(runs, reg, tmp_path):
    with pytest.raises(ArtifactError, match="not a run directory"):
        reg.push(tmp_path, "news")
    for bad in ("", "a b", "news@2", "-x", "x" * 65):
        with pytest.raises(ConfigError, match="registry name"):
            reg.push(runs["good"], bad)
    assert parse_ref("news@12") == ("news", 12) and parse_ref("news") == ("news", None)
    for bad in ("news@", "news@x", "news@0"):
        with pytest.raises(ConfigError, match="NAME@N"):
            parse_ref(bad)
    assert not reg.root.exists()  # a refused push leaves no registry behind


def test_only_push_creates_a_registry(runs, tmp_path, monkeypatch):
    """QA: every call made the folder, index.sqlite, versions/ and .tmp/ at a mistyped path, so a typo became an
    empty registry (drift said "no promoted version", serve served 0 adapters). Now only push creates one; anything
    else on a folder without one is refused in one line and creates nothing."""
    typo = Registry(tmp_path / "typo")
    calls = {"list": typo.list, "log": typo.log, "promoted": typo.promoted, "generation": typo.generation,
             "promoted_version": lambda: typo.promoted_version("news"), "show": lambda: typo.show("news"),
             "promote": lambda: typo.promote("news", 1), "rollback": lambda: typo.rollback("news"),
             "delete": lambda: typo.delete("news", 1), "load": lambda: typo.load("news", 1)}
    for what, call in calls.items():
        with pytest.raises(ArtifactError, match=f"no registry at {typo.root} .*check --registry") as e:
            call()
        assert one_line(e.value) and not typo.root.exists(), what
    (tmp_path / "typo").mkdir()  # an existing folder that holds no registry is no registry either
    with pytest.raises(ArtifactError, match="no registry at"):
        typo.list()
    assert list(typo.root.iterdir()) == []
    fresh = Registry(tmp_path / "fresh", missing_ok=True)  # the default location before the first push: empty
    assert (fresh.list(), fresh.log(), fresh.promoted(), fresh.generation()) == ([], [], {}, 0)
    with pytest.raises(ArtifactError, match="no versions of 'news'"):
        fresh.show("news")
    assert not fresh.root.exists()
    assert fresh.push(runs["good"], "news").ref == "news@1" and fresh.exists() and Registry(fresh.root).list()
    monkeypatch.delenv("GRAFTUNE_REGISTRY", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr("graftune.registry.store.platformdirs", None)
    assert open_registry().list() == [] and not (tmp_path / "xdg").exists()
    monkeypatch.setenv("GRAFTUNE_REGISTRY", str(tmp_path / "env-typo"))
    with pytest.raises(ArtifactError, match="no registry at"):
        open_registry().list()
    with pytest.raises(ArtifactError, match="no registry at"):
        open_registry(tmp_path / "flag-typo").list()
    assert not (tmp_path / "env-typo").exists() and not (tmp_path / "flag-typo").exists()


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.delenv("GRAFTUNE_REGISTRY", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr("graftune.registry.store.platformdirs", None)
    assert default_root() == tmp_path / "xdg" / "graftune" / "registry"
    monkeypatch.setenv("GRAFTUNE_REGISTRY", str(tmp_path / "env"))
    assert default_root() == tmp_path / "env" and default_root(tmp_path / "flag") == tmp_path / "flag"


# --- faults -------------------------------------------------------------------------------------------------------
# fork, not spawn: the children start at once with graftune already imported (a fresh interpreter spends ~10 s
# importing torch on a busy 2-core machine); each is still its own process with its own SQLite connection
FORK = multiprocessing.get_context("fork")


def _push_in_process(root: str, run_dir: str, barrier) -> None:
    barrier.wait(timeout=60)
    Registry(Path(root)).push(run_dir, "news")


def test_two_processes_pushing_at_once_both_land(runs, reg):
    barrier = FORK.Barrier(2)
    procs = [FORK.Process(target=_push_in_process, args=(str(reg.root), str(runs[r]), barrier)) for r in ("good", "bad")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    versions = reg.list("news")
    assert [v.version for v in versions] == [1, 2]
    assert {v.source for v in versions} == {str(runs["good"]), str(runs["bad"])}
    for v in versions:
        reg.verify(v)
    assert [e["action"] for e in reg.log("news")] == ["push", "push"] and reg.generation() == 2


def _killed_push(root: str, run_dir: str, where: str) -> None:
    """Push, and SIGKILL this process midway: while copying the run's files, or after the finished version's
    rename into place but before its row is committed."""
    from graftune.registry import store

    real_replace, real_hash, hashed = store.os.replace, store.sha256_file, []

    def replace(src, dst):
        real_replace(src, dst)
        if where == "after-rename":
            os.kill(os.getpid(), signal.SIGKILL)

    def sha256_file(path):
        hashed.append(path)
        if where == "while-copying" and len(hashed) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_hash(path)

    store.os.replace, store.sha256_file = replace, sha256_file
    store.Registry(Path(root)).push(run_dir, "news")


@pytest.mark.parametrize("where", ["while-copying", "after-rename"])
def test_a_push_killed_midway_leaves_no_half_version(runs, reg, where):
    child = FORK.Process(target=_killed_push, args=(str(reg.root), str(runs["good"]), where))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -signal.SIGKILL
    assert reg.list() == [] and reg.generation() == 0 and reg.log() == []
    leftover = list((reg.root / TMP).iterdir()) + list((reg.root / "versions").rglob(VERSION_FILE))
    assert len(leftover) == 1  # the killed push's folder: never listed
    v = reg.push(runs["bad"], "news")  # the next push takes the number and replaces any orphan in its place
    assert v.version == 1 and v.source == str(runs["bad"]) and reg.show("news", 1) == v


def test_a_file_changed_after_push_is_refused_in_one_line(runs, reg):
    v1 = reg.push(runs["good"], "news")
    reg.promote("news", 1)
    v2 = reg.push(runs["good2"], "news")
    head = v2.path / "head" / "head.safetensors"
    original = head.read_bytes()
    writable(head)
    head.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    for call in (lambda: reg.show("news", 2), lambda: reg.verify(v2), lambda: reg.load("news", 2),
                 lambda: reg.promote("news", 2)):
        with pytest.raises(ArtifactError, match=r"news@2: .*head\.safetensors changed since push"):
            call()
    assert reg.promoted_version("news") == 1
    head.write_bytes(original)
    reg.verify(v2)
    (v2.path / "head" / "extra.json").write_text("{}")
    with pytest.raises(ArtifactError, match="extra.json was added after push") as e:
        reg.show("news", 2)
    one_line(e.value)
    (v2.path / "head" / "extra.json").unlink()
    (v1.path / "metrics.json").unlink()
    with pytest.raises(ArtifactError, match="metrics.json is missing"):
        reg.load("news")
    with pytest.raises(ArtifactError, match=r"metrics.json is missing .*--force --reason"):
        reg.promote("news", 2)  # the damaged promoted version cannot be scored ...
    forced = reg.promote("news", 2, force=True, reason="news@1 damaged")  # ... and does not block a good one
    assert forced.accepted and forced.forced and not forced.gated and reg.promoted_version("news") == 2
    meta = v2.path / VERSION_FILE
    writable(meta)
    meta.write_text(meta.read_text().replace('"probe"', '"lora"'))
    with pytest.raises(ArtifactError, match="version.json changed since push"):
        reg.show("news", 2)


# --- promote, rollback, delete, audit -------------------------------------------------------------------------------
def test_promote_rollback_delete_and_the_audit_log(runs, reg):
    for run in ("good", "good2", "good"):
        reg.push(runs[run], "news")
    gen = reg.generation()
    first = reg.promote("news", 1)
    assert first.accepted and not first.gated and "first promotion" in first.message
    assert reg.generation() == gen + 1 and reg.promoted()["news"].version == 1
    same = reg.promote("news", 1)
    assert same.accepted and "already" in same.message and reg.generation() == gen + 1
    second = reg.promote("news", 2)
    assert second.accepted and second.gated and second.examples == 90 and not second.refused
    third = reg.promote("news", 3)
    assert third.accepted and reg.promoted_version("news") == 3
    with pytest.raises(ArtifactError, match="news@3 is the promoted version"):
        reg.delete("news", 3)
    reg.delete("news", 2)  # out of the history too: rollback skips it
    assert reg.rollback("news").version == 1 and reg.promoted()["news"].version == 1
    with pytest.raises(ArtifactError, match=r"news: no earlier promotion left to roll back to \(news@1 is promoted\)"):
        reg.rollback("news")
    with pytest.raises(ArtifactError, match="no promoted version"):
        reg.rollback("other")
    actions = [(e["action"], e["version"]) for e in reg.log("news")]
    assert actions == [("push", 1), ("push", 2), ("push", 3), ("promote", 1), ("promote", 2), ("promote", 3),
                       ("delete", 2), ("rollback", 1)]
    rolled = reg.log("news")[-1]
    assert rolled["detail"] == {"from": 3} and rolled["who"] and rolled["at"].endswith("Z")
    gated = reg.log("news")[4]["detail"]
    assert gated["gated"] and gated["examples"] == 90 and gated["candidate_score"] == second.candidate_score


def test_the_gate_refuses_a_shuffled_label_candidate_and_accepts_a_better_one(runs, reg):
    bad1 = reg.push(runs["bad"], "news")
    reg.push(runs["good"], "news")
    reg.push(runs["bad"], "news")
    assert reg.promote("news", 1).accepted  # the first: no gate
    better = reg.promote("news", 2)
    assert better.accepted and better.gated and better.difference > 0.2 and not better.refused
    assert better.candidate_score == pytest.approx(evaluate_run(reg.show("news", 2).path)["accuracy"])
    assert better.incumbent_score == pytest.approx(bad1.metrics["accuracy"])
    worse = reg.promote("news", 3)
    assert not worse.accepted and worse.refused and worse.gated and worse.p_value < 0.05
    assert worse.difference == pytest.approx(worse.candidate_score - worse.incumbent_score)
    assert worse.difference < -worse.tolerance < 0
    assert f"{worse.candidate_score:.3f}" in worse.message and f"{worse.incumbent_score:.3f}" in worse.message
    assert f"{worse.difference * 100:+.1f} points" in worse.message and "refused" in worse.message
    assert "\n" not in worse.message and reg.promoted_version("news") == 2
    assert reg.log("news")[-1]["action"] == "refused" and reg.log("news")[-1]["detail"]["p_value"] == worse.p_value
    with pytest.raises(ConfigError, match="--reason"):
        reg.promote("news", 3, force=True)
    forced = reg.promote("news", 3, force=True, reason="label audit: the old labels were wrong")
    assert forced.accepted and forced.forced and forced.refused and reg.promoted_version("news") == 3
    entry = reg.log("news")[-1]
    assert entry["action"] == "promote" and entry["forced"] and entry["reason"].startswith("label audit")
    assert entry["who"] and entry["at"]


def test_a_drop_too_small_to_refuse_on_few_examples_is_promoted_with_a_note(runs, reg, monkeypatch):
    """14 examples, the candidate wrong on 3 the promoted version gets right and right on no other: 21 points
    worse, but 3 discordant examples cannot make the exact test significant (p = 1/8). Promoted, and the note says
    the gate cannot catch a drop of that size there (the normal approximation's tolerance, 18 points, would have
    refused: the note says which one decided)."""
    from graftune.registry import store

    reg.push(runs["good"], "news")
    reg.push(runs["good"], "news")
    reg.promote("news", 1)
    scripted = iter([[False] * 3 + [True] * 11, [True] * 14])  # the candidate's, then the promoted version's
    monkeypatch.setattr(store, "correctness", lambda path, held: next(scripted))
    result = reg.promote("news", 2)
    assert result.accepted and not result.refused and result.p_value == pytest.approx(0.125)
    assert result.difference == pytest.approx(-3 / 14) and -result.difference > result.tolerance
    note = next(n for n in result.notes if "points below" in n)
    assert note.startswith("news@2 is 21.4 points below news@1 here, but the two disagree on only 3 of 14 examples")
    assert "the exact test decides" in note and "--data FILE" in note


def test_the_gate_on_given_data_and_when_the_test_data_is_gone(runs, reg, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for f in ("train.csv", "test.csv", "shuffled.csv"):
        shutil.copy(runs[f.split(".")[0]], data / f)
    moved = {}
    for run, train_file in (("good", "train.csv"), ("bad", "shuffled.csv")):  # runs reading their data from `data`
        moved[run] = tmp_path / run
        shutil.copytree(runs[run], moved[run])
        set_paths(moved[run], data=str(data / train_file), test=str(data / "test.csv"))
    reg.push(moved["good"], "news")
    reg.push(moved["bad"], "news")
    reg.promote("news", 1)
    rows = (data / "test.csv").read_text().splitlines()
    (data / "test.csv").write_text("\n".join(rows[:-1]) + "\n")  # one example fewer: not the recorded split
    with pytest.raises(DataError, match="changed since the run was trained") as e:
        reg.promote("news", 2)
    one_line(e.value)
    (data / "test.csv").unlink()
    with pytest.raises(DataError, match=r"news@2: its test data is not reachable here .*pass --data FILE") as e:
        reg.promote("news", 2)
    one_line(e.value)
    result = reg.promote("news", 2, data=str(runs["test"]))
    assert result.refused and not result.accepted and result.examples == 90 and "(--data)" in result.data
    assert reg.promote("news", 2, force=True, reason="data gone").accepted  # the gate cannot run: forced, noted
    assert "gate not run" in reg.log("news")[-1]["detail"]["notes"][0]


# --- the rule ------------------------------------------------------------------------------------------------------
def test_paired_test_numbers():
    # 10 examples only the incumbent gets right, none only the candidate: p = 0.5 ** 10
    cand = [True] * 80 + [False] * 10 + [False] * 10
    inc = [True] * 80 + [True] * 10 + [False] * 10
    out = paired_test(cand, inc)
    assert out["discordant"] == (0, 10) and out["difference"] == pytest.approx(-0.1)
    assert out["p_value"] == pytest.approx(0.5 ** 10) and out["refused"]
    assert out["se"] == pytest.approx(((10 / 100 - 0.01) / 100) ** 0.5)
    assert out["tolerance"] == pytest.approx(1.6448536 * out["se"], rel=1e-6)
    assert not paired_test(inc, cand)["refused"] and paired_test(inc, cand)["p_value"] == pytest.approx(1.0)
    assert not paired_test(inc, inc)["refused"]
    with pytest.raises(DataError):
        paired_test([], [])


def test_a_zero_tolerance_says_what_it_rests_on():
    """QA: with every example's paired difference the same (all agree, or all disagree one way) the paired SE is 0
    and the message printed "tolerance 0.0 (paired SE 0.0; ...)". The exact test decides (the tolerance never did);
    the message says so in words."""
    worse = paired_test([False] * 3, [True] * 3)  # 3 examples, all to the promoted version: p = 1/8, let through
    assert worse["se"] == 0 and worse["discordant"] == (0, 3) and not worse["refused"]
    text = gate_numbers(worse, "news@2", "news@1", "accuracy", "news@2's test split", 0.05)
    assert "tolerance 0.0" not in text and "SE 0.0" not in text
    assert ("difference -100.0 points, no tolerance: every example went the same way (only news@1 right, on all 3), "
            "so the paired SE is 0 and the exact test alone decides (0 examples only news@2 got right, 3 only news@1; "
            "one-sided McNemar p=0.125") in text
    same = gate_numbers(paired_test([True, False], [True, False]), "news@2", "news@1", "accuracy", "x", 0.05)
    assert "no tolerance: the two agree on all 2 examples" in same
    usual = gate_numbers(paired_test([True] * 8 + [False] * 2, [True] * 10), "news@2", "news@1", "accuracy", "x", 0.05)
    assert "tolerance 20.8 (paired SE 12.6; 0 examples only news@2 got right, 2 only news@1;" in usual


def test_paired_test_false_refusal_rate_and_power():
    """Simulated: an equally good candidate (both 80 % right, independently) is refused at most alpha of the time;
    a candidate 12 points worse on 300 examples is refused almost always."""
    rng = random.Random(0)

    def refusals(p_cand, p_inc, n, trials=1000, alpha=0.05):
        count = 0
        for _ in range(trials):
            cand = [rng.random() < p_cand for _ in range(n)]
            inc = [rng.random() < p_inc for _ in range(n)]
            count += paired_test(cand, inc, alpha=alpha)["refused"]
        return count / trials

    same = refusals(0.8, 0.8, 200)
    assert 0.005 < same <= 0.05 + 0.02  # 0.02: three Monte-Carlo standard errors at 1000 trials
    assert refusals(0.8, 0.8, 200, alpha=0.01) <= 0.01 + 0.01
    assert refusals(0.73, 0.85, 300, trials=300) > 0.9


def test_the_gate_on_causal_lm_versions_scores_exact_answers(runs, reg, tmp_path):
    """Causal-LM versions are compared on their greedy answers' exact match (as ``graftune eval`` scores them); a
    causal-LM candidate cannot be gated against a classifier."""
    from graftune.config import RunConfig
    from graftune.runs import train
    from tests.train_helpers import llama_folder, pairs_jsonl

    llama, pairs = llama_folder(tmp_path / "llama"), pairs_jsonl(tmp_path / "pairs.jsonl", n=30)
    for run, seed in (("a", 0), ("b", 1)):
        train(RunConfig(model=str(llama), data=str(pairs), out=str(tmp_path / run), method="lora", epochs=1, seed=seed,
                        max_length=32, precision="fp32", max_new_tokens=4), progress=False)
        reg.push(tmp_path / run, "lm")
    assert reg.show("lm", 1).task == "causal-lm"
    reg.promote("lm", 1)
    result = reg.promote("lm", 2)
    assert result.gated and result.metric == "exact_match" and result.examples == 6
    assert result.candidate_score == pytest.approx(evaluate_run(reg.show("lm", 2).path)["exact_match"])
    reg.push(runs["good"], "news")
    reg.promote("news", 1)
    reg.push(tmp_path / "a", "news")
    with pytest.raises(ConfigError, match="news@2 is a causal-lm run and news@1 .* a classification run"):
        reg.promote("news", 2)


# --- a damaged version, rollback through history, labels, servability, the gate's columns (QA) --------------------
def test_a_damaged_version_is_listed_as_such_and_breaks_nothing_else(runs, reg):
    """A version folder removed by hand: every other name still lists, shows, loads and reports its promoted
    version; the damaged one is listed DAMAGED (with the way out), and verify refuses it in one line."""
    from graftune.registry.text import show_name, version_table

    reg.push(runs["good"], "news")
    reg.push(runs["good"], "other")
    reg.promote("news", 1)
    reg.promote("other", 1)
    shutil.rmtree(reg.root / "versions" / "news" / "1")
    listed = {v.ref: v for v in reg.list()}
    assert listed["other@1"].damaged is None and listed["other@1"].method == "probe"
    assert "folder" in listed["news@1"].damaged and "graftune registry delete news@1" in listed["news@1"].damaged
    promoted = reg.promoted()
    assert promoted["other"].damaged is None and promoted["news"].damaged and promoted["news"].version == 1
    assert [n for n, v in promoted.items() if not v.damaged] == ["other"]
    with pytest.raises(ArtifactError, match="news@1: its folder .* is missing") as e:
        reg.verify(promoted["news"])
    one_line(e.value)
    table = version_table(reg.list(), promoted)
    assert table[0].split()[:5] == ["*", "news@1", "DAMAGED:", "its", "folder"] and table[1].startswith("* other@1")
    assert show_name(reg, "other")[0].startswith("* other@1") and reg.show("other", 1).version == 1
    predict(reg.load("other"), ["goal match"])
    for call in (lambda: reg.show("news", 1), lambda: reg.load("news")):
        with pytest.raises(ArtifactError, match="news@1: its folder .* is missing .*registry delete news@1"):
            call()
    (reg.root / "versions" / "other" / "1" / VERSION_FILE).chmod(stat.S_IRUSR | stat.S_IWUSR)
    (reg.root / "versions" / "other" / "1" / VERSION_FILE).write_text("[1, 2]")
    assert "not a version description" in reg.list("other")[0].damaged


def test_list_flags_a_file_changed_or_missing_inside_a_version(runs, reg, monkeypatch):
    """QA: list and show NAME flagged only a missing folder; a version with metrics.json edited or a head file
    deleted listed as fine (show NAME@V refused it). The quick check catches both; a file over QUICK_HASH_BYTES is
    checked by its size recorded at push."""
    from graftune.registry import store
    from graftune.registry.text import show_name

    for _ in range(5):
        reg.push(runs["good"], "news")
    metrics = reg.root / "versions" / "news" / "1" / "metrics.json"
    writable(metrics)
    text = metrics.read_text()
    edited = text.replace("0.", "1.", 1)
    assert len(edited) == len(text) and edited != text  # the same size: only the hash tells
    metrics.write_text(edited)
    (reg.root / "versions" / "news" / "2" / "head" / "head.json").unlink()
    (reg.root / "versions" / "news" / "3" / "head" / "notes.txt").write_text("added")
    tensors = reg.root / "versions" / "news" / "4" / "head" / "head.safetensors"
    writable(tensors)
    original = tensors.read_bytes()
    tensors.write_bytes(original[:-8])  # truncated
    listed = {v.version: v for v in reg.list()}
    assert listed[5].damaged is None
    assert "metrics.json changed since push (sha256 differs)" in listed[1].damaged
    assert "head.json is missing (removed after push)" in listed[2].damaged
    assert "notes.txt was added after push" in listed[3].damaged
    assert "head.safetensors changed since push (size" in listed[4].damaged
    assert all("graftune registry delete news@" in listed[n].damaged for n in (1, 2, 3, 4))
    assert listed[1].method == "probe"  # read from version.json: the JSON listing keeps what is known
    overview = show_name(reg, "news")
    assert [line.split()[0] for line in overview[:5] if "DAMAGED:" in line] == ["news@1", "news@2", "news@3", "news@4"]
    # a file over the quick-hash size is compared by size only: a same-size change waits for show NAME@V
    monkeypatch.setattr(store, "QUICK_HASH_BYTES", 0)
    tensors.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    assert reg.list("news")[3].damaged is None
    with pytest.raises(ArtifactError, match="head.safetensors changed since push"):
        reg.show("news", 4)


def test_deleting_a_damaged_promoted_version_falls_back_to_the_previous_good_one(runs, reg):
    for run in ("good", "good2", "good"):
        reg.push(runs[run], "news")
    for number in (1, 2, 3):
        reg.promote("news", number, force=True, reason="history")
    with pytest.raises(ArtifactError, match="news@3 is the promoted version"):
        reg.delete("news", 3)  # intact: never
    (reg.root / "versions" / "news" / "2" / "metrics.json").unlink()  # damaged too: passed over
    shutil.rmtree(reg.root / "versions" / "news" / "3")
    assert reg.delete("news", 3).version == 1 and reg.promoted_version("news") == 1
    assert not (reg.root / "versions" / "news" / "3").exists() and [v.version for v in reg.list()] == [1, 2]
    deleted, rolled = reg.log("news")[-2:]
    assert deleted["action"] == "delete" and deleted["version"] == 3 and deleted["detail"]["was_promoted"]
    assert "is missing" in deleted["detail"]["damaged"]
    assert rolled["action"] == "rollback" and rolled["version"] == 1 and rolled["detail"]["from"] == 3
    assert "metrics.json is missing" in rolled["detail"]["skipped_damaged"]["2"]
    reg.delete("news", 2)  # a damaged version that is not promoted: as any other
    shutil.rmtree(reg.root / "versions" / "news" / "1")
    assert reg.delete("news", 1) is None  # no earlier promotion left: the name has none
    assert reg.promoted() == {} and reg.list() == []


def test_rollback_skips_the_current_version_deleted_and_damaged_ones(runs, reg):
    """History 1, 2, 3, 2 (forced), then 3 deleted: rollback goes to 1 (not 'from @2 to @2'), and then there is no
    earlier promotion left (not 'the only version ever promoted')."""
    for run in ("good", "good2", "good"):
        reg.push(runs[run], "news")
    for number in (1, 2, 3, 2):
        reg.promote("news", number, force=True, reason="history")
    reg.delete("news", 3)
    generation = reg.generation()
    assert reg.rollback("news").version == 1 and reg.promoted_version("news") == 1
    assert reg.log("news")[-1]["detail"] == {"from": 2} and reg.generation() == generation + 1
    with pytest.raises(ArtifactError, match=r"no earlier promotion left to roll back to \(news@1 is promoted\)"):
        reg.rollback("news")
    assert reg.log("news")[-1]["action"] == "rollback" and reg.generation() == generation + 1
    reg.promote("news", 2, force=True, reason="again")
    reg.push(runs["good"], "news")
    reg.promote("news", 4, force=True, reason="again")
    (reg.root / "versions" / "news" / "2" / "run.yaml").unlink()
    assert reg.rollback("news").version == 1  # news@2 is damaged: passed over, and said so in the log
    assert list(reg.log("news")[-1]["detail"]["skipped_damaged"]) == ["2"]
    with pytest.raises(ArtifactError, match="no earlier promotion left"):
        reg.rollback("news")


def test_a_changed_label_set_is_refused_unless_forced(runs, reg):
    from tests.registry_helpers import relabelled_run

    reg.push(runs["good"], "news")
    reg.promote("news", 1)
    reg.push(relabelled_run(runs, "renamed", {"tech": "science"}), "news")
    reg.push(relabelled_run(runs, "superset", {"tech": ("tech", "gadgets")}), "news")
    with pytest.raises(ConfigError, match=r"news@2's labels differ from news@1's \(promoted\): added science; "
                                          r"removed tech\. .*--force --reason TEXT if the change is intended") as e:
        reg.promote("news", 2)
    one_line(e.value)
    with pytest.raises(ConfigError, match=r"news@3's labels differ .*: added gadgets\. Promoting it changes"):
        reg.promote("news", 3)  # a class added is a change too
    assert reg.promoted_version("news") == 1 and reg.log("news")[-1]["action"] == "push"  # nothing changed
    forced = reg.promote("news", 3, force=True, reason="gadgets are their own class now")
    assert forced.accepted and forced.forced and forced.gated and reg.promoted_version("news") == 3
    assert "label set changed (--force): added gadgets" in forced.notes
    entry = reg.log("news")[-1]
    assert entry["forced"] and entry["reason"] == "gadgets are their own class now"


def test_promoting_a_version_serve_cannot_serve_says_so(runs, reg):
    reg.push(runs["good"], "news")
    reg.push(runs["good2"], "news")
    first = reg.promote("news", 1)
    assert any(n.startswith("`graftune serve` cannot serve news@1: a --method probe run") and
               "a server serves no version of news" in n for n in first.notes)
    second = reg.promote("news", 2)
    assert any("a running server keeps serving news@1 and a restarted one serves no version of news" in n
               for n in second.notes)
    assert any("cannot serve news@2" in n for n in reg.log("news")[-1]["detail"]["notes"])


def test_unservable_agrees_with_the_server(runs, tmp_path):
    """The registry's rule (``registry/servable.py``) and the server's (``ModelStore``) give the same answers."""
    from graftune.config import RunConfig
    from graftune.registry.servable import unservable
    from graftune.runs import train
    from graftune.serve import ModelStore

    dirs = {"probe": runs["good"]}
    for method in ("lora", "head", "prompt"):
        dirs[method] = tmp_path / method
        train(RunConfig(model=str(runs["bert"]), data=str(runs["train"]), out=str(dirs[method]), method=method,
                        epochs=1, batch_size=8, max_length=32, precision="fp32", val_size=0), progress=False)
    store = ModelStore()
    try:
        failed = store.sync({m: ("1", d) for m, d in dirs.items()})["failed"]
    finally:
        store.close()
    assert sorted(failed) == ["probe@1", "prompt@1"]
    assert {m: unservable(d) is not None for m, d in dirs.items()} == \
        {"probe": True, "lora": False, "head": False, "prompt": True}
    assert "prompt adapters change the input sequence" in unservable(dirs["prompt"])


def test_the_gate_reads_data_with_other_columns_and_one_class(runs, reg, tmp_path):
    reg.push(runs["good"], "news")
    reg.push(runs["good2"], "news")
    reg.promote("news", 1)
    rows = (runs["test"]).read_text().splitlines()
    other = tmp_path / "wrongcols.csv"
    other.write_text("\n".join(["body,topic"] + rows[1:]) + "\n")
    with pytest.raises(DataError, match="--text-column"):
        reg.promote("news", 2, data=str(other))
    with pytest.raises(ConfigError, match="--text-column, --label-column name the columns of a --data FILE"):
        reg.promote("news", 2, text_column="body", label_column="topic")
    result = reg.promote("news", 2, data=str(other), text_column="body", label_column="topic")
    assert result.gated and result.examples == len(rows) - 1
    sport = tmp_path / "sport.csv"
    sport.write_text("\n".join(rows[:1] + [r for r in rows[1:] if r.endswith(",sport")]) + "\n")
    assert reg.promote("news", 1, data=str(sport)).gated  # one class is enough to score on


def test_a_reason_without_force_is_recorded_and_said_so(runs, reg):
    reg.push(runs["good"], "news")
    reg.push(runs["good2"], "news")
    assert not any("--reason" in n for n in reg.promote("news", 1).notes)
    result = reg.promote("news", 2, reason="retrained on March data")
    assert result.accepted and not result.forced
    assert any(n.startswith("--reason recorded in the audit log") and "overrides nothing" in n for n in result.notes)
    assert reg.log("news")[-1]["reason"] == "retrained on March data"


def test_a_version_not_promoted_is_deleted_whatever_the_promotion_ids(runs, reg):
    # review: delete compared the promotion row's id with the version number, so with news@1 then news@3 promoted
    # (rows 1 and 2), deleting news@2 was refused as "the promoted version"
    for run in ("good", "good2", "good"):
        reg.push(runs[run], "news")
    reg.promote("news", 1)
    reg.promote("news", 3, force=True, reason="a test")
    reg.delete("news", 2)
    assert [v.version for v in reg.list("news")] == [1, 3] and reg.promoted_version("news") == 3
    with pytest.raises(ArtifactError, match="news@3 is the promoted version"):
        reg.delete("news", 3)


def test_the_default_location_reads_as_empty_while_its_first_push_creates_the_index(tmp_path):
    """Review: between the first push creating index.sqlite and committing its tables, a read of the default
    location (missing_ok) met sqlite's 'no such table'; it reads as the empty registry it still is."""
    import sqlite3

    fresh = Registry(tmp_path / "reg", missing_ok=True)  # opened before the push began
    (tmp_path / "reg").mkdir()
    sqlite3.connect(tmp_path / "reg" / "index.sqlite").close()  # the push's file, no tables yet
    assert (fresh.list(), fresh.log(), fresh.promoted()) == ([], [], {})


def _open_index(root: str, start, failures) -> None:
    start.wait(timeout=60)
    try:
        Registry(Path(root))._create()
    except Exception as e:  # noqa: BLE001 (counted: the test asserts there is none)
        failures.put(str(e))


def test_processes_creating_one_index_at_once_never_see_it_locked(tmp_path):
    """SQLite answers processes that race to put a new index in WAL mode with "database is locked" at once, not
    after the busy timeout: `make test` failed once that way (two pushes at once). 4 processes x 12 fresh
    registries: before the retry about 1 connection in 32 failed."""
    failures = FORK.Queue()
    for trial in range(12):
        start = FORK.Event()
        procs = [FORK.Process(target=_open_index, args=(str(tmp_path / f"r{trial}"), start, failures))
                 for _ in range(4)]
        for p in procs:
            p.start()
        start.set()
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0] * 4
    assert failures.empty(), failures.get()
