"""Argument checks shared by the ops: bad input raises a ``TypeError``/``ValueError`` naming the
argument; nothing is silently broadcast or truncated (DESIGN.md §3)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .layout import FrameLayout

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last if ``x`` is stored that way (and not also plain contiguous), else NCHW."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def acc_dtype(x: Tensor) -> torch.dtype:
    """Dtype of statistics, reductions and per-branch parameters for input ``x``."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_input(name: str, x: Tensor, layout: FrameLayout) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [frames, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    layout.check(x.shape[0], name=name)


def check_like(name: str, t: Optional[Tensor], x: Tensor, x_name: str = "x") -> None:
    """``t`` must have exactly the shape, dtype and device of ``x``."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != x.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {x_name} has {tuple(x.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {x_name} has {x.dtype}")
    check_device(name, t, x)


def check_device(name: str, t: Tensor, x: Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device} (mixed devices)")


def check_param(name: str, p: Optional[Tensor], x: Tensor, layout: FrameLayout) -> None:
    """A per-branch parameter or buffer: ``[P, C]`` with ``C == x.shape[1]`` and every layout row < P."""
    if p is None:
        return
    if not isinstance(p, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(p).__name__}")
    if p.dim() != 2 or p.shape[1] != x.shape[1]:
        raise ValueError(
            f"{name} must have shape [rows, C={x.shape[1]}] (one row per branch), "
            f"got {tuple(p.shape)}"
        )
    if not p.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {p.dtype}")
    check_device(name, p, x)
    if max(layout.rows) >= p.shape[0]:
        raise ValueError(
            f"layout rows {layout.rows} index row {max(layout.rows)} of {name}, "
            f"which has only {p.shape[0]} rows"
        )


def check_fold_div(fold_div: int) -> None:
    if isinstance(fold_div, bool) or not isinstance(fold_div, int) or fold_div < 2:
        raise ValueError(f"fold_div must be an int >= 2, got {fold_div!r}")


def check_norm(
    x: Tensor,
    layout: FrameLayout,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: Sequence[float],
    eps: float,
) -> None:
    """Checks of the BatchNorm arguments beyond their shapes."""
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if not training and running_mean is None:
        raise ValueError("training=False needs running_mean and running_var")
    if len(momentum) != layout.num_segments:
        raise ValueError(
            f"momentum has {len(momentum)} values but the layout has {layout.num_segments} segments"
        )
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if training:
        if running_mean is not None and not layout.has_unique_rows:
            raise ValueError(
                f"layout rows {layout.rows} repeat a row; in training each parameter row may "
                "appear at most once per call (its running statistics would be updated twice)"
            )
        per_channel = layout.clips * min(layout.frames) * x.shape[2] * x.shape[3]
        if per_channel < 2:
            raise ValueError(
                "training BatchNorm needs more than 1 value per channel in every segment, "
                f"got {per_channel} (clips={layout.clips}, frames={layout.frames}, "
                f"spatial={tuple(x.shape[2:])})"
            )


def momenta(momentum, layout: FrameLayout) -> list[float]:
    """``momentum`` as one float per segment (a float applies to all segments)."""
    if momentum is None:
        raise ValueError(
            "momentum=None (cumulative average) needs a batch counter: use "
            "ffn_kernels.FreqBatchNorm2d(momentum=None), or pass 1/num_batches_tracked"
        )
    if isinstance(momentum, (int, float)) and not isinstance(momentum, bool):
        return [float(momentum)] * layout.num_segments
    try:
        values = [float(m) for m in momentum]
    except TypeError:
        raise TypeError(f"momentum must be a float or a sequence of floats, got {momentum!r}") from None
    if len(values) != layout.num_segments:
        raise ValueError(
            f"momentum has {len(values)} values but the layout has {layout.num_segments} segments"
        )
    return values
