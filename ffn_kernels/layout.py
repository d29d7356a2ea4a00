"""The packed multi-branch frame layout (docs/design.md §2).

Every branch of a batch lives in one tensor ``[N*(T_0+...+T_{S-1}), C, H, W]``: segment ``s`` holds
the ``N`` clips of branch ``s`` (clip-major, frame-minor) and uses row ``rows[s]`` of every
per-branch parameter. A :class:`FrameLayout` describes that packing with plain Python ints, so ops
derive their offsets without touching the device. Under ``torch.compile`` / ``torch.export`` with
dynamic shapes, ``clips`` and ``frames`` may be ``torch.SymInt`` (taken from the input's shape);
``rows`` are always ints.
"""

from __future__ import annotations

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
        if not _is_int(self.clips, symbolic=True):
            raise ValueError(f"FrameLayout: clips must be a positive int, got {self.clips!r}")
        _require(self.clips >= 1,
                 lambda: f"FrameLayout: clips must be a positive int, got {self.clips!r}")
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


def _is_int(value, symbolic: bool = False) -> bool:
    """An int (not a bool), or with ``symbolic`` also a ``torch.SymInt`` (a size under tracing)."""
    kinds = (int, torch.SymInt) if symbolic else int
    return isinstance(value, kinds) and not isinstance(value, bool)


def _int_tuple(name: str, value: Sequence[int], symbolic: bool = False) -> tuple[int, ...]:
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"FrameLayout: {name} must be a sequence of ints, got {value!r}") from None
    for v in items:
        if not _is_int(v, symbolic):
            raise TypeError(f"FrameLayout: {name} must hold ints, got {v!r} in {items}")
    return items
