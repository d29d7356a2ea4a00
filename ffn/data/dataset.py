"""Datasets of clips for training (one clip per branch) and evaluation (views of one frame count),
and the collate function that drops and counts unreadable videos when asked to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .records import BadSampleError, VideoRecord
from .sampling import eval_indices, train_indices
from .timeout import time_limit
from .transforms import EvalTransform, TrainTransform


class Source(Protocol):
    """Where videos come from: frame folders, video files or the synthetic generator."""

    def __len__(self) -> int: ...
    def record(self, i: int) -> VideoRecord: ...
    def num_frames(self, i: int) -> int: ...
    def read(self, i: int, indices: Sequence[int]) -> np.ndarray: ...


@dataclass(frozen=True)
class Skipped:
    """Stands in for a video that could not be read (only with ``skip_bad``)."""

    index: int
    reason: str


def _read(source: Source, i: int, index_lists: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Decode the union of ``index_lists`` once; return the frames and each list's rows in them."""
    unique, inverse = np.unique(np.concatenate(index_lists), return_inverse=True)
    frames = source.read(i, unique.tolist())
    if len(frames) != len(unique):
        raise BadSampleError(f"video {source.record(i).path}: read {len(frames)} frames, wanted {len(unique)}")
    rows = np.split(inverse, np.cumsum([len(ix) for ix in index_lists])[:-1])
    return frames, rows


class _Clips(Dataset):
    def __init__(self, source: Source, skip_bad: bool, decode_timeout: float) -> None:
        self.source, self.skip_bad, self.decode_timeout = source, skip_bad, decode_timeout

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        record = self.source.record(i)
        try:
            with time_limit(self.decode_timeout, f"video {record.path}"):
                return self._load(i), record.label
        except BadSampleError as e:
            if not self.skip_bad:
                raise
            return Skipped(i, str(e))

    def _load(self, i: int):
        raise NotImplementedError


class TrainClips(_Clips):
    """Item ``i``: ``([clip_b for each branch], label)``, ``clip_b`` float ``[frames[b], 3, size, size]``.

    The randomness of item ``i`` depends only on ``(seed, epoch, i)`` (call :meth:`set_epoch`), so a
    resumed or distributed run sees exactly the clips an uninterrupted one does. An item that takes
    longer than ``decode_timeout`` seconds (0: no limit) raises :class:`BadSampleError` (as do
    :class:`EvalClips`'), and with ``skip_bad`` is skipped.
    """

    def __init__(self, source: Source, frames: Sequence[int], transform: TrainTransform,
                 nested: bool = False, seed: int = 0, skip_bad: bool = False, decode_timeout: float = 0) -> None:
        super().__init__(source, skip_bad, decode_timeout)
        self.frames, self.transform, self.nested = tuple(frames), transform, nested
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _load(self, i: int) -> list[Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        index_lists = train_indices(self.source.num_frames(i), self.frames, rng, self.nested)
        frames, rows = _read(self.source, i, index_lists)
        x = self.transform(frames, rng)  # one crop for all branches
        return [x[torch.from_numpy(r)] for r in rows]


class EvalClips(_Clips):
    """Item ``i``: ``(views, label)``, ``views`` float ``[V, frames, 3, size, size]`` with
    ``V = (2 if twice else 1) * transform.crops`` (sampling views outer, crops inner)."""

    def __init__(self, source: Source, frames: int, transform: EvalTransform, twice: bool = False,
                 skip_bad: bool = False, decode_timeout: float = 0) -> None:
        super().__init__(source, skip_bad, decode_timeout)
        self.frames, self.transform, self.twice = frames, transform, twice

    def _load(self, i: int) -> Tensor:
        index_lists = eval_indices(self.source.num_frames(i), self.frames, self.twice)
        frames, rows = _read(self.source, i, index_lists)
        x = self.transform(frames)  # [crops, F, 3, s, s]
        return torch.cat([x[:, torch.from_numpy(r)] for r in rows])


@dataclass
class Batch:
    """Collated clips (a list per branch ``[N, T_b, 3, H, W]`` for training, ``[N, V, T, 3, H, W]``
    for evaluation), labels ``[N]`` and the videos skipped from this batch."""

    clips: list[Tensor] | Tensor | None
    labels: Tensor
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":  # called by DataLoader(pin_memory=True)
        return self._map(Tensor.pin_memory)

    def _map(self, fn) -> "Batch":
        clips = self.clips
        if isinstance(clips, list):
            clips = [fn(c) for c in clips]
        elif clips is not None:
            clips = fn(clips)
        return Batch(clips, fn(self.labels), self.skipped)


def collate(items: list) -> Batch:
    """Stack the readable items; count the :class:`Skipped` ones (the batch may end up empty)."""
    skipped = [it for it in items if isinstance(it, Skipped)]
    good = [it for it in items if not isinstance(it, Skipped)]
    labels = torch.tensor([label for _, label in good], dtype=torch.long)
    if not good:
        return Batch(None, labels, skipped)
    first = good[0][0]
    if isinstance(first, list):
        clips = [torch.stack([clip[b] for clip, _ in good]) for b in range(len(first))]
    else:
        clips = torch.stack([clip for clip, _ in good])
    return Batch(clips, labels, skipped)
