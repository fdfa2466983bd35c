"""The main job (`graftune demo`) as an AVX2-only CPU would run it, on a CPU that has native bf16 (issue 14: "under 3
minutes of job time on such a CPU").

An AVX2-only CPU has no bf16 in hardware, so graftune's ``auto`` precision runs everything in float32 there. This
script makes graftune see no native bf16 (``precision.cpu_has_native_bf16`` answers False) and runs the demo, so
every matrix product is float32, as on such a machine. What it cannot change is the vector width: AVX-512 float32
could be faster than AVX2's. Check on the CPU at hand: ``ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`` and
without, a float32 matmul rate is printed first; where both are equal (AMD Zen 4 runs 512-bit float32 as two 256-bit
halves), the job time here is that of an AVX2-only CPU of the same clock.

    PYTHONPATH=src OMP_NUM_THREADS=2 .venv/bin/python bench/issue14_demo_fp32.py --out /tmp/demo-fp32
    PYTHONPATH=src OMP_NUM_THREADS=2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        .venv/bin/python bench/issue14_demo_fp32.py --out /tmp/demo-fp32-avx2
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from graftune import demo
from graftune.speed import precision


def matmul_gflops(seconds: float = 2.0) -> float:
    """float32 matrix product rate (512x1024 @ 1024x1024) on this process's threads."""
    a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 512 * 1024 * 1024 * n / (time.perf_counter() - t0) / 1e9


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/demo-fp32")
    a = p.parse_args()
    limits = {k: os.environ.get(k) for k in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS")}
    print(f"cpu: {precision.cpu_features()}; limits: {limits}; float32 matmul {matmul_gflops():.0f} GFLOP/s "
          f"({torch.get_num_threads()} threads)")
    precision.cpu_has_native_bf16 = lambda: False  # what an AVX2-only CPU answers: auto precision is float32
    result = demo.run_demo(a.out, progress=False)
    print(demo.format_table(result))
    print(f"precision of the run: {result['picked'].get('precision', 'n/a')}; job time {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
