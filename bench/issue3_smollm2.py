"""SmolLM2-135M-Instruct + LoRA on json-answers (extract city and country as a fixed JSON object): the rate of
well-formed JSON answers (and of exactly right ones) on held-out prompts before and after training, and the loss
curve (per step and per epoch, train and val).

Run: ``.venv/bin/python bench/issue3_smollm2.py [--set epochs=3 ...]``
Writes ``bench/out/issue3_smollm2.json`` and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from graftune.config import RunConfig, parse_sets
from graftune.runs import train

OUT = Path(__file__).parent / "out" / "issue3_smollm2.json"
RECIPE = {"model": "smollm2", "data": "json-answers", "method": "lora", "options": {"r": 8, "alpha": 16},
          "test_size": 0.2, "val_size": 0.1, "epochs": 3, "lr": 2e-3, "batch_size": 8, "max_length": 128,
          "max_new_tokens": 32, "patience": 0}


def before_training(cfg: RunConfig) -> dict:
    """The untouched base on the same held-out prompts (greedy, same chat template and length limit)."""
    from graftune.core.model import AdapterModel
    from graftune.data.sources import load_data
    from graftune.data.splits import make_splits
    from graftune.run.scoring import score_causal_lm
    from graftune.speed import precision
    from graftune.tasks import build_task
    from graftune.zoo import load_base

    ds = load_data(cfg.data)
    test = make_splits(ds, **cfg.split_args()).test
    base = load_base(cfg.model, task="causal-lm")
    task = build_task("causal-lm", base, max_length=cfg.max_length)
    model = AdapterModel(base.model, family=base.family)
    policy = precision.choose(cfg.precision, inference=True)
    precision.apply(model.base, policy)
    return score_causal_lm(task, model, test.inputs, policy=policy, max_new_tokens=cfg.max_new_tokens)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", dest="sets", action="append", default=[], help="override a recipe field (YAML value)")
    args = ap.parse_args()
    changes = parse_sets(args.sets)
    recipe = {**RECIPE, **changes}
    print(f"recipe: {json.dumps(recipe)}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(**recipe, out=str(Path(tmp) / "run"))
        before = before_training(cfg)
        print(f"before: json_valid_rate {before.get('json_valid_rate')}, json_match_rate "
              f"{before.get('json_match_rate')}, perplexity {before['perplexity']:.2f}", flush=True)
        after = train(cfg, progress=False)
        log = [json.loads(line) for line in (Path(cfg.out) / "log.jsonl").read_text().splitlines()]
    steps = [round(e["loss"], 4) for e in log if e["event"] == "step"]
    epochs = [{"epoch": e["epoch"], "train_loss": round(e["train_loss"], 4),
               "val_loss": round(e["val"]["loss"], 4) if e.get("val") else None} for e in log if e["event"] == "epoch"]
    keys = ("json_valid_rate", "json_match_rate", "exact_match", "perplexity", "loss", "examples")
    result = {"recipe": recipe, "before": {k: before.get(k) for k in keys}, "after": {k: after.get(k) for k in keys},
              "samples_before": before.get("samples", [])[:3], "samples_after": after.get("samples", [])[:3],
              "step_losses": steps, "epochs": epochs, "train_seconds": after["train_seconds"],
              "train_cpu_seconds": after.get("train_cpu_seconds"),
              "trainable_params": after["trainable_params"], "peak_rss_mb": after["peak_rss_mb"],
              "seconds": round(time.perf_counter() - started, 1), "date": time.strftime("%Y-%m-%d %H:%M")}
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("before", "after", "epochs", "train_seconds")}, indent=2))


if __name__ == "__main__":
    main()
