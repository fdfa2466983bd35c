"""Does the server answer a real contrastive run as ``graftune predict`` does, beside a LoRA run in the same
batches? (issue 13, session 9). Both runs are served by one ``ModelStore`` (one MiniLM); batches mix the two runs'
requests; every answer is compared with ``graftune predict`` on the run loaded alone.

    PYTHONPATH=src OMP_NUM_THREADS=2 .venv/bin/python bench/issue13_serve_contrastive.py \
        --contrastive RUN_DIR --lora RUN_DIR --data trec --n 120
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from graftune.data.sources import load_data
from graftune.evaluate import load_run, predict
from graftune.serve import ModelStore
from graftune.serve.store import Rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contrastive", required=True)
    p.add_argument("--lora", required=True)
    p.add_argument("--data", default="trec")
    p.add_argument("--n", type=int, default=120)
    p.add_argument("--per-request", type=int, default=4)
    a = p.parse_args()
    ds = load_data(a.data)
    texts = [ds.inputs[i] for i in np.random.default_rng(0).permutation(len(ds))[:a.n]]
    want = {name: predict(load_run(run), texts) for name, run in (("c", a.contrastive), ("lora", a.lora))}
    store = ModelStore()
    try:
        report = store.sync({"c": ("1", a.contrastive), "lora": ("1", a.lora)})
        assert not report["failed"], report["failed"]
        entries = {n: store.acquire(n) for n in ("c", "lora")}
        k = a.per_request
        batch = [Rows(entries[("c", "lora")[j % 2]], texts[i:i + k]) for j, i in enumerate(range(0, len(texts), k))]
        t0 = time.perf_counter()
        out = store.submit(store.classify, batch).result()
        seconds = time.perf_counter() - t0
    finally:
        store.close()
    mismatches, worst = 0, {"c": 0.0, "lora": 0.0}
    for j, (rows, answers) in enumerate(zip(batch, out)):
        name = ("c", "lora")[j % 2]
        start = (j * k)
        for got, ref in zip(answers, want[name][start:start + len(answers)]):
            mismatches += got["label"] != ref["label"]
            worst[name] = max(worst[name], max(abs(got["probabilities"][c] - ref["probabilities"][c])
                                               for c in ref["probabilities"]))
    print(f"{len(texts)} texts in {len(batch)} requests (contrastive and LoRA alternating), one batch, "
          f"{seconds:.2f} s: {mismatches} label mismatches; largest probability difference: contrastive "
          f"{worst['c']:.2e}, LoRA {worst['lora']:.2e}")


if __name__ == "__main__":
    main()
