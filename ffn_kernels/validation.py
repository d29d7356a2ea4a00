"""The tensor conventions of the ops (docs/design.md §3.4) for the Python side (the reference, the
Triton kernels, the wrappers): memory format, accumulation dtype and the dtype of an unused output,
plus the per-segment momenta. ``csrc/conventions.h`` is the C++ twin of the first three; the two
must say the same. The ops' argument checks (errors naming the argument, nothing silently
broadcast or truncated, docs/design.md §3.5) are in C++, ``csrc/ops/dispatch.cpp``."""

from __future__ import annotations

import numbers
from collections.abc import Iterable

import torch
from torch import Tensor

from .layout import FrameLayout, as_int


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
    if _is_real(momentum):
        return [float(momentum)] * layout.num_segments
    values = list(momentum) if isinstance(momentum, Iterable) and not isinstance(
        momentum, (str, bytes, Tensor)) else None
    if values is None or not all(_is_real(m) for m in values):
        raise TypeError(f"momentum must be a float or a sequence of floats, got {momentum!r}")
    if len(values) != layout.num_segments:
        raise ValueError(
            f"momentum has {len(values)} values but the layout has {layout.num_segments} segments"
        )
    return [float(m) for m in values]


# --- the Python wrappers' argument types (ffn_kernels.ops): our one-line errors naming the
# argument instead of torch's schema messages ("Expected a value of type 'Tensor' for argument
# 'weight'...") or a later failure inside the op


def _is_real(value) -> bool:
    """A real scalar: a Python or numpy int/float, or a 0-dim floating tensor (not a bool)."""
    if isinstance(value, Tensor):
        return value.dim() == 0 and value.is_floating_point()
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def real(name: str, value) -> float:
    if not _is_real(value):
        raise TypeError(f"{name} must be a float, got {value!r} ({type(value).__name__})")
    return float(value)


def integer(name: str, value) -> int:
    """An integral scalar (int, numpy integer, 0-dim integer tensor; not a bool) as an int that
    fits the int64 of the op's schema."""
    value = as_int(name, value)
    if not -2**63 <= value < 2**63:
        raise ValueError(f"{name} must fit in int64, got {value}")
    return value


def boolean(name: str, value) -> bool:
    """A bool or a numpy bool: ``training="no"`` must not count as True."""
    if not (isinstance(value, bool) or type(value).__name__ in ("bool", "bool_")):  # numpy 2, 1
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return bool(value)


def tensor(name: str, value, optional: bool = False):
    if value is None and optional:
        return None
    if not isinstance(value, Tensor):
        kind = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    return value


def writable(name: str, t: Tensor) -> None:
    """Running statistics are written back in place: refuse, before the op runs, a tensor that
    cannot take the write (an expanded view, whose elements share memory, or an inference tensor
    outside inference mode) instead of failing in torch's in-place copy after the op. Not while
    tracing: torch.compile cannot trace ``is_inference`` (and guards would be per stride)."""
    if torch.compiler.is_compiling():
        return
    if any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape)):
        raise ValueError(f"{name} is an expanded view (stride 0, elements sharing memory) and "
                         f"cannot be updated in place; pass a tensor of its own (.clone())")
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(f"{name} is an inference tensor and cannot be updated in place outside "
                         f"torch.inference_mode(); pass a tensor of its own (.clone())")
