"""Video list files in the TSM format and the error raised for unreadable samples."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..config import UserError, read_user_text


DECIMAL = re.compile(r"[0-9]{1,18}")  # a number of a list file: ASCII digits, within int64


class BadSampleError(RuntimeError):
    """A video or one of its frames is missing or cannot be decoded."""


@dataclass(frozen=True)
class VideoRecord:
    """One line of a list file: where the video is, how many frames it has (0 = ask the file)."""

    path: str
    num_frames: int
    label: int


def read_list_file(list_file: str | Path, root: str | Path = "", frames_column: bool = True,
                   num_classes: int = 0) -> list[VideoRecord]:
    """Parse ``path num_frames label`` lines (``path label`` where ``frames_column`` is False).

    ``path`` is taken relative to ``root``. Paths may contain spaces: the numbers are read from the
    end of the line, and are plain decimal ASCII digits (``int`` would also take ``1_0``, ``+3``
    or ``١``). Blank lines and lines whose first non-blank character is ``#`` are skipped: a video
    whose name starts with ``#`` is listed as ``./#name``; a ``#`` anywhere else is part of the
    path. A UTF-8 BOM is ignored. A missing, non-regular or non-text file, malformed lines and
    labels outside ``[0, num_classes)`` (where ``num_classes`` is given) raise
    :class:`~ffn.config.UserError` (a ``ValueError``) naming the file and line.
    """
    fields = 3 if frames_column else 2
    names = ("num_frames", "label") if frames_column else ("label",)
    text = read_user_text(list_file, "list file")
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.rsplit(maxsplit=fields - 1)
        if len(parts) != fields:
            want = "path num_frames label" if frames_column else "path label"
            raise UserError(f"{list_file}:{lineno}: expected '{want}', got {line!r}")
        for name, part in zip(names, parts[1:]):
            if not DECIMAL.fullmatch(part):
                raise UserError(f"{list_file}:{lineno}: {name} must be a decimal integer (at most 18 digits 0-9), "
                                f"got {part!r} in {line!r}")
        numbers = [int(p) for p in parts[1:]]
        num_frames, label = numbers if frames_column else (0, numbers[0])
        if frames_column and num_frames < 1:
            raise UserError(f"{list_file}:{lineno}: num_frames must be >= 1, got {num_frames}")
        if num_classes and label >= num_classes:
            raise UserError(f"{list_file}:{lineno}: label {label} is out of range for "
                            f"data.num_classes={num_classes} (labels are 0..{num_classes - 1})")
        records.append(VideoRecord(str(Path(root) / parts[0]), num_frames, label))
    if not records:
        raise UserError(f"{list_file}: no videos listed")
    return records
