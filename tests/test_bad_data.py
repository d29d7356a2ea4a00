"""Bad data: list files, frames and videos that are FIFOs, devices or folders, list numbers that are not
plain decimals, `#` in list files, 16- and 32-bit frames, decompression bombs, hung decodes and
data settings out of range. Each is refused with one line naming the file (and line) or the video:
:class:`~ffn.config.UserError` before any work, or :class:`~ffn.data.BadSampleError`, which
``--skip-bad`` counts; none hangs."""

import os
import signal
import time
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest

from ffn.cli import main
from ffn.config import UserError, load_config, max_workers
from ffn.data import (BadSampleError, EvalClips, EvalTransform, FrameFolderSource, Skipped, TrainClips,
                      TrainTransform, VideoFileSource, collate, read_list_file)
from ffn.data.timeout import time_limit


pytestmark = pytest.mark.usefixtures("no_hang")


def one_line(e: pytest.ExceptionInfo, *names) -> str:
    message = str(e.value)
    assert "\n" not in message and all(str(n) in message for n in names), message
    return message


def frames_folder(root: Path, name: str = "v0", n: int = 4, value: int = 100) -> Path:
    from PIL import Image

    folder = root / name
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(folder / f"{i + 1:05d}.png")
    return folder


# --- files that are no regular file --------------------------------------------------------------

def special(kind: str, path: Path) -> str:
    """Make ``path`` a FIFO, a link to /dev/zero or a folder; the words the error says."""
    if kind == "fifo":
        os.mkfifo(path)
        return "is a FIFO, not a regular file"
    if kind == "device":
        path.symlink_to("/dev/zero")
        return "is a character device, not a regular file"
    path.mkdir()
    return "is a directory"


KINDS = ["fifo", "device", "folder"]


@pytest.mark.parametrize("kind", KINDS)
def test_list_file_that_is_no_regular_file(tmp_path, kind):
    path = tmp_path / "list.txt"
    words = special(kind, path)
    with pytest.raises(UserError) as e:
        read_list_file(path)
    assert one_line(e, path, words).startswith("list file")


@pytest.mark.parametrize("kind", KINDS)
def test_frame_that_is_no_regular_file_is_a_bad_sample(tmp_path, kind):
    frames_folder(tmp_path)
    (tmp_path / "v0" / "00002.png").unlink()
    words = special(kind, tmp_path / "v0" / "00002.png")
    (tmp_path / "list.txt").write_text("v0 4 1\n")
    src = FrameFolderSource(tmp_path / "list.txt", tmp_path, "{:05d}.png")
    with pytest.raises(BadSampleError) as e:
        src.read(0, [0, 1])
    one_line(e, tmp_path / "v0", "00002.png", words)
    skipped = EvalClips(src, 4, EvalTransform(8, 8), skip_bad=True)[0]
    assert isinstance(skipped, Skipped) and words in skipped.reason


@pytest.mark.parametrize("kind", KINDS)
def test_video_that_is_no_regular_file_is_a_bad_sample(tmp_path, kind):
    words = special(kind, tmp_path / "clip.mp4")
    (tmp_path / "list.txt").write_text("clip.mp4 1\n")
    src = VideoFileSource(tmp_path / "list.txt", tmp_path)
    for read in (lambda: src.num_frames(0), lambda: src.read(0, [0])):
        with pytest.raises(BadSampleError) as e:
            read()
        one_line(e, tmp_path / "clip.mp4", words)


@pytest.mark.parametrize("key", ["data.train_list", "data.val_list"])
def test_dev_zero_as_a_list_is_refused_before_training(tmp_path, key):
    out = tmp_path / "run"
    err = StringIO()
    with redirect_stderr(err), redirect_stdout(StringIO()):
        code = main(["train", "data.kind=video", "data.num_classes=2", "data.train_list=/dev/zero",
                     "data.val_list=/dev/zero", f"{key}=/dev/zero", "data.workers=0", "--out", str(out)])
    (line,) = err.getvalue().splitlines()
    assert code == 2 and "list file /dev/zero is a character device" in line and "data.train_list" in line
    assert not out.exists()


# --- list files: numbers and comments ------------------------------------------------------------

BAD_NUMBERS = ["1_0", "\u0661", "+3", "3.0", "-1", "0x3", "\uff13", "1e2", "3\u00b2", "1" * 19]


@pytest.mark.parametrize("text", BAD_NUMBERS, ids=[ascii(t) for t in BAD_NUMBERS])
def test_labels_are_plain_decimal_ascii(tmp_path, text):
    path = tmp_path / "l.txt"
    path.write_text(f"ok 4 0\nv {4} {text}\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_list_file(path)
    assert f"l.txt:2: label must be a decimal integer" in one_line(e, path)
    path.write_text(f"v {text}\n", encoding="utf-8")  # a video list without the frames column
    with pytest.raises(UserError, match=r"l.txt:1: label must"):
        read_list_file(path, frames_column=False)


@pytest.mark.parametrize("text", ["1_0", "+4", "\u0664", "4.0"], ids=ascii)
def test_frame_counts_are_plain_decimal_ascii(tmp_path, text):
    path = tmp_path / "l.txt"
    path.write_text(f"v {text} 1\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_list_file(path)
    assert "l.txt:1: num_frames must be a decimal integer" in one_line(e, path)


def test_a_hash_starts_a_comment_only_as_a_lines_first_character(tmp_path):
    """``#`` first (after blanks) makes a comment line; ``./#name`` lists a video named ``#name``;
    a ``#`` elsewhere is part of the path (there are no end-of-line comments)."""
    path = tmp_path / "l.txt"
    path.write_text("#clip 4 1\n   # a comment\n./#clip 4 1\nv#2 4 0\nv 3 4 0 # not a comment\n")
    with pytest.raises(UserError, match=r"l.txt:5: num_frames must be a decimal integer .*got 'a'"):
        read_list_file(path, root="/r")
    path.write_text("#clip 4 1\n   # a comment\n./#clip 4 1\nv#2 4 0\n")
    assert [(r.path, r.label) for r in read_list_file(path, root="/r")] == [("/r/#clip", 1), ("/r/v#2", 0)]
    frames_folder(tmp_path, "#clip")
    src = FrameFolderSource(path, tmp_path, "{:05d}.png")
    assert src.read(0, [0, 3]).shape == (2, 8, 8, 3)


# --- frames: bit depth, bombs --------------------------------------------------------------------

@pytest.mark.parametrize("mode,dtype", [("I;16", "<u2"), ("I;16B", ">u2")])
def test_16_bit_frames_keep_their_high_byte(tmp_path, mode, dtype):
    from PIL import Image

    folder = tmp_path / "v0"
    folder.mkdir()
    values = (np.arange(64).reshape(8, 8) * 1000 + 500).astype(dtype)  # 500 .. 63500
    img = Image.frombuffer(mode, (8, 8), values.tobytes(), "raw", mode, 0, 1)
    img.save(folder / "00001.png" if mode == "I;16" else folder / "00001.tif")
    name = "{:05d}.png" if mode == "I;16" else "{:05d}.tif"
    (tmp_path / "list.txt").write_text("v0 1 0\n")
    (frame,) = FrameFolderSource(tmp_path / "list.txt", tmp_path, name).read(0, [0])
    np.testing.assert_array_equal(frame, np.repeat((values.astype(np.uint16) >> 8)[..., None], 3, 2))
    assert (frame == 255).mean() < 0.05  # PIL's convert("RGB") gave 98% of 255


@pytest.mark.parametrize("dtype,mode", [(np.int32, "I"), (np.float32, "F")])
def test_32_bit_frames_are_refused(tmp_path, dtype, mode):
    from PIL import Image

    folder = tmp_path / "v0"
    folder.mkdir()
    Image.fromarray(np.full((8, 8), 70000, dtype)).save(folder / "00001.tif")
    (tmp_path / "list.txt").write_text("v0 1 0\n")
    with pytest.raises(BadSampleError) as e:
        FrameFolderSource(tmp_path / "list.txt", tmp_path, "{:05d}.tif").read(0, [0])
    one_line(e, "00001.tif", f"(mode {mode})")


def test_a_decompression_bomb_is_a_bad_sample_that_skip_bad_counts(tmp_path, monkeypatch):
    from PIL import Image

    frames_folder(tmp_path, "small", value=10)
    frames_folder(tmp_path, "bomb")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "bomb" / "00003.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 8x8 passes; 40x40 is over twice the limit
    (tmp_path / "list.txt").write_text("small 4 0\nbomb 4 1\n")
    src = FrameFolderSource(tmp_path / "list.txt", tmp_path, "{:05d}.png")
    with pytest.raises(BadSampleError) as e:
        src.read(1, [0, 2])
    one_line(e, tmp_path / "bomb", "00003.png", "decompression bomb")
    clips = TrainClips(src, [4], TrainTransform(8), skip_bad=True)
    batch = collate([clips[0], clips[1]])
    assert len(batch) == 1 and [s.index for s in batch.skipped] == [1]


# --- hung decodes ---------------------------------------------------------------------------------

class Hanging(FrameFolderSource):
    """Frame folders whose video 1 never finishes decoding."""

    def read(self, i, indices):
        while i == 1:
            time.sleep(0.01)
        return super().read(i, indices)


@pytest.fixture
def hanging(tmp_path) -> Hanging:
    frames_folder(tmp_path, "fine")
    frames_folder(tmp_path, "stuck")
    (tmp_path / "list.txt").write_text("fine 4 0\nstuck 4 1\n")
    return Hanging(tmp_path / "list.txt", tmp_path, "{:05d}.png")


@pytest.mark.parametrize("skip_bad", [False, True])
def test_a_hung_decode_times_out_as_a_bad_sample(hanging, skip_bad):
    clips = EvalClips(hanging, 4, EvalTransform(8, 8), skip_bad=skip_bad, decode_timeout=0.2)
    assert clips[0][0].shape == (1, 4, 3, 8, 8)  # a video read in time is unaffected
    start = time.monotonic()
    if skip_bad:
        item = clips[1]
        assert isinstance(item, Skipped) and "stuck: not read within data.decode_timeout=0.2 s" in item.reason
    else:
        with pytest.raises(BadSampleError) as e:
            clips[1]
        one_line(e, "stuck", "data.decode_timeout=0.2")
    assert time.monotonic() - start < 5
    assert 10 < signal.getitimer(signal.ITIMER_REAL)[0] <= 20  # the test's own alarm is still set


def test_a_hung_decode_in_a_dataloader_worker_is_skipped_and_counted(hanging):
    from torch.utils.data import DataLoader

    clips = TrainClips(hanging, [2], TrainTransform(8), skip_bad=True, decode_timeout=0.5)
    (batch,) = DataLoader(clips, batch_size=2, num_workers=1, collate_fn=collate)
    assert len(batch) == 1 and [s.index for s in batch.skipped] == [1]
    assert "data.decode_timeout" in batch.skipped[0].reason


def test_an_outer_timer_that_fires_first_is_left_alone():
    signal.setitimer(signal.ITIMER_REAL, 0.1)
    with pytest.raises(TimeoutError, match="hung"):  # the test's handler, not a BadSampleError
        with time_limit(5, "video v"):
            time.sleep(1)


# --- data settings -------------------------------------------------------------------------------

@pytest.mark.parametrize("override,key", [
    (f"data.workers={10**6}", "data.workers"), ("data.workers=-1", "data.workers"),
    ("data.decode_timeout=-1", "data.decode_timeout"), ("data.decode_timeout=nan", "data.decode_timeout"),
])
def test_data_settings_out_of_range_are_refused(override, key):
    with pytest.raises(UserError) as e:
        load_config(overrides=[override])
    assert one_line(e, key).startswith(f"config {key}")
    assert max_workers() >= 8


def test_train_with_skip_bad_counts_a_fifo_frame_and_a_bomb(tmp_path, monkeypatch):
    """End to end: both bad videos are skipped and counted, the run completes; without --skip-bad the
    run stops with one line naming the first and leaves no checkpoint."""
    from PIL import Image

    for v in range(4):
        frames_folder(tmp_path / "frames", f"v{v}", value=40 * v)
    (tmp_path / "frames" / "v1" / "00002.png").unlink()
    os.mkfifo(tmp_path / "frames" / "v1" / "00002.png")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "frames" / "v2" / "00001.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    (tmp_path / "list.txt").write_text("".join(f"v{v} 4 {v % 2}\n" for v in range(4)))
    args = ["data.kind=frames", f"data.root={tmp_path / 'frames'}", f"data.train_list={tmp_path / 'list.txt'}",
            f"data.val_list={tmp_path / 'list.txt'}", "data.template={:05d}.png", "data.num_classes=2",
            "data.size=8", "data.scale_size=8", "data.batch_size=4", "data.workers=0", "model.frames=[4]",
            "model.width=8", "train.epochs=1", "train.progress=false"]
    err = StringIO()
    with redirect_stderr(err), redirect_stdout(StringIO()):
        code = main(["train", *args, "--out", str(tmp_path / "strict")])
    lines = [line for line in err.getvalue().splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err.getvalue()
    assert "(00002.png) is a FIFO" in lines[0] or "(00001.png): too large" in lines[0], lines[0]
    assert not (tmp_path / "strict" / "last.pt").exists()
    with redirect_stderr(StringIO()), redirect_stdout(StringIO()):
        assert main(["train", *args, "--out", str(tmp_path / "lenient"), "--skip-bad"]) == 0
    import csv

    with open(tmp_path / "lenient" / "log.csv") as f:
        (row,) = csv.DictReader(f)
    assert int(row["skipped"]) == 2 and int(row["val_skipped"]) == 2
