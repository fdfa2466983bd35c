"""Mixup on vectors: embeddings, hidden states, or any (batch, ...) tensor, whatever the modality.

    lam ~ Beta(alpha, alpha) per example,   j = a random permutation of the batch
    x' = lam x + (1 - lam) x[j],            y' = lam y + (1 - lam) y[j]   (y one-hot or soft)

(Zhang et al. 2018, https://arxiv.org/abs/1710.09412; on hidden states, Verma et al. 2019, "Manifold Mixup",
https://arxiv.org/abs/1806.05236). Mixed examples need a loss that accepts soft labels (cross-entropy with
probability targets), and they belong to the training split only.

Randomness comes from a ``torch.Generator`` (the permutation) and a NumPy generator seeded from it (Beta
draws: torch has no seeded Beta sampler), so a seeded generator gives the same mix on any machine.
"""

from __future__ import annotations

import numpy as np
import torch

from graftune.errors import ConfigError, DataError


def beta(alpha: float, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` draws of Beta(alpha, alpha) as float32, reproducible from ``generator``."""
    if not alpha > 0:
        raise ConfigError(f"alpha: got {alpha!r}; use a positive number (0.2 to 1 are usual)")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=n).astype(np.float32))


def soft_labels(labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Class indices (batch,) -> one-hot float (batch, classes); float (batch, classes) labels pass through."""
    labels = torch.as_tensor(labels)
    if labels.is_floating_point():
        if labels.dim() != 2:
            raise DataError(f"soft labels must be (batch, classes); got shape {tuple(labels.shape)}")
        return labels
    if labels.dim() != 1:
        raise DataError(f"class indices must be (batch,); got shape {tuple(labels.shape)}")
    if num_classes is None:
        raise ConfigError("num_classes: needed to turn class indices into one-hot labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels must lie in 0..{num_classes - 1}; got {int(labels.min())}..{int(labels.max())}")
    return torch.nn.functional.one_hot(labels.long(), num_classes).float()


def mix(x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor,
        partner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``lam x + (1 - lam) x[partner]`` and the same for ``y``; ``lam`` has one value per example."""
    lx = lam.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    ly = lam.to(y.dtype).view(-1, 1)
    return lx * x + (1 - lx) * x[partner], ly * y + (1 - ly) * y[partner]


def mixup_embeddings(h: torch.Tensor, labels: torch.Tensor, *, num_classes: int | None = None, alpha: float = 0.4,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Mix pairs of rows of ``h`` (batch, ...) and their labels with Beta(alpha, alpha) weights.

    Args:
        h: embeddings (batch, dim) or hidden states (batch, seq, dim); any floating tensor with a batch dim.
        labels: class indices (batch,) with ``num_classes``, or soft labels (batch, classes).
        alpha: Beta parameter; small alpha keeps most mixes close to one of the two examples.
        generator: a seeded ``torch.Generator`` for reproducible mixes.

    Returns the mixed tensor, soft labels that sum to 1 per row, and a record of what was done. Mixing
    hidden states of padded sequences mixes padding too: mix pooled vectors, or sequences of equal length.
    """
    if not h.is_floating_point():
        raise DataError(f"mixup needs a floating tensor; got {h.dtype}")
    y = soft_labels(labels, num_classes).to(h.device)
    if len(y) != len(h):
        raise DataError(f"got {len(h)} rows but {len(y)} labels")
    lam = beta(alpha, len(h), generator).to(h.device)
    partner = torch.randperm(len(h), generator=generator).to(h.device)
    out, y_mix = mix(h, y, lam, partner)
    record = {"op": "mixup", "alpha": alpha, "examples": len(h),
              "lambda_mean": float(lam.mean()) if len(lam) else None, "partners": partner.tolist()}
    return out, y_mix, record
