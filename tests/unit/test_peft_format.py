"""PEFT interoperability, checked against the real ``peft`` package on tiny random models.

Both directions: an adapter exported by graftune and loaded by ``PeftModel.from_pretrained`` computes what
graftune computes, and a LoRA made and saved by ``peft`` computes the same once imported into graftune.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from graftune import AdapterModel, graft
from graftune.errors import ArtifactError
from graftune.io.artifact import save_adapter
from graftune.io.peft_format import CONFIG_FILE, WEIGHTS_FILE, export_peft, export_run, import_peft
from tests.conftest import TINY, first_tensor

peft = pytest.importorskip("peft")

TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
VARIANTS = {"plain": {}, "rslora": {"rslora": True}, "dora": {"dora": True}}
PEFT_VARIANTS = {"plain": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


class TinyConvNet(nn.Module):
    """A custom (non-transformers) model with Conv2d targets."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.conv2(torch.relu(self.conv1(x))).mean((2, 3)))


def _randomize(params, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _peft_lora_params(peft_model):
    return [p for n, p in peft_model.named_parameters() if "lora_" in n]


def _ours(model, x) -> torch.Tensor:
    with torch.no_grad():
        return first_tensor(model(**x))


# --- graftune -> peft ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("family", sorted(TARGETS))
def test_exported_adapter_loads_in_peft_with_same_outputs(family, variant, tmp_path):
    build, inputs = TINY[family]
    x = inputs()
    model = graft(build(), "lora", r=4, alpha=8, **VARIANTS[variant])
    _randomize(model.adapters["default"].parameters())
    expected = _ours(model, x)
    with model.disabled():
        assert not torch.allclose(_ours(model, x), expected, atol=1e-3), "the adapter must change the output"
    out = export_peft(model, "default", tmp_path / "peft", base_model_name_or_path="tiny")
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["fan_in_fan_out"] is (family == "gpt2")
    assert config["base_model_name_or_path"] == "tiny"
    peft_model = peft.PeftModel.from_pretrained(build(), out).eval()
    with torch.no_grad():
        got = first_tensor(peft_model(**x))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_exported_embedding_and_conv2d_adapters_load_in_peft(tmp_path):
    build, inputs = TINY["bert"]
    x = inputs()
    model = graft(build(), "lora", r=4, alpha=8, targets=["word_embeddings", "query"])
    _randomize(model.adapters["default"].parameters())
    out = export_peft(model, "default", tmp_path / "emb")
    peft_model = peft.PeftModel.from_pretrained(build(), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(first_tensor(peft_model(**x)), _ours(model, x), rtol=0, atol=1e-5)

    img = {"x": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))}
    model = graft(TinyConvNet().eval(), "lora", r=2, alpha=4, targets=["conv1", "conv2"])
    _randomize(model.adapters["default"].parameters())
    out = export_peft(model, "default", tmp_path / "conv")
    peft_model = peft.PeftModel.from_pretrained(TinyConvNet().eval(), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**img), model(**img), rtol=0, atol=1e-5)


# --- peft -> graftune ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(PEFT_VARIANTS))
@pytest.mark.parametrize("family", sorted(TARGETS))
def test_peft_lora_imports_with_same_outputs(family, variant, tmp_path):
    build, inputs = TINY[family]
    x = inputs()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family], fan_in_fan_out=family == "gpt2",
                             **PEFT_VARIANTS[variant])
    peft_model = peft.get_peft_model(build(), config).eval()
    _randomize(_peft_lora_params(peft_model), seed=3)
    with torch.no_grad():
        expected = first_tensor(peft_model(**x))
        with peft_model.disable_adapter():
            assert not torch.allclose(first_tensor(peft_model(**x)), expected, atol=1e-3)
    peft_model.save_pretrained(tmp_path / "peft")

    model = AdapterModel(build())
    info = import_peft(model, tmp_path / "peft", name="imported")
    model.set_active("imported")
    assert info.config.r == 4 and info.config.rslora == (variant == "rslora") and info.config.dora == (variant == "dora")
    torch.testing.assert_close(_ours(model, x), expected, rtol=0, atol=1e-5)


def test_peft_embedding_and_conv2d_import(tmp_path):
    build, inputs = TINY["bert"]
    x = inputs()
    peft_model = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["word_embeddings"]))
    _randomize(_peft_lora_params(peft_model), seed=4)
    peft_model.eval()
    with torch.no_grad():
        expected = first_tensor(peft_model(**x))
    peft_model.save_pretrained(tmp_path / "emb")
    model = AdapterModel(build())
    import_peft(model, tmp_path / "emb")
    model.set_active("default")
    torch.testing.assert_close(_ours(model, x), expected, rtol=0, atol=1e-5)

    img = {"x": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))}
    peft_model = peft.get_peft_model(TinyConvNet(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "conv2"]))
    _randomize(_peft_lora_params(peft_model), seed=5)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**img)
    peft_model.save_pretrained(tmp_path / "conv")
    model = AdapterModel(TinyConvNet().eval())
    import_peft(model, tmp_path / "conv")
    model.set_active("default")
    with torch.no_grad():
        torch.testing.assert_close(model(**img), expected, rtol=0, atol=1e-5)


def test_export_then_import_roundtrips_tensors_and_config(tmp_path):
    build, _ = TINY["gpt2"]
    model = graft(build(), "lora", r=4, alpha=6, rslora=True, dora=True, dropout=0.1)
    _randomize(model.adapters["default"].parameters())
    export_peft(model, "default", tmp_path / "peft")
    other = AdapterModel(build())
    info = import_peft(other, tmp_path / "peft")
    assert info.targets == model.info["default"].targets
    assert (info.config.r, info.config.alpha, info.config.dropout, info.config.rslora, info.config.dora) == (
        4, 6.0, 0.1, True, True)
    a, b = model.adapter_state_dict("default"), other.adapter_state_dict("default")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- export_run (the CLI's `graftune export RUN_DIR --format peft --out DIR`) ----------------------------------
def test_export_run_from_the_artifact_alone(tmp_path):
    build, inputs = TINY["llama"]
    x = inputs()
    model = graft(build(), "lora", r=4, alpha=8)
    _randomize(model.adapters["default"].parameters())
    expected = _ours(model, x)
    run = tmp_path / "run"
    save_adapter(model, "default", run / "adapter", head=nn.Linear(32, 3))
    (run / "run.yaml").write_text("model: smollm2\nmethod: lora\n")
    out = export_run(run, tmp_path / "peft")
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and config["task_type"] == "CAUSAL_LM"
    peft_model = peft.PeftModel.from_pretrained(build(), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(first_tensor(peft_model(**x)), expected, rtol=0, atol=1e-5)


def test_export_run_refuses_non_lora(tmp_path):
    model = graft(TINY["bert"][0](), "lora")
    save_adapter(model, "default", tmp_path / "run" / "adapter")
    meta_file = tmp_path / "run" / "adapter" / "adapter.json"
    meta = json.loads(meta_file.read_text())
    meta["method"] = "bottleneck"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"only LoRA adapters export to PEFT format \(this one is bottleneck\)"):
        export_run(tmp_path / "run", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_export_peft_refuses_non_lora(tmp_path):
    import dataclasses

    from graftune.core.method import Method

    class Other(Method):  # deliberately not registered
        name = "other"

    model = graft(TINY["bert"][0](), "lora")
    model.info["default"] = dataclasses.replace(model.info["default"], method=Other())
    with pytest.raises(ArtifactError, match=r"\(this one is other\)"):
        export_peft(model, "default", tmp_path / "peft")


def test_export_never_overwrites_an_unrelated_folder(tmp_path):
    model = graft(TINY["bert"][0](), "lora")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="refusing to overwrite"):
        export_peft(model, "default", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    export_peft(model, "default", tmp_path / "peft")
    export_peft(model, "default", tmp_path / "peft")  # an earlier export is replaced
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


def test_export_under_a_file_is_one_line(tmp_path):
    """QA: an output folder under a file was a FileExistsError traceback, after the conversion."""
    model = graft(TINY["bert"][0](), "lora")
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match=r"notes.txt/peft: cannot create the PEFT adapter folder there \(Not a "
                                            r"directory\); choose another path"):
        export_peft(model, "default", tmp_path / "notes.txt" / "peft")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# --- import errors leave the model as it was ---------------------------------------------------------------
def _snapshot(model: AdapterModel, x) -> tuple:
    return sorted(model.info), model.active, sorted(model._sites), _ours(model, x)


def _assert_unchanged(model, x, before) -> None:
    after = _snapshot(model, x)
    assert after[:3] == before[:3]
    assert torch.equal(after[3], before[3])


def _peft_dir(tmp_path, **config_kw):
    peft_model = peft.get_peft_model(TINY["bert"][0](), peft.LoraConfig(r=4, lora_alpha=8,
                                                                        target_modules=["query"], **config_kw))
    peft_model.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft"


def _edit_config(path, **changes):
    cfg = json.loads((path / CONFIG_FILE).read_text())
    cfg.update(changes)
    (path / CONFIG_FILE).write_text(json.dumps(cfg))


@pytest.mark.parametrize("problem, match", [
    ("ia3", "only PEFT LoRA adapters"),
    ("rank_pattern", "rank_pattern"),
    ("bias", "bias='all'"),
    ("pissa", "rewrites the base weights"),
    ("missing_config", "no adapter_config.json"),
    ("bad_json", "not valid JSON"),
    ("bin_only", "never unpickles"),
    ("truncated", "truncated or corrupt"),
    ("other_base", "which this base does not have"),
    ("rank_mismatch", "rank 4, the config says r=2"),
])
def test_import_errors_leave_the_model_unchanged(problem, match, tmp_path):
    path = _peft_dir(tmp_path)
    family = "llama" if problem == "other_base" else "bert"
    build, inputs = TINY[family]
    x = inputs()
    model = graft(build(), "lora", name="mine")
    _randomize(model.adapters["mine"].parameters())
    before = _snapshot(model, x)
    if problem == "ia3":
        _edit_config(path, peft_type="IA3")
    elif problem == "rank_pattern":
        _edit_config(path, rank_pattern={"query": 8})
    elif problem == "bias":
        _edit_config(path, bias="all")
    elif problem == "pissa":
        _edit_config(path, init_lora_weights="pissa_niter_4")
    elif problem == "missing_config":
        (path / CONFIG_FILE).unlink()
    elif problem == "bad_json":
        (path / CONFIG_FILE).write_text("{not json")
    elif problem == "bin_only":
        (path / WEIGHTS_FILE).rename(path / "adapter_model.bin")
    elif problem == "truncated":
        data = (path / WEIGHTS_FILE).read_bytes()
        (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    elif problem == "rank_mismatch":
        _edit_config(path, r=2)
    with pytest.raises(ArtifactError, match=match):
        import_peft(model, path)
    _assert_unchanged(model, x, before)


def test_import_peft_dora_on_embedding_is_refused_cleanly(tmp_path):
    path = _peft_dir(tmp_path)
    peft_model = peft.get_peft_model(TINY["bert"][0](), peft.LoraConfig(r=4, target_modules=["word_embeddings"],
                                                                        use_dora=True))
    peft_model.save_pretrained(path)
    model = AdapterModel(TINY["bert"][0]())
    with pytest.raises(ArtifactError, match="DoRA"):
        import_peft(model, path)
    assert not model.info and not model._sites
