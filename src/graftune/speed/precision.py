"""The precision policy: which dtype the frozen base computes in, and whether autocast runs.

Measured on the project machine (2-core AMD EPYC with avx512_bf16, torch 2.13 CPU; ``bench/issue3_precision.py``,
MiniLM + LoRA, batch 16 x 256 tokens): casting the *frozen* base to bfloat16 once makes a training step ~5x and
an inference batch ~5x faster than float32, while ``torch.autocast("cpu", bfloat16)`` over float32 weights gains
only ~1.3x (it re-casts every frozen weight on every step: autocast caches casts only for weights that require
grad) and autocast over bfloat16 weights is slower still in training. So on a CPU with native bf16 (AMX or
avx512_bf16) the default is: frozen base in bfloat16, no autocast; adapters, head and optimizer stay float32 (the
adapters cast their input to their own dtype, and the head reads features cast to float32).

On CUDA the base stays float32 and autocast runs in bfloat16 where supported (else float16).
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


def choose(requested: str = "auto", device: str | torch.device = "cpu", *, trains_base: bool = False) -> Precision:
    """Resolve ``requested`` (auto, fp32, bf16, fp16) for ``device`` into a :class:`Precision`.

    ``trains_base``: the method trains copies of base weights (top-k layers, full fine-tuning), which must stay
    float32 beside the frozen rest; bf16 then means autocast over a float32 base."""
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
        if trains_base:
            return Precision("bf16", None, torch.bfloat16, kind)
        return Precision("bf16", torch.bfloat16, None, kind)
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
