"""Frozen-prefix cache: same outputs and gradients as the plain forward, and the lower layers really skipped."""

import pytest
import torch

from graftune import graft
from graftune.speed.cache import FrozenPrefixCache
from tests.conftest import first_tensor, text_inputs, tiny_bert, tiny_llama


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_cached_forward_equals_plain_forward_and_skips_lower_layers(build):
    model = graft(build(), "lora", top_k_layers=1)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.normal_(0, 0.1)
    x = text_inputs()
    cache = FrozenPrefixCache(model)
    assert cache.enabled and cache.start == 1

    def loss_and_grads():
        model.zero_grad()
        loss = first_tensor(model(**x)).float().pow(2).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.trainable_parameters()]

    plain_loss, plain_grads = loss_and_grads()
    calls = []
    handle = cache.layers[0].register_forward_hook(lambda *a: calls.append(1))
    for _ in range(2):  # first pass records, second replays
        with cache.around(x["input_ids"], x["attention_mask"]):
            loss, grads = loss_and_grads()
        torch.testing.assert_close(loss, plain_loss, rtol=0, atol=1e-6)
        for g, pg in zip(grads, plain_grads):
            torch.testing.assert_close(g, pg, rtol=1e-5, atol=1e-7)
    handle.remove()
    assert (cache.misses, cache.hits) == (1, 1)
    assert len(calls) == 1, "layer 0 must not run when its output is cached"
    # changed inputs miss the cache (automatic invalidation)
    y = dict(x, input_ids=x["input_ids"].flip(0))
    with cache.around(y["input_ids"], y["attention_mask"]):
        model(**y)
    assert cache.misses == 2


def test_cache_disabled_when_an_adapter_sits_in_the_first_layer():
    model = graft(tiny_bert(), "lora")
    assert not FrozenPrefixCache(model).enabled
