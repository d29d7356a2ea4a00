"""TSN segment sampling: which frames of a video each branch sees.

A clip of ``T`` frames splits the video into ``T`` equal segments and takes one frame from each,
``floor((k + u_k) * num_frames / T)`` for segment ``k``: ``u_k`` uniform in [0, 1) for training,
0.5 (the centre) for evaluation, and 0 for the second view of twice-sampling. The same formula covers
videos shorter than the clip (frames then repeat, in order).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def segment_indices(num_frames: int, clip_frames: int, offsets: np.ndarray | float) -> np.ndarray:
    """Frame index per segment; ``offsets`` in [0, 1) is one value or one per segment."""
    if num_frames < 1 or clip_frames < 1:
        raise ValueError(f"need num_frames >= 1 and clip_frames >= 1, got {num_frames}, {clip_frames}")
    k = np.arange(clip_frames) + offsets
    return np.minimum((k * num_frames / clip_frames).astype(np.int64), num_frames - 1)


def train_indices(num_frames: int, frames: Sequence[int], rng: np.random.Generator,
                  nested: bool = False) -> list[np.ndarray]:
    """Random TSN indices for every branch.

    Independent (the paper): each branch samples its own frames. Nested: the largest branch
    samples, every other branch takes one random frame of it per segment, so a video decodes only
    ``max(frames)`` frames.
    """
    if not nested:
        return [segment_indices(num_frames, t, rng.random(t)) for t in frames]
    largest = max(frames)
    base = segment_indices(num_frames, largest, rng.random(largest))
    return [base[segment_indices(largest, t, rng.random(t))] for t in frames]


def eval_indices(num_frames: int, clip_frames: int, twice: bool = False) -> list[np.ndarray]:
    """Segment centres; with ``twice`` also the segment starts (TSM's twice-sampling), as a 2nd view."""
    views = [segment_indices(num_frames, clip_frames, 0.5)]
    if twice:
        views.append(segment_indices(num_frames, clip_frames, 0.0))
    return views
