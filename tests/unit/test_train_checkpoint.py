"""The training checkpoint carries fp16's GradScaler state (loss scale, growth tracker), so a resumed fp16 run goes
on with the scale it had found instead of restarting at 65536 and skipping steps to find it again. fp16 training
runs only on CUDA; the save/restore round trip is checked here with a CPU GradScaler, which has the same state."""

import torch

import graftune.recipes.adapter as t
import graftune.run.checkpoint as ck
from graftune import AdapterModel
from graftune.config import RunConfig
from tests.conftest import tiny_bert


def _run_parts(cfg: RunConfig, scaler_enabled: bool):
    torch.manual_seed(0)
    model = AdapterModel(tiny_bert())
    model.add_adapter("a", "lora", r=2)
    model.set_active("a")
    model.set_trainable("a")
    head = torch.nn.Linear(32, 3)
    params = model.trainable_parameters() + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = t._scheduler(cfg, optimizer, 10)
    return model, head, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=scaler_enabled)


def _state() -> dict:
    return {"epoch": 1, "step": 2, "best": None, "best_epoch": None, "bad_epochs": 0, "stopped": False}


def test_checkpoint_restores_the_loss_scale(tmp_path):
    cfg = RunConfig(model="m", data="d", method="lora")
    model, head, optimizer, scheduler, scaler = _run_parts(cfg, True)
    ids = torch.randint(5, 90, (2, 6))
    loss = head(model(input_ids=ids).last_hidden_state[:, 0]).pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()  # a finite step: the growth tracker counts it
    scaler.update(new_scale=1024.0)  # as if overflows had backed the scale off
    saved = scaler.state_dict()
    assert saved["scale"] == 1024.0 and saved["_growth_tracker"] == 1
    ck.write_checkpoint(tmp_path, model, "a", head, optimizer, scheduler, _state(), None, cfg, scaler=scaler)

    model, head, optimizer, scheduler, fresh = _run_parts(cfg, True)
    assert fresh.state_dict() != saved
    ck.restore(ck.read_checkpoint(tmp_path), model, "a", head, optimizer, scheduler, _state(), scaler=fresh)
    assert fresh.state_dict() == saved


def test_checkpoint_without_loss_scaling_leaves_the_scaler_alone(tmp_path):
    """fp32/bf16 runs (a disabled scaler) and checkpoints written before the scaler was saved restore as before."""
    cfg = RunConfig(model="m", data="d", method="lora")
    model, head, optimizer, scheduler, disabled = _run_parts(cfg, False)
    ck.write_checkpoint(tmp_path, model, "a", head, optimizer, scheduler, _state(), None, cfg, scaler=disabled)
    ckpt = ck.read_checkpoint(tmp_path)
    assert ckpt["scaler"] == {}
    model, head, optimizer, scheduler, enabled = _run_parts(cfg, True)
    default = enabled.state_dict()
    ck.restore(ckpt, model, "a", head, optimizer, scheduler, _state(), scaler=enabled)
    del ckpt["scaler"]
    ck.restore(ckpt, model, "a", head, optimizer, scheduler, _state(), scaler=enabled)
    assert enabled.state_dict() == default
