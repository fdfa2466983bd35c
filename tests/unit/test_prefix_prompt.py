"""Prompt and prefix tuning against hand-written references, masks, cached generation, mixed batches, state."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from graftune import AdapterModel, graft
from graftune.errors import ArtifactError, ConfigError
from tests.conftest import first_tensor, tiny_bert, tiny_cnn, tiny_gpt2, tiny_llama

BUILDERS = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2}
DECODERS = ("llama", "gpt2")


def one_layer(family: str):
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "bert":
        return BertModel(BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                    intermediate_size=48, max_position_embeddings=64), add_pooling_layer=False).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=48,
                                        max_position_embeddings=64)).eval()


def ids_and_mask(batch=3, length=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 120, (batch, length), generator=g), torch.ones(batch, length, dtype=torch.long)


def perturb(model: AdapterModel, name: str, seed: int, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters[name].parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def grafted(family: str, method: str, seed: int = 3, base=None, **options) -> AdapterModel:
    model = graft(base if base is not None else BUILDERS[family](), method, **options)
    perturb(model, "default", seed)
    return model


def module(model: AdapterModel, name: str = "default"):
    return model.adapters[name]["__model__"]


# --- numerics against references ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_prompt_equals_base_on_soft_tokens_then_embeddings(family):
    model = grafted(family, "prompt", num_virtual_tokens=4)
    ids, mask = ids_and_mask()
    mask[-1, -2:] = 0
    soft = module(model).prompt_embeddings
    embeds = torch.cat([soft.expand(3, -1, -1), model.base.get_input_embeddings()(ids)], dim=1)
    with model.disabled():
        ref = first_tensor(model.base(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(3, 4).long(), mask], 1)))
    out = first_tensor(model(input_ids=ids, attention_mask=mask))
    assert out.shape[1] == 6
    torch.testing.assert_close(out, ref[:, 4:], rtol=1e-5, atol=1e-5)


def test_prompt_extends_labels_and_trims_hidden_states():
    model = grafted("llama", "prompt", num_virtual_tokens=3)
    ids, mask = ids_and_mask()
    out = model(input_ids=ids, attention_mask=mask, labels=ids, output_hidden_states=True)
    assert out.logits.shape[:2] == (3, 6) and all(h.shape[1] == 6 for h in out.hidden_states)
    # the reference: the base on [soft; embeddings] with the soft positions ignored by the loss
    embeds = torch.cat([module(model).prompt_embeddings.expand(3, -1, -1), model.base.get_input_embeddings()(ids)], 1)
    labels = torch.cat([torch.full((3, 3), -100), ids], 1)
    with model.disabled():
        ref = model.base(inputs_embeds=embeds, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


def _bert_reference(base, ids, mask, kv):
    """One BERT layer by hand: keys/values of the prefix concatenated before the tokens' own."""
    p, (b, t) = kv.shape[-2], ids.shape
    h = base.embeddings(input_ids=ids, position_ids=torch.arange(p, p + t)[None])
    layer = base.encoder.layer[0]
    att = layer.attention.self
    heads, d = att.num_attention_heads, att.attention_head_size

    def split(x):
        return x.view(b, t, heads, d).transpose(1, 2)

    k = torch.cat([kv[0].expand(b, -1, -1, -1), split(att.key(h))], dim=2)
    v = torch.cat([kv[1].expand(b, -1, -1, -1), split(att.value(h))], dim=2)
    scores = split(att.query(h)) @ k.transpose(-1, -2) / math.sqrt(d)
    keep = torch.cat([torch.ones(b, p, dtype=torch.bool), mask.bool()], 1)[:, None, None, :]
    ctx = (scores.masked_fill(~keep, -math.inf).softmax(-1) @ v).transpose(1, 2).reshape(b, t, heads * d)
    a = layer.attention.output(ctx, h)
    return layer.output(layer.intermediate(a), a)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _llama_reference(model, ids, mask, kv):
    """One Llama layer by hand (RoPE on the tokens' queries/keys, grouped key/value heads, causal mask that lets
    every token see the whole prefix), then the final norm and the LM head."""
    p, (b, t) = kv.shape[-2], ids.shape
    body = model.model
    layer, att = body.layers[0], body.layers[0].self_attn
    heads, kv_heads, d = 4, 2, 8
    x = body.embed_tokens(ids)
    cos, sin = body.rotary_emb(x, torch.arange(p, p + t)[None])
    h = layer.input_layernorm(x)
    q = att.q_proj(h).view(b, t, heads, d).transpose(1, 2)
    k = att.k_proj(h).view(b, t, kv_heads, d).transpose(1, 2)
    v = att.v_proj(h).view(b, t, kv_heads, d).transpose(1, 2)
    q, k = q * cos[:, None] + _rotate_half(q) * sin[:, None], k * cos[:, None] + _rotate_half(k) * sin[:, None]
    k = torch.cat([kv[0].expand(b, -1, -1, -1), k], 2).repeat_interleave(heads // kv_heads, dim=1)
    v = torch.cat([kv[1].expand(b, -1, -1, -1), v], 2).repeat_interleave(heads // kv_heads, dim=1)
    causal = torch.cat([torch.ones(t, p, dtype=torch.bool), torch.ones(t, t, dtype=torch.bool).tril()], 1)
    keep = causal[None, None] & torch.cat([torch.ones(b, p, dtype=torch.bool), mask.bool()], 1)[:, None, None, :]
    scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~keep, -math.inf)
    o = att.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, heads * d))
    x = x + o
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(body.norm(x))


@pytest.mark.parametrize("projection", [False, True], ids=["direct", "projection"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_prefix_equals_hand_written_attention_with_concatenated_keys_values(family, projection):
    model = grafted(family, "prefix", base=one_layer(family), num_virtual_tokens=5, projection=projection,
                    projection_hidden=16)
    ids, mask = ids_and_mask()
    mask[-1, -2:] = 0
    kv = module(model)()[0]  # layer 0: (2, kv_heads, P, head_dim)
    assert kv.shape == ((2, 4, 5, 8) if family == "bert" else (2, 2, 5, 8))
    out = first_tensor(model(input_ids=ids, attention_mask=mask))
    with torch.no_grad(), model.disabled():
        ref = (_bert_reference if family == "bert" else _llama_reference)(model.base, ids, mask, kv)
    real = mask.bool()  # padded query positions are not compared (their outputs are ignored anyway)
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5)


def test_prefix_projection_is_the_mlp_of_the_embedding():
    model = grafted("gpt2", "prefix", num_virtual_tokens=3, projection=True, projection_hidden=7)
    m = module(model)
    flat = m.prefix_mlp[2](torch.tanh(m.prefix_mlp[0](m.prefix_embedding)))  # (P, layers * 2 * heads * head_dim)
    expected = flat.view(3, 2, 2, 4, 8).permute(1, 2, 3, 0, 4)
    torch.testing.assert_close(m(), expected)
    assert {n for n, _ in m.named_parameters()} == {"prefix_embedding", "prefix_mlp.0.weight", "prefix_mlp.0.bias",
                                                    "prefix_mlp.2.weight", "prefix_mlp.2.bias"}


def test_vocab_init_uses_real_tokens():
    base = tiny_llama()
    prompt = module(graft(base, "prompt", num_virtual_tokens=4))
    table = base.get_input_embeddings().weight
    assert all((table == row).all(-1).any() for row in prompt.prompt_embeddings)
    # prefix: the keys/values the base computes for real tokens (layer 0's values are v_proj of normed embeddings)
    model = graft(tiny_llama(), "prefix", num_virtual_tokens=4)
    values = module(model).prefix_kv[0, 1]  # (kv_heads, P, head_dim)
    layer = model.base.model.layers[0]
    with torch.no_grad():
        all_values = layer.self_attn.v_proj(layer.input_layernorm(model.base.get_input_embeddings().weight))
    all_values = all_values.view(120, 2, 8).transpose(0, 1)  # (kv_heads, vocab, head_dim)
    for j in range(4):
        assert (all_values - values[:, j:j + 1]).abs().amax((0, 2)).min() < 1e-6


# --- masks ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("family,side", [("bert", "right"), ("llama", "right"), ("llama", "left"), ("gpt2", "left")])
def test_padded_rows_equal_unpadded_runs(method, family, side):
    model = grafted(family, method, num_virtual_tokens=3)
    ids, mask = ids_and_mask(batch=2, length=6)
    short = ids[1, :4].clone()
    if side == "right":
        ids[1, 4:], mask[1, 4:] = 0, 0
        real = slice(0, 4)
    else:
        ids[1] = torch.cat([torch.zeros(2, dtype=torch.long), short])
        mask[1, :2] = 0
        real = slice(2, 6)
    # left padding: the caller passes the positions the real tokens should have (as generate does)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = first_tensor(model(input_ids=ids, attention_mask=mask, position_ids=positions))
    alone = first_tensor(model(input_ids=short[None], attention_mask=torch.ones(1, 4, dtype=torch.long)))
    torch.testing.assert_close(out[1, real], alone[0], rtol=1e-5, atol=1e-5)


# --- generation ----------------------------------------------------------------------------------------------------
def _step_by_step(model, ids, steps, **kw):
    """Greedy decoding through AdapterModel.forward on the growing sequence, without a cache."""
    logits = []
    for _ in range(steps):
        last = first_tensor(model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw))[:, -1]
        logits.append(last)
        ids = torch.cat([ids, last.argmax(-1, keepdim=True)], 1)
    return ids, torch.stack(logits, 1)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("family", DECODERS)
def test_cached_generate_equals_step_by_step_forward(method, family):
    model = grafted(family, method, num_virtual_tokens=4)
    ids, mask = ids_and_mask(batch=2)
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True, output_logits=True)
    expected, logits = _step_by_step(model, ids, 5)
    assert torch.equal(gen.sequences, expected)
    torch.testing.assert_close(torch.stack(gen.logits, 1), logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("family", DECODERS)
def test_left_padded_generate_equals_unpadded(method, family):
    model = grafted(family, method, num_virtual_tokens=4)
    ids, mask = ids_and_mask(batch=2)
    ids[1, :2], mask[1, :2] = 0, 0
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    alone = model.generate(input_ids=ids[1:, 2:], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(gen[1, 2:], alone[0])


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("family", DECODERS)
def test_mixed_batch_generate_rows_equal_single_adapter_runs(method, family):
    model = AdapterModel(BUILDERS[family]())
    model.add_adapter("a", method, num_virtual_tokens=3)
    model.add_adapter("b", method, num_virtual_tokens=5)
    perturb(model, "a", 1)
    perturb(model, "b", 2)
    ids, mask = ids_and_mask()
    kw = {"attention_mask": mask, "max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    mixed = model.generate(input_ids=ids, adapter_names=["a", None, "b"], **kw)
    for i, name in enumerate(["a", None, "b"]):
        model.set_active(*([name] if name else []))
        assert torch.equal(mixed[i], model.generate(input_ids=ids, **kw)[i]), name


def test_prefix_generate_with_beams_and_several_sequences():
    model = grafted("gpt2", "prefix", num_virtual_tokens=3)
    ids, mask = ids_and_mask(batch=2)
    beams = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, num_beams=2, do_sample=False,
                           pad_token_id=0)
    assert beams.shape == (2, 9)
    torch.manual_seed(0)
    sampled = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=True,
                             num_return_sequences=3, pad_token_id=0)
    assert sampled.shape == (6, 9) and torch.equal(sampled[:, :6], ids.repeat_interleave(3, 0))


# --- mixed batches -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_mixed_batch_with_different_token_counts(method, family):
    base = BUILDERS[family]()
    ids, mask = ids_and_mask(batch=4)
    mask[3, -2:] = 0
    with torch.no_grad():
        plain = first_tensor(base(input_ids=ids, attention_mask=mask))
    model = AdapterModel(base)
    model.add_adapter("a", method, num_virtual_tokens=2)
    model.add_adapter("b", method, num_virtual_tokens=6)
    perturb(model, "a", 1)
    perturb(model, "b", 2)
    rows = ["b", None, "a", "b"]
    mixed = first_tensor(model(input_ids=ids, attention_mask=mask, adapter_names=rows))
    for i, name in enumerate(rows):
        if name is None:
            torch.testing.assert_close(mixed[i], plain[i], rtol=1e-5, atol=1e-5)
            continue
        model.set_active(name)
        single = first_tensor(model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]))
        torch.testing.assert_close(mixed[i], single[0], rtol=1e-5, atol=1e-5)


# --- state, options, errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{"method": "prompt"}, {"method": "prefix"},
                                     {"method": "prefix", "projection": True, "projection_hidden": 8}],
                         ids=["prompt", "prefix", "prefix-projection"])
def test_state_dict_roundtrip(options):
    options = dict(options)
    method = options.pop("method")
    model = grafted("llama", method, num_virtual_tokens=4, **options)
    ids, mask = ids_and_mask()
    expected = first_tensor(model(input_ids=ids, attention_mask=mask))
    state = model.adapter_state_dict("default")
    assert all(k.startswith("__model__.prefix_" if method == "prefix" else "__model__.prompt_") for k in state)
    config = model.info["default"].config
    other = AdapterModel(copy.deepcopy(model.unload()))
    other.add_adapter("x", method, config)
    other.load_adapter_state_dict("x", state)
    other.set_active("x")
    assert torch.equal(first_tensor(other(input_ids=ids, attention_mask=mask)), expected)
    other.add_adapter("wider", method, num_virtual_tokens=5, **options)
    with pytest.raises(ArtifactError, match="shape"):
        other.load_adapter_state_dict("wider", state)


def test_training_moves_only_the_adapter():
    model = graft(tiny_gpt2(), "prefix", num_virtual_tokens=3, projection=True, projection_hidden=8)
    before = {k: v.clone() for k, v in model.base.state_dict().items()}
    ids, mask = ids_and_mask()
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.base.state_dict().items())


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_bfloat16_base_with_float32_adapter(method):
    model = grafted("llama", method, base=tiny_llama().to(torch.bfloat16))
    ids, mask = ids_and_mask()
    out = first_tensor(model(input_ids=ids, attention_mask=mask))
    assert out.dtype == torch.bfloat16 and out.shape[:2] == (3, 6) and torch.isfinite(out).all()
    assert module(model).state_dict()[next(iter(module(model).state_dict()))].dtype == torch.float32


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("bad,match", [({"num_virtual_tokens": 0}, "num_virtual_tokens"),
                                       ({"init": "zeros"}, "init"),
                                       ({"targets": ["query"]}, "targets"),
                                       ({"top_k_layers": 1}, "top_k_layers")])
def test_bad_config_names_the_field(method, bad, match):
    with pytest.raises(ConfigError, match=match):
        graft(tiny_bert(), method, **bad)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_user_errors(method):
    with pytest.raises(ConfigError, match="families"):
        graft(tiny_cnn(), method)
    model = graft(tiny_gpt2(), method)
    ids, _ = ids_and_mask()
    with pytest.raises(ConfigError, match="by keyword"):
        model(ids)
    from transformers import DynamicCache

    for name in ("past_key_values", "cache"):  # transformers 5.25 renamed the first to the second
        with pytest.raises(ConfigError, match="cannot continue a cache passed in"):
            model(input_ids=ids, **{name: DynamicCache()})
    with pytest.raises(ConfigError, match="cannot be merged"):
        model.merge("default")


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_generate_max_length_counts_the_callers_tokens(method):
    model = grafted("llama", method, num_virtual_tokens=4)
    ids, _ = ids_and_mask(batch=2)
    out = model.generate(input_ids=ids, max_length=9, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 9) and torch.equal(out[:, :6], ids)
