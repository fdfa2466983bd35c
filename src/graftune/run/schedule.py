"""The learning-rate schedule of every training loop: a linear warm-up, then linear or cosine decay, or constant.

Written here rather than taken from ``transformers.get_scheduler`` on purpose: its warm-up starts at a learning
rate of 0, so the first optimizer step changes nothing. With 8 examples per class an epoch can be one step, and
then the first epoch trained nothing; early stopping could keep it (bench/issue13_serving_load.py ``--trained``,
session 8: 11 of 32 eight-shot LoRA runs kept epoch 1, and 4 of those still had an all-zero LoRA). Here every step
trains: the warm-up reaches the full rate on its last step, and decay ends one step short of 0.
"""

from __future__ import annotations

import math

import torch

from graftune.config import SCHEDULES


def warmup_steps(total: int, warmup: float) -> int:
    """Steps of warm-up: the fraction ``warmup`` of ``total``, rounded up (0 when ``warmup`` is 0)."""
    return math.ceil(warmup * total) if warmup > 0 else 0


def lr_factor(step: int, total: int, warmup: float = 0.1, schedule: str = "linear") -> float:
    """The multiplier of the base learning rate at ``step`` (0-based) of ``total``: ``(step + 1) / w`` during the
    ``w`` warm-up steps, then 1 (``constant``), ``(total - step) / (total - w)`` (``linear``) or half a cosine from
    1 towards 0 (``cosine``). Positive at every step."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: got {schedule!r}; use one of {', '.join(SCHEDULES)}")
    w = warmup_steps(total, warmup)
    if step < w:
        return (step + 1) / w
    if schedule == "constant":
        return 1.0
    span = max(1, total - w)
    done = (step - w) / span
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * done))
    return max(0.0, 1.0 - done)


def make_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: float = 0.1,
                   schedule: str = "linear") -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_factor`` as a torch scheduler (``scheduler.step()`` after each optimizer step)."""
    lr_factor(0, total, warmup, schedule)  # a bad schedule name fails here, before any step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, schedule))
