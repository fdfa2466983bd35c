"""Frozen-prefix cache (speed/cache.py): same outputs and gradients as the plain forward, the lower layers really
skipped, changed or left-padded inputs never served from the store, and the cases it declines."""

import pytest
import torch

from graftune import AdapterModel, graft
from graftune.speed.cache import FrozenPrefixCache, plan
from tests.conftest import first_tensor, tiny_bert, tiny_llama


def _inputs(lengths=(7, 5, 3), seed=1) -> dict:
    """Right-padded rows of different lengths (as task.collate pads)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, 120, (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def _counter(layer: torch.nn.Module) -> list:
    """Counts the layer's real computations: calls of its first sublayer (the layer's own hooks still fire when
    the cache makes it stand aside)."""
    calls = []
    next(layer.children()).register_forward_hook(lambda *a: calls.append(1))
    return calls


def _grafted(build, **options):
    model = graft(build(), "lora", **options)
    with torch.no_grad():  # a non-zero update, so the adapted layer really changes the output
        for p in model.trainable_parameters():
            p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_cached_forward_equals_plain_forward_and_skips_lower_layers(build):
    model = _grafted(build, top_k_layers=1)
    x = _inputs()
    cache = FrozenPrefixCache(model)
    assert cache.enabled and cache.start == 1, cache.note
    mask = x["attention_mask"].bool()

    def loss_and_grads():
        model.zero_grad()
        out = first_tensor(model(**x)).float()
        loss = out[mask].pow(2).mean()  # padded positions are never read (pooling and losses mask them)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.trainable_parameters()]

    plain_loss, plain_grads = loss_and_grads()
    lower, upper = _counter(cache.layers[0]), _counter(cache.layers[1])
    with cache.attached():
        for _ in range(3):  # first pass records, later ones replay
            loss, grads = loss_and_grads()
            torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
            for g, pg in zip(grads, plain_grads):
                torch.testing.assert_close(g, pg, rtol=1e-4, atol=1e-6)
    assert (cache.misses, cache.hits) == (1, 2)
    assert len(lower) == 1 and len(upper) == 3, "layer 0 must run once; layer 1 every call"
    assert len(cache.store) == 3 and cache.nbytes() == 4 * 32 * (7 + 5 + 3)


def test_rows_are_keyed_by_their_tokens_in_any_batch():
    model = _grafted(tiny_bert, top_k_layers=1)
    cache = FrozenPrefixCache(model)
    model.eval()
    a, b = _inputs((6, 4), seed=2), _inputs((5,), seed=3)
    with torch.no_grad(), cache.attached():
        model(**a), model(**b)
        assert cache.misses == 2
        # a new batch made of the same rows in another order and padding width is served from the store
        rows = [a["input_ids"][1, :4], b["input_ids"][0, :5], a["input_ids"][0, :6]]
        mixed = {"input_ids": torch.nn.utils.rnn.pad_sequence(rows, batch_first=True),
                 "attention_mask": torch.nn.utils.rnn.pad_sequence([torch.ones(len(r), dtype=torch.long)
                                                                    for r in rows], batch_first=True)}
        got = model(**mixed).last_hidden_state
        assert cache.hits == 1
        # one changed token: a miss (never a stale row)
        changed = {k: v.clone() for k, v in mixed.items()}
        changed["input_ids"][0, 0] += 1
        model(**changed)
        assert cache.misses == 3
        # left padding bypasses the cache: positions would depend on the padding
        left = {"input_ids": mixed["input_ids"].flip(1), "attention_mask": mixed["attention_mask"].flip(1)}
        model(**left)
        assert cache.bypassed == 1
    ref = model(**mixed).last_hidden_state
    m = mixed["attention_mask"].bool()
    torch.testing.assert_close(got[m], ref[m], rtol=1e-5, atol=1e-5)


def test_fill_runs_only_the_lower_layers_and_verify_compares_with_plain():
    model = _grafted(tiny_llama, top_k_layers=1)
    cache = FrozenPrefixCache(model)
    model.eval()
    lower, upper = _counter(cache.layers[0]), _counter(cache.layers[1])
    batches = [_inputs((7, 2), seed=4), _inputs((3,), seed=5)]
    cache.fill(batches)
    assert (len(lower), len(upper), len(cache.store)) == (2, 0, 3) and not cache.attached_now
    ok, detail = cache.verify(lambda b: model(**b).logits, batches[0])
    assert ok, detail
    assert len(lower) == 3  # verify's plain reference; the cached calls skipped layer 0


def test_head_only_caches_every_layer():
    model = AdapterModel(tiny_bert())
    cache = FrozenPrefixCache(model)
    assert cache.start == 2 and "every layer" in cache.note
    ok, detail = cache.verify(lambda b: model(**b).last_hidden_state, _inputs())
    assert ok, detail


def test_declines_what_it_cannot_cache():
    assert plan(graft(tiny_bert(), "lora"))[0] is None  # every layer, layer 0 included
    assert "layer 0" in plan(graft(tiny_bert(), "lora"))[1]
    assert "inputs" in plan(graft(tiny_llama(), "prompt", num_virtual_tokens=2))[1]
    assert "inputs" in plan(graft(tiny_llama(), "prefix", num_virtual_tokens=2))[1]
    assert "outside" in plan(graft(tiny_bert(), "lora", targets=["word_embeddings"]))[1]
    start, note = plan(graft(tiny_bert(), "topk", top_k_layers=1))
    assert start == 1, note


def test_memory_cap_leaves_rows_uncached_with_the_same_results():
    """Rows of 7, 5 and 3 tokens (hidden 32, fp32: 896, 640 and 384 bytes) under a 1,300-byte cap: the 7- and the
    3-token rows are stored, the 5-token one would pass the cap and runs uncached. Outputs and gradients stay those
    of the plain forward; a batch of stored rows alone is still served from the cache."""
    model = _grafted(tiny_bert, top_k_layers=1)
    x = _inputs()
    mask = x["attention_mask"].bool()

    def loss_and_grads(batch, keep):
        model.zero_grad()
        loss = first_tensor(model(**batch)).float()[keep].pow(2).mean()
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.trainable_parameters()]

    plain = loss_and_grads(x, mask)
    capped, uncapped = FrozenPrefixCache(model, max_mb=1300e-6), FrozenPrefixCache(model)
    for cache in (capped, uncapped):
        with cache.attached():
            for _ in range(3):
                for got, want in zip(loss_and_grads(x, mask), plain):
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert uncapped.max_bytes > 10**6 and (uncapped.misses, uncapped.hits) == (1, 2)
    assert uncapped.stats()["rows_uncached_over_cap"] == 0
    stats = capped.stats()
    assert (capped.misses, capped.hits) == (3, 0)  # every call holds the uncached row: the whole base runs
    assert (stats["examples"], stats["rows_uncached_over_cap"], capped.max_bytes) == (2, 1, 1300)
    held = sum(t.numel() * t.element_size() for t in capped.store.values())
    assert held == capped.nbytes() == 896 + 384 <= capped.max_bytes
    stored = {k: v[[0, 2], :7] for k, v in x.items()}  # the two stored rows: served from the cache
    with capped.attached():
        loss_and_grads(stored, stored["attention_mask"].bool())
    assert capped.hits == 1 and capped.nbytes() == held
    capped.clear()
    assert capped.stats()["rows_uncached_over_cap"] == capped.nbytes() == 0
    # a cap below the 4 rows verify checks on: the cache says so instead of a wrong reason
    ok, detail = FrozenPrefixCache(model, max_mb=1e-4).verify(lambda b: model(**b).last_hidden_state, x)
    assert not ok and "memory cap" in detail


def test_training_under_a_tiny_cap_equals_training_without_the_cache(tmp_path):
    from safetensors.torch import load_file

    from graftune.config import RunConfig
    from graftune.runs import train
    from tests.train_helpers import bert_folder, topic_csv, train_args

    common = train_args(bert_folder(tmp_path / "bert"), topic_csv(tmp_path / "t.csv", n_per_class=12),
                        tmp_path / "plain", epochs=2, options={"top_k_layers": 1})
    plain = train(RunConfig(**common, cache="off"), progress=False)
    capped = train(RunConfig(**{**common, "out": str(tmp_path / "capped")}, cache="on", cache_max_mb=0.01),
                   progress=False)
    stats = capped["speed"]["cache_stats"]
    assert stats["max_mb"] == 0.01 and 0 < stats["mb"] <= 0.01 and stats["rows_uncached_over_cap"] > 0
    assert "over the 0.01 MB cap run uncached" in capped["speed"]["cache"]
    assert capped["loss"] == pytest.approx(plain["loss"], rel=1e-4)
    a, b = (load_file(tmp_path / run / "adapter" / "adapter.safetensors") for run in ("plain", "capped"))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
