"""Data layer: list files, frame folders, video files, synthetic videos, sampling, transforms,
bad-sample handling."""

import numpy as np
import pytest
import torch

from ffn.data import (BadSampleError, EvalClips, EvalTransform, FrameFolderSource, Skipped,
                      SyntheticMotion, TrainClips, TrainTransform, VideoFileSource, collate,
                      eval_indices, read_list_file, segment_indices, train_indices)


def grey(value: int, h: int = 12, w: int = 16) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def frame_value(i: int) -> int:
    return 10 + 20 * i  # distinct flat grey per frame, robust to JPEG / MPEG-4 loss


def make_frame_folders(root, template="img_{:05d}.jpg", start_index=1, videos=((7, 0), (12, 1))):
    from PIL import Image

    lines = []
    for v, (n, label) in enumerate(videos):
        folder = root / f"video {v}"  # a space in the path: list lines are split from the right
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(grey(frame_value(i))).save(folder / template.format(i + start_index))
        lines.append(f"video {v} {n} {label}")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return root / "list.txt"


def make_video(path, n: int = 12):
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 16, 12, "yuv420p"
        for i in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(grey(frame_value(i)), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def assert_values(frames: np.ndarray, indices, tol=4):
    means = frames.reshape(len(frames), -1).mean(1)
    np.testing.assert_allclose(means, [frame_value(i) for i in indices], atol=tol)


# --- list files ----------------------------------------------------------------------------------

def test_list_file_parses_and_names_bad_lines(tmp_path):
    f = tmp_path / "l.txt"
    f.write_text("# comment\na/b 10 3\n\nc d 5 0\n")
    recs = read_list_file(f, root="/data")
    assert [(r.path, r.num_frames, r.label) for r in recs] == [("/data/a/b", 10, 3), ("/data/c d", 5, 0)]
    f.write_text("a 10 3\nb ten 1\n")
    with pytest.raises(ValueError, match=r"l.txt:2"):
        read_list_file(f)
    f.write_text("a 0 3\n")
    with pytest.raises(ValueError, match="num_frames"):
        read_list_file(f)
    f.write_text("a.mp4 2\n")
    assert read_list_file(f, frames_column=False)[0].label == 2


def test_list_file_checks_labels_encoding_and_existence(tmp_path):
    f = tmp_path / "l.txt"
    f.write_text("a 10 3\nb 10 4\n")
    assert len(read_list_file(f, num_classes=5)) == 2
    with pytest.raises(ValueError, match=r"l.txt:2: label 4 is out of range for data.num_classes=4"):
        read_list_file(f, num_classes=4)
    f.write_bytes("\ufeffa b 10 1\n".encode())  # a BOM was part of the first path
    assert read_list_file(f, root="/r")[0].path == "/r/a b"
    f.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(ValueError, match=r"l.txt: not a UTF-8 text file"):
        read_list_file(f)
    with pytest.raises(ValueError, match=r"list file .*none.txt does not exist"):
        read_list_file(tmp_path / "none.txt")


# --- frame folders -------------------------------------------------------------------------------

@pytest.mark.parametrize("template,start", [("img_{:05d}.jpg", 1), ("{:05d}.jpg", 1), ("{:06d}.jpg", 0)])
def test_frame_folders_read_the_requested_frames(tmp_path, template, start):
    src = FrameFolderSource(make_frame_folders(tmp_path, template, start), tmp_path, template, start)
    assert len(src) == 2 and src.num_frames(1) == 12 and src.record(1).label == 1
    frames = src.read(1, [0, 5, 11])
    assert frames.shape == (3, 12, 16, 3) and frames.dtype == np.uint8
    assert_values(frames, [0, 5, 11])


def test_missing_frame_raises_or_is_skipped_and_counted(tmp_path):
    lst = make_frame_folders(tmp_path)
    (tmp_path / "video 1" / "img_00004.jpg").unlink()
    src = FrameFolderSource(lst, tmp_path)
    with pytest.raises(BadSampleError, match=r"video 1.*frame 3 \(img_00004.jpg\)"):
        src.read(1, [3])
    strict = TrainClips(src, [4, 8], TrainTransform(8))
    strict[0]  # the intact video loads
    with pytest.raises(BadSampleError, match="img_00004.jpg"):
        strict[1]
    lenient = TrainClips(src, [4, 8], TrainTransform(8), skip_bad=True)
    item = lenient[1]
    assert isinstance(item, Skipped) and item.index == 1 and "img_00004.jpg" in item.reason
    batch = collate([lenient[0], lenient[1]])
    assert len(batch) == 1 and len(batch.skipped) == 1
    assert [tuple(c.shape) for c in batch.clips] == [(1, 4, 3, 8, 8), (1, 8, 3, 8, 8)]
    empty = collate([lenient[1]])
    assert len(empty) == 0 and empty.clips is None and len(empty.skipped) == 1


def test_corrupt_frame_raises(tmp_path):
    lst = make_frame_folders(tmp_path)
    (tmp_path / "video 0" / "img_00002.jpg").write_bytes(b"not a jpeg")
    src = FrameFolderSource(lst, tmp_path)
    with pytest.raises(BadSampleError, match="img_00002.jpg"):
        src.read(0, [0, 1])
    truncated = tmp_path / "video 1" / "img_00003.jpg"
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(BadSampleError, match="img_00003.jpg"):
        src.read(1, [2])


# --- video files ---------------------------------------------------------------------------------

def test_video_files_decode_frames_and_count_them(tmp_path):
    make_video(tmp_path / "a.mp4", 12)
    (tmp_path / "list.txt").write_text("a.mp4 3\n")
    src = VideoFileSource(tmp_path / "list.txt", tmp_path)
    assert src.num_frames(0) == 12 and src.record(0).label == 3
    frames = src.read(0, [0, 4, 11])
    assert frames.shape == (3, 12, 16, 3)
    assert_values(frames, [0, 4, 11], tol=6)
    with pytest.raises(BadSampleError, match="ended after 12 frames"):
        src.read(0, [3, 20])


def test_bad_videos_raise_or_are_skipped(tmp_path):
    make_video(tmp_path / "good.mp4", 8)
    (tmp_path / "bad.mp4").write_bytes(b"\x00garbage" * 50)
    (tmp_path / "list.txt").write_text("good.mp4 0\nbad.mp4 1\nmissing.mp4 1\n")
    src = VideoFileSource(tmp_path / "list.txt", tmp_path)
    for i, name in [(1, "bad.mp4"), (2, "missing.mp4")]:
        with pytest.raises(BadSampleError, match=name):
            src.read(i, [0])
    data = EvalClips(src, 4, EvalTransform(8, 8), skip_bad=True)
    batch = collate([data[i] for i in range(3)])
    assert len(batch) == 1 and batch.labels.tolist() == [0]
    assert sorted(s.index for s in batch.skipped) == [1, 2]


# --- synthetic videos ----------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_frame_addressable():
    a, b = SyntheticMotion(6, num_frames=20, size=24), SyntheticMotion(6, num_frames=20, size=24)
    full = a.read(2, list(range(20)))
    assert full.shape == (20, 24, 24, 3)
    np.testing.assert_array_equal(b.read(2, [3, 17]), full[[3, 17]])
    assert not np.array_equal(full[0], full[-1])  # the shape moves
    assert [a.record(i).label for i in range(6)] == [0, 1, 2, 3, 0, 1]
    assert not np.array_equal(SyntheticMotion(6, size=24, seed=1).read(2, [0]), a.read(2, [0]))


def test_synthetic_label_is_the_direction_of_motion():
    data = SyntheticMotion(8, num_classes=4, num_frames=16, size=32, noise=0.0)
    for i in range(8):
        first, last = data.read(i, [0, 15]).astype(np.int32)
        colours, counts = np.unique(first.reshape(-1, 3), axis=0, return_counts=True)
        background = colours[counts.argmax()]
        changed = (first != last).any(-1)  # the moving shape's old and new places, not the distractor
        start = np.argwhere(changed & (first != background).any(-1)).mean(0)
        end = np.argwhere(changed & (last != background).any(-1)).mean(0)
        dy, dx = end - start
        right, down, left, up = (0, 1), (1, 0), (0, -1), (-1, 0)
        expected = [right, down, left, up][data.record(i).label]
        assert (np.sign(dy) if abs(dy) > abs(dx) else 0, np.sign(dx) if abs(dx) > abs(dy) else 0) == expected


def test_synthetic_speed_classes_move_twice_as_far_per_frame():
    data = SyntheticMotion(30, num_classes=3, num_frames=48, size=32, travel=2.0, noise=0.0, task="speed")
    changed = {c: [] for c in range(3)}  # pixels changed from one frame to the next, per class
    for i in range(30):
        video = data.read(i, list(range(48))).astype(np.int32)
        changed[data.record(i).label].append((video[1:] != video[:-1]).any(-1).sum(axis=(1, 2)).mean())
    means = [np.mean(changed[c]) for c in range(3)]
    assert means[0] * 1.5 < means[1] and means[1] * 1.3 < means[2], means
    # three movers change about three times the pixels of one
    one, three = (SyntheticMotion(6, 3, 48, 32, 2.0, 0.0, task="speed", movers=m) for m in (1, 3))
    counts = [sum((v[0] != v[1]).any(-1).sum() for v in (d.read(i, [10, 11]) for i in range(6)))
              for d in (one, three)]
    assert counts[1] > 2 * counts[0], counts


def test_synthetic_bounce_reflects_into_the_frame():
    from ffn.data.synthetic import _bounce

    p = np.array([3.0, 10.0, 12.0, 25.0, -4.0, 41.0])
    np.testing.assert_allclose(_bounce(p, 2.0, 12.0), [3.0, 10.0, 12.0, 5.0, 8.0, 3.0])


def test_synthetic_refuses_bad_arguments():
    with pytest.raises(ValueError, match="task"):
        SyntheticMotion(4, task="colour")
    with pytest.raises(ValueError, match="travel"):
        SyntheticMotion(4, travel=2.0)  # a direction video's path must fit in the frame
    with pytest.raises(ValueError, match="travel"):
        SyntheticMotion(4, travel=0.0, task="speed")
    with pytest.raises(ValueError, match="movers"):
        SyntheticMotion(4, movers=0)


# --- sampling ------------------------------------------------------------------------------------

def test_train_indices_take_one_frame_per_segment():
    rng = np.random.default_rng(0)
    for num_frames, t in [(48, 16), (48, 4), (50, 8), (3, 8), (16, 16)]:
        for _ in range(20):
            ix = segment_indices(num_frames, t, rng.random(t))
            assert len(ix) == t and np.all(np.diff(ix) >= 0) and 0 <= ix.min() and ix.max() < num_frames
            lo = np.floor(np.arange(t) * num_frames / t)
            assert np.all(ix >= lo) and np.all(ix < np.maximum(lo + 1, np.arange(1, t + 1) * num_frames / t))


def test_eval_indices_are_segment_centres_and_twice_adds_starts():
    (centres,) = eval_indices(48, 16)
    assert centres.tolist() == list(range(1, 48, 3))
    centres, starts = eval_indices(48, 4, twice=True)
    assert centres.tolist() == [6, 18, 30, 42] and starts.tolist() == [0, 12, 24, 36]


def test_independent_and_nested_branch_sampling():
    rng = np.random.default_rng(0)
    indep = train_indices(48, [4, 8, 16], rng)
    assert [len(i) for i in indep] == [4, 8, 16]
    nested = [train_indices(48, [4, 8, 16], rng, nested=True) for _ in range(20)]
    for small4, small8, large in nested:
        assert set(small4) <= set(large) and set(small8) <= set(large) and len(set(large)) == 16
        assert np.all(np.diff(small4) > 0)
    # independent sampling usually needs frames outside the largest branch's set
    assert any(not set(a) <= set(c) for a, _, c in (train_indices(48, [4, 8, 16], rng) for _ in range(20)))


# --- datasets and transforms ---------------------------------------------------------------------

def test_train_clips_share_one_augmentation_and_are_seeded_by_epoch():
    src = SyntheticMotion(4, num_frames=32, size=40)
    data = TrainClips(src, [4, 8, 16], TrainTransform(24), nested=True, seed=3)
    clips = data[1][0]
    assert [tuple(c.shape) for c in clips] == [(4, 3, 24, 24), (8, 3, 24, 24), (16, 3, 24, 24)]
    # nested: every small-branch frame equals some large-branch frame, pixel for pixel (same crop)
    for c in clips[:2]:
        for frame in c:
            assert any(torch.equal(frame, g) for g in clips[2])
    again = data[1][0]
    assert all(torch.equal(a, b) for a, b in zip(clips, again))
    data.set_epoch(1)
    assert not torch.equal(data[1][0][2], clips[2])


def test_eval_clips_views_and_crops():
    src = SyntheticMotion(2, num_frames=32, size=40)
    views = EvalClips(src, 6, EvalTransform(24, 28, crops=3), twice=True)[0][0]
    assert views.shape == (6, 6, 3, 24, 24)
    single = EvalClips(src, 6, EvalTransform(24, 28))[0][0]
    assert single.shape == (1, 6, 3, 24, 24)


def test_transforms_shapes_and_flip():
    frames = np.random.default_rng(0).integers(0, 255, (5, 30, 40, 3), dtype=np.uint8)
    out = TrainTransform(16)(frames, np.random.default_rng(0))
    assert out.shape == (5, 3, 16, 16) and out.dtype == torch.float32
    tall = EvalTransform(16, 16, crops=3)(frames.transpose(0, 2, 1, 3).copy())
    assert tall.shape == (3, 5, 3, 16, 16)
    # no flip unless asked: a left-to-right ramp stays increasing
    ramp = np.broadcast_to(np.linspace(0, 255, 40, dtype=np.uint8)[None, None, :, None], (2, 30, 40, 3)).copy()
    for seed in range(10):
        x = TrainTransform(16, scales=(1.0,))(ramp, np.random.default_rng(seed))
        assert x[0, 0, 0, -1] > x[0, 0, 0, 0]
    flips = [TrainTransform(16, scales=(1.0,), flip=True)(ramp, np.random.default_rng(s))[0, 0, 0, -1] <
             TrainTransform(16, scales=(1.0,), flip=True)(ramp, np.random.default_rng(s))[0, 0, 0, 0]
             for s in range(10)]
    assert any(flips) and not all(flips)
