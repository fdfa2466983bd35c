"""Adapter artifacts: roundtrips for every registered method, base fingerprints, corrupt files, atomic writes."""

from __future__ import annotations

import json
import os
import pickle
import time

import pytest
import torch
from torch import nn

from graftune import AdapterModel, all_methods, graft
from graftune.core.method import Method, MethodConfig
from graftune.errors import ArtifactError, ConfigError
from graftune.io import artifact
from graftune.io.artifact import (
    FORMAT_VERSION,
    META_FILE,
    TENSORS_FILE,
    base_fingerprint,
    load_adapter,
    read_head_state,
    save_adapter,
)
from tests.conftest import TINY, first_tensor

FAMILIES = sorted(TINY)


def _applies(method, family: str) -> bool:
    if method.families:
        return family in method.families
    return family in method.presets or "*" in method.presets


CASES = [pytest.param(m.name, f, id=f"{m.name}-{f}") for m in all_methods() for f in FAMILIES if _applies(m, f)]


def _perturb(params, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _out(model, x) -> torch.Tensor:
    with torch.no_grad():
        return first_tensor(model(**x))


def _lora_bert():
    build, inputs = TINY["bert"]
    model = graft(build(), "lora", name="mine", r=4)
    _perturb(model.adapters["mine"].parameters())
    return model, inputs()


# --- roundtrips --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,family", CASES)
def test_save_load_roundtrip_gives_identical_outputs(method, family, tmp_path):
    build, inputs = TINY[family]
    x = inputs()
    model = graft(build(), method)
    _perturb(model.adapters["default"].parameters())
    expected = _out(model, x)
    save_adapter(model, "default", tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [META_FILE, TENSORS_FILE]

    other = AdapterModel(build())
    info = load_adapter(other, tmp_path / "a")
    assert info.name == "default" and info.method.name == method and other.active == ()
    assert info.config == model.info["default"].config and info.targets == model.info["default"].targets
    other.set_active("default")
    assert torch.equal(_out(other, x), expected)


def test_head_labels_extra_and_name_override(tmp_path):
    model, x = _lora_bert()
    head = nn.Linear(32, 3)
    save_adapter(model, "mine", tmp_path / "a", head=head, label_names=["neg", "neu", "pos"], extra={"seed": 7})
    meta = json.loads((tmp_path / "a" / META_FILE).read_text())
    assert meta["format"] == "graftune-adapter" and meta["format_version"] == FORMAT_VERSION
    assert meta["method"] == "lora" and meta["config"]["r"] == 4 and meta["family"] == "bert"
    assert meta["extra"] == {"seed": 7} and meta["sizes"]["head_params"] == 32 * 3 + 3
    assert meta["sizes"]["bytes"] == (tmp_path / "a" / TENSORS_FILE).stat().st_size

    state, info = read_head_state(tmp_path / "a")
    assert state.keys() == head.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in head.state_dict().items())
    assert info["class"] == "Linear" and info["in_features"] == 32 and info["out_features"] == 3
    assert info["label_names"] == ["neg", "neu", "pos"]

    other = AdapterModel(TINY["bert"][0]())
    load_adapter(other, tmp_path / "a", name="copy")  # head tensors are not adapter tensors
    other.set_active("copy")
    assert torch.equal(_out(other, x), _out(model, x))


def test_read_head_state_without_a_head(tmp_path):
    model, _ = _lora_bert()
    save_adapter(model, "mine", tmp_path / "a")
    with pytest.raises(ArtifactError, match="without a head"):
        read_head_state(tmp_path / "a")


def test_extra_must_be_json(tmp_path):
    model, _ = _lora_bert()
    with pytest.raises(ArtifactError, match="plain JSON"):
        save_adapter(model, "mine", tmp_path / "a", extra={"x": object()})
    assert not list(tmp_path.iterdir())


# --- the base fingerprint ----------------------------------------------------------------------------------------
def test_fingerprint_is_deterministic_and_dtype_independent():
    build = TINY["bert"][0]
    fp = base_fingerprint(build())
    assert fp == base_fingerprint(build())
    bf16 = base_fingerprint(build().to(torch.bfloat16))
    assert (bf16["structure"], bf16["values"]) == (fp["structure"], fp["values"])


class _Swap(Method):
    """A params-site method (not registered): owns a replacement for each target's weight."""

    name = "swap-test"
    config_cls = MethodConfig
    site = "params"

    def build(self, target, config, *, target_name):
        holder = nn.Module()
        holder.weight = nn.Parameter(target.weight.detach().clone() + 1.0)
        return holder


def test_fingerprint_ignores_hooks_merges_and_swapped_parameters():
    build = TINY["gpt2"][0]
    fp = base_fingerprint(build())
    model = graft(build(), "lora", r=4)
    _perturb(model.adapters["default"].parameters())
    assert base_fingerprint(model) == fp
    model.merge("default")
    assert base_fingerprint(model) == fp
    model.unmerge()
    model.add_adapter("swap", _Swap(), MethodConfig(targets=["c_attn", "wte"]))
    model.set_active("swap")
    assert model.base.transformer.wte.weight is model.adapters["swap"]["transformer:wte"].weight
    assert base_fingerprint(model) == fp
    assert base_fingerprint(model.base) != fp  # the bare module sees the swapped-in values


def test_fingerprint_of_a_merged_bitfit_on_a_bias_free_base():
    # Llama has no biases: BitFit adds them, so the originals kept aside on merge are "no parameter"
    build = TINY["llama"][0]
    fp = base_fingerprint(build())
    model = graft(build(), "bitfit")
    _perturb(model.adapters["default"].parameters())
    model.merge("default")
    assert base_fingerprint(model) == fp


def test_fingerprint_is_fast_on_a_22m_parameter_model():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    base = BertModel(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                intermediate_size=1536))
    assert 20e6 < sum(p.numel() for p in base.parameters()) < 25e6
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        base_fingerprint(base)
        timings.append(time.perf_counter() - start)
    assert min(timings) < 0.05, f"fingerprint took {min(timings) * 1000:.1f} ms"


# --- failures leave the model exactly as it was ------------------------------------------------------------------
def _snapshot(model: AdapterModel, x) -> tuple:
    return (sorted(model.info), model.active, sorted(model._sites), dict(model._originals),
            {k: v.clone() for k, v in model.adapters.state_dict().items()}, _out(model, x))


def _assert_unchanged(model, x, before) -> None:
    after = _snapshot(model, x)
    assert after[:4] == before[:4]
    assert after[4].keys() == before[4].keys() and all(torch.equal(after[4][k], before[4][k]) for k in after[4])
    assert torch.equal(after[5], before[5])


def _edit_meta(path, **changes):
    meta = json.loads((path / META_FILE).read_text())
    meta.update(changes)
    (path / META_FILE).write_text(json.dumps(meta))


def _other_weights():
    base = TINY["bert"][0]()
    with torch.no_grad():
        base.encoder.layer[1].output.dense.weight.add_(0.01)
    return base


def _corrupt(problem: str, path) -> None:
    tensors = path / TENSORS_FILE
    if problem == "truncated":
        data = tensors.read_bytes()
        tensors.write_bytes(data[: len(data) // 2])
    elif problem == "garbage":
        tensors.write_bytes(b"\x00" * 7)
    elif problem == "pickle":
        with open(tensors, "wb") as f:
            pickle.dump({"encoder.layer.0.attention.self.query.lora_A": torch.zeros(4, 32)}, f)
    elif problem == "torch_save":
        torch.save({"x": torch.zeros(2)}, tensors)
    elif problem == "missing_tensors":
        tensors.unlink()
    elif problem == "missing_json":
        (path / META_FILE).unlink()
    elif problem == "bad_json":
        (path / META_FILE).write_text('{"format": "graftune-adapter", ')
    elif problem == "newer_version":
        _edit_meta(path, format_version=FORMAT_VERSION + 1)
    elif problem == "not_graftune":
        _edit_meta(path, format="something-else")
    elif problem == "unknown_method":
        _edit_meta(path, method="no-such-method")
    elif problem == "bad_config":
        meta = json.loads((path / META_FILE).read_text())
        _edit_meta(path, config={**meta["config"], "r": 0})
    elif problem == "shapes":  # a config that no longer fits the tensors (fingerprint check off below)
        meta = json.loads((path / META_FILE).read_text())
        _edit_meta(path, config={**meta["config"], "r": 2})


@pytest.mark.parametrize("problem, match", [pytest.param(*case, id=case[0]) for case in [
    ("truncated", "adapter.safetensors: not a valid safetensors file .*truncated or corrupt"),
    ("garbage", "adapter.safetensors: not a valid safetensors file"),
    ("pickle", "adapter.safetensors: is a pickle"),
    ("torch_save", "adapter.safetensors: is a pickle"),
    ("missing_tensors", "adapter.safetensors: missing"),
    ("missing_json", "adapter.json: missing"),
    ("bad_json", "adapter.json: not valid JSON"),
    ("newer_version", f"format_version {FORMAT_VERSION + 1} is newer .* upgrade graftune"),
    ("not_graftune", "not a graftune adapter"),
    ("unknown_method", "uses method 'no-such-method'"),
    ("bad_config", "config does not fit"),
    ("shapes", "shape"),
]])
def test_bad_artifacts_raise_one_line_and_leave_the_model_unchanged(problem, match, tmp_path):
    model, _ = _lora_bert()
    save_adapter(model, "mine", tmp_path / "a")
    _corrupt(problem, tmp_path / "a")
    target, tx = _lora_bert()
    before = _snapshot(target, tx)
    with pytest.raises(ArtifactError, match=match) as err:
        load_adapter(target, tmp_path / "a", name="loaded", check_base=problem != "shapes")
    assert "\n" not in str(err.value)
    _assert_unchanged(target, tx, before)


@pytest.mark.parametrize("other", ["other_weights", "other_arch"])
def test_wrong_base_is_refused_and_the_model_unchanged(other, tmp_path):
    model, _ = _lora_bert()
    save_adapter(model, "mine", tmp_path / "a")
    if other == "other_weights":
        target, x = AdapterModel(_other_weights()), TINY["bert"][1]()
        why = "same architecture, other weights"
    else:
        target, x = AdapterModel(TINY["llama"][0]()), TINY["llama"][1]()
        why = "another architecture"
    before = _snapshot(target, x)
    with pytest.raises(ArtifactError, match=rf"adapter 'mine' .* was trained on base BertModel .*{why}.*load it onto "
                                            "the base it was made for"):
        load_adapter(target, tmp_path / "a")
    _assert_unchanged(target, x, before)


def test_check_base_false_loads_onto_other_weights(tmp_path):
    model, _ = _lora_bert()
    save_adapter(model, "mine", tmp_path / "a")
    target = AdapterModel(_other_weights())
    load_adapter(target, tmp_path / "a", check_base=False)
    assert "mine" in target.info


def test_name_clash_is_a_config_error_and_changes_nothing(tmp_path):
    model, x = _lora_bert()
    save_adapter(model, "mine", tmp_path / "a")
    before = _snapshot(model, x)
    with pytest.raises(ConfigError, match="already loaded"):
        load_adapter(model, tmp_path / "a")
    _assert_unchanged(model, x, before)


def test_missing_directory(tmp_path):
    model, _ = _lora_bert()
    with pytest.raises(ArtifactError, match="no such adapter directory"):
        load_adapter(model, tmp_path / "nope")


# --- atomic writes -----------------------------------------------------------------------------------------------
def _failing_save_file(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"half a file")
    raise OSError("disk full")


def test_a_failed_save_leaves_nothing_at_path(tmp_path, monkeypatch):
    model, _ = _lora_bert()
    monkeypatch.setattr(artifact, "save_file", _failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, "mine", tmp_path / "a")
    assert not list(tmp_path.iterdir()), "no artifact and no temporary folder may remain"


def test_a_failed_overwrite_keeps_the_previous_artifact(tmp_path, monkeypatch):
    model, x = _lora_bert()
    save_adapter(model, "mine", tmp_path / "a", extra={"version": 1})
    monkeypatch.setattr(artifact, "save_file", _failing_save_file)
    with pytest.raises(OSError):
        save_adapter(model, "mine", tmp_path / "a", extra={"version": 2})
    monkeypatch.undo()

    real_rename, calls = os.rename, []

    def rename_failing_second(src, dst):  # the old artifact moves aside, then the new one fails to move in
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_failing_second)
    with pytest.raises(OSError, match="rename failed"):
        save_adapter(model, "mine", tmp_path / "a", extra={"version": 3})
    monkeypatch.undo()

    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    assert json.loads((tmp_path / "a" / META_FILE).read_text())["extra"] == {"version": 1}
    other = AdapterModel(TINY["bert"][0]())
    load_adapter(other, tmp_path / "a")
    other.set_active("mine")
    assert torch.equal(_out(other, x), _out(model, x))


def test_overwrite_replaces_an_artifact_but_never_an_unrelated_folder(tmp_path):
    model, _ = _lora_bert()
    save_adapter(model, "mine", tmp_path / "a", extra={"version": 1})
    save_adapter(model, "mine", tmp_path / "a", extra={"version": 2})
    assert json.loads((tmp_path / "a" / META_FILE).read_text())["extra"] == {"version": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(ArtifactError, match="refusing to overwrite"):
        save_adapter(model, "mine", tmp_path / "home")
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"
