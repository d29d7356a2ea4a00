"""The packed multi-branch frame layout (docs/design.md §2).

Every branch of a batch lives in one tensor ``[N*(T_0+...+T_{S-1}), C, H, W]``: segment ``s`` holds
the ``N`` clips of branch ``s`` (clip-major, frame-minor) and uses row ``rows[s]`` of every
per-branch parameter. A :class:`FrameLayout` describes that packing with plain Python ints, so ops
derive their offsets without touching the device. Under ``torch.compile`` / ``torch.export`` with
dynamic shapes, ``clips`` and ``frames`` may be ``torch.SymInt`` (taken from the input's shape);
``rows`` are always ints.
"""

from __future__ import annotations

import numbers
import operator
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch


@dataclass(frozen=True)
class Segment:
    """One branch inside a packed tensor: frames ``[start, stop)`` use parameter row ``row``."""

    index: int
    start: int
    stop: int
    clips: int
    frames: int
    row: int


@dataclass(frozen=True)
class FrameLayout:
    """Descriptor of a packed batch: ``clips`` clips per branch, ``frames[s]`` frames per clip in
    segment ``s``, which uses parameter row ``rows[s]``.

    >>> FrameLayout(clips=2, frames=(4, 8, 16), rows=(0, 1, 2)).total_frames
    56
    >>> FrameLayout.single(clips=2, frames=12, row=2)  # 12-frame eval on the 16-frame branch
    FrameLayout(clips=2, frames=(12,), rows=(2,))
    """

    clips: int
    frames: tuple[int, ...]
    rows: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        clips = as_int("FrameLayout: clips", self.clips, symbolic=True)
        _require(clips >= 1, lambda: f"FrameLayout: clips must be a positive int, got {clips!r}")
        frames = _int_tuple("frames", self.frames, symbolic=True)
        if not frames:
            raise ValueError("FrameLayout: frames must name at least one segment")
        for t in frames:
            _require(t >= 1,
                     lambda: f"FrameLayout: every frame count must be >= 1, got frames={frames}")
        rows = tuple(range(len(frames))) if self.rows is None else _int_tuple("rows", self.rows)
        if len(rows) != len(frames):
            raise ValueError(
                f"FrameLayout: rows has {len(rows)} entries but frames has {len(frames)}; "
                "give one parameter row per segment"
            )
        if any(r < 0 for r in rows):
            raise ValueError(f"FrameLayout: rows must be >= 0, got rows={rows}")
        _check_sizes(clips, frames, rows)
        object.__setattr__(self, "clips", clips)
        object.__setattr__(self, "frames", frames)
        object.__setattr__(self, "rows", rows)

    @classmethod
    def single(cls, clips: int, frames: int, row: int = 0) -> "FrameLayout":
        """A one-segment layout: ``clips`` clips of ``frames`` frames on parameter row ``row``."""
        return cls(clips=clips, frames=(frames,), rows=(row,))

    @property
    def num_segments(self) -> int:
        return len(self.frames)

    @property
    def total_frames(self) -> int:
        """Leading dimension of a tensor in this layout."""
        return self.clips * sum(self.frames)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start frame of every segment plus the end, like flash-attention's ``cu_seqlens``."""
        out = [0]
        for t in self.frames:
            out.append(out[-1] + self.clips * t)
        return tuple(out)

    @property
    def has_unique_rows(self) -> bool:
        return len(set(self.rows)) == len(self.rows)

    def segments(self) -> Iterator[Segment]:
        off = self.offsets
        for s, (t, r) in enumerate(zip(self.frames, self.rows)):
            yield Segment(s, off[s], off[s + 1], self.clips, t, r)

    def split(self, x) -> list:
        """Views of ``x`` (leading dim ``total_frames``) per segment."""
        return [x[seg.start : seg.stop] for seg in self.segments()]

    def check(self, num_frames: int, num_rows: int | None = None, name: str = "x") -> None:
        """Raise ``ValueError`` unless a tensor with ``num_frames`` leading frames and parameters
        with ``num_rows`` rows fit this layout."""
        _require(num_frames == self.total_frames,
                 lambda: f"{name}.shape[0] is {num_frames} but the layout holds "
                         f"{self.total_frames} frames (clips={self.clips} x frames={self.frames})")
        if num_rows is not None and max(self.rows) >= num_rows:
            raise ValueError(
                f"layout rows {self.rows} index parameter row {max(self.rows)}, but the parameters "
                f"have only {num_rows} rows"
            )


def _require(ok, message: Callable[[], str]) -> None:
    """Raise ``ValueError(message())`` unless ``ok``. A traced condition (sizes under
    torch.compile / torch.export) becomes a runtime assert instead: a guard would recompile per
    size, and an unbacked size (``mark_unbacked``) cannot be guarded on at all."""
    if isinstance(ok, torch.SymBool) or torch.compiler.is_compiling():
        torch._check(ok)
    elif not ok:
        raise ValueError(message())


# The kernels index frame counts and rows as int32 (csrc/cpu and csrc/cuda keep them as int,
# Triton's layout table is int32) and frame offsets as int64.
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1


def as_int(name: str, value, symbolic: bool = False):
    """``value`` as an int: any integral scalar (int, a numpy integer, a 0-dim integer tensor), not
    a bool or a float; with ``symbolic`` a ``torch.SymInt`` (a size under tracing) stays as is."""
    # (under torch.compile a traced size passes isinstance(value, int); it must stay unconverted)
    if (isinstance(value, int) and not isinstance(value, bool)) or (
            symbolic and isinstance(value, torch.SymInt)):
        return value
    if isinstance(value, torch.Tensor):
        integral = value.dim() == 0 and not (value.is_floating_point() or value.is_complex()
                                             or value.dtype == torch.bool)
    else:
        integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not integral:
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return operator.index(value)


def _int_tuple(name: str, value: Sequence[int], symbolic: bool = False) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"FrameLayout: {name} must be a sequence of ints, got {value!r}")
    items = tuple(value)
    try:
        return tuple(as_int(name, v, symbolic) for v in items)
    except TypeError:
        raise TypeError(f"FrameLayout: {name} must hold ints, got {items!r}") from None


def _check_sizes(clips, frames: tuple, rows: tuple) -> None:
    """Refuse sizes the kernels cannot index: a frame count or row past int32, or a total number
    of frames past int64 (which C++ would wrap: clips=2**62+1 x 4 frames is 4 frames there).
    Not while tracing: traced sizes come from a tensor's shape (and would each need a guard)."""
    if torch.compiler.is_compiling():
        return
    concrete = [t for t in frames if isinstance(t, int)]
    for name, values in (("frames", concrete), ("rows", rows)):
        if any(v > _INT32_MAX for v in values):
            raise ValueError(f"FrameLayout: {name} must be < 2**31 (the kernels index them as "
                             f"int32), got {name}={tuple(values)}")
    if isinstance(clips, int) and len(concrete) == len(frames) and clips * sum(frames) > _INT64_MAX:
        raise ValueError(f"FrameLayout: clips={clips} x frames={frames} is more than 2**63 - 1 "
                         "frames (int64 overflow)")


# --- the layout of the current call, by context (docs/design.md §5.7) -------------------------------
#
# Modules called without a layout (a torchvision block calls ``bn(x)``) read it from the innermost
# active ``frame_layout`` block of this thread. It is a ``threading.local`` and not a
# ``contextvars.ContextVar`` because torch.compile reads an attribute of a threading.local and
# guards on its value (a new layout recompiles, another thread sees its own), while it cannot trace
# ``ContextVar.get`` (graph break: ``fullgraph=True`` fails).
_current = threading.local()


def current_layout() -> FrameLayout | None:
    """The layout of the innermost active :func:`frame_layout` block in this thread, or None."""
    return getattr(_current, "layout", None)


def resolve_layout(layout: FrameLayout | None, who: str) -> FrameLayout:
    """``layout`` if given, else the context's (:func:`frame_layout`); with neither, a ``TypeError``
    that names ``who`` (the module being called) and both ways to provide one."""
    if layout is not None:
        return layout
    layout = current_layout()
    if layout is None:
        raise TypeError(
            f"{who} needs a FrameLayout: pass it as an argument, e.g. module(x, layout), or call the "
            f"module inside `with ffn_kernels.frame_layout(layout):`"
        )
    return layout


class frame_layout:  # noqa: N801 - used like a function, as torch.no_grad
    """Context manager: modules called without a layout inside the block use ``layout``.

    >>> layout = FrameLayout(clips=2, frames=(4, 8))
    >>> with frame_layout(layout):
    ...     current_layout() is layout
    True

    Blocks nest (the inner layout wins until it exits) and each thread has its own. They must exit
    in the reverse order they entered, which a block held open across an ``await`` or a ``yield``
    can break: that raises ``RuntimeError`` at the exit.
    """

    def __init__(self, layout: FrameLayout) -> None:
        if type(layout) is not FrameLayout:
            raise TypeError(
                f"frame_layout: layout must be a ffn_kernels.FrameLayout, got {type(layout).__name__}"
            )
        self.layout = layout
        self._outer: list[FrameLayout | None] = []  # one entry per active entry of this object

    def __enter__(self) -> FrameLayout:
        self._outer.append(current_layout())
        _current.layout = self.layout
        return self.layout

    def __exit__(self, *exc) -> None:
        if current_layout() is not self.layout:
            raise RuntimeError(
                "frame_layout blocks exited out of order (one was held open across an await or a "
                "yield?): the layout in effect is not the one this block set"
            )
        _current.layout = self._outer.pop()
