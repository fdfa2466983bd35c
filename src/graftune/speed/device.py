"""Where training runs: resolving ``device`` (auto, cpu, cuda, cuda:N) and getting batches there.

On CUDA the training loop puts the base, the adapter and the head on the device, and every batch travels from
pinned (page-locked) host memory with ``non_blocking`` copies, so the copy overlaps the work already queued on
the GPU. Mixed precision on CUDA is ``speed/precision.py``'s: autocast in bf16 where the GPU supports it, else fp16
(then with a gradient scaler, in ``train()``). On the CPU nothing changes: batches are used as collated.

The task protocol (``graftune.tasks``) collates on the CPU and evaluation code (``graftune.evaluate``) gathers
logits on the CPU; :class:`DeviceTask` bridges the two without either knowing about devices: its ``collate``
returns device batches, and for scoring it hands logits and features back on the CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from graftune.errors import ConfigError


def resolve(requested: str = "auto", *, local_rank: int | None = None, local_processes: int = 1) -> torch.device:
    """``auto`` -> ``cuda`` when torch sees a GPU for each of the ``local_processes`` on this machine (one GPU per
    process: ``LOCAL_WORLD_SIZE`` under a launcher), else ``cpu``, the same choice on every rank. ``cuda`` without
    an index is ``cuda:LOCAL_RANK`` under a launcher, else ``cuda:0``."""
    if requested == "auto":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        requested = "cuda" if gpus >= max(local_processes, 1) else "cpu"
    if requested == "cpu":
        return torch.device("cpu")
    if not requested.startswith("cuda"):
        raise ConfigError(f"device: got {requested!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device: {requested} asked for, but torch sees no CUDA GPU; use --device cpu (or auto)")
    device = torch.device(requested)
    if device.index is None:
        device = torch.device("cuda", local_rank or 0)
    if device.index >= torch.cuda.device_count():
        raise ConfigError(f"device: {device} asked for, but torch sees {torch.cuda.device_count()} GPU(s); use "
                          f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return device


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device``: pinned host memory and non-blocking copies on CUDA; as is on the CPU."""
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class DeviceTask:
    """A task (``graftune.tasks.Task``) whose batches live on ``device``.

    ``outputs_on_cpu``: ``forward`` and ``features`` hand their results back on the CPU (classification scoring
    gathers logits into numpy and compares them with CPU labels). ``generate`` sends the prompts to the device."""

    def __init__(self, task: Any, device: torch.device, *, outputs_on_cpu: bool = False):
        self.task, self.device, self.outputs_on_cpu = task, device, outputs_on_cpu

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)

    def collate(self, examples: list) -> dict:
        return to_device(self.task.collate(examples), self.device)

    def forward(self, model, head, batch: dict) -> torch.Tensor:
        out = self.task.forward(model, head, batch)
        return out.cpu() if self.outputs_on_cpu else out

    def features(self, model, batch: dict) -> torch.Tensor:
        out = self.task.features(model, batch)
        return out.cpu() if self.outputs_on_cpu else out

    def generate(self, model, prompts, **kwargs):
        return self.task.generate(_InputsTo(model, self.device), prompts, **kwargs)


class _InputsTo:
    """A model whose ``generate`` moves its tensor arguments to ``device`` first (tasks pad prompts on the CPU)."""

    def __init__(self, model, device: torch.device):
        self.model, self.device = model, device

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def generate(self, *args, **kwargs):
        args = tuple(a.to(self.device) if torch.is_tensor(a) else a for a in args)
        kwargs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        return self.model.generate(*args, **kwargs)
