"""A synthetic video dataset rendered on the fly: shapes move at constant velocity, and the class is
either the direction they move in (``task="direction"``, staying inside the frame) or how fast
(``task="speed"``, bouncing off the edges).

Every frame is a pure function of ``(seed, video, frame)``, so any sampler, worker or process sees
the same pixels. A single frame says nothing about the class (start position, shape, colours and a
static distractor are random); only the change of position between frames does, so the model must
use time, and the step between sampled frames changes with the number of frames sampled. Speed
classes make that dependence explicit: the same video sampled at 4 instead of 16 frames moves about
five times as far per frame, which is the Temporal Frequency Deviation of the FFN paper in its
simplest form.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .records import VideoRecord

MIN_RADIUS, MAX_RADIUS = 0.12, 0.18  # of the frame size
TASKS = ("direction", "speed")
SPEED_JITTER = 0.85  # a speed class spans [0.85, 1] x its speed; classes are 2x apart


class SyntheticMotion:
    """``num_videos`` clips of ``num_frames`` frames, ``size`` x ``size`` pixels.

    ``task="direction"``: label ``c`` moves the shape towards angle ``2*pi*c/num_classes`` (jittered)
    across ``travel`` of the frame width, staying inside the frame. ``task="speed"``: the direction is
    random, the shape bounces off the edges, and label ``c`` moves it ``travel * 2**(c - num_classes +
    1)`` frame widths over the video (jittered down by up to 15%), so the classes' speeds are a factor
    of two apart and the fastest covers ``travel`` widths (which may exceed 1).
    """

    def __init__(self, num_videos: int, num_classes: int = 4, num_frames: int = 48, size: int = 40,
                 travel: float = 0.5, noise: float = 12.0, seed: int = 0, task: str = "direction",
                 movers: int = 1) -> None:
        if num_videos < 1 or num_classes < 2 or num_frames < 2 or size < 8:
            raise ValueError(
                f"SyntheticMotion: need num_videos >= 1, num_classes >= 2, num_frames >= 2, size >= 8; "
                f"got {num_videos}, {num_classes}, {num_frames}, {size}"
            )
        if movers < 1:
            raise ValueError(f"SyntheticMotion: movers must be >= 1, got {movers}")
        if task not in TASKS:
            raise ValueError(f"SyntheticMotion: task must be one of {TASKS}, got {task!r}")
        if task == "direction" and not 0 < travel <= 1 - 2 * MAX_RADIUS - 2 / size:
            raise ValueError(f"SyntheticMotion: travel must be in (0, {1 - 2 * MAX_RADIUS - 2 / size:.3f}] "
                             f"for the shape to stay inside a {size}-pixel frame, got {travel}")
        if travel <= 0:
            raise ValueError(f"SyntheticMotion: travel must be > 0, got {travel}")
        self.num_videos, self.num_classes, self.frames = num_videos, num_classes, num_frames
        self.size, self.travel, self.noise, self.seed, self.task = size, travel, noise, seed, task
        self.movers = movers

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
        s, label = self.size, self.record(i).label
        radius = rng.uniform(MIN_RADIUS, MAX_RADIUS) * s
        margin = radius + 1
        starts, steps = [], []
        for _ in range(self.movers):
            if self.task == "direction":  # the whole path stays inside the frame
                angle = 2 * math.pi * (label + rng.uniform(-0.15, 0.15)) / self.num_classes
                step = np.array([math.cos(angle), math.sin(angle)]) * self.travel * s
                starts.append(rng.uniform(np.maximum(margin, margin - step), np.minimum(s - margin, s - margin - step)))
            else:  # any direction, bouncing off the frame's edges
                angle = rng.uniform(0, 2 * math.pi)
                travel = self.travel * 2.0 ** (label - self.num_classes + 1) * rng.uniform(SPEED_JITTER, 1)
                step = np.array([math.cos(angle), math.sin(angle)]) * travel * s
                starts.append(rng.uniform(margin, s - margin, size=2))
            steps.append(step)
        square = rng.random() < 0.5
        # random colours, light shapes on a dark background: every video has a strong contrast of
        # the same sign, so motion shows as a change of similar size (learnt in a few epochs)
        background = rng.integers(0, 64, size=3)
        colour, distractor_colour = rng.integers(160, 256, size=(2, 3))
        distractor = rng.uniform(margin, s - margin, size=2)

        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
        static = _shape(xx, yy, distractor, radius, not square)
        out = np.empty((len(indices), s, s, 3), dtype=np.uint8)
        for k, t in enumerate(indices):
            frame = np.broadcast_to(background.astype(np.float32), (s, s, 3)).copy()
            frame[static] = distractor_colour
            for start, step in zip(starts, steps):
                centre = _bounce(start + step * t / (self.frames - 1), margin, s - margin)
                frame[_shape(xx, yy, centre, radius, square)] = colour
            frame += np.random.default_rng([self.seed, i, t]).normal(0, self.noise, (s, s, 1))
            out[k] = np.clip(frame, 0, 255)
        return out


def _bounce(p: np.ndarray, low: float, high: float) -> np.ndarray:
    """``p`` reflected into ``[low, high]`` as often as it takes (a ball bouncing off walls)."""
    q = np.mod(p - low, 2 * (high - low))
    return low + np.minimum(q, 2 * (high - low) - q)


def _shape(xx: np.ndarray, yy: np.ndarray, centre: np.ndarray, radius: float, square: bool) -> np.ndarray:
    dx, dy = xx - centre[0], yy - centre[1]
    if square:
        return np.maximum(abs(dx), abs(dy)) <= radius
    return dx * dx + dy * dy <= radius * radius
