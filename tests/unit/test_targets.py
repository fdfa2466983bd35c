"""Target selection (core/targets.py): names and suffixes, regex, layer indices, module types, family presets
(BERT, Llama, GPT-2, ViT, CNN), top_k_layers, and the error that lists candidate module names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graftune import AdapterModel, all_methods, get_method, graft
from graftune.core import targets
from graftune.core.method import TargetSpec
from graftune.errors import TargetError
from tests.conftest import TINY, first_tensor, tiny_bert, tiny_cnn, tiny_gpt2, tiny_llama


def tiny_vit():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16,
                    patch_size=8, num_channels=3)
    return ViTModel(cfg, add_pooling_layer=False).eval()


def vit_inputs(batch: int = 3) -> dict:
    return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1))}


def _select(model, **spec) -> list[str]:
    top_k = spec.pop("top_k_layers", None)
    return list(targets.select(model, TargetSpec(**spec), top_k_layers=top_k))


BERT_Q = ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"]


# --- one criterion at a time -----------------------------------------------------------------------------------
def test_by_suffix_dotted_suffix_or_full_name():
    bert = tiny_bert()
    assert _select(bert, names=["query"]) == BERT_Q
    assert _select(bert, names="query") == BERT_Q  # a single string is one name
    assert _select(bert, names=["self.query"]) == BERT_Q
    assert _select(bert, names=["encoder.layer.1.attention.self.query"]) == BERT_Q[1:]
    # suffixes match whole name components: "uery" is not "query", "dense" does not match "output" blocks
    with pytest.raises(TargetError):
        _select(bert, names=["uery"])
    dense = _select(bert, names=["output.dense"])
    assert dense == [f"encoder.layer.{i}.{p}.dense" for i in (0, 1) for p in ("attention.output", "output")]


def test_by_regex_searches_the_full_name():
    bert = tiny_bert()
    assert _select(bert, regex=r"layer\.1\..*dense$") == [
        "encoder.layer.1.attention.output.dense", "encoder.layer.1.intermediate.dense", "encoder.layer.1.output.dense"]
    assert _select(bert, regex=r"(query|key)$") == [
        f"encoder.layer.{i}.attention.self.{n}" for i in (0, 1) for n in ("query", "key")]


def test_by_module_type():
    bert, gpt2 = tiny_bert(), tiny_gpt2()
    assert _select(bert, types=["Embedding"]) == [
        "embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings"]
    assert _select(gpt2, types="Conv1D") == [
        f"transformer.h.{i}.{n}" for i in (0, 1) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    # stem, block 0 (depthwise, project), blocks 1-2 (expand, depthwise, project), head
    assert len(_select(tiny_cnn(), types=["Conv2d"])) == 1 + 2 + 3 + 3 + 1


def test_by_layer_indices_ranges_and_negative_indices():
    llama = tiny_llama()
    q = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert _select(llama, names=["q_proj"], layers=[1]) == q[1:]
    assert _select(llama, names=["q_proj"], layers=1) == q[1:]
    assert _select(llama, names=["q_proj"], layers=[-1]) == q[1:]  # counted from the top
    assert _select(llama, names=["q_proj"], layers=[-2]) == q[:1]
    assert _select(llama, names=["q_proj"], layers=range(2)) == q  # a range is a list of indices
    # modules outside the numbered layers (embeddings, lm_head) never match a layer filter
    assert "lm_head" not in _select(llama, types=["Linear"], layers=[0, 1])
    assert targets.layer_index("model.layers.3.mlp.up_proj") == 3 and targets.layer_index("lm_head") is None
    assert targets.num_layers(llama) == 2


def test_criteria_combine_with_and():
    bert = tiny_bert()
    assert _select(bert, regex=r"attention", types=["Linear"], layers=[0], names=["key", "dense"]) == [
        "encoder.layer.0.attention.self.key", "encoder.layer.0.attention.output.dense"]


def test_top_k_layers():
    bert = tiny_bert()
    assert _select(bert, names=["query"], top_k_layers=1) == BERT_Q[1:]
    assert _select(bert, names=["query"], top_k_layers=2) == BERT_Q
    assert _select(bert, names=["query"], layers=[0, 1], top_k_layers=1) == BERT_Q[1:]  # intersected
    with pytest.raises(TargetError, match="top_k_layers=3, but this model has 2 numbered layers; use 1 to 2"):
        _select(bert, names=["query"], top_k_layers=3)
    assert _select(bert, names=["query"], layers=[-1], top_k_layers=1) == BERT_Q[1:]  # negative: from the top
    # an empty intersection is an error, not "every layer"
    with pytest.raises(TargetError, match=r"layers \[0\] are not among the top 1 layers \[1\]"):
        _select(bert, names=["query"], layers=[0], top_k_layers=1)
    model = graft(tiny_bert(), "lora", top_k_layers=1)
    assert model.info["default"].targets == ["encoder.layer.1.attention.self.query",
                                             "encoder.layer.1.attention.self.value"]


# --- errors -----------------------------------------------------------------------------------------------------
def test_no_match_lists_candidates_and_suggests_close_names():
    bert = tiny_bert()
    with pytest.raises(TargetError) as err:
        _select(bert, names=["querry"])
    message = str(err.value)
    assert "\n" not in message
    assert "no module matches targets" in message and "did you mean query?" in message
    assert "candidate module names:" in message
    for name in ("query", "key", "value", "dense", "word_embeddings", "LayerNorm"):
        assert name in message


def test_no_match_for_a_method_lists_only_modules_it_can_adapt():
    model = AdapterModel(tiny_bert())
    with pytest.raises(TargetError, match="candidate module names") as err:
        model.add_adapter("a", "lora", targets=["nothing_here"])
    assert "LayerNorm" not in str(err.value) and "query" in str(err.value)
    with pytest.raises(TargetError, match="only modules of type LayerNorm, which this method cannot adapt"):
        model.add_adapter("a", "lora", targets=["LayerNorm"])
    assert not model.info


def test_a_family_without_a_preset_asks_for_targets():
    model = AdapterModel(tiny_cnn())
    assert model.family == "cnn"
    with pytest.raises(TargetError, match="no default targets for model family 'cnn'") as err:
        model.add_adapter("a", "ia3")
    # the fix names the --set form (there is no --targets flag) with a layer this model has, and the methods
    # that do have CNN presets; it did suggest '--targets query,value', which a CNN has neither of
    msg = str(err.value)
    assert "--targets" not in msg and "query" not in msg
    assert "--method lora (or bitfit, bottleneck)" in msg and "--set 'targets=[_fc]'" in msg
    model.add_adapter("a", "ia3", targets=["_fc"])  # what the message suggests attaches
    assert model.info["a"].targets == ["_fc"]


# --- presets ----------------------------------------------------------------------------------------------------
LORA_PRESETS = {
    "bert": [f"encoder.layer.{i}.attention.self.{n}" for i in (0, 1) for n in ("query", "value")],
    "llama": [f"model.layers.{i}.self_attn.{n}" for i in (0, 1) for n in ("q_proj", "v_proj")],
    "gpt2": ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"],
    "cnn": ["_blocks.0._project_conv", *(f"_blocks.{i}.{n}" for i in (1, 2) for n in ("_expand_conv", "_project_conv"))],
    "vit": [f"layers.{i}.attention.{n}" for i in (0, 1) for n in ("q_proj", "v_proj")],
}
BUILD = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2, "cnn": tiny_cnn, "vit": tiny_vit}


@pytest.mark.parametrize("family", sorted(LORA_PRESETS))
def test_family_detection_and_lora_presets(family):
    base = BUILD[family]()
    assert targets.family_of(base) == family
    assert graft(base, "lora").info["default"].targets == LORA_PRESETS[family]


def test_presets_of_other_methods():
    expect = {
        ("ia3", "bert"): [f"encoder.layer.{i}.{n}" for i in (0, 1)
                          for n in ("attention.self.key", "attention.self.value", "output.dense")],
        ("ia3", "llama"): [f"model.layers.{i}.{n}" for i in (0, 1)
                           for n in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")],
        ("ia3", "vit"): [f"layers.{i}.{n}" for i in (0, 1) for n in ("attention.k_proj", "attention.v_proj", "mlp.fc2")],
        ("bottleneck", "gpt2"): ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"],
        ("bottleneck", "cnn"): ["_blocks.0", "_blocks.1", "_blocks.2"],
        ("bottleneck", "vit"): ["layers.0.mlp.fc2", "layers.1.mlp.fc2"],
    }
    for (method, family), names in expect.items():
        assert graft(BUILD[family](), method).info["default"].targets == names, (method, family)
    houlsby = graft(tiny_vit(), "bottleneck", placement="houlsby").info["default"].targets
    assert houlsby == [f"layers.{i}.{n}" for i in (0, 1) for n in ("attention.o_proj", "mlp.fc2")]


def test_generic_models_fall_back_to_every_linear():
    base = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model = graft(base, "lora", r=2)
    assert model.family == "generic" and model.info["default"].targets == ["0", "2"]


VIT_METHODS = [m.name for m in all_methods() if (m.families and "vit" in m.families)
               or (not m.families and ("vit" in m.presets or "*" in m.presets))]


@pytest.mark.parametrize("method", VIT_METHODS)
def test_every_vit_preset_grafts_onto_a_tiny_vit(method):
    """ViTs use the presets of every method that claims them (transformers 5.x names: q_proj, o_proj, mlp.fc2)."""
    base = tiny_vit()
    x = vit_inputs()
    ref = first_tensor(base(**x))
    model = graft(base, method)
    assert model.family == "vit"
    if get_method(method).capabilities.identity_at_init:
        torch.testing.assert_close(first_tensor(model(**x)), ref, rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.adapters["default"].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    assert not torch.allclose(first_tensor(model(**x)), ref)
    with model.disabled():
        assert torch.equal(first_tensor(model(**x)), ref)


def test_vit_is_covered_by_the_main_methods():
    assert {"lora", "ia3", "bottleneck", "bitfit"} <= set(VIT_METHODS)


def test_tiny_models_in_conftest_are_all_covered_by_lora_presets():
    assert set(TINY) <= set(LORA_PRESETS)
