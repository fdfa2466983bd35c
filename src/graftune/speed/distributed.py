"""Data-parallel training beyond one process: DistributedDataParallel over the adapter and head only.

Run a training script under a launcher; :func:`init_from_env` reads what it sets:

- ``torchrun --nproc_per_node N`` and ``accelerate launch --multi_gpu --num_processes N`` (accelerate hands these
  to torchrun; ``--multi_gpu`` is what asks for N processes, and they train on the CPU with gloo where there is
  no GPU or with ``--device cpu``): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``.
  Without ``--multi_gpu`` (``accelerate launch --cpu --num_processes N``) accelerate starts ONE process;
- ``accelerate launch --cpu --mpirun_hostfile FILE --num_processes N`` (accelerate's multi-CPU mode, through
  mpirun): the MPI rank and size (``PMI_RANK``/``PMI_SIZE`` from Intel MPI and MPICH, ``OMPI_COMM_WORLD_*`` from
  Open MPI, ``MV2_COMM_WORLD_*`` from MVAPICH), with ``MASTER_ADDR`` and ``MASTER_PORT`` from accelerate.

Each process loads the same frozen base from disk, computes its share of every global batch, and DDP
all-reduces (averages) the gradients before the optimizer step, so every rank ends each step with the same
weights as one process training on the whole global batch.

What travels between processes, and why it is small:

- DDP registers its gradient all-reduce hooks only on parameters with ``requires_grad=True``. AdapterModel
  freezes the whole base, so only the adapter's and the head's gradients are all-reduced (for MiniLM + LoRA
  r=8 on query/value: 74k floats per step instead of 22.7M).
- At construction DDP also broadcasts rank 0's parameters and buffers so all ranks start equal. The frozen
  base is identical on every rank (each loads the same files), so :func:`wrap` tells DDP to ignore the frozen
  parameters and the buffers (``_set_params_and_buffers_to_ignore_for_model``): only the trainable tensors are
  broadcast, once.
- ``find_unused_parameters=False``: with one active adapter every trainable parameter receives a gradient in
  every step, so the extra graph traversal DDP would otherwise do per step is not needed. A run that trains
  several adapters on batches that do not use all of them must pass ``find_unused_parameters=True``.

Sharding: :func:`shard` cuts one global batch (a list of example indices, already in the seeded, length-bucketed
order of ``tasks.batches``) into ``world_size`` contiguous pieces; every rank draws the same global batches from
the same seed, so no sampler state has to be shared. When the pieces are unequal, :func:`loss_weight` rescales
each rank's mean loss so the averaged gradient equals the gradient of the global-batch mean.

Writing: only rank 0 writes files (:func:`is_main`); the others wait at :func:`barrier` where needed.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# where each launcher puts a process's place, first match wins: torchrun's names, then the MPI launchers'
RANK_KEYS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
SIZE_KEYS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
LOCAL_RANK_KEYS = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")
LOCAL_SIZE_KEYS = ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")
RENDEZVOUS_KEYS = ("MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Args:
    rank: this process's index among all processes (0 writes files).
    world_size: the number of processes (1: not distributed).
    local_rank: the index on this machine (picks the CUDA device).
    backend: ``gloo`` (CPU) or ``nccl`` (CUDA); empty when not distributed.
    owned: this call of :func:`init_from_env` created the process group (so :func:`cleanup` is ours to call).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    owned: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def env_int(keys: Sequence[str], default: int) -> int:
    """The first of ``keys`` set in the environment, as an int; ``default`` when none is."""
    return next((int(os.environ[k]) for k in keys if os.environ.get(k, "").strip()), default)


def launched() -> bool:
    """True when a launcher (torchrun, accelerate launch, mpirun) started this process as one of several."""
    return env_int(SIZE_KEYS, 1) > 1


def local_rank() -> int:
    """This process's index on its machine (0 when not launched)."""
    return env_int(LOCAL_RANK_KEYS, 0)


def local_world_size() -> int:
    """The number of processes on this machine (1 when not launched)."""
    return env_int(LOCAL_SIZE_KEYS, 1)


def init_from_env(backend: str | None = None) -> DistInfo:
    """Join the process group the launcher describes in the environment, or return a one-process DistInfo.

    ``backend``: ``gloo`` or ``nccl``; unset: nccl when CUDA is available, else gloo. Calling it twice is safe."""
    import torch.distributed as dist

    if not launched():
        return DistInfo()
    missing = [k for k in RENDEZVOUS_KEYS if k not in os.environ]
    if missing:
        from graftune.errors import ConfigError

        raise ConfigError(f"distributed: {', '.join(missing)} not set; start the script with torchrun "
                          "--nproc_per_node N or accelerate launch --multi_gpu --num_processes N")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    local = local_rank()
    if backend == "nccl":
        torch.cuda.set_device(local)
    owned = not dist.is_initialized()
    if owned:  # rank and size passed explicitly: under mpirun only the MPI names are set
        dist.init_process_group(backend=backend, init_method="env://", rank=env_int(RANK_KEYS, 0),
                                world_size=env_int(SIZE_KEYS, 1))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dist.get_backend(), owned)


def is_main() -> bool:
    """True in the process that writes files: rank 0, or the only process."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every process (no-op when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (no-op when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # A gloo worker thread drops its finished work (the last broadcast's tensors) only once it holds the GIL;
        # the process group's destructor joins those threads while the main thread holds the GIL (a pybind
        # dealloc), so a worker still waiting to drop a work deadlocks the process (seen: a torchrun rank hung in
        # ~ProcessGroupGloo after the final metrics broadcast). A barrier and a short sleep, both without the
        # GIL, let every worker finish first.
        dist.barrier()
        time.sleep(0.05)
        dist.destroy_process_group()


class TrainStep(nn.Module):
    """The adapted model and the head as one module, so DDP sees every trainable parameter in one forward.

    ``forward(batch)`` returns ``forward_fn(model, head, batch)`` (``task.forward`` in the training loop)."""

    def __init__(self, model: nn.Module, head: nn.Module | None,
                 forward_fn: Callable[[nn.Module, nn.Module | None, dict], torch.Tensor]):
        super().__init__()
        self.model = model
        self.head = head
        self.forward_fn = forward_fn

    def forward(self, batch: dict) -> torch.Tensor:
        return self.forward_fn(self.model, self.head, batch)


def frozen_names(module: nn.Module) -> list[str]:
    """Fully qualified names of the frozen parameters and of all buffers: what DDP need not broadcast."""
    names = [n for n, p in module.named_parameters() if not p.requires_grad]
    return names + [n for n, _ in module.named_buffers()]


def wrap(model: nn.Module, head: nn.Module | None, forward_fn: Callable, info: DistInfo, *,
         find_unused_parameters: bool = False) -> nn.Module:
    """A TrainStep around ``model`` and ``head``, in DistributedDataParallel when ``info`` is distributed.

    Only the trainable parameters are registered with DDP's reducer (gradient all-reduce) and broadcast at
    start; the frozen base is left alone on every rank. Call the result with a batch to get logits."""
    step = TrainStep(model, head, forward_fn)
    if not info.distributed:
        return step
    from torch.nn.parallel import DistributedDataParallel

    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step, frozen_names(step))
    device_ids = [info.local_rank] if info.backend == "nccl" else None
    # buffers are never synchronised: every buffer is on the ignore list above. torch 2.13 renamed the switch
    # (broadcast_buffers is deprecated there); older torch (>= 2.4 is supported) only has the old name.
    no_sync = ({"forward_sync_buffers": False}
               if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
               else {"broadcast_buffers": False})
    return DistributedDataParallel(step, device_ids=device_ids, find_unused_parameters=find_unused_parameters,
                                   **no_sync)


def reduced_parameters(ddp: nn.Module) -> list[str]:
    """Names of the parameters whose gradients DDP all-reduces (for checks and logs)."""
    ignored = set(getattr(ddp, "parameters_to_ignore", ()))
    return [n for n, p in ddp.module.named_parameters() if p.requires_grad and n not in ignored]


def shard(indices: Sequence[int], info: DistInfo) -> list[int]:
    """This rank's contiguous piece of one global batch (pieces differ in size by at most one)."""
    n, world = len(indices), info.world_size
    start = info.rank * n // world
    end = (info.rank + 1) * n // world
    return list(indices[start:end])


def loss_weight(local: int, global_: int, info: DistInfo) -> float:
    """Multiply this rank's mean loss by this so DDP's gradient average equals the global-batch mean's gradient
    (1.0 when the pieces are equal, or when not distributed)."""
    return local * info.world_size / global_ if global_ else 0.0


def all_mean(value: float, info: DistInfo) -> float:
    """The mean of a float over all ranks (for logging the global loss); the value itself when not distributed."""
    if not info.distributed:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def broadcast(value: Any, info: DistInfo) -> Any:
    """Rank 0's ``value`` on every rank (a picklable Python object: a val score, the final metrics); the value
    itself when not distributed. Keeps decisions such as early stopping identical on every rank."""
    if not info.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, device=info.device if info.backend == "nccl" else None)
    return box[0]


def describe(info: DistInfo) -> dict[str, Any]:
    return {"rank": info.rank, "world_size": info.world_size, "backend": info.backend or "none"}
