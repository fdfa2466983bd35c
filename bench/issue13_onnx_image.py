"""Issue 13 (Session 7): an image run exported to ONNX, against graftune's own PyTorch inference. Run by hand:

    .venv/bin/graftune train --model efficientnet-lite0 --data digits --method lora --shots 16 --test-size 0.2 \\
        --val-size 0 --epochs 10 --lr 3e-3 --batch-size 16 --out /tmp/b7/digits-lora
    OMP_NUM_THREADS=1 .venv/bin/python bench/issue13_onnx_image.py --run /tmp/b7/digits-lora --out /tmp/b7/onnx-img \\
        --threads 1 [--no-timing]

Exports the run with ``graftune.onnx_export.export_onnx`` (float32, and static int8 calibrated on the training
images), then, each side from the raw test images (preprocessing included):

- ``pytorch``: the run as ``graftune eval`` loads it (adapters merged; a bf16 frozen base where the CPU has native
  bf16), ``run.scoring.logits_of`` (the torch transform, batches of 32);
- ``pytorch-fp32``: the same with ``precision: fp32`` (a copy of the run directory with that line changed);
- ``onnx-fp32``, ``onnx-int8``: ``OnnxClassifier.load(DIR).logits`` (numpy preprocessing, ONNX Runtime CPU);
- ``onnx-dynamic-int8``: the float32 export quantized the way text exports are (dynamic, here with Conv included:
  ConvInteger), to show why image exports use static quantization.

Accuracy on every test image; throughput on ``--timed`` of them in the order pytorch, fp32, int8, dynamic, dynamic,
int8, fp32, pytorch (ABBA: a linear drift of the machine's load cancels), the mean of the two passes per side.
Writes ``OUT/results.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from graftune.data.splits import run_splits
from graftune.io.onnx_format import MODEL_FILE, OnnxClassifier, OnnxImageRun
from graftune.onnx_export import export_onnx
from graftune.run.scoring import logits_of
from graftune.runs import load_run


# ---------------------------------------------------------------------------------------------------------------
def dynamic_variant(fp32_dir: Path, out_file: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        quantize_dynamic(str(fp32_dir / MODEL_FILE), str(out_file), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=True, op_types_to_quantize=["Conv", "MatMul", "Gemm"])
        logging.disable(logging.NOTSET)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timed", type=int, default=128, help="test images timed per pass")
    ap.add_argument("--no-timing", action="store_true", help="accuracy only (a busy machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # --- export ---------------------------------------------------------------------------------------------------
    exports = {}
    for name, quantize in (("onnx-fp32", "none"), ("onnx-int8", "int8")):
        t = time.perf_counter()
        result = export_onnx(args.run, out / name, quantize=quantize, overwrite=True, log=print)
        exports[name] = {"seconds": round(time.perf_counter() - t, 1), "check": result.manifest["check"],
                         "int8": result.manifest.get("int8"),
                         "mb": round((result.path / MODEL_FILE).stat().st_size / 1e6, 2)}
        print(name, json.dumps(exports[name]), flush=True)
    dynamic_file = out / "dynamic-int8.onnx"
    dynamic_variant(out / "onnx-fp32", dynamic_file)

    # --- the sides --------------------------------------------------------------------------------------------------
    run = load_run(args.run)
    fp32_copy = out / "run-fp32"
    shutil.rmtree(fp32_copy, ignore_errors=True)
    shutil.copytree(args.run, fp32_copy)
    yaml_file = fp32_copy / "run.yaml"
    yaml_file.write_text("".join(line if not line.startswith("precision:") else "precision: fp32\n"
                                 for line in yaml_file.read_text().splitlines(keepends=True)))
    run_fp32 = load_run(fp32_copy)
    test = run_splits(run.cfg, run.kind).test
    images, labels = list(test.inputs), list(test.labels)
    onnx_runs = {name: OnnxClassifier.load(out / name, threads=args.threads) for name in ("onnx-fp32", "onnx-int8")}
    fp32 = onnx_runs["onnx-fp32"]
    onnx_runs["onnx-dynamic-int8"] = OnnxImageRun(dynamic_file, preprocess=fp32.preprocess,
                                                  label_names=fp32.label_names, threads=args.threads)

    def logits(side: str, batch: list) -> np.ndarray:
        if side.startswith("pytorch"):
            r = run if side == "pytorch" else run_fp32
            return logits_of(r.task, r.model, r.head, batch, batch_size=32, policy=r.policy).numpy()
        return onnx_runs[side].logits(batch, batch_size=32)

    sides = ["pytorch", "pytorch-fp32", *onnx_runs]
    y = np.array([run.label_names.index(lab) for lab in labels])
    rows = {}
    reference, reference_fp32 = logits("pytorch", images), logits("pytorch-fp32", images)
    for side in sides:
        got = {"pytorch": reference, "pytorch-fp32": reference_fp32}.get(side)
        got = logits(side, images) if got is None else got
        rows[side] = {"accuracy": float((got.argmax(1) == y).mean()),
                      "agreement_with_pytorch": float((got.argmax(1) == reference.argmax(1)).mean()),
                      "agreement_with_pytorch_fp32": float((got.argmax(1) == reference_fp32.argmax(1)).mean()),
                      "max_abs_logit_diff_vs_pytorch_fp32": float(np.abs(got - reference_fp32).max())}
    if not args.no_timing:
        timed = images[: args.timed]
        for side in sides:  # warm-up: first-call allocations, ONNX Runtime's graph optimizations
            logits(side, timed[:32])
        seconds = {side: [] for side in sides}
        for side in sides + sides[::-1]:
            t = time.perf_counter()
            logits(side, timed)
            seconds[side].append(time.perf_counter() - t)
        for side in sides:
            rows[side]["images_per_s"] = round(len(timed) / float(np.mean(seconds[side])), 1)
        for side in sides:
            rows[side]["speedup_vs_pytorch"] = round(rows[side]["images_per_s"] / rows["pytorch"]["images_per_s"], 2)

    results = {"run": str(Path(args.run).resolve()), "test_images": len(images), "threads": args.threads,
               "timed_images": None if args.no_timing else min(args.timed, len(images)), "precision": run.policy.name,
               "exports": exports, "sides": rows}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{len(images)} test images; threads {args.threads}; PyTorch precision {run.policy.name} (pytorch), "
          f"{run_fp32.policy.name} (pytorch-fp32)\n")
    print("| side | accuracy | same label as pytorch / pytorch-fp32 | max abs logit diff vs pytorch-fp32 | images/s "
          "| vs pytorch |")
    print("|---|---|---|---|---|---|")
    for side, r in rows.items():
        print(f"| {side} | {r['accuracy']:.3f} | {r['agreement_with_pytorch']:.3f} / "
              f"{r['agreement_with_pytorch_fp32']:.3f} | {r['max_abs_logit_diff_vs_pytorch_fp32']:.1e} | "
              f"{r.get('images_per_s', 'not measured')} | {r.get('speedup_vs_pytorch', '-')} |")


if __name__ == "__main__":
    main()
