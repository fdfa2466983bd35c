"""Resuming: a training process killed (SIGKILL) after its first checkpoint is continued with
`graftune train --resume --out RUN_DIR` and ends with exactly the metrics of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from graftune.cli import app
from graftune.config import RunConfig
from graftune.errors import ConfigError
from graftune.run.checkpoint import CHECKPOINT, CHECKPOINT_FILE
from graftune.run.rundir import partial_dir
from graftune.runs import train
from tests.train_helpers import bert_folder, topic_csv, train_args

ROOT = Path(__file__).resolve().parents[2]
TIMING = ("train_seconds", "train_cpu_seconds", "wall_seconds", "peak_rss_mb")

# Runs train() in a child process whose checkpoint writer announces each checkpoint and then stalls, so the test
# can kill it at a known point (after the first epoch's checkpoint, before the second epoch).
CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
import graftune.recipes.adapter as t
from graftune.config import RunConfig
write = t.write_checkpoint
def announce_and_stall(*args, **kwargs):
    write(*args, **kwargs)
    print("CHECKPOINT", flush=True)
    time.sleep(120)
t.write_checkpoint = announce_and_stall
t.train(RunConfig(**json.loads(sys.argv[1])), progress=False)
"""


def _stable(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in TIMING}


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(tmp_path):
    bert, data = bert_folder(tmp_path / "bert"), topic_csv(tmp_path / "d.csv")
    # dropout on (the RNG state must be restored), a val set (best weights must survive the kill)
    args = train_args(bert, data, tmp_path / "killed", epochs=4, dropout=0.3, lr=0.02, patience=3)
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT)), json.dumps(args)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        assert child.stdout.readline().strip() == "CHECKPOINT"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    out = tmp_path / "killed"
    assert not out.exists() and (partial_dir(out) / CHECKPOINT / CHECKPOINT_FILE).is_file()
    first_log = (partial_dir(out) / "log.jsonl").read_text().splitlines()
    assert sum('"event": "epoch"' in line for line in first_log) == 1

    result = CliRunner().invoke(app, ["train", "--resume", "--out", str(out), "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    resumed = json.loads(result.stdout)
    assert not partial_dir(out).exists() and not (out / CHECKPOINT).exists()
    events = [json.loads(line)["event"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert "resume" in events and events.count("start") == 1

    straight = train(RunConfig(**{**args, "out": str(tmp_path / "straight")}), progress=False)
    assert _stable(resumed) == _stable(straight)


def test_resume_without_an_interrupted_run_is_a_clear_error(tmp_path):
    cfg = RunConfig(model="m", data="d", out=str(tmp_path / "nothing"), resume=True)
    with pytest.raises(ConfigError, match="no interrupted run"):
        train(cfg, progress=False)


def test_resume_refuses_a_changed_config(tmp_path):
    work = partial_dir(tmp_path / "run")
    (work / CHECKPOINT).mkdir(parents=True)
    (work / CHECKPOINT / CHECKPOINT_FILE).write_bytes(b"")
    # as a run writes it: the method's own settings filled in
    (work / "run.yaml").write_text(RunConfig(model="m", data="d", epochs=3, val_size=0.1).with_step_defaults().to_yaml())
    with pytest.raises(ConfigError, match="epochs differs"):
        train(RunConfig(model="m", data="d", epochs=5, out=str(tmp_path / "run"), resume=True), progress=False)
