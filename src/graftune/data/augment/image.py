"""Image augmentation on float batches (batch, channels, height, width), with torch ops only.

torchvision does not run beside the CPU torch build here, so these are written with plain tensor ops and
``affine_grid`` / ``grid_sample``. Every function takes the batch ``x``, optional labels ``y`` and a
``torch.Generator`` (seed it for reproducible augmentation), draws its parameters per example, and returns
``(x, y, record)``: the new batch, the labels (unchanged for geometric and colour ops; soft labels for mixup and
cutmix) and a short record of what it did. Inputs are never modified in place. Use them on the training split
only.

- ``hflip`` / ``vflip``: mirror each example with probability ``p``;
- ``random_crop``: pad by ``padding`` pixels (reflect or a constant) and crop back to the original size at a
  random offset (the CIFAR recipe: small translations);
- ``rotate``: rotate by an angle drawn uniformly from [-degrees, degrees] about the centre (bilinear);
- ``color_jitter``: brightness (scale), contrast (blend with the image's mean grey), saturation (blend with
  each pixel's grey; three-channel images only), each factor uniform in [1 - s, 1 + s]; applied in that order;
- ``mixup``: Zhang et al. 2018, https://arxiv.org/abs/1710.09412;
- ``cutmix``: paste a random box from another example; the label weight is the pasted area (Yun et al. 2019,
  https://arxiv.org/abs/1905.04899).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from graftune.data.augment.embedding import beta, mix, soft_labels
from graftune.errors import ConfigError, DataError

_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights


def _check(x: torch.Tensor) -> None:
    if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise DataError(f"expected a float image batch (batch, channels, height, width); got {shape}")


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _flip(x, y, p, generator, dim, op):
    _check(x)
    if not 0 <= p <= 1:
        raise ConfigError(f"p: got {p!r}; use a probability in [0, 1]")
    chosen = (torch.rand(len(x), generator=generator) < p).to(x.device)
    out = torch.where(chosen.view(-1, 1, 1, 1), x.flip(dim), x)
    return out, y, {"op": op, "p": p, "applied": int(chosen.sum())}


def hflip(x: torch.Tensor, y=None, *, p: float = 0.5, generator: torch.Generator | None = None):
    """Mirror left-right each example with probability ``p``."""
    return _flip(x, y, p, generator, -1, "hflip")


def vflip(x: torch.Tensor, y=None, *, p: float = 0.5, generator: torch.Generator | None = None):
    """Mirror top-bottom each example with probability ``p`` (digits and text do not survive this)."""
    return _flip(x, y, p, generator, -2, "vflip")


def random_crop(x: torch.Tensor, y=None, *, padding: int = 4, fill: str | float = "reflect",
                generator: torch.Generator | None = None):
    """Pad each side by ``padding`` pixels (``fill``: ``"reflect"``, ``"replicate"`` or a constant value) and
    crop the original height x width at a random offset per example."""
    _check(x)
    if not isinstance(padding, int) or padding < 0:
        raise ConfigError(f"padding: got {padding!r}; use a non-negative number of pixels")
    _, _, h, w = x.shape
    if isinstance(fill, str):
        if fill not in ("reflect", "replicate"):
            raise ConfigError(f"fill: got {fill!r}; use 'reflect', 'replicate' or a number")
        if fill == "reflect" and padding >= min(h, w):
            raise ConfigError(f"padding={padding} is too large to reflect a {h}x{w} image; lower it")
        padded = F.pad(x, (padding,) * 4, mode=fill)
    else:
        padded = F.pad(x, (padding,) * 4, mode="constant", value=float(fill))
    top = torch.randint(0, 2 * padding + 1, (len(x),), generator=generator).tolist()
    left = torch.randint(0, 2 * padding + 1, (len(x),), generator=generator).tolist()
    out = torch.stack([padded[i, :, t:t + h, s:s + w] for i, (t, s) in enumerate(zip(top, left))]) if len(x) else x
    return out, y, {"op": "random_crop", "padding": padding, "fill": fill,
                    "mean_shift_px": float(sum(abs(t - padding) + abs(s - padding) for t, s in zip(top, left)))
                    / max(len(x), 1)}


def rotate(x: torch.Tensor, y=None, *, degrees: float = 15.0, padding_mode: str = "zeros",
           generator: torch.Generator | None = None):
    """Rotate each example about its centre by an angle uniform in [-degrees, degrees] (bilinear sampling;
    ``padding_mode``: ``zeros``, ``border`` or ``reflection`` for the corners that come from outside)."""
    _check(x)
    if padding_mode not in ("zeros", "border", "reflection"):
        raise ConfigError(f"padding_mode: got {padding_mode!r}; use zeros, border or reflection")
    b, _, h, w = x.shape
    angle = _uniform(b, -degrees, degrees, generator) * math.pi / 180
    cos, sin = torch.cos(angle), torch.sin(angle)
    # grid coordinates are normalized to [-1, 1] per axis, so a rotation in pixels needs the aspect ratio
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
    theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    return out, y, {"op": "rotate", "degrees": degrees,
                    "mean_abs_angle": float(angle.abs().mean() * 180 / math.pi) if b else 0.0}


def color_jitter(x: torch.Tensor, y=None, *, brightness: float = 0.2, contrast: float = 0.2,
                 saturation: float = 0.2, clamp: tuple[float, float] | None = (0.0, 1.0),
                 generator: torch.Generator | None = None):
    """Random brightness, contrast and saturation per example (factors uniform in [1 - s, 1 + s]); values are
    clamped to ``clamp`` (images in [0, 1] by default; None for normalized inputs)."""
    _check(x)
    for name, s in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
        if not 0 <= s < 1:
            raise ConfigError(f"{name}: got {s!r}; use a strength in [0, 1)")
    b, c = x.shape[:2]
    view = (-1, 1, 1, 1)
    fb = _uniform(b, 1 - brightness, 1 + brightness, generator).to(x.device, x.dtype).view(view)
    fc = _uniform(b, 1 - contrast, 1 + contrast, generator).to(x.device, x.dtype).view(view)
    fs = _uniform(b, 1 - saturation, 1 + saturation, generator).to(x.device, x.dtype).view(view)
    out = x * fb
    grey = _grey(out)
    mean = grey.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * fc + mean
    if c == 3:
        grey = _grey(out)
        out = (out - grey) * fs + grey
    if clamp is not None:
        out = out.clamp(*clamp)
    return out, y, {"op": "color_jitter", "brightness": brightness, "contrast": contrast,
                    "saturation": saturation if c == 3 else 0.0}


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        return x.mean(dim=1, keepdim=True)
    w = torch.tensor(_GREY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def mixup(x: torch.Tensor, y: torch.Tensor, *, num_classes: int | None = None, alpha: float = 0.2,
          generator: torch.Generator | None = None):
    """Blend each image with a random partner: ``lam x + (1 - lam) x[j]``, labels likewise (soft labels)."""
    _check(x)
    y = soft_labels(y, num_classes).to(x.device)
    lam = beta(alpha, len(x), generator).to(x.device)
    partner = torch.randperm(len(x), generator=generator).to(x.device)
    out, y_mix = mix(x, y, lam, partner)
    return out, y_mix, {"op": "mixup", "alpha": alpha, "examples": len(x),
                        "lambda_mean": float(lam.mean()) if len(x) else None, "partners": partner.tolist()}


def cutmix(x: torch.Tensor, y: torch.Tensor, *, num_classes: int | None = None, alpha: float = 1.0,
           generator: torch.Generator | None = None):
    """Paste a box from a random partner into each image. The box covers about ``1 - lam`` of the area
    (lam ~ Beta(alpha, alpha)), clipped at the borders; the label weight is then recomputed from the box actually
    pasted, so ``y' = lam' y + (1 - lam') y[j]`` with ``lam'`` = the fraction of the image that stays."""
    _check(x)
    y = soft_labels(y, num_classes).to(x.device)
    b, _, h, w = x.shape
    lam = beta(alpha, b, generator)
    partner = torch.randperm(b, generator=generator)
    cut = torch.sqrt(1 - lam)
    cut_h, cut_w = (cut * h).long(), (cut * w).long()
    cy = torch.randint(0, h, (b,), generator=generator)
    cx = torch.randint(0, w, (b,), generator=generator)
    y0, y1 = (cy - cut_h // 2).clamp(0, h), (cy + cut_h - cut_h // 2).clamp(0, h)
    x0, x1 = (cx - cut_w // 2).clamp(0, w), (cx + cut_w - cut_w // 2).clamp(0, w)
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    box = (rows >= y0.view(-1, 1, 1)) & (rows < y1.view(-1, 1, 1)) & (cols >= x0.view(-1, 1, 1)) & \
        (cols < x1.view(-1, 1, 1))
    box = box.unsqueeze(1).to(x.device)
    partner = partner.to(x.device)
    out = torch.where(box, x[partner], x)
    kept = 1 - box.flatten(1).float().mean(1)
    ly = kept.to(y.dtype).view(-1, 1)
    y_mix = ly * y + (1 - ly) * y[partner]
    return out, y_mix, {"op": "cutmix", "alpha": alpha, "examples": b,
                        "lambda": kept.tolist(), "lambda_mean": float(kept.mean()) if b else None,
                        "partners": partner.tolist()}
