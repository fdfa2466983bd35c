"""``compile: true`` on this CPU: training steps with the base's layers compiled (inductor) vs eager.

Two identical MiniLM + LoRA (r=8, alpha 16, query/value, all layers) + classification-head stacks, set up as
``train()`` sets them up (``precision.choose("auto")`` + ``precision.apply``: frozen weights bf16 and bf16
autocast on this CPU); one is compiled with ``graftune.speed.compilation.compile_layers`` (what ``compile: true``
calls; the check call, one forward + backward, is timed as the compile cost). Then blocks of STEPS training steps
(forward, backward, AdamW) on the same real BBC batches (16 articles, max_length tokens, graftune's collate)
alternate: eager, compiled, eager, compiled, ...; the median step of each side is compared. The machine is
shared: compare the ratio, not the seconds. Dynamo's own counts are reported too: graphs compiled (recompiles
included), graph breaks, and how often it gave up on a frame at its recompile limit (then that frame runs eager).

    .venv/bin/python bench/issue5_compile.py [--blocks 3] [--steps 4] [--max-length 128]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


class RecompileLimitHits(logging.Handler):
    """Counts dynamo's 'hit config.recompile_limit' warnings (each: one frame left to run eager from then on)."""

    def __init__(self):
        super().__init__()
        self.hits: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if "recompile_limit" in msg:
            self.hits.append(msg.splitlines()[0])


def main():
    from graftune import AdapterModel
    from graftune.data.sources import load_data
    from graftune.data.splits import make_splits
    from graftune.speed import precision
    from graftune.speed.compilation import backend, compile_layers
    from graftune.tasks import batches
    from graftune.zoo import load_base

    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--out", default="bench/out/issue5/compile.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from torch._dynamo.utils import counters

    limit_hits = RecompileLimitHits()
    logging.getLogger("torch._dynamo").addHandler(limit_hits)
    la0 = loadavg()
    ds = load_data("bbc-news")
    splits = make_splits(ds, seed=0, shot_seed=0, test_per_class=100, shots=16, val_size=0)
    policy = precision.choose("auto")
    stacks = []
    for _ in range(2):
        torch.manual_seed(0)
        base = load_base("minilm", task="text-classification")
        from graftune.tasks import build_task

        task = build_task("text-classification", base, label_names=ds.label_names, multi_label=False,
                          max_length=args.max_length, dropout=0.1)
        model = AdapterModel(base.model, family=base.family)
        model.add_adapter("a", "lora", r=8, alpha=16, targets={"names": ["query", "value"]})
        model.set_active("a")
        model.set_trainable("a")
        head = task.build_head()
        precision.apply(model.base, policy)
        opt = torch.optim.AdamW(model.trainable_parameters() + list(head.parameters()), lr=2e-3)
        model.train()
        model.base.eval()
        stacks.append((task, model, head, opt))
    task = stacks[0][0]
    train = task.encode(splits.train.inputs, splits.train.labels)
    lengths = [task.length(e) for e in train]
    order = list(batches(train, lengths, 16, generator=torch.Generator().manual_seed(0)))
    shapes = sorted({(len(i), max(lengths[j] for j in i)) for i in order})

    def step(stack, k):
        task, model, head, opt = stack
        batch = task.collate([train[i] for i in order[k % len(order)]])
        with policy.autocast():
            logits = task.forward(model, head, batch)
        task.loss(logits.float(), batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # compile the second stack; the check call (one forward + backward) compiles it
    t = time.perf_counter()
    ok, note = compile_layers(stacks[1][1].base, check=lambda: step(stacks[1], 0))
    compile_s = time.perf_counter() - t
    graphs_at_check = counters["stats"]["unique_graphs"]
    print(f"{note}; check call {compile_s:.1f} s ({graphs_at_check} graphs); batch shapes {shapes}; loadavg {la0}",
          flush=True)
    # warm-up both over every batch shape once (later compiled shapes may recompile: counted apart)
    warm = {}
    for name, stack in (("eager", stacks[0]), ("compiled", stacks[1])):
        t = time.perf_counter()
        for k in range(len(order)):
            step(stack, k)
        warm[name] = time.perf_counter() - t
    print(f"warm-up pass over {len(order)} batches: {warm}", flush=True)
    times = {"eager": [], "compiled": []}
    k = 0
    for b in range(args.blocks):
        pair = (("eager", stacks[0]), ("compiled", stacks[1]))
        for name, stack in (pair if b % 2 == 0 else pair[::-1]):
            for _ in range(args.steps):
                t = time.perf_counter()
                step(stack, k)
                times[name].append(time.perf_counter() - t)
                k += 1
        print(f"block {b}: " + ", ".join(f"{n} {statistics.median(v):.2f} s" for n, v in times.items()), flush=True)
    med = {n: statistics.median(v) for n, v in times.items()}
    out = {"compiled": ok, "note": note, "backend": backend(), "check_call_s": round(compile_s, 1),
           "warmup_pass_s": {n: round(v, 1) for n, v in warm.items()},
           "median_step_s": {n: round(v, 3) for n, v in med.items()},
           "step_s": {n: [round(t, 2) for t in v] for n, v in times.items()},
           "eager_over_compiled": round(med["eager"] / med["compiled"], 3),
           "steps_each": len(times["eager"]), "batch_shapes": shapes, "max_length": args.max_length,
           "precision": policy.name, "loadavg_start": la0, "loadavg_end": loadavg(),
           "break_even_steps": (round(compile_s / (med["eager"] - med["compiled"]))
                                if med["eager"] > med["compiled"] else None),
           "dynamo": {"graphs_check_call": graphs_at_check, "graphs_total": counters["stats"]["unique_graphs"],
                      "graph_breaks": {k.splitlines()[0]: v for k, v in counters["graph_break"].items()},
                      "recompile_limit_hits": limit_hits.hits}}
    print(json.dumps(out, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
