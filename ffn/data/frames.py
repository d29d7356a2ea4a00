"""Videos stored as folders of image files (the TSM / TSN layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .records import BadSampleError, VideoRecord, read_list_file


class FrameFolderSource:
    """Frame folders listed in a TSM list file (``path num_frames label``).

    Frame ``i`` (0-based) of a video is the file ``template.format(i + start_index)`` in its folder,
    e.g. ``img_{:05d}.jpg`` with ``start_index=1`` gives ``img_00001.jpg`` first.
    """

    def __init__(self, list_file: str | Path, root: str | Path = "", template: str = "img_{:05d}.jpg",
                 start_index: int = 1, num_classes: int = 0) -> None:
        self.records = read_list_file(list_file, root, num_classes=num_classes)
        self.template, self.start_index = template, start_index
        template.format(start_index)  # fail here, not in a worker, on a malformed template

    def __len__(self) -> int:
        return len(self.records)

    def record(self, i: int) -> VideoRecord:
        return self.records[i]

    def num_frames(self, i: int) -> int:
        return self.records[i].num_frames

    def read(self, i: int, indices: Sequence[int]) -> np.ndarray:
        """Frames ``indices`` (sorted, unique) of video ``i`` as uint8 ``[F, H, W, 3]``."""
        from PIL import Image, UnidentifiedImageError

        folder = Path(self.records[i].path)
        frames = []
        for idx in indices:
            path = folder / self.template.format(idx + self.start_index)
            try:
                with Image.open(path) as img:
                    frames.append(np.asarray(img.convert("RGB")))
            except (OSError, UnidentifiedImageError, ValueError) as e:
                raise BadSampleError(f"video {folder}: frame {idx} ({path.name}): {e}") from e
        if len({f.shape for f in frames}) > 1:
            raise BadSampleError(f"video {folder}: frames differ in size: {sorted({f.shape for f in frames})}")
        return np.stack(frames)
