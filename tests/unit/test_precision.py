"""The CPU bf16 training policy (speed/precision.py): a bf16 frozen base under autocast, float32 adapters, head and
optimizer state, and attention that will be differentiated computed as batched matmuls. Tiny random models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graftune import AdapterModel
from graftune.speed import precision
from graftune.tasks.classification import pool
from tests.conftest import text_inputs, tiny_bert

BF16_GRAD_RTOL = 0.05  # |g_bf16 - g_fp32| / |g_fp32| over all adapter (or head) gradients; measured ~0.01


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)


# --- the choice -------------------------------------------------------------------------------------------------
def test_cpu_with_native_bf16_trains_on_a_bf16_base_with_matmul_attention(native_bf16):
    train = precision.choose("auto")
    assert (train.name, train.frozen_dtype, train.autocast_dtype) == ("bf16", torch.bfloat16, torch.bfloat16)
    assert train.matmul_attention
    infer = precision.choose("auto", inference=True)
    assert infer.frozen_dtype == torch.bfloat16 and not infer.matmul_attention  # the fused kernel's forward is faster


def test_cpu_without_native_bf16_picks_fp32(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    for inference in (False, True):
        p = precision.choose("auto", inference=inference)
        assert (p.name, p.frozen_dtype, p.autocast_dtype, p.matmul_attention) == ("fp32", None, None, False)
    assert precision.choose("bf16").name == "bf16"  # asked for explicitly, it is still honoured


EPYC = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\n"
SAPPHIRE = "model name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


@pytest.mark.parametrize("text, flags, native", [
    (EPYC, ["avx2"], False),
    (SAPPHIRE, ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"], True),
    ("flags: avx2 avx512f\n", ["avx2", "avx512f"], False),  # avx512 without bf16 is still emulated bf16
], ids=["avx2-only", "amx", "avx512-no-bf16"])
def test_cpu_features_from_cpuinfo_decide_bf16(text, flags, native, monkeypatch):
    info = precision.read_cpuinfo(text)
    assert info["flags"] == flags and info["native_bf16"] is native
    monkeypatch.setattr(precision, "cpu_features", lambda: info)
    assert precision.choose("auto").name == ("bf16" if native else "fp32")


def test_this_machines_cpu_is_recorded_and_respected():
    info = precision.cpu_features()
    assert set(info) == {"model", "flags", "native_bf16"}
    assert precision.choose("auto").name == ("bf16" if info["native_bf16"] else "fp32")


@pytest.mark.parametrize(("bf16_ok", "name", "dtype"), [(True, "bf16", torch.bfloat16), (False, "fp16", torch.float16)])
def test_cuda_policy_is_unchanged(monkeypatch, bf16_ok, name, dtype):
    """CUDA: autocast over the float32 base, fused attention, as before."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    assert precision.choose("auto", "cuda") == precision.Precision(name, None, dtype, "cuda")
    assert precision.choose("fp32", "cuda") == precision.Precision("fp32", None, None, "cuda")


# --- one training step --------------------------------------------------------------------------------------------
def _stack(policy: precision.Precision):
    """Tiny BERT + LoRA (q, v; B non-zero so A gets gradients) + head, set up as train() does."""
    model = AdapterModel(tiny_bert())
    model.add_adapter("a", "lora", r=4, alpha=8, targets={"names": ["query", "value"]})
    model.set_active("a")
    model.set_trainable("a")
    g = torch.Generator().manual_seed(3)
    for name, p in model.adapters.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    torch.manual_seed(4)
    head = nn.Linear(32, 3)
    original = {n: p.detach().clone() for n, p in model.base.named_parameters()}
    precision.apply(model.base, policy)
    return model, head, original


def _step(model, head, policy):
    batch = text_inputs(batch=4, length=9)
    labels = torch.tensor([0, 1, 2, 1])
    with policy.autocast():
        h = model(**batch).last_hidden_state
        logits = head(pool(h, batch["attention_mask"], "mean")).float()
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.adapters.named_parameters()}
    grads |= {f"head.{n}": p.grad.clone() for n, p in head.named_parameters()}
    return loss, grads


def _rel(grads, ref, keys):
    diff = sum((grads[k].double() - ref[k].double()).pow(2).sum() for k in keys) ** 0.5
    return float(diff / sum(ref[k].double().pow(2).sum() for k in keys) ** 0.5)


def test_bf16_training_step_keeps_float32_masters_and_matches_fp32(native_bf16, monkeypatch):
    calls = []
    real = precision.matmul_attention
    monkeypatch.setattr(precision, "matmul_attention", lambda *a, **k: calls.append(1) or real(*a, **k))

    fp32 = precision.choose("fp32")
    model32, head32, _ = _stack(fp32)
    loss32, ref = _step(model32, head32, fp32)
    assert not calls  # the fp32 policy leaves attention alone

    policy = precision.choose("auto")
    model, head, original = _stack(policy)
    # the frozen base: bf16, not trainable, and holding exactly the bf16-rounded original weights
    for name, p in model.base.named_parameters():
        assert not p.requires_grad and p.dtype == torch.bfloat16, name
        assert torch.equal(p, original[name].to(torch.bfloat16)), name
    loss, grads = _step(model, head, policy)
    assert len(calls) == 2  # both layers' attention ran as batched matmuls

    trained = [*model.adapters.parameters(), *head.parameters()]
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in trained)
    assert abs(loss.item() - loss32.item()) < 0.02 * loss32.item()
    for part in ("lora_A", "lora_B", "head."):
        keys = [k for k in ref if part in k]
        assert _rel(grads, ref, keys) < BF16_GRAD_RTOL, part

    opt = torch.optim.AdamW(trained, lr=1e-2)
    opt.step()
    assert all(s.dtype == torch.float32 for st in opt.state.values() for s in st.values() if s.is_floating_point())
    assert all(p.dtype == torch.float32 for p in trained)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.base.parameters())


def test_lora_under_cpu_autocast_skips_the_float32_round_trip():
    """Same numbers as casting x to float32 first (autocast runs the products in bf16 either way), and the bf16
    activation is not copied to float32."""
    model = AdapterModel(nn.Sequential(nn.Linear(16, 16)))
    model.add_adapter("a", "lora", r=4, targets={"names": ["0"]})
    lora = next(m for m in model.adapters.modules() if hasattr(m, "lora_A"))
    nn.init.normal_(lora.lora_B)
    x = torch.randn(5, 16).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        direct = lora.update(x)
        via_fp32 = lora.update(x.float())
    assert direct.dtype == torch.bfloat16 and torch.equal(direct, via_fp32)
    assert lora.update(x).dtype == torch.float32  # without autocast: the adapter's own dtype, as before


# --- batched-matmul attention -------------------------------------------------------------------------------------
def _qkv(heads=4, kv_heads=4, n=6, s=6, grad=True):
    g = torch.Generator().manual_seed(0)
    shapes = [(2, heads, n, 8), (2, kv_heads, s, 8), (2, kv_heads, s, 8)]
    return [torch.randn(sh, generator=g, dtype=torch.float64).requires_grad_(grad) for sh in shapes]


def _bool_mask(s=6):
    m = torch.ones(2, 1, 1, s, dtype=torch.bool)
    m[1, ..., -2:] = False  # a padded row
    return m


@pytest.mark.parametrize("case", ["plain", "bool-mask", "float-mask", "causal", "gqa", "scale"])
def test_matmul_attention_equals_sdpa_with_gradients(case):
    kw, qkv = {}, _qkv(kv_heads=2 if case == "gqa" else 4)
    if case == "bool-mask":
        kw["attn_mask"] = _bool_mask()
    elif case == "float-mask":
        kw["attn_mask"] = torch.zeros(2, 1, 1, 6, dtype=torch.float64).masked_fill(~_bool_mask(), -1e9)
    elif case == "causal":
        kw["is_causal"] = True
    elif case == "gqa":
        kw["enable_gqa"] = True
    elif case == "scale":
        kw["scale"] = 0.3
    ours = precision.matmul_attention(*qkv, **kw)
    g_ours = torch.autograd.grad(ours.square().sum(), qkv)
    ref = F.scaled_dot_product_attention(*qkv, **kw)
    g_ref = torch.autograd.grad(ref.square().sum(), qkv)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_matmul_attention_fully_masked_row_stays_finite():
    q, k, v = _qkv()
    mask = torch.zeros(2, 1, 6, 6, dtype=torch.float64)
    mask[0, 0, 2] = float("-inf")  # query 2 of row 0 sees no key
    out = precision.matmul_attention(q, k, v, attn_mask=mask)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()


def test_matmul_attention_only_where_a_backward_will_run(monkeypatch):
    calls = []
    monkeypatch.setattr(precision, "matmul_attention", lambda *a, **k: calls.append(1) or torch.zeros(()))
    policy = precision.Precision("bf16", torch.bfloat16, torch.bfloat16, "cpu", matmul_attention=True)
    with policy.autocast():
        F.scaled_dot_product_attention(*_qkv())
        assert len(calls) == 1
        F.scaled_dot_product_attention(*_qkv(grad=False))  # nothing to differentiate
        with torch.no_grad():
            F.scaled_dot_product_attention(*_qkv())
        long = precision.MATMUL_ATTENTION_MAX_KEYS + 1  # long sequences keep the fused kernel
        F.scaled_dot_product_attention(*_qkv(n=long, s=long))
    F.scaled_dot_product_attention(*_qkv())  # outside the policy's context
    assert len(calls) == 1


def test_compiled_layers_under_the_bf16_policy(native_bf16, monkeypatch):
    """train()'s compile option with the bf16 policy: dynamo traces the attention mode with no graph break and gives
    eager's loss and gradients; eager backend, as tests/unit/test_train_speed.py. (Which attention the compiled
    layers run is a speed matter, measured by bench/issue5_compile.py.)"""
    from graftune.speed.compilation import compile_layers

    monkeypatch.setenv("GRAFTUNE_COMPILE_BACKEND", "eager")
    policy = precision.choose("auto")
    model, head, _ = _stack(policy)
    eager_loss, eager = _step(model, head, policy)
    model.zero_grad()
    head.zero_grad()

    def check():
        _step(model, head, policy)

    from torch._dynamo.utils import counters

    counters.clear()
    compiled, note = compile_layers(model.base, start=0, check=check)
    if not compiled:
        pytest.skip(f"torch.compile is unavailable here: {note}")
    assert not counters["graph_break"], dict(counters["graph_break"])
    model.zero_grad()
    head.zero_grad()
    loss, grads = _step(model, head, policy)
    assert abs(loss.item() - eager_loss.item()) < 0.02 * eager_loss.item()
    assert _rel(grads, eager, list(eager)) < BF16_GRAD_RTOL


@pytest.mark.parametrize("kind", ["causal-lm", "image"])
def test_train_runs_end_to_end_under_the_bf16_policy(kind, tmp_path, monkeypatch):
    """train() with precision bf16 on a tiny Llama (padded prompts, causal masks, batched-matmul attention) and a
    tiny CNN (bf16 batch-norm statistics, LoRA on convolutions): no dtype mismatch, finite losses, a loadable run."""
    from graftune.config import RunConfig
    from graftune.evaluate import load_run
    from graftune.runs import train
    from tests.train_helpers import image_folder, llama_folder, pairs_jsonl, train_args, use_tiny_cnn

    calls = []
    real = precision.matmul_attention
    monkeypatch.setattr(precision, "matmul_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    if kind == "causal-lm":
        args = train_args(llama_folder(tmp_path / "llama"), pairs_jsonl(tmp_path / "pairs.jsonl"), tmp_path / "r",
                          epochs=1, val_size=0, max_new_tokens=2, precision="bf16")
    else:
        use_tiny_cnn(monkeypatch)
        args = {"model": "tiny-cnn", "data": str(image_folder(tmp_path / "imgs", n_per_class=6)), "method": "lora",
                "out": str(tmp_path / "r"), "epochs": 1, "batch_size": 4, "precision": "bf16", "val_size": 0,
                "test_size": 0.3}
    m = train(RunConfig(**args), progress=False)
    assert m["precision"] == "bf16" and m["task"] == kind
    assert bool(calls) == (kind == "causal-lm")  # the CNN has no attention
    losses = [line for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines() if '"step"' in line]
    assert losses and all('"loss": NaN' not in line for line in losses)
    assert load_run(tmp_path / "r").policy.name == "bf16"


def test_make_test_avx2_hides_the_wide_flags_from_every_process(tmp_path):
    # `make test-avx2` puts bench/avx2_only on PYTHONPATH: a process started anywhere must see an AVX2-only CPU. On
    # a CPU without avx512/AMX the real /proc/cpuinfo has nothing to hide, so a Sapphire Rapids one is fed through
    # the same function too
    import os
    import subprocess
    import sys
    from pathlib import Path

    sim = Path(__file__).resolve().parents[2] / "bench" / "avx2_only"
    code = ("import pathlib, sitecustomize as s; from graftune.speed import precision as p; i = p.cpu_features(); "
            f"x = p.read_cpuinfo(s.hide_wide_flags({SAPPHIRE!r})); "
            "print(i['native_bf16'], any(f.startswith(('avx512', 'amx')) for f in i['flags']), p.choose('auto').name, "
            "x['flags'], x['native_bf16'], pathlib.Path.read_text.__name__)")
    env = {**os.environ, "PYTHONPATH": str(sim)}
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "fp32", "['avx2']", "False", "_read_text_without_wide_flags"]
