"""Int8 inference (speed/quantize.py): what gets quantized, how close it stays to the float32 merged model, what
is refused (and left untouched), and that a run directory is never written. Tiny random models; seconds.

Tolerance: the int8 layers round each weight to 1/127 of its output channel's largest weight, and each batch's
activations to 1/255 of their range. On these tiny models that moves the outputs by about 0.1-0.5 % of their
largest value (measured: logits differ by at most 0.004 with logits up to 1.9), so 0.02 absolute + 2 % relative
is 5x the measured error while still far below the difference between classes. Outputs must also differ from the
float32 ones at all: identical outputs would mean nothing was quantized.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings

import pytest
import torch
import yaml
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

from graftune import AdapterModel
from graftune.config import RunConfig
from graftune.errors import ConfigError
from graftune.evaluate import evaluate_run, generate, load_run, predict
from graftune.run.scoring import logits_of
from graftune.runs import train
from graftune.speed.quantize import check_choice, is_quantized, quantize_int8
from tests.conftest import text_inputs, tiny_bert, tiny_llama
from tests.train_helpers import bert_folder, llama_folder, pairs_jsonl, topic_csv, topic_rows, train_args

TOL = {"atol": 0.02, "rtol": 0.02}
TEXTS = [r["text"] for r in topic_rows(10, seed=5)]


def _randomize(model: AdapterModel, name: str) -> None:
    """Adapters start as the identity; give them values so that merging changes the weights."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.adapters[name].parameters():
            p.add_(torch.randn_like(p) * 0.1)


def _adapted(base: nn.Module, method: str, **options) -> AdapterModel:
    model = AdapterModel(base)
    model.add_adapter("a", method, **options)
    _randomize(model, "a")
    model.set_active("a")
    return model


def _linears(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in module.modules())


# --- on a model in memory -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "ia3", "bitfit"])
def test_merged_adapters_become_int8_and_stay_close(method):
    model = _adapted(tiny_bert(), method)
    with torch.inference_mode():
        adapted = model(**text_inputs()).last_hidden_state
    model.merge("a")
    n = _linears(model.base)
    assert quantize_int8(model) is model
    assert _linears(model.base) == 0 and sum(isinstance(m, Int8Linear) for m in model.base.modules()) == n
    assert is_quantized(model) and not model.info  # the adapter is folded in for good, its hooks gone
    with torch.inference_mode():
        out = model(**text_inputs()).last_hidden_state
    torch.testing.assert_close(out, adapted, **TOL)
    assert not torch.equal(out, adapted)


def test_new_biases_of_merged_bitfit_on_llama_survive():
    """Llama's projections have no bias; merged BitFit adds one, and the int8 layer must carry it."""
    model = _adapted(tiny_llama(), "bitfit")
    with torch.inference_mode():
        adapted = model(**text_inputs()).logits
    model.merge("a")
    quantize_int8(model)
    q_proj = model.base.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Int8Linear) and q_proj.bias() is not None
    with torch.inference_mode():
        torch.testing.assert_close(model(**text_inputs()).logits, adapted, **TOL)


def test_a_plain_module_is_quantized_in_place():
    base = tiny_bert()
    with torch.inference_mode():
        ref = base(**text_inputs()).last_hidden_state
    quantize_int8(base)
    assert _linears(base) == 0 and is_quantized(base)
    with torch.inference_mode():
        torch.testing.assert_close(base(**text_inputs()).last_hidden_state, ref, **TOL)


@pytest.mark.parametrize("method", ["lora", "bottleneck", "prefix", "topk"])
def test_unmerged_adapters_are_refused_and_the_model_left_alone(method):
    model = _adapted(tiny_bert(), method, **({"top_k_layers": 1} if method == "topk" else {}))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        before = model(**text_inputs()).last_hidden_state
    hint = "call model.merge" if method == "lora" else f"{method} adapters .* cannot be merged"
    with pytest.raises(ConfigError, match=hint) as err:
        quantize_int8(model)
    assert "\n" not in str(err.value)
    assert not is_quantized(model) and set(model.info) == {"a"} and model.active == ("a",)
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    with torch.inference_mode():
        assert torch.equal(model(**text_inputs()).last_hidden_state, before)


def test_an_inactive_unmerged_adapter_is_refused_too():
    """Its hooks would be lost with the layers it sits on, so it could never be used again."""
    model = _adapted(tiny_bert(), "lora")
    model.add_adapter("b", "lora")
    model.merge("a")
    with pytest.raises(ConfigError, match="b not merged"):
        quantize_int8(model)
    assert not is_quantized(model)


def test_bf16_weights_and_models_without_linear_layers_are_refused():
    base = tiny_bert().to(torch.bfloat16)
    with pytest.raises(ConfigError, match="float32 weights, got bfloat16"):
        quantize_int8(base)
    with pytest.raises(ConfigError, match="no nn.Linear"):
        quantize_int8(nn.Sequential(nn.Conv1d(3, 4, 1)))


def test_bad_choice_is_one_line():
    assert check_choice(None) == "none" and check_choice("int8") == "int8"
    with pytest.raises(ConfigError, match="quantize: got 'int4'; use one of none, int8"):
        check_choice("int4")


def test_torch_deprecation_warnings_stay_inside():
    """torch 2.13 deprecates torch.ao.quantization; quantize_int8 silences that (and only around its own call)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_int8(tiny_bert())


def test_int8_layers_reject_bf16_autocast():
    """Why an int8 run has no autocast: torch's dynamic int8 Linear takes float32 input only. If torch lifts
    this, int8 + bf16 attention could be measured (and ``load_run``'s fp32 policy reconsidered)."""
    base = quantize_int8(tiny_bert())
    with pytest.raises(RuntimeError, match="Float"), torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        base(**text_inputs())


# --- on a run directory ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    bert, data = bert_folder(root / "bert"), topic_csv(root / "topics.csv")
    out = {}
    for method in ("lora", "ia3", "bottleneck"):
        out[method] = root / method
        train(RunConfig(**train_args(bert, data, out[method], method=method, epochs=2, val_size=0)), progress=False)
    out["data"] = data
    return out


def _digest(run_dir) -> dict:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_a_run_predicts_in_int8_like_in_fp32_and_is_not_written(runs, method):
    before = _digest(runs[method])
    ref, q = load_run(runs[method]), load_run(runs[method], quantize="int8")
    assert ref.quantize == "none" and not is_quantized(ref.model)
    assert q.quantize == "int8" and is_quantized(q.model) and _linears(q.model.base) == 0
    assert _linears(q.head) > 0  # the task head stays float32
    a, b = (logits_of(r.task, r.model, r.head, TEXTS) for r in (ref, q))
    torch.testing.assert_close(b, a, **TOL)
    assert not torch.equal(a, b)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9  # near-ties may flip; measured: all agree
    assert [r["label"] for r in predict(q, TEXTS)] == [q.label_names[i] for i in b.argmax(-1)]
    metrics = evaluate_run(runs[method], quantize="int8")
    assert metrics["quantize"] == "int8" and "quantize" not in evaluate_run(runs[method])
    assert _digest(runs[method]) == before


def test_a_bf16_run_is_quantized_from_float32_without_autocast(runs, tmp_path):
    run_dir = tmp_path / "bf16"
    shutil.copytree(runs["lora"], run_dir)
    cfg = yaml.safe_load((run_dir / "run.yaml").read_text())
    cfg["precision"] = "bf16"
    (run_dir / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert load_run(run_dir).policy.autocast_dtype == torch.bfloat16
    q = load_run(run_dir, quantize="int8")
    assert q.policy.name == "fp32" and q.policy.autocast_dtype is None and is_quantized(q.model)
    assert predict(q, TEXTS[:2])[0]["label"] in q.label_names


def test_runs_that_cannot_merge_are_refused(runs):
    before = _digest(runs["bottleneck"])
    with pytest.raises(ConfigError, match="bottleneck adapters .* cannot be merged; use bf16/fp32 inference"):
        load_run(runs["bottleneck"], quantize="int8")
    with pytest.raises(ConfigError, match="quantize: got 'int4'"):
        load_run(runs["bottleneck"], quantize="int4")
    with pytest.raises(ConfigError, match="needs the adapters merged"):
        load_run(runs["lora"], quantize="int8", merge=False)
    assert _digest(runs["bottleneck"]) == before


def test_a_causal_lm_run_generates_in_int8(tmp_path):
    out = tmp_path / "lm"
    train(RunConfig(**train_args(llama_folder(tmp_path / "llama"), pairs_jsonl(tmp_path / "pairs.jsonl"), out,
                                 epochs=1, max_new_tokens=3, val_size=0)), progress=False)
    q = load_run(out, quantize="int8")
    assert is_quantized(q.model) and _linears(q.model.base) == 0  # lm_head included
    answers = generate(q, ["goal team", "bank market"])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
