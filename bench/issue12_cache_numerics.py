"""How far apart training with and without the frozen-prefix cache ends, on a tiny random BERT (issue 12: the suite
must pass on every CPU). Prints, per setting, the largest absolute difference between the two runs' saved adapter and
head tensors, and both test losses.

Run: ``PYTHONPATH=. .venv/bin/python bench/issue12_cache_numerics.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from graftune.config import RunConfig
from graftune.runs import train
from tests.train_helpers import bert_folder, topic_csv, train_args


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="cache-numerics-"))
    try:
        bert, csv = bert_folder(root / "bert"), topic_csv(root / "t.csv", n_per_class=12)
        for epochs, head_init in ((1, "random"), (1, "probe"), (3, "probe")):
            common = train_args(bert, csv, root / f"plain-{epochs}-{head_init}", epochs=epochs,
                                options={"top_k_layers": 1}, head_init=head_init)
            plain = train(RunConfig(**common, cache="off"), progress=False)
            cached_out = root / f"cached-{epochs}-{head_init}"
            cached = train(RunConfig(**{**common, "out": str(cached_out)}, cache="on"), progress=False)
            a = load_file(Path(common["out"]) / "adapter" / "adapter.safetensors")
            b = load_file(cached_out / "adapter" / "adapter.safetensors")
            worst, name = max(((a[k] - b[k]).abs().max().item(), k) for k in a)
            print(f"epochs {epochs}, head_init {head_init}: {plain['steps']} steps, largest difference {worst:.1e} "
                  f"({name}); test loss {plain['loss']:.7f} vs {cached['loss']:.7f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
