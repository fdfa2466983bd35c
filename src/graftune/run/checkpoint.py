"""Checkpoints: everything a run needs to continue exactly, in ``.checkpoint/checkpoint.safetensors`` inside the
run's partial directory (tensors, with the JSON state in the file's metadata; never a pickle), replaced atomically
after every epoch. ``--resume`` reads it back; a resumed run ends with the same weights and metrics as an
uninterrupted one with the same seed."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from graftune.config import HEAD_ONLY, RunConfig
from graftune.errors import ArtifactError
from graftune.io.atomic import write_file_atomically

CHECKPOINT = ".checkpoint"
CHECKPOINT_FILE = "checkpoint.safetensors"


def checkpoint_file(work: Path) -> Path:
    """The checkpoint of the run being assembled in ``work`` (its partial directory)."""
    return Path(work) / CHECKPOINT / CHECKPOINT_FILE


def weights(model, name: str, head: nn.Module | None, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """A copy of everything that trains: adapter tensors under ``adapter.``, head tensors under ``head.``."""
    out = {}
    if cfg.method != HEAD_ONLY:
        out.update({f"adapter.{k}": v.clone() for k, v in model.adapter_state_dict(name).items()})
    if head is not None:
        out.update({f"head.{k}": v.detach().cpu().clone() for k, v in head.state_dict().items()})
    return out


def load_weights(weights: dict[str, torch.Tensor], model, name: str, head: nn.Module | None) -> None:
    adapter = {k[len("adapter."):]: v for k, v in weights.items() if k.startswith("adapter.")}
    if adapter:
        model.load_adapter_state_dict(name, adapter)
    if head is not None:
        head.load_state_dict({k[len("head."):]: v for k, v in weights.items() if k.startswith("head.")})


def write_checkpoint(work: Path, model, name: str, head, optimizer, scheduler, state: dict,
                      best: dict | None, cfg: RunConfig, scaler: torch.amp.GradScaler | None = None) -> None:
    """Everything needed to continue exactly: weights, optimizer moments, schedule, RNG, counters, best weights,
    and fp16's loss scale (a resumed run would otherwise restart at 65536 and skip steps finding it again).
    Tensors go to safetensors; the rest is JSON in the file's metadata. Written to a temporary file and renamed,
    so a crash leaves the previous checkpoint intact."""
    tensors = {f"now.{k}": v.contiguous() for k, v in weights(model, name, head, cfg).items()}
    if best is not None:
        tensors.update({f"best.{k}": v.contiguous() for k, v in best.items()})
    opt = optimizer.state_dict()
    opt_other: dict[str, dict] = {}
    for pid, pstate in opt["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                opt_other.setdefault(str(pid), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"state": state, "param_groups": opt["param_groups"], "optim_other": opt_other,
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else {}}
    write_file_atomically(checkpoint_file(work),
                          lambda tmp: save_file(tensors, tmp, metadata={"graftune": json.dumps(meta)}))


def read_checkpoint(work: Path) -> dict:
    file = checkpoint_file(work)
    try:
        with safe_open(file, framework="pt") as f:
            meta = json.loads(f.metadata()["graftune"])
            meta["tensors"] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise ArtifactError(f"{file}: unreadable checkpoint ({type(e).__name__}); start the run again without "
                            "--resume") from None
    return meta


def restore(ckpt: dict, model, name: str, head, optimizer, scheduler, state: dict,
             scaler: torch.amp.GradScaler | None = None) -> dict | None:
    """Put a checkpoint's weights, optimizer, schedule, loss scale, RNG and counters back; return its best
    weights."""
    tensors = ckpt["tensors"]
    load_weights({k[len("now."):]: v for k, v in tensors.items() if k.startswith("now.")}, model, name, head)
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, field = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[field] = value
    for pid, other in ckpt["optim_other"].items():
        opt_state.setdefault(int(pid), {}).update(other)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in ckpt["param_groups"]]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):  # empty when the run has no loss scaling (not fp16)
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    state.update(ckpt["state"])
    best = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
    return best or None
