"""The tensor conventions of the ops (docs/design.md §3.4) for the Python side (the reference, the
Triton kernels, the wrappers): memory format, accumulation dtype and the dtype of an unused output,
plus the per-segment momenta. ``csrc/conventions.h`` is the C++ twin of the first three; the two
must say the same. The ops' argument checks (errors naming the argument, nothing silently
broadcast or truncated, docs/design.md §3.5) are in C++, ``csrc/ops/dispatch.cpp``."""

from __future__ import annotations


import torch
from torch import Tensor

from .layout import FrameLayout


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last if ``x`` is stored that way (and not also plain contiguous), else NCHW."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def acc_dtype(x: Tensor) -> torch.dtype:
    """Dtype of statistics, reductions and per-branch parameters for input ``x``."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def unused_acc(x: Tensor) -> Tensor:
    """The empty tensor standing for a per-row or per-segment output a call does not produce
    (``d alter`` without alter, the running statistics without them): x's acc dtype, the dtype
    that output has when it is produced."""
    return x.new_empty(0, dtype=acc_dtype(x))


def unused_activation(x: Tensor) -> Tensor:
    """The empty tensor standing for an activation-sized output a call does not produce
    (``dresidual`` without a residual): x's dtype."""
    return x.new_empty(0)


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
