"""The built-in aliases on their real shipped weights (offline): each model must still do its day job."""

from __future__ import annotations

import contextlib
import io
import shutil
import time

import pytest
import torch

from graftune.zoo import image_transform, load_base

pytestmark = pytest.mark.integration

CHURCH_LIKE = {442: "bell cote", 698: "palace", 497: "church", 663: "monastery"}


def _frozen(base) -> bool:
    return not base.model.training and not any(p.requires_grad for p in base.model.parameters())


def test_minilm_embeddings_rank_paraphrases_first():
    base = load_base("minilm")
    assert base.family == "bert" and base.pooling == "mean" and base.tokenizer.model_max_length == 256
    assert _frozen(base) and base.info.alias == "minilm"
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."]
    batch = base.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = base.model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.6 > sim[0, 2]


def test_efficientnet_lite0_recognizes_the_temple():
    from sklearn.datasets import load_sample_image

    base = load_base("efficientnet-lite0")
    assert base.family == "cnn" and base.image_size == 224 and base.tokenizer is None and _frozen(base)
    x = image_transform(base)(load_sample_image("china.jpg"))[None]
    with torch.no_grad():
        top5 = base.model(x).softmax(-1)[0].topk(5).indices.tolist()
        assert base.model.features(x).shape == (1, 1280)
    assert top5[0] in CHURCH_LIKE and len(CHURCH_LIKE.keys() & set(top5)) >= 2, top5


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """One GGUF conversion per session, into a throwaway cache (~25 s, ~540 MB)."""
    cache = tmp_path_factory.mktemp("graftune-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRAFTUNE_CACHE", str(cache))
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            base = load_base("smollm2")
        yield base, stderr.getvalue()
    shutil.rmtree(cache, ignore_errors=True)  # pytest keeps old temp dirs; 540 MB each is too much to keep


@pytest.mark.slow
def test_smollm2_converts_once_then_reads_the_cache(smollm2):
    base, stderr = smollm2
    assert "converting SmolLM2 GGUF once into" in stderr
    assert base.family == "llama" and base.pooling == "last" and _frozen(base)
    assert type(base.model).__name__ == "LlamaForCausalLM"
    t0 = time.perf_counter()
    stderr2 = io.StringIO()
    with contextlib.redirect_stderr(stderr2):
        again = load_base("smollm2", dtype=torch.bfloat16)
    assert "converting" not in stderr2.getvalue() and time.perf_counter() - t0 < 15
    assert next(again.model.parameters()).dtype == torch.bfloat16 and again.source == base.source


@pytest.mark.slow
def test_smollm2_greedy_chat_answers(smollm2):
    base, _ = smollm2
    tok = base.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = base.model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
