"""Few-shot strategies on tiny models: embeddings, prototypes, pair sampling, losses, the frozen-prefix cache and
contrastive training of an adapter or the full body."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graftune import AdapterModel
from graftune.errors import ConfigError, DataError
from graftune.recipes import fewshot as fs
from tests.conftest import tiny_llama

WORDS = [
    "the", "a", "cat", "dog", "bird", "fish", "runs", "swims", "flies", "eats", "food", "sky", "sea", "tree",
    "market", "stock", "price", "bank", "money", "shares", "profit", "game", "team", "win", "goal", "player",
    "match", "cup", "in", "of", "and"
]
TEXTS = ["the cat eats food", "a dog runs", "the bird flies in the sky", "fish swims in the sea",
         "market stock price", "bank money and shares", "the bank profit", "stock market shares price",
         "the team win the cup", "player goal", "the match and the goal", "team player game"]
LABELS = ["animal"] * 4 + ["money"] * 4 + ["sport"] * 4


def tokenizer():
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def bert(layers: int = 3, dropout: float = 0.0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    return BertModel(cfg, add_pooling_layer=False).eval()


FAST = {"iterations": 4, "batch_size": 8, "precision": "fp32", "max_length": 16, "embed_max_length": 16}


# --- embeddings ------------------------------------------------------------------------------------------------


def test_embed_shape_order_normalization_and_padding():
    model, tok = bert(), tokenizer()
    e = fs.embed(model, tok, TEXTS)
    assert e.shape == (12, 32) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=1), torch.ones(12), atol=1e-5)
    # the input order is kept although batches are sorted by length, and padding never counts
    rev = fs.embed(model, tok, TEXTS[::-1], batch_size=5)
    assert torch.allclose(rev.flip(0), e, atol=1e-5)
    alone = fs.embed(model, tok, [TEXTS[1]])
    assert torch.allclose(alone[0], e[1], atol=1e-5)
    raw = fs.embed(model, tok, TEXTS[:2], normalize=False)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(2))
    assert not model.training


def test_long_texts_are_read_as_token_weighted_windows():
    model, tok = bert(), tokenizer()
    # one window per text when it fits: the same as plain truncation
    assert torch.allclose(fs.embed(model, tok, TEXTS, max_chunks=3), fs.embed(model, tok, TEXTS, max_chunks=1),
                          atol=1e-6)
    # 6 + 6 + 3 body tokens with max_length 8 ([CLS] ... [SEP] takes 2): three windows
    first, second, third = "the cat eats food in the", "sky and the sea of a", "dog runs in"
    long_text = f"{first} {second} {third}"
    parts = fs.embed(model, tok, [first, second, third], max_length=8, max_chunks=1)
    expected = torch.nn.functional.normalize((parts * torch.tensor([[6.0], [6.0], [3.0]])).sum(0), dim=0)
    assert torch.allclose(fs.embed(model, tok, [long_text], max_length=8, max_chunks=3)[0], expected, atol=1e-5)
    # max_chunks bounds the windows read; max_chunks=1 truncates to the first window
    two = fs.embed(model, tok, [long_text, TEXTS[0]], max_length=8, max_chunks=2)
    assert torch.allclose(two[0], torch.nn.functional.normalize(parts[:2].sum(0), dim=0), atol=1e-5)
    assert torch.allclose(fs.embed(model, tok, [long_text], max_length=8, max_chunks=1)[0], parts[0], atol=1e-5)
    # the chunked text does not disturb its neighbours in the batch
    assert torch.allclose(two[1], fs.embed(model, tok, [TEXTS[0]])[0], atol=1e-5)
    with pytest.raises(ConfigError, match="max_chunks"):
        fs.embed(model, tok, TEXTS, max_chunks=0)
    with pytest.raises(ConfigError, match="max_length"):
        fs.embed(model, tok, TEXTS, max_length=2, max_chunks=2)


def test_embed_with_an_adapter_model_and_errors():
    model, tok = AdapterModel(bert()), tokenizer()
    assert torch.allclose(fs.embed(model, tok, TEXTS[:3]), fs.embed(model.base, tok, TEXTS[:3]), atol=1e-6)
    with pytest.raises(ConfigError, match="pooling"):
        fs.embed(model, tok, TEXTS, pooling="max")
    with pytest.raises(DataError, match="strings"):
        fs.embed(model, tok, "one text")
    with pytest.raises(ConfigError, match="tokenizer"):
        fs.embed(model, None, TEXTS)


# --- prototypes ------------------------------------------------------------------------------------------------


def test_prototype_classifier_nearest_mean_by_cosine():
    emb = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0]])
    clf = fs.PrototypeClassifier(temperature=0.1).fit(emb, ["x", "x", "y", "y"])
    assert list(clf.classes_) == ["x", "y"]
    assert list(clf.predict(torch.tensor([[5.0, 1.0], [0.2, 3.0]]))) == ["x", "y"]  # scale does not matter
    p = clf.predict_proba(np.array([[1.0, 1.0], [1.0, 0.0]]))
    assert np.allclose(p.sum(1), 1) and abs(p[0, 0] - 0.5) < 1e-6 and p[1, 0] > 0.9
    with pytest.raises(DataError, match="two classes"):
        fs.PrototypeClassifier().fit(emb, ["x"] * 4)
    with pytest.raises(ConfigError, match="temperature"):
        fs.PrototypeClassifier(temperature=0)


def test_frozen_fit_heads():
    model, tok = bert(), tokenizer()
    for head in ("prototype", "logistic"):
        m = fs.frozen_fit(model, tok, TEXTS, LABELS, head=head, max_length=16)
        assert m.classes == ["animal", "money", "sport"]
        assert set(m.predict(TEXTS)) <= set(LABELS)
        assert np.allclose(m.predict_proba(TEXTS[:3]).sum(1), 1)
        assert m.report["strategy"] == f"frozen+{head}"


# --- pairs and losses ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_class", [2, 5, 64])
def test_sample_pairs_balanced_and_seeded(per_class):
    labels = np.repeat([0, 1, 2], per_class)
    pairs = fs.sample_pairs(labels, iterations=3, seed=0)
    n = len(labels)
    assert pairs.shape == (2 * 3 * n, 3)
    same = labels[pairs[:, 0]] == labels[pairs[:, 1]]
    assert np.array_equal(same, pairs[:, 2] == 1)  # target 1 exactly for same-class pairs
    assert (pairs[:, 2] == 1).sum() == 3 * n
    assert np.array_equal(np.bincount(pairs[pairs[:, 2] == 1, 0], minlength=n), np.full(n, 3))
    assert np.array_equal(np.bincount(pairs[pairs[:, 2] == 0, 0], minlength=n), np.full(n, 3))
    assert not (pairs[:, 0] == pairs[:, 1]).any()  # with >= 2 per class, never a self-pair
    assert np.array_equal(pairs, fs.sample_pairs(labels, iterations=3, seed=0))
    assert not np.array_equal(pairs, fs.sample_pairs(labels, iterations=3, seed=1))


def test_sample_pairs_uses_every_partner_before_repeating():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    pairs = fs.sample_pairs(labels, iterations=3, seed=0)
    for i in range(4):  # three positive partners for three iterations: each exactly once
        partners = pairs[(pairs[:, 0] == i) & (pairs[:, 2] == 1), 1]
        assert sorted(partners) == sorted(set(range(4)) - {i})


def test_sample_pairs_edge_cases():
    pairs = fs.sample_pairs(["a", "b", "b"], iterations=2, seed=0)
    alone = pairs[(pairs[:, 0] == 0) & (pairs[:, 2] == 1)]
    assert (alone[:, 1] == 0).all()  # alone in its class: its own positive partner
    with pytest.raises(DataError, match="two classes"):
        fs.sample_pairs(["a", "a"], iterations=2)
    with pytest.raises(ConfigError, match="iterations"):
        fs.sample_pairs(["a", "b"], iterations=0)


def test_losses():
    u = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(fs.cosine_pair_loss(u, v, torch.tensor([1.0, 0.0]))) == pytest.approx(0.0)
    assert float(fs.cosine_pair_loss(u, v, torch.tensor([0.0, 1.0]))) == pytest.approx(1.0)
    labels = torch.tensor([0, 0, 1, 1])
    clustered = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    assert fs.supcon_loss(clustered, labels) < fs.supcon_loss(mixed, labels)
    assert float(fs.supcon_loss(clustered, torch.tensor([0, 1, 2, 3]))) == 0.0  # no positives: no signal


# --- the frozen-prefix cache -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_prefix_cache_reproduces_the_forward(family):
    # contrastive_fit's cache is speed/cache.py's (tests/unit/test_cache.py); here: on fewshot's own batches
    tok = tokenizer()
    base = bert() if family == "bert" else tiny_llama()
    model = AdapterModel(base)
    targets = ["query", "value"] if family == "bert" else ["q_proj", "v_proj"]
    model.add_adapter("a", "lora", targets=targets, top_k_layers=1)
    model.set_active("a")
    with torch.no_grad():  # a non-zero update, so the adapted layer really changes the output
        for p in model.adapters["a"].parameters():
            p.normal_(0, 0.1)
    ids = fs._tokenize(tok, TEXTS, 16)
    cache, note = fs._prefix_cache(model, tok, ids, torch.device("cpu"))
    assert cache is not None and note.startswith("layers 2..2" if family == "bert" else "layers 1..1"), note
    assert len(cache.store) == len(TEXTS)
    rows = [5, 0, 7]
    sub = fs._batch(tok, [ids[i] for i in rows], torch.device("cpu"))
    with torch.no_grad():
        got = fs.base_hidden(model, sub)
        cache.detach()
        ref = fs.base_hidden(model, sub)
    assert cache.hits >= 1
    m = sub["attention_mask"].bool()
    assert torch.allclose(got[m], ref[m], atol=1e-5)


def test_prefix_cache_declines_when_the_first_layer_is_adapted():
    tok = tokenizer()
    model = AdapterModel(bert())
    model.add_adapter("a", "lora")  # every layer
    model.set_active("a")
    ids = fs._tokenize(tok, TEXTS, 16)
    cache, note = fs._prefix_cache(model, tok, ids, torch.device("cpu"))
    assert cache is None and "layer 0" in note
    model.add_adapter("p", "lora", targets=["word_embeddings"])
    model.set_active("p")
    assert fs._prefix_cache(model, tok, ids, torch.device("cpu"))[0] is None


# --- contrastive training --------------------------------------------------------------------------------------


def test_contrastive_adapter_trains_and_leaves_the_base_untouched():
    base, tok = bert(), tokenizer()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    steps = []
    m = fs.contrastive_fit(base, tok, TEXTS, LABELS, lr=5e-3, epochs=3, on_step=steps.append, **FAST)
    assert m.report["steps"] == len(steps) == 3 * 12 and m.report["cache"].startswith("layers 1..2")
    assert np.mean([s["loss"] for s in steps[-6:]]) < np.mean([s["loss"] for s in steps[:6]])
    assert set(m.predict(TEXTS)) <= set(LABELS) and np.allclose(m.predict_proba(TEXTS).sum(1), 1)
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(m.model, AdapterModel) and m.model.active == () and m.adapter == "fewshot"
    with m.model.disabled():  # the base alone still computes exactly as before
        assert torch.allclose(fs.embed(m.model, tok, TEXTS[:2]), fs.embed(bert(), tok, TEXTS[:2]), atol=1e-6)


def test_contrastive_is_seeded_and_the_cache_changes_nothing():
    tok = tokenizer()
    runs = [fs.contrastive_fit(bert(), tok, TEXTS, LABELS, seed=3, cache=c, lr=5e-3, **FAST)
            for c in (True, True, False)]
    p = [r.predict_proba(TEXTS) for r in runs]
    assert np.array_equal(p[0], p[1])
    assert runs[2].report["cache"].startswith("off")
    # no dropout here: cached and plain training give the same body, and heads equal to lbfgs's stopping tolerance
    # (a CPU's kernels may differ in the last bits between the cache's batches and plain ones; see the test below)
    assert torch.allclose(runs[0].embed(TEXTS), runs[2].embed(TEXTS), atol=1e-5)
    assert np.allclose(p[0], p[2], atol=1e-3)
    other = fs.contrastive_fit(bert(), tok, TEXTS, LABELS, seed=4, lr=5e-3, **FAST).predict_proba(TEXTS)
    assert not np.allclose(p[0], other)
    state = torch.random.get_rng_state()
    fs.contrastive_fit(bert(), tok, TEXTS, LABELS, **FAST)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is left alone


@pytest.mark.parametrize("model,loss", [("bert", "cosine"), ("bert", "supcon"), ("llama-left-padded", "cosine")])
def test_contrastive_length_groups_change_nothing(model, loss):
    # a step's texts encoded in groups by length (each padded to its own longest) train exactly as one batch: the
    # same losses step by step and the same model (no dropout here); a group's rows back in the wrong order would
    # pair the wrong embeddings (cosine) or give them the wrong labels (supcon)
    tok = tokenizer()
    extra = {}
    if model != "bert":
        tok.padding_side = "left"
        extra = {"pooling": "last", "method_options": {"top_k_layers": 1}}
    runs = {}
    for rows in (3, 1000):
        steps = []
        runs[rows] = (fs.contrastive_fit(bert() if model == "bert" else tiny_llama(), tok, TEXTS, LABELS, seed=2,
                                         lr=5e-3, loss=loss, group_rows=rows, on_step=steps.append, **extra, **FAST),
                      [s["loss"] for s in steps])
    assert np.allclose(runs[3][1], runs[1000][1], atol=1e-5)
    grouped, whole = runs[3][0], runs[1000][0]
    assert torch.allclose(grouped.embed(TEXTS), whole.embed(TEXTS), atol=1e-5)  # the same body
    # the heads agree to the logistic regression's stopping tolerance, not to float32: on an Intel Xeon without bf16,
    # inputs 2e-7 apart made lbfgs stop one iteration apart, and the probabilities moved by 1.7e-4
    assert np.allclose(grouped.predict_proba(TEXTS), whole.predict_proba(TEXTS), atol=1e-3)
    with pytest.raises(ConfigError, match="group_rows"):
        fs.contrastive_fit(bert(), tok, TEXTS, LABELS, group_rows=0, **FAST)


@pytest.mark.parametrize("variant", ["full", "supcon", "topk", "prototype-head", "bf16", "full-bf16"])
def test_contrastive_variants(variant):
    base, tok = bert(), tokenizer()
    kw = dict(FAST)
    if variant == "full":
        kw.update(body="full", lr=1e-3)
    elif variant == "supcon":
        kw.update(loss="supcon")
    elif variant == "topk":
        kw.update(method="topk", method_options={"top_k_layers": 1})
    elif variant == "prototype-head":
        kw.update(head="prototype")
    elif variant == "full-bf16":
        kw.update(body="full", lr=1e-3, precision="bf16")
    else:
        kw.update(precision="bf16")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    m = fs.contrastive_fit(base, tok, TEXTS, LABELS, **kw)
    assert set(m.predict(TEXTS)) <= set(LABELS)
    assert np.isfinite(m.report["last_loss"])
    if variant in ("full", "topk", "supcon"):
        after = base.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    if variant in ("bf16", "full-bf16"):
        # the report must not claim what did not happen: the frozen base really is bf16, the trained weights fp32
        assert m.report["precision"] == "bf16"
        assert all(p.dtype == torch.float32 for p in m.model.adapters[m.adapter].parameters())
    if variant == "bf16":
        assert all(p.dtype == torch.bfloat16 for p in m.model.base.parameters() if p.is_floating_point())


def test_contrastive_on_an_existing_adapter_model_and_a_decoder():
    tok = tokenizer()
    model = AdapterModel(bert())
    model.add_adapter("fewshot", "lora")
    m = fs.contrastive_fit(model, tok, TEXTS, LABELS, **FAST)
    assert m.adapter == "fewshot-2" and set(model.info) == {"fewshot", "fewshot-2"}
    llama = fs.contrastive_fit(tiny_llama(), tok, TEXTS, LABELS, pooling="last", method_options={"top_k_layers": 1},
                               **FAST)
    assert llama.report["cache"].startswith("layers 1..1") and set(llama.predict(TEXTS)) <= set(LABELS)


def test_contrastive_rejects_bad_input():
    tok = tokenizer()
    with pytest.raises(ConfigError, match="body"):
        fs.contrastive_fit(bert(), tok, TEXTS, LABELS, body="partial")
    with pytest.raises(ConfigError, match="loss"):
        fs.contrastive_fit(bert(), tok, TEXTS, LABELS, loss="triplet")
    with pytest.raises(ConfigError, match="head"):
        fs.contrastive_fit(bert(), tok, TEXTS, LABELS, head="svm")
    with pytest.raises(DataError, match="labels"):
        fs.contrastive_fit(bert(), tok, TEXTS, LABELS[:3])
    with pytest.raises(DataError, match="two classes"):
        fs.contrastive_fit(bert(), tok, TEXTS[:4], LABELS[:4])
    with pytest.raises(ConfigError, match="batch_size"):
        fs.contrastive_fit(bert(), tok, TEXTS, LABELS, batch_size=0)
