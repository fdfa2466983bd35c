"""Data-parallel training (speed/distributed.py, wired into train()): ``torchrun --nproc_per_node 2 -m graftune
train`` and ``accelerate launch --multi_gpu --num_processes 2 -m graftune train`` on CPU (gloo) end with the same
adapter and head weights as one process on the same global batches, only the trainable parameters are all-reduced,
and processes started with only MPI's rank variables (accelerate's mpirun mode) join one group."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from graftune.config import RunConfig
from graftune.errors import ConfigError
from graftune.runs import train
from graftune.speed import distributed
from graftune.speed.distributed import DistInfo
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


# --- two processes under a launcher vs one process ----------------------------------------------------------------
# batch 7: the two shards of a global batch are unequal (3 and 4), so loss_weight matters; the adapter sits in the
# top layer only, so the frozen-prefix cache runs under DDP too; no dropout, so both runs draw nothing; one thread
# everywhere, so that matrix products sum in the same order (Adam magnifies last-bit differences)
RUN = {"epochs": 2, "batch_size": 7, "lr": 5e-3, "max_length": 32, "precision": "fp32", "dropout": 0.0,
       "options": {"top_k_layers": 1}, "threads": 1, "device": "cpu"}
RUN_FLAGS = ["--epochs", "2", "--batch-size", "7", "--lr", "5e-3", "--max-length", "32", "--precision", "fp32",
             "--dropout", "0", "--set", "top_k_layers=1", "--threads", "1", "--device", "cpu", "--quiet", "--json"]
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # accelerate starts N processes through torchrun only with --multi_gpu (--cpu --num_processes 2 starts one);
    # on a machine without a GPU (and with --device cpu anywhere) they train on the CPU with gloo. Every value is
    # given, so no accelerate config file is read or needed; port 0: a free one
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "0"],
}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: ``train()`` in this process on the tiny BERT and topic data the launched runs also read."""
    tmp = tmp_path_factory.mktemp("one_process")
    model, data = bert_folder(tmp / "bert"), topic_csv(tmp / "topics.csv", n_per_class=12)
    threads = torch.get_num_threads()
    try:
        metrics = train(RunConfig(model=str(model), data=str(data), **RUN, out=str(tmp / "one")), progress=False)
    finally:
        torch.set_num_threads(threads)
    return model, data, metrics, load_file(tmp / "one" / "adapter" / "adapter.safetensors")


# one worker runs both launches, one after the other: two gloo groups of two started at once on a 2-core machine
# (pytest -n 2) once left a rank waiting on its peer
@pytest.mark.xdist_group("distributed")
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_processes_match_one_process(launcher, one_process, tmp_path):
    model, data, single, want = one_process
    cmd = [*LAUNCHERS[launcher], "-m", "graftune", "train", "--model", str(model), "--data", str(data),
           "--out", str(tmp_path / "ddp"), *RUN_FLAGS]
    # HF_HOME: accelerate would read a default config file under it; the test must not depend on the machine's
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["speed"]["processes"] == 2 and single["speed"]["processes"] == 1
    assert ddp["speed"]["cache"].startswith("on:") and ddp["steps"] == single["steps"]
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-4)
    got = load_file(tmp_path / "ddp" / "adapter" / "adapter.safetensors")
    assert got.keys() == want.keys() and any(k.startswith("__head__.") for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)
    # rank 0 alone wrote the run directory, and logged the run as one of 2 processes
    events = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("start") == 1
    assert next(e for e in events if e["event"] == "speed")["processes"] == 2


# each process: join the group from the environment, then average its rank + 1 over the group
_JOIN = """
from graftune.speed import distributed
info = distributed.init_from_env("gloo")
print(info.rank, info.world_size, info.local_rank, distributed.all_mean(info.rank + 1.0, info), flush=True)
distributed.cleanup()
"""


def test_mpi_variables_alone_form_the_group():
    """What mpirun (accelerate launch --cpu --mpirun_hostfile) gives each process: Open MPI's rank variables and
    accelerate's rendezvous address, no RANK or WORLD_SIZE. Two processes started so must form one group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    procs = [subprocess.Popen([sys.executable, "-c", _JOIN], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**base, "OMPI_COMM_WORLD_RANK": str(r), "OMPI_COMM_WORLD_SIZE": "2",
                                   "OMPI_COMM_WORLD_LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port)})
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert sorted(out.split() for out, _ in outs) == [["0", "2", "0", "1.5"], ["1", "2", "1", "1.5"]]


def test_launcher_variables(monkeypatch):
    for k in (*distributed.SIZE_KEYS, *distributed.LOCAL_RANK_KEYS, *distributed.LOCAL_SIZE_KEYS):
        monkeypatch.delenv(k, raising=False)
    assert not distributed.launched() and distributed.local_rank() == 0 and distributed.local_world_size() == 1
    monkeypatch.setenv("PMI_SIZE", "1")  # a one-task MPI or Slurm job is not distributed
    assert not distributed.launched()
    monkeypatch.setenv("PMI_SIZE", "4")
    monkeypatch.setenv("MPI_LOCALRANKID", "3")
    assert distributed.launched() and distributed.local_rank() == 3
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun's names win over MPI's
    assert not distributed.launched()
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ConfigError, match="MASTER_PORT"):
        distributed.init_from_env("gloo")
