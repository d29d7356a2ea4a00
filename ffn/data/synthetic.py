"""A synthetic video dataset rendered on the fly: the class is the direction a shape moves in.

Every frame is a pure function of ``(seed, video, frame)``, so any sampler, worker or process sees
the same pixels. A single frame says nothing about the class (start position, shape, colours and a
static distractor are random); only the order of positions does, so the model must use time, and
the step between sampled frames changes with the number of frames sampled.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .records import VideoRecord

MIN_RADIUS, MAX_RADIUS = 0.12, 0.18  # of the frame size


class SyntheticMotion:
    """``num_videos`` clips of ``num_frames`` frames, ``size`` x ``size`` pixels; label ``c`` moves the
    shape towards angle ``2*pi*c/num_classes`` (jittered) across ``travel`` of the frame width."""

    def __init__(self, num_videos: int, num_classes: int = 4, num_frames: int = 48, size: int = 40,
                 travel: float = 0.5, noise: float = 12.0, seed: int = 0) -> None:
        if num_videos < 1 or num_classes < 2 or num_frames < 2 or size < 8:
            raise ValueError(
                f"SyntheticMotion: need num_videos >= 1, num_classes >= 2, num_frames >= 2, size >= 8; "
                f"got {num_videos}, {num_classes}, {num_frames}, {size}"
            )
        if not 0 < travel <= 1 - 2 * MAX_RADIUS - 2 / size:
            raise ValueError(f"SyntheticMotion: travel must be in (0, {1 - 2 * MAX_RADIUS - 2 / size:.3f}] "
                             f"for the shape to stay inside a {size}-pixel frame, got {travel}")
        self.num_videos, self.num_classes, self.frames = num_videos, num_classes, num_frames
        self.size, self.travel, self.noise, self.seed = size, travel, noise, seed

    def __len__(self) -> int:
        return self.num_videos

    def record(self, i: int) -> VideoRecord:
        return VideoRecord(f"synthetic/{self.seed}/{i}", self.frames, i % self.num_classes)

    def num_frames(self, i: int) -> int:
        return self.frames

    def read(self, i: int, indices: Sequence[int]) -> np.ndarray:
        """Frames ``indices`` of video ``i`` as uint8 ``[F, size, size, 3]``."""
        if not 0 <= i < self.num_videos:
            raise IndexError(f"video {i} out of range [0, {self.num_videos})")
        rng = np.random.default_rng([self.seed, i])
        s = self.size
        angle = 2 * math.pi * (self.record(i).label + rng.uniform(-0.15, 0.15)) / self.num_classes
        step = np.array([math.cos(angle), math.sin(angle)]) * self.travel * s
        radius = rng.uniform(MIN_RADIUS, MAX_RADIUS) * s
        margin = radius + 1
        low = np.maximum(margin, margin - step)  # the whole path stays inside the frame
        high = np.minimum(s - margin, s - margin - step)
        start = rng.uniform(low, high)
        square = rng.random() < 0.5
        background, colour, distractor_colour = rng.integers(0, 256, size=(3, 3))
        distractor = rng.uniform(margin, s - margin, size=2)

        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
        static = _shape(xx, yy, distractor, radius, not square)
        out = np.empty((len(indices), s, s, 3), dtype=np.uint8)
        for k, t in enumerate(indices):
            centre = start + step * t / (self.frames - 1)
            frame = np.broadcast_to(background.astype(np.float32), (s, s, 3)).copy()
            frame[static] = distractor_colour
            frame[_shape(xx, yy, centre, radius, square)] = colour
            frame += np.random.default_rng([self.seed, i, t]).normal(0, self.noise, (s, s, 1))
            out[k] = np.clip(frame, 0, 255)
        return out


def _shape(xx: np.ndarray, yy: np.ndarray, centre: np.ndarray, radius: float, square: bool) -> np.ndarray:
    dx, dy = xx - centre[0], yy - centre[1]
    if square:
        return np.maximum(abs(dx), abs(dy)) <= radius
    return dx * dx + dy * dy <= radius * radius
