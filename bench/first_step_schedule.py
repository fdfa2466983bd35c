"""Does the first epoch train? The default LoRA recipe at 8 shots on a 2-class set (16 examples, batch 16: one step
an epoch), with transformers' warm-up (its first step at a learning rate of 0) against graftune's schedule
(``run/schedule.py``: every step trains). Per seed: the epoch early stopping kept, test accuracy, and the largest
|B| of the LoRA weights (0: the adapter never trained).

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python bench/first_step_schedule.py --data sms-spam --seeds 0,1,2,3
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from safetensors.torch import load_file
from transformers import get_scheduler

from graftune.config import RunConfig
from graftune.recipes import adapter
from graftune.runs import train


def hf_scheduler(cfg, optimizer, total_steps):
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=int(cfg.warmup * total_steps),
                         num_training_steps=total_steps)


def lora_b_max(run: Path) -> float:
    tensors = {}
    for f in (run / "adapter").rglob("*.safetensors"):
        tensors.update(load_file(f))
    return max(float(t.abs().max()) for k, t in tensors.items() if k.endswith("lora_B"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="sms-spam")
    p.add_argument("--seeds", default="0,1,2,3")
    a = p.parse_args()
    ours = adapter._scheduler
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in a.seeds.split(",")):
            for name, scheduler in (("transformers", hf_scheduler), ("graftune", ours)):
                adapter._scheduler = scheduler
                out = Path(tmp) / f"{name}-{seed}"
                m = train(RunConfig(model="minilm", data=a.data, method="lora", shots=8, seed=seed, out=str(out),
                                    max_length=128), progress=False)
                print(f"{a.data} seed {seed} {name:12s}: kept epoch {m['best_epoch']} of {m['epochs_run']}, "
                      f"accuracy {m['accuracy']:.3f}, max |B| {lora_b_max(out):.4f}", flush=True)
    adapter._scheduler = ours


if __name__ == "__main__":
    main()
