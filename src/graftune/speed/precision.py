"""The precision policy: whether autocast runs, which dtype the frozen base is stored in, and how attention runs
when its backward will run.

On a CPU with native bf16 (``amx_bf16`` or ``avx512_bf16`` in /proc/cpuinfo) ``auto`` picks bf16. The frozen
weights (layer norms and embeddings included) are cast to bf16 once, and forward passes run under
``torch.autocast("cpu", bfloat16)``. On the CPU autocast leaves layer norms, softmax and sums in their input's
dtype, so with a bf16 base the activations stay bf16 from layer to layer: no float32 <-> bf16 casts around every
layer norm and residual sum, as over a float32 base. (The CPU bf16 layer-norm and softmax kernels accumulate in
float32; their error is the output's bf16 rounding.) Adapters, heads and optimizer state stay float32; gradients
reach the float32 adapter weights through autocast's casts. Elsewhere ``auto`` is fp32. On CUDA: autocast in bf16
where supported, else fp16, over the float32 base (unchanged).

Attention in training (CPU bf16): PyTorch's fused CPU attention kernel has a slow bf16 backward on this CPU
(avx512_bf16 without AMX). Computing softmax((q * scale) k^T + mask) v as a few batched matmuls is faster for short
sequences (measured by hand, 12 heads x 32 dims, forward + backward: 1.7x at 128 keys, ~1.1x at 256, 0.75-1.0x at
512). So within :meth:`Precision.autocast`, attention whose backward will run and that has at most
``MATMUL_ATTENTION_MAX_KEYS`` keys goes to :func:`matmul_attention` (:class:`MatmulAttention`). Inference and
longer sequences keep the fused kernel, whose forward alone is the faster one.

Training step, ``bench/issue5_ceiling.py`` (MiniLM + LoRA r=8 q/v, batch 16 (8 at 512 tokens); policies
interleaved, each compared with the old policy within a round, median of the per-round ratios). Quiet machine
(load average ~1.5):

=====================================================  ==========  ==========  ==================
speed-up over float32 base + autocast (old policy)     128 tokens  256 tokens  512 tokens
=====================================================  ==========  ==========  ==================
+ batched-matmul attention                              1.56x       1.30x       0.97x (fused kept)
+ bf16 frozen base                                      1.05x       1.03x       not measured
both (this policy)                                      1.63x       1.30x       1.04x
this policy's step, seconds (float32: 0.75 / 1.59)      0.35        0.80        1.16
=====================================================  ==========  ==========  ==================

Loaded (load average 4-6, shared with other benchmarks): 1.35x at 128 tokens, 1.26x at 256. At 128 tokens the step
reaches 65% of the measured bf16 matmul rate (quiet). Gradients of the LoRA and head weights differ from float32 by
0.8-0.9% (old policy: 0.5-0.7%). Test accuracy on BBC News, 16 shots, 4 epochs, was identical for two seeds.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from graftune.errors import ConfigError

CHOICES = ("auto", "fp32", "bf16", "fp16")
#: the longest key sequence that training attention computes as batched matmuls (see the module docstring)
MATMUL_ATTENTION_MAX_KEYS = 256


@dataclass(frozen=True)
class Precision:
    """Args:
    name: the resolved choice (``fp32``, ``bf16``, ``fp16``).
    frozen_dtype: dtype the frozen base weights are cast to once (None: left as loaded).
    autocast_dtype: dtype for ``torch.autocast`` around forward passes (None: no autocast).
    device_type: ``cpu`` or ``cuda``.
    matmul_attention: inside :meth:`autocast`, attention that will be differentiated runs as batched matmuls
        (:class:`MatmulAttention`).
    """

    name: str
    frozen_dtype: torch.dtype | None
    autocast_dtype: torch.dtype | None
    device_type: str
    matmul_attention: bool = False

    def autocast(self):
        """The forward-pass context for this policy."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        if not self.matmul_attention:
            return torch.autocast(self.device_type, dtype=self.autocast_dtype)
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(self.device_type, dtype=self.autocast_dtype))
        stack.enter_context(MatmulAttention())
        return stack


def matmul_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False) -> torch.Tensor:
    """``F.scaled_dot_product_attention``'s result, computed as softmax((q * scale) k^T + mask) v with batched
    matmuls (same arguments). Masks use the dtype's lowest value, not -inf, so a query row whose keys are all masked
    (padding) gets the mean of the values instead of the fused kernel's zeros, and never NaN."""
    if enable_gqa:
        groups = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(groups, -3), value.repeat_interleave(groups, -3)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = (query * scale) @ key.transpose(-2, -1)  # scaling q, the smaller tensor, saves a pass over the scores
    lowest = torch.finfo(scores.dtype).min
    if is_causal:
        keep = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, lowest)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, lowest)
        else:
            scores = scores + attn_mask.clamp(min=lowest)
    probs = scores.softmax(-1)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return probs @ value


class MatmulAttention(TorchFunctionMode):
    """Within this context, ``F.scaled_dot_product_attention`` calls on the CPU whose backward will run (grad
    enabled, an input requires grad) with at most ``MATMUL_ATTENTION_MAX_KEYS`` keys go to
    :func:`matmul_attention`; every other call runs unchanged. Compiled layers (``compile: true``) get the same
    choice: dynamo traces this mode, and inductor with the fused kernel was 1.5x slower per step than eager with
    batched matmuls (MiniLM + LoRA, 16 x 128 tokens, bench/RESULTS.md)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = (args[i] if i < len(args) else kwargs[n] for i, n in enumerate(("query", "key", "value")))
            if (q.device.type == "cpu" and torch.is_grad_enabled() and k.shape[-2] <= MATMUL_ATTENTION_MAX_KEYS
                    and (q.requires_grad or k.requires_grad or v.requires_grad)):
                return matmul_attention(*args, **kwargs)
        return func(*args, **kwargs)


#: the CPU features that decide matrix-product speed: vector width, and bf16 in hardware (avx512_bf16, AMX)
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
NATIVE_BF16 = ("amx_bf16", "avx512_bf16")


def read_cpuinfo(text: str) -> dict:
    """The model name and the ``SPEED_FLAGS`` present, from the text of /proc/cpuinfo."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return {"model": model or "unknown", "flags": [f for f in SPEED_FLAGS if f in flags],
            "native_bf16": bool(flags & set(NATIVE_BF16))}


@lru_cache(maxsize=1)
def cpu_features() -> dict:
    """This machine's CPU: model name, the speed-relevant flags present and whether bf16 runs in hardware
    (recorded in every run's ``metrics.json`` ``speed``, so a timing says which CPU made it)."""
    try:
        return read_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return {"model": "unknown", "flags": [], "native_bf16": False}


def cpu_has_native_bf16() -> bool:
    """True when the CPU has amx_bf16 or avx512_bf16 (bf16 matrix products in hardware). Without them a bf16
    matmul is emulated, about 50x slower than float32: ``auto`` never picks bf16 there."""
    return cpu_features()["native_bf16"]


def choose(requested: str = "auto", device: str | torch.device = "cpu", *, inference: bool = False) -> Precision:
    """Resolve ``requested`` (auto, fp32, bf16, fp16) for ``device`` into a :class:`Precision`.

    ``inference``: nothing trains, so attention keeps the fused kernel (see the module docstring)."""
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
        return Precision("bf16", torch.bfloat16, torch.bfloat16, kind, matmul_attention=not inference)
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
