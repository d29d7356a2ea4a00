"""Video files decoded with PyAV."""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import file_problem
from .records import BadSampleError, VideoRecord, read_list_file


class VideoFileSource:
    """Video files listed as ``path label`` or ``path num_frames label`` lines.

    Frame ``i`` of a video is the ``i``-th frame a decode from the start gives. Without a frame count
    the container's is used (counted by decoding when the header has none). :meth:`read` does not
    decode from the start: a pass over the packets (no decoding) says where each frame and keyframe
    is, then it seeks to the keyframe before the first wanted frame, and again wherever a keyframe
    lies between two wanted frames, and decodes forward, dropping the frames it was not asked for.
    It decodes from the start instead where the packets do not say exactly where the frames are
    (:func:`_frame_index`) or a seek lands anywhere but on a frame at or before the one wanted: the
    frames are bit for bit those of a decode from frame 0, and a video that cannot be read gives the
    same errors.
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
                stream = container.streams.video[0] if container.streams.video else None
                count = (stream and stream.frames) or sum(1 for _ in self._decode(i, container))
            if count < 1:
                raise BadSampleError(f"video {self.records[i].path}: no frames")
            self._counts[i] = count
        return self._counts[i]

    def read(self, i: int, indices: Sequence[int]) -> np.ndarray:
        """Frames ``sorted(set(indices))`` of video ``i`` as uint8 ``[F, H, W, 3]``."""
        wanted = sorted({int(x) for x in indices})
        if not wanted:
            raise ValueError("read: no frame indices given")
        with self._open(i) as container:
            frames = self._read_seeking(container, wanted)
        if frames is None:  # decode from the start; its errors are the ones to report
            with self._open(i) as container:
                frames = self._read_from_start(i, container, wanted)
        return frames

    def _read_seeking(self, container, wanted: list[int]) -> np.ndarray | None:
        """The frames, each run of them decoded from the keyframe before its first one (see
        :meth:`FrameIndex.runs`); None where that cannot be done exactly (the caller then decodes
        from the start)."""
        import av

        try:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            index = _frame_index(container, stream)
            if index is None or wanted[-1] >= len(index.pts):
                return None
            parts = []
            for key, run in index.runs(wanted):
                for target in index.seek_targets(key):
                    self._seek(container, stream, target)
                    frames = _decode_after_seek(container, stream, index, run)
                    if frames is not _MISSED:
                        break
                if frames is None or frames is _MISSED:
                    return None
                parts.append(frames)
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        except (OSError, av.FFmpegError):
            return None

    def _seek(self, container, stream, timestamp: int) -> None:
        container.seek(timestamp, stream=stream, backward=True, any_frame=False)

    def _read_from_start(self, i: int, container, wanted: list[int]) -> np.ndarray:
        want, frames, decoded = set(wanted), [], 0
        for frame in self._decode(i, container):
            if decoded in want:
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) == len(want):
                    return np.stack(frames)
            decoded += 1
        raise BadSampleError(
            f"video {self.records[i].path}: ended after {decoded} frames, frame {wanted[-1]} requested"
        )

    def _open(self, i: int):
        import av

        path = self.records[i].path
        problem = file_problem(path)  # FFmpeg would wait on a FIFO for ever, and read a device without end
        if problem:
            raise BadSampleError(f"video {path} {problem}")
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


_MISSED = object()  # the seek landed after the first wanted frame (or at the end)


def _decode_after_seek(container, stream, index: "FrameIndex", wanted: list[int]):
    """Decode on from where a seek landed: the frames ``wanted``; :data:`_MISSED` where the first
    frame is after ``wanted[0]`` or there is none; None where a frame is not the one the index says
    comes next."""
    want, frames, rank = set(wanted), [], -1
    for frame in container.decode(stream):
        if rank < 0:  # where the seek landed
            rank = index.rank.get(frame.pts, -1)
            if rank < 0:
                return None
            if rank > wanted[0]:
                return _MISSED
        else:
            rank += 1
            if rank >= len(index.pts) or frame.pts != index.pts[rank]:
                return None
        if rank in want:
            frames.append(frame.to_ndarray(format="rgb24"))
            if rank == wanted[-1]:
                return np.stack(frames)
    return _MISSED if rank < 0 else None


@dataclass(frozen=True)
class FrameIndex:
    """Where the frames of a video stream are, from its packets (in ``stream.time_base`` units)."""

    pts: list[int]  # of frame i, in presentation order
    rank: dict[int, int]  # pts -> i
    keyframes: list[int]  # their frame numbers, ascending
    key_dts: list[int | None]  # their dts

    def runs(self, wanted: list[int]) -> list[tuple[int, list[int]]]:
        """``wanted`` (sorted) split into runs, each ``(k, frames)`` to be decoded from the ``k``-th
        keyframe on: a new run starts where a keyframe lies between two wanted frames, so that the
        frames between them are skipped rather than decoded."""
        runs: list[tuple[int, list[int]]] = []
        for w in wanted:
            k = bisect_right(self.keyframes, w) - 1
            if runs and self.keyframes[k] <= runs[-1][1][-1] + 1:
                runs[-1][1].append(w)  # no frame to skip: decode on
            else:
                runs.append((k, [w]))
        return runs

    def seek_targets(self, k: int) -> list[int]:
        """Timestamps to seek to for the ``k``-th keyframe: its pts, then its dts where that is lower
        (a demuxer that seeks by dts lands after the keyframe on its pts: MPEG-TS)."""
        pts, dts = self.pts[self.keyframes[k]], self.key_dts[k]
        return [pts] + ([dts] if dts is not None and dts < pts else [])


def _frame_index(container, stream) -> FrameIndex | None:
    """The frames of ``stream`` from a pass over its packets (no decoding), leaving ``container`` at
    its end. None where a decode from the start might not give one frame per packet in timestamp
    order: a packet without a timestamp, an empty or discarded one (edit lists), a first packet that
    is no keyframe or frames shown before it (the decoder drops those), two frames at one time."""
    pts, keyframes = [], []
    for packet in container.demux(stream):
        if packet.pts is None and packet.size == 0:
            continue  # the empty packets PyAV adds at the end to flush the decoder
        if packet.pts is None or packet.size == 0 or packet.is_discard or (not pts and not packet.is_keyframe):
            return None
        pts.append(packet.pts)
        if packet.is_keyframe:
            keyframes.append((packet.pts, packet.dts))
    if not pts or min(pts) != pts[0]:
        return None
    order = sorted(pts)
    rank = {p: r for r, p in enumerate(order)}
    if len(rank) != len(order):
        return None
    keyframes.sort()
    return FrameIndex(order, rank, [rank[p] for p, _ in keyframes], [d for _, d in keyframes])
