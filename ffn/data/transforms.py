"""Spatial transforms applied to all frames of a video at once (so every branch gets the same one).

Frames come in as uint8 ``[F, H, W, 3]`` and leave as normalised float ``[F, 3, size, size]``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_tensor(frames: np.ndarray) -> Tensor:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3], got {frames.shape}")
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def _normalize(x: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return (x - mean) / std


class TrainTransform:
    """TSM's multi-scale crop: crop sides are ``scales`` x the short side (width and height at most
    ``max_distort`` scale steps apart) at a random position, resized to ``size``; then an optional
    horizontal flip. Leave ``flip`` off when the label depends on left/right motion."""

    def __init__(self, size: int, scales: Sequence[float] = (1.0, 0.875, 0.75, 0.66),
                 max_distort: int = 1, flip: bool = False) -> None:
        self.size, self.scales, self.max_distort, self.flip = size, tuple(scales), max_distort, flip

    def __call__(self, frames: np.ndarray, rng: np.random.Generator) -> Tensor:
        x = _to_tensor(frames)
        h, w = x.shape[-2:]
        pairs = [(i, j) for i in range(len(self.scales)) for j in range(len(self.scales))
                 if abs(i - j) <= self.max_distort]
        i, j = pairs[rng.integers(len(pairs))]
        ch = max(1, int(min(h, w) * self.scales[i]))
        cw = max(1, int(min(h, w) * self.scales[j]))
        top, left = rng.integers(h - ch + 1), rng.integers(w - cw + 1)
        x = _resize(x[..., top:top + ch, left:left + cw], (self.size, self.size))
        if self.flip and rng.random() < 0.5:
            x = x.flip(-1)
        return _normalize(x)


class EvalTransform:
    """``crops=1``: short side resized to ``scale_size``, centre ``size`` crop. ``crops=3``: short
    side resized to ``size``, three ``size`` crops along the long side (TSM's full-resolution test)."""

    def __init__(self, size: int, scale_size: int, crops: int = 1) -> None:
        if crops not in (1, 3):
            raise ValueError(f"crops must be 1 or 3, got {crops}")
        if scale_size < size:
            raise ValueError(f"scale_size ({scale_size}) must be >= size ({size})")
        self.size, self.scale_size, self.crops = size, scale_size, crops

    def __call__(self, frames: np.ndarray) -> Tensor:
        """``[crops, F, 3, size, size]``."""
        x = _to_tensor(frames)
        h, w = x.shape[-2:]
        short = self.scale_size if self.crops == 1 else self.size
        nh, nw = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
        x = _resize(x, (nh, nw))
        s = self.size
        if self.crops == 1:
            starts = [((nh - s) // 2, (nw - s) // 2)]
        elif nw >= nh:
            starts = [((nh - s) // 2, left) for left in (0, (nw - s) // 2, nw - s)]
        else:
            starts = [(top, (nw - s) // 2) for top in (0, (nh - s) // 2, nh - s)]
        return _normalize(torch.stack([x[..., t:t + s, l:l + s] for t, l in starts]))
