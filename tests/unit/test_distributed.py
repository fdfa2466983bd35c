"""Data-parallel training (speed/distributed.py): 2 CPU processes with gloo end with the same adapter and head
weights as one process training on the same global batches; only trainable parameters are all-reduced."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from graftune.speed import distributed
from graftune.speed.distributed import DistInfo
from tests.conftest import tiny_bert

STEPS, GLOBAL_BATCH, WORLD = 3, 7, 2  # 7 rows: the two shards are unequal (3 and 4), so loss_weight matters


def _data():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 120, (STEPS * GLOBAL_BATCH, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, -3:] = 0
    labels = torch.randint(0, 3, (STEPS * GLOBAL_BATCH,), generator=g)
    return ids, mask, labels


def _forward(model, head, batch):
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return head((hidden * m).sum(1) / m.sum(1))


def _train(info: DistInfo) -> dict[str, torch.Tensor]:
    """A few AdamW steps of LoRA + a linear head; this rank computes its shard of each global batch."""
    from graftune import AdapterModel

    model = AdapterModel(tiny_bert())
    model.add_adapter("a", "lora", r=4, alpha=8)
    model.set_active("a")
    model.set_trainable("a")
    with torch.no_grad():  # non-zero B so the LoRA path carries gradient to A from the first step
        for n, p in model.adapters["a"].named_parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 3)
    step = distributed.wrap(model, head, _forward, info)
    params = [p for p in step.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids, mask, labels = _data()
    for s in range(STEPS):
        rows = distributed.shard(list(range(s * GLOBAL_BATCH, (s + 1) * GLOBAL_BATCH)), info)
        batch = {"input_ids": ids[rows], "attention_mask": mask[rows]}
        loss = torch.nn.functional.cross_entropy(step(batch), labels[rows])
        (loss * distributed.loss_weight(len(rows), GLOBAL_BATCH, info)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    out = {f"adapter.{k}": v.detach().clone() for k, v in model.adapter_state_dict("a").items()}
    out.update({f"head.{k}": v.detach().clone() for k, v in head.state_dict().items()})
    if info.distributed:
        out["__reduced__"] = torch.tensor(len(distributed.reduced_parameters(step)))
        out["__trainable__"] = torch.tensor(sum(p.requires_grad for p in step.module.parameters()))
        out["__ignored__"] = torch.tensor(len(step.parameters_to_ignore))
    return out


def _worker(rank: int, port: int, folder: str) -> None:
    import os

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    info = distributed.init_from_env("gloo")
    try:
        weights = _train(info)
        torch.save(weights, f"{folder}/rank{rank}.pt")
    finally:
        distributed.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_covers_the_global_batch_once():
    idx = list(range(10))
    pieces = [distributed.shard(idx, DistInfo(rank=r, world_size=3)) for r in range(3)]
    assert [i for p in pieces for i in p] == idx and sorted(len(p) for p in pieces) == [3, 3, 4]
    weights = [distributed.loss_weight(len(p), 10, DistInfo(rank=r, world_size=3)) for r, p in enumerate(pieces)]
    assert sum(weights) / 3 == pytest.approx(1.0)


def test_not_launched_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = distributed.init_from_env()
    assert not info.distributed and distributed.is_main()
    assert isinstance(distributed.wrap(torch.nn.Linear(2, 2), None, lambda m, h, b: m(b), info),
                      distributed.TrainStep)


def test_two_gloo_processes_match_one_process(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    single = _train(DistInfo())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for got in ranks:
        # only the adapter + head are all-reduced: 2 layers x (query, value) x (A, B) + head weight and bias
        assert int(got.pop("__reduced__")) == int(got.pop("__trainable__")) == 2 * 2 * 2 + 2
        assert int(got.pop("__ignored__")) > 0  # the frozen base is neither broadcast nor reduced
        assert got.keys() == single.keys()
        for k in single:
            torch.testing.assert_close(got[k], single[k], atol=1e-6, rtol=1e-5, msg=k)
    torch.manual_seed(0)
    assert not torch.allclose(single["head.weight"], torch.nn.Linear(32, 3).weight)  # training moved the weights
