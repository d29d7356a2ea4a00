"""Videos stored as folders of image files (the TSM / TSN layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import file_problem
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
                problem = file_problem(path)  # a FIFO would block the open for ever
                if problem:
                    raise BadSampleError(f"video {folder}: frame {idx} ({path.name}) {problem}")
                with Image.open(path) as img:
                    frames.append(rgb8(img))
            except Image.DecompressionBombError as e:  # PIL's limit on pixels (Image.MAX_IMAGE_PIXELS)
                raise BadSampleError(f"video {folder}: frame {idx} ({path.name}): too large, a "
                                     f"decompression bomb? ({e})") from e
            except (OSError, UnidentifiedImageError, ValueError) as e:
                raise BadSampleError(f"video {folder}: frame {idx} ({path.name}): {e}") from e
        if len({f.shape for f in frames}) > 1:
            raise BadSampleError(f"video {folder}: frames differ in size: {sorted({f.shape for f in frames})}")
        return np.stack(frames)


def rgb8(img) -> np.ndarray:
    """``img`` as uint8 ``[H, W, 3]``. 16-bit grey (PIL's ``I;16`` modes) keeps its high byte, as PIL
    does for 16-bit colour (``convert`` would clip it at 255: a mostly white frame); 32-bit integer
    and float images (modes ``I``, ``F``) have no stated range and raise ``ValueError``."""
    if img.mode.startswith("I;16"):
        grey = (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode in ("I", "F"):
        raise ValueError(f"a 32-bit {'float' if img.mode == 'F' else 'integer'} image (mode {img.mode}) has "
                         "no 8-bit range: store frames as 8- or 16-bit images")
    return np.asarray(img.convert("RGB"))
