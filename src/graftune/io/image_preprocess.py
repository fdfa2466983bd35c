"""The image models' eval preprocessing in numpy alone, for ONNX exports of image runs.

``graftune.zoo.ImageTransform`` prepares an image for a CNN with torch: scale to [0, 1], grayscale repeated to
three channels (alpha dropped), the short side resized to ``round(size / crop)`` with antialiased bilinear
interpolation (``F.interpolate(antialias=True, align_corners=False)``), a center crop of ``size`` x ``size``, then
``(x - mean) / std``. An exported model must get the same pixels where no torch is installed, so this module does
the same in numpy: the resize is two matrix products with the interpolation weights torch computes (the
triangle filter widened by the downscaling factor, normalized per output pixel, in float32, as ATen's
``_upsample_bilinear2d_aa`` does). It agrees with torch to about 1e-7 per pixel; the export checks that on every
test image of the run (``graftune.onnx_export``). Only numpy is imported: the file can be copied into a deployment.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

KIND = "resize-crop-normalize"


@functools.lru_cache(maxsize=64)
def resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 weights of antialiased bilinear resizing along one axis (align_corners=False): output
    pixel i averages the inputs under a triangle centred at ``scale * (i + 0.5)``, ``scale = n_in / n_out``, whose
    half-width is ``max(scale, 1)`` input pixels; the weights of each output pixel sum to 1."""
    one, half = np.float32(1.0), np.float32(0.5)
    scale = np.float32(n_in / n_out)
    support = max(scale, one)
    invscale = one / scale if scale >= one else one
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    for i in range(n_out):
        center = scale * np.float32(i + 0.5)
        lo = max(int(center - support + half), 0)
        hi = min(int(center + support + half), n_in)
        taps = np.arange(lo, hi, dtype=np.float32)
        w = np.maximum(np.float32(0.0), one - np.abs((taps - center + half) * invscale))
        total = w.sum(dtype=np.float32)
        weights[i, lo:hi] = w / total if total != 0 else w
    return weights


def as_float_chw(image: Any) -> np.ndarray:
    """One image as float32 (3, H, W) in [0, 1]: a numpy/PIL ``HWC`` or ``HW`` array (uint8 read as 0..255,
    floats as 0..1 unless their max exceeds 1), or a torch ``CHW`` tensor (graftune's data sets hold those)."""
    if hasattr(image, "detach"):  # a torch tensor: channels first
        x = np.asarray(image.detach().cpu().numpy())
        x = x[None] if x.ndim == 2 else x
    else:
        a = np.asarray(image)
        if a.ndim not in (2, 3):
            raise ValueError(f"expected an HWC or HW image, got an array of shape {a.shape}: pass one image at a time")
        x = a.reshape(a.shape[0], a.shape[1], -1).transpose(2, 0, 1)
    if x.ndim != 3 or x.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected 1, 3 or 4 image channels, got shape {tuple(x.shape)}")
    integer = not np.issubdtype(x.dtype, np.floating)
    x = x.astype(np.float32)
    if integer or x.max() > 1:
        x = x / np.float32(255)
    return x[:3] if x.shape[0] >= 3 else np.repeat(x, 3, axis=0)


@dataclass(frozen=True)
class ImagePreprocess:
    """What ``graftune.zoo.ImageTransform(size, crop)`` does, in numpy; recorded in an export's manifest.

    Args:
        size: the model's square input side in pixels.
        crop: the center-crop fraction: the short side is first resized to ``round(size / crop)``.
        mean: subtracted from every channel after scaling to [0, 1].
        std: the result is divided by it.
    """

    size: int
    crop: float = 0.875
    mean: float = 0.5
    std: float = 0.5

    def __call__(self, images: Sequence[Any]) -> np.ndarray:
        """float32 (N, 3, size, size), ready for the exported graph."""
        out = np.empty((len(images), 3, self.size, self.size), dtype=np.float32)
        for k, image in enumerate(images):
            out[k] = self.one(image)
        return out

    def one(self, image: Any) -> np.ndarray:
        x = as_float_chw(image)
        h, w = x.shape[1:]
        scale = round(self.size / self.crop) / min(h, w)
        oh, ow = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        top, left = (oh - self.size) // 2, (ow - self.size) // 2
        # only the rows and columns the crop keeps are computed
        rows = resize_weights(h, oh)[top:top + self.size]
        cols = resize_weights(w, ow)[left:left + self.size]
        x = np.matmul(x, cols.T)  # (3, h, size): the width resized and cropped
        x = np.einsum("oh,chp->cop", rows, x)  # (3, size, size): then the height
        return (x - np.float32(self.mean)) / np.float32(self.std)

    def to_dict(self) -> dict:
        return {"kind": KIND, **asdict(self), "resize_short_side": round(self.size / self.crop),
                "interpolation": "bilinear, antialiased (torch F.interpolate antialias=True, align_corners=False)",
                "channels": "RGB; grayscale repeated to 3 channels, alpha dropped",
                "scale": "uint8 / 255; floats as they are unless their max exceeds 1 (then / 255)"}

    @classmethod
    def from_dict(cls, d: dict) -> ImagePreprocess:
        if d.get("kind") != KIND:
            raise ValueError(f"unknown image preprocessing {d.get('kind')!r} (this graftune knows {KIND!r})")
        return cls(int(d["size"]), float(d["crop"]), float(d["mean"]), float(d["std"]))
