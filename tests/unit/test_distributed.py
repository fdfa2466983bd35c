"""Data-parallel training (speed/distributed.py, wired into train()): ``torchrun --nproc_per_node 2 -m graftune
train`` on CPU (gloo) ends with the same adapter and head weights as one process on the same global batches, and
only the trainable parameters are all-reduced."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from graftune.config import RunConfig
from graftune.speed import distributed
from graftune.speed.distributed import DistInfo
from graftune.train import train
from tests.conftest import tiny_bert
from tests.train_helpers import bert_folder, topic_csv


def test_shard_covers_the_global_batch_once():
    idx = list(range(10))
    pieces = [distributed.shard(idx, DistInfo(rank=r, world_size=3)) for r in range(3)]
    assert [i for p in pieces for i in p] == idx and sorted(len(p) for p in pieces) == [3, 3, 4]
    weights = [distributed.loss_weight(len(p), 10, DistInfo(rank=r, world_size=3)) for r, p in enumerate(pieces)]
    assert sum(weights) / 3 == pytest.approx(1.0)


def test_not_launched_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = distributed.init_from_env()
    assert not info.distributed and not info.owned and distributed.is_main()
    assert distributed.broadcast({"a": 1}, info) == {"a": 1}
    assert isinstance(distributed.wrap(torch.nn.Linear(2, 2), None, lambda m, h, b: m(b), info),
                      distributed.TrainStep)


def test_wrap_reduces_only_the_adapter_and_head(tmp_path):
    """DDP in this process (a one-process gloo group): its reducer holds exactly the trainable tensors."""
    import torch.distributed as dist

    from graftune import AdapterModel

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = AdapterModel(tiny_bert())
        model.add_adapter("a", "lora", r=4)
        model.set_active("a")
        model.set_trainable("a")
        step = distributed.wrap(model, torch.nn.Linear(32, 3), lambda m, h, b: h(m(**b).last_hidden_state[:, 0]),
                                DistInfo(rank=0, world_size=2, backend="gloo"))
        assert isinstance(step, torch.nn.parallel.DistributedDataParallel)
        # 2 layers x (query, value) x (A, B), plus the head's weight and bias; the frozen base is ignored
        assert len(distributed.reduced_parameters(step)) == 2 * 2 * 2 + 2
        assert len(step.parameters_to_ignore) == len(distributed.frozen_names(step.module)) > 0
    finally:
        dist.destroy_process_group()


def test_torchrun_two_processes_match_one_process(tmp_path):
    model, data = bert_folder(tmp_path / "bert"), topic_csv(tmp_path / "topics.csv", n_per_class=12)
    # batch 7: the two shards of a global batch are unequal (3 and 4), so loss_weight matters; the adapter sits in
    # the top layer only, so the frozen-prefix cache runs under DDP too; no dropout, so both runs draw nothing;
    # one thread everywhere, so that matrix products sum in the same order (Adam magnifies last-bit differences)
    args = {"model": str(model), "data": str(data), "epochs": 2, "batch_size": 7, "lr": 5e-3, "max_length": 32,
            "precision": "fp32", "dropout": 0.0, "options": {"top_k_layers": 1}, "threads": 1,
            "device": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "graftune", "train", "--model", args["model"], "--data", args["data"], "--out", str(tmp_path / "ddp"),
           "--epochs", "2", "--batch-size", "7", "--lr", "5e-3", "--max-length", "32", "--precision", "fp32",
           "--dropout", "0", "--set", "top_k_layers=1", "--threads", "1", "--device", "cpu", "--quiet", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    threads = torch.get_num_threads()
    try:
        single = train(RunConfig(**args, out=str(tmp_path / "one")), progress=False)
    finally:
        torch.set_num_threads(threads)

    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["speed"]["processes"] == 2 and single["speed"]["processes"] == 1
    assert ddp["speed"]["cache"].startswith("on:") and ddp["steps"] == single["steps"]
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-4)
    got, want = load_file(tmp_path / "ddp" / "adapter" / "adapter.safetensors"), \
        load_file(tmp_path / "one" / "adapter" / "adapter.safetensors")
    assert got.keys() == want.keys() and any(k.startswith("__head__.") for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)
    # rank 0 alone wrote the run directory, and logged the run as one of 2 processes
    events = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("start") == 1
    assert next(e for e in events if e["event"] == "speed")["processes"] == 2
