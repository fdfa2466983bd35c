"""Edge export: ONNX Runtime int8 vs PEFT's unmerged fp32 vs graftune's merged inference, same run, same 500 texts.

The run is the MiniLM LoRA run of issue 13 (train it first):

    graftune train --model minilm --data bbc-news --method lora --set r=8 --set alpha=16 --shots 16 \\
        --test-per-class 100 --val-size 0 --seed 0 --out runs/bbc

It is exported twice with ``graftune.onnx_export.export_onnx`` (float32, and ``quantize="int8"``: what
``graftune export --format onnx [--quantize int8]`` writes), and its LoRA once in PEFT's format
(``graftune.io.peft_format.export_run``), loaded with ``PeftModel.from_pretrained`` onto a fresh base, unmerged.
The four sides classify the run's 500 test articles (its own test split, rebuilt from run.yaml), timed with
tokenization included, at the run's max_length (256), batches of 32:

- ``peft-fp32``: PEFT unmerged, fp32, batches in dataset order padded to the batch's longest (tokenizer
  ``padding=True``: what a typical script does), mean pooling + the run's head (as ``bench/issue5_inference.py``);
- ``graftune``: ``load_run(RUN_DIR)`` (merged; on an AVX2-only CPU the policy is fp32) + ``evaluate.predict``
  (length-sorted batches);
- ``onnx-fp32`` and ``onnx-int8``: ``OnnxRun.load(DIR).predict`` (length-sorted batches, ONNX Runtime CPU).

Interleaved as in issue 5: the texts are split in halves, run in one order on the first half and in the reverse
order on the second; each side's time is the sum (the machine is shared: read the ratios).

    .venv/bin/python bench/issue13_onnx.py [--run runs/bbc] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from graftune.config import build_config
from graftune.data.splits import run_splits
from graftune.evaluate import load_run
from graftune.evaluate import predict as run_predict
from graftune.io.onnx_format import OnnxRun, read_manifest
from graftune.io.peft_format import export_run as export_peft_run
from graftune.onnx_export import export_onnx
from graftune.tasks.classification import pool

BATCH = 32


def cpu_facts() -> dict:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    lscpu = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name")),
                 platform.processor())
    return {"model": model, "avx2": "avx2" in flags, "avx512": sorted(f for f in flags if f.startswith("avx512")),
            "amx": sorted(f for f in flags if f.startswith("amx")), "avx_vnni": "avx_vnni" in flags}


def main():
    import peft
    from transformers import AutoModel, AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/bbc")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/out/issue13")
    ap.add_argument("--limit", type=int, default=None, help="time the first N test texts only (a quick re-run)")
    ap.add_argument("--reuse-exports", action="store_true", help="time the exports already under --out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run_dir, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    la0 = Path("/proc/loadavg").read_text().split()[:3]

    # --- exports (timed: what a user waits for) ---------------------------------------------------------------
    exports = {}
    for name, quantize in (("onnx-fp32", "none"), ("onnx-int8", "int8")):
        if args.reuse_exports:
            exports[name] = type("Reused", (), {"manifest": read_manifest(out / name)})()
            exports[name].manifest.setdefault("export_seconds", None)
            continue
        t = time.perf_counter()
        exports[name] = export_onnx(run_dir, out / name, quantize=quantize, overwrite=True)
        exports[name].manifest["export_seconds"] = round(time.perf_counter() - t, 1)
        print(f"{name}: exported in {exports[name].manifest['export_seconds']} s", flush=True)

    cfg = build_config(run_dir / "run.yaml")
    test = run_splits(cfg, "classification").test
    texts, labels = [str(t) for t in test.inputs][:args.limit], list(test.labels)[:args.limit]

    # --- the four sides ---------------------------------------------------------------------------------------
    run = load_run(run_dir)  # merged, the policy of this CPU
    head, names, max_len = run.head, run.label_names, run.task.max_length
    folder = run.task.tokenizer.name_or_path
    tok = AutoTokenizer.from_pretrained(folder)
    with tempfile.TemporaryDirectory() as tmp:
        export_peft_run(run_dir, Path(tmp) / "peft")
        pm = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(folder), Path(tmp) / "peft").eval()
    onnx_runs = {name: OnnxRun.load(out / name, threads=args.threads) for name in exports}

    def peft_predict(ix: list[int]) -> list[str]:
        preds = []
        with torch.no_grad():
            for s in range(0, len(ix), BATCH):
                enc = tok([texts[i] for i in ix[s:s + BATCH]], padding=True, truncation=True, max_length=max_len,
                          return_tensors="pt")
                h = pm(**enc).last_hidden_state
                preds += [names[int(k)] for k in head(pool(h, enc["attention_mask"], "mean")).argmax(-1)]
        return preds

    sides = {
        "peft-fp32": peft_predict,
        "graftune": lambda ix: [r["label"] for r in run_predict(run, [texts[i] for i in ix], batch_size=BATCH)],
        **{name: (lambda ix, r=r: [p["label"] for p in r.predict([texts[i] for i in ix], batch_size=BATCH)])
           for name, r in onnx_runs.items()},
    }
    half = len(texts) // 2
    halves = [list(range(half)), list(range(half, len(texts)))]
    secs = {k: 0.0 for k in sides}
    preds: dict[str, list[str | None]] = {k: [None] * len(texts) for k in sides}
    for h, ix in enumerate(halves):
        for name in (list(sides) if h == 0 else list(sides)[::-1]):
            t = time.perf_counter()
            for i, p in zip(ix, sides[name](ix)):
                preds[name][i] = p
            secs[name] += time.perf_counter() - t
            print(f"half {h} {name}: {time.perf_counter() - t:.1f} s", flush=True)

    acc = {k: sum(p == y for p, y in zip(v, labels)) / len(labels) for k, v in preds.items()}
    base = "peft-fp32"
    result = {
        "texts": len(texts), "max_length": max_len, "batch": BATCH, "threads": args.threads,
        "seconds": {k: round(v, 2) for k, v in secs.items()},
        "texts_per_second": {k: round(len(texts) / v, 2) for k, v in secs.items()},
        "accuracy": acc,
        "throughput_vs_peft": {k: round(secs[base] / v, 2) for k, v in secs.items()},
        "accuracy_change_vs_peft_points": {k: round(100 * (a - acc[base]), 2) for k, a in acc.items()},
        "agreement_with_peft": {k: sum(a == b for a, b in zip(v, preds[base])) / len(texts) for k, v in preds.items()},
        "int8_manifest": exports["onnx-int8"].manifest["int8"],
        "export_seconds": {k: e.manifest["export_seconds"] for k, e in exports.items()},
        "model_mb": {k: round((out / k / e.manifest["model_file"]).stat().st_size / 1e6, 1) for k, e in exports.items()},
        "target": ">= 4x peft-fp32 throughput at <= 0.5 points of accuracy (onnx-int8)",
        "met": secs[base] / secs["onnx-int8"] >= 4 and abs(100 * (acc["onnx-int8"] - acc[base])) <= 0.5,
        "cpu": cpu_facts(), "torch_threads": torch.get_num_threads(),
        "loadavg_start": la0, "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
    }
    print(json.dumps(result, indent=2))
    (out / ("result.json" if args.limit is None else f"result-{args.limit}.json")).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
