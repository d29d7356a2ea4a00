"""Video files decoded with PyAV."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .records import BadSampleError, VideoRecord, read_list_file


class VideoFileSource:
    """Video files listed as ``path label`` or ``path num_frames label`` lines.

    Without a frame count the container's is used (counted by decoding when the header has none).
    Frames are decoded in order from the start, which suits the short clips of action datasets.
    """

    def __init__(self, list_file: str | Path, root: str | Path = "", frames_column: bool = False,
                 num_classes: int = 0) -> None:
        self.records = read_list_file(list_file, root, frames_column=frames_column, num_classes=num_classes)
        self._counts: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.records)

    def record(self, i: int) -> VideoRecord:
        return self.records[i]

    def num_frames(self, i: int) -> int:
        if self.records[i].num_frames:
            return self.records[i].num_frames
        if i not in self._counts:
            with self._open(i) as container:
                stream = container.streams.video[0]
                count = stream.frames or sum(1 for _ in self._decode(i, container))
            if count < 1:
                raise BadSampleError(f"video {self.records[i].path}: no frames")
            self._counts[i] = count
        return self._counts[i]

    def read(self, i: int, indices: Sequence[int]) -> np.ndarray:
        """Frames ``indices`` (sorted, unique) of video ``i`` as uint8 ``[F, H, W, 3]``."""
        wanted, frames, decoded = set(indices), [], 0
        with self._open(i) as container:
            for frame in self._decode(i, container):
                if decoded in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    if len(frames) == len(wanted):
                        return np.stack(frames)
                decoded += 1
        raise BadSampleError(
            f"video {self.records[i].path}: ended after {decoded} frames, frame {max(indices)} requested"
        )

    def _open(self, i: int):
        import av

        path = self.records[i].path
        try:
            return av.open(path)
        except (OSError, av.FFmpegError) as e:
            raise BadSampleError(f"video {path}: cannot open: {e}") from e

    def _decode(self, i: int, container):
        import av

        try:
            if not container.streams.video:
                raise BadSampleError(f"video {self.records[i].path}: no video stream")
            yield from container.decode(video=0)
        except (OSError, av.FFmpegError) as e:
            raise BadSampleError(f"video {self.records[i].path}: cannot decode: {e}") from e
