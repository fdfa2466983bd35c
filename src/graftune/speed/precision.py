"""The precision policy: whether autocast runs, and which dtype the frozen base is stored in.

Measured on the project machine (2-core AMD EPYC with avx512_bf16, no AMX; torch 2.13 CPU;
``bench/issue3_precision.py``, MiniLM + LoRA r=8, batch 16 x 256 tokens, policies interleaved, median of 5):

=========================  ==========  ===============
policy                     train step  inference (x32)
=========================  ==========  ===============
fp32                       1.64 s      1.51 s
autocast bf16              1.02 s      0.83 s
bf16 frozen + autocast     1.07 s      0.83 s
bf16 frozen, no autocast   1.24 s      0.82 s
=========================  ==========  ===============

So on a CPU with native bf16 (``amx_bf16`` or ``avx512_bf16`` in /proc/cpuinfo) training runs under
``torch.autocast("cpu", bfloat16)`` over the float32 base: 1.6x faster than float32, and casting the frozen
weights to bf16 once (to save autocast's per-step re-casts) measured no faster. Autocast also keeps layer norms and
softmax in float32, and adapters, heads and optimizer state stay float32. For inference the frozen weights are
cast to bf16 once as well (same speed, half the memory). On CUDA, autocast bf16 where supported, else fp16.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from graftune.errors import ConfigError

CHOICES = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    """Args:
    name: the resolved choice (``fp32``, ``bf16``, ``fp16``).
    frozen_dtype: dtype the frozen base weights are cast to once (None: left as loaded).
    autocast_dtype: dtype for ``torch.autocast`` around forward passes (None: no autocast).
    device_type: ``cpu`` or ``cuda``.
    """

    name: str
    frozen_dtype: torch.dtype | None
    autocast_dtype: torch.dtype | None
    device_type: str

    def autocast(self):
        """The forward-pass context for this policy."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when /proc/cpuinfo lists amx_bf16 or avx512_bf16 (bf16 matrix products in hardware)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"amx_bf16", "avx512_bf16"})
    return False


def choose(requested: str = "auto", device: str | torch.device = "cpu", *, inference: bool = False) -> Precision:
    """Resolve ``requested`` (auto, fp32, bf16, fp16) for ``device`` into a :class:`Precision`.

    ``inference``: nothing trains, so the frozen weights may be stored in bf16 too (see the module docstring)."""
    if requested not in CHOICES:
        raise ConfigError(f"precision: got {requested!r}; use one of {', '.join(CHOICES)}")
    kind = torch.device(device).type
    if kind == "cuda":
        if requested == "fp32":
            return Precision("fp32", None, None, "cuda")
        bf16_ok = torch.cuda.is_bf16_supported()
        name = "fp16" if requested == "fp16" or (requested == "auto" and not bf16_ok) else "bf16"
        return Precision(name, None, torch.float16 if name == "fp16" else torch.bfloat16, "cuda")
    if requested == "fp16":
        raise ConfigError("precision: fp16 is for CUDA devices; on a CPU use bf16 or fp32")
    if requested == "bf16" or (requested == "auto" and cpu_has_native_bf16()):
        return Precision("bf16", torch.bfloat16 if inference else None, torch.bfloat16, kind)
    return Precision("fp32", None, None, kind)


def apply(model: torch.nn.Module, policy: Precision) -> None:
    """Cast the frozen floating-point parameters of ``model`` to the policy's dtype, once. Trainable parameters
    (adapters, heads) keep float32 so the optimizer updates them at full precision. Buffers keep their dtype
    (rotary frequencies lose accuracy in bf16), except batch-norm statistics, which must match the input."""
    if policy.frozen_dtype is None:
        return
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(policy.frozen_dtype)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            for name in ("running_mean", "running_var"):
                buf = getattr(m, name, None)
                if buf is not None:
                    setattr(m, name, buf.to(policy.frozen_dtype))
