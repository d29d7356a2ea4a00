"""Bad checkpoints, through every path that reads one (`--resume`, `ffn eval`, `model.pretrained`):
each is refused with one :class:`~ffn.engine.checkpoint.CheckpointError` line naming the file (exit
2, no traceback, none of torch's advice), and leaves the run folder as it was. A fuzz of truncations
and bit flips of a real checkpoint either loads the identical state or is refused so."""

import os
import random
import shutil
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch

from ffn.cli import main
from ffn.config import load_config
from ffn.engine import checkpoint, distributed
from ffn.engine.checkpoint import CheckpointError
from ffn.engine.trainer import Trainer, fit

# ResNet-18 of width 8 on 8x8 crops, one step: a run takes a few seconds
SMALL = [
    "data.synthetic.train_videos=4", "data.synthetic.val_videos=2", "data.synthetic.num_frames=4",
    "data.synthetic.frame_size=16", "data.size=8", "data.scale_size=8", "data.batch_size=2",
    "data.workers=0", "model.frames=[1,2]", "model.width=8", "model.dropout=0", "train.epochs=2",
    "train.max_steps=1", "train.progress=false",
]


pytestmark = pytest.mark.usefixtures("no_hang")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 1-epoch run of 2 (so it can be resumed): last.pt holds momentum buffers and a stepped schedule."""
    out = tmp_path_factory.mktemp("ck") / "run"
    fit(load_config(overrides=[*SMALL, f"train.out={out}", "train.epochs=1"]))
    return out


@pytest.fixture(scope="module")
def good(run) -> dict:
    return torch.load(run / "last.pt", weights_only=True)


def folder_bytes(folder: Path) -> dict:
    """What the folder holds: each regular file's bytes (a FIFO or folder is left unopened)."""
    return {p.name: p.read_bytes() if p.is_file() else p.stat().st_mode for p in sorted(folder.iterdir())}


def refused(argv: list[str], path: Path, expected: str) -> None:
    """``ffn ARGV`` exits 2 with one line ``ffn CMD: error: checkpoint PATH: ...EXPECTED...``."""
    err = StringIO()
    with redirect_stderr(err), redirect_stdout(StringIO()):
        code = main(argv)
    lines = err.getvalue().splitlines()
    assert code == 2 and len(lines) == 1, err.getvalue()
    assert lines[0].startswith(f"ffn {argv[0]}: error: checkpoint {path}"), lines[0]
    assert expected in lines[0] and "weights_only" not in lines[0], lines[0]


def resume_refused(tmp_path: Path, run: Path, write, expected: str) -> None:
    """``ffn train --out OUT --resume`` where OUT/last.pt is ``write(path)``'s: refused, OUT unchanged."""
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / "last.pt").unlink()
    write(out / "last.pt")
    before = folder_bytes(out)
    refused(["train", "--out", str(out), "--resume"], out / "last.pt", expected)
    assert folder_bytes(out) == before


def eval_refused(tmp_path: Path, write, expected: str) -> None:
    path = tmp_path / "bad.pt"
    write(path)
    refused(["eval", str(path), "--frames", "1..2", "--out", str(tmp_path / "eval")], path, expected)
    assert not (tmp_path / "eval").exists()


def saving(state) -> callable:
    return lambda path: torch.save(state, path)


def nan_at(key, value=float("nan")):
    def mutate(s):
        s["model"][key] = s["model"][key].clone().fill_(value)
    return mutate


def set_item(*keys, value):
    def mutate(s):
        node = s
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return mutate


def delete(*keys):
    def mutate(s):
        node = s
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]
    return mutate


def set_momentum(new):
    """The first parameter's momentum buffer replaced by ``new(buffer)``."""
    def mutate(s):
        entry = next(iter(s["optimizer"]["state"].values()))
        entry["momentum_buffer"] = new(entry["momentum_buffer"])
    return mutate


# (id, mutation of a good checkpoint's dict, what the error line says): refused by eval and resume
MODEL_CASES = [
    ("nan-weight", nan_at("fc.weight"), "model 'fc.weight' holds NaN or Inf"),
    ("inf-running-var", nan_at("bn1.running_var", float("inf")), "holds NaN or Inf"),
    ("no-model", delete("model"), "no model"),
    ("no-config", delete("config"), "no config"),
    ("config-list", set_item("config", value=[1, 2]), "its config is a list"),
    ("config-unknown-key", set_item("config", "model", "depth", value=3), "its config is not valid here"),
    ("config-bad-type", set_item("config", "model", "frames", value="1,2"), "model.frames"),
    ("model-list", set_item("model", value=[torch.zeros(2)]), "model is a list"),
    ("model-string-value", set_item("model", "fc.bias", value="zeros"), "'fc.bias' is a str"),
    ("model-sparse", set_item("model", "fc.bias", value=torch.zeros(2).to_sparse()), "not a dense tensor"),
    ("weight-missing", delete("model", "fc.bias"), "'fc.bias' is missing"),
    ("weight-extra", set_item("model", "fc.extra", value=torch.zeros(2)), "'fc.extra' is not in the model"),
    ("weight-shape", set_item("model", "fc.bias", value=torch.zeros(3)), "'fc.bias' is torch.float32 [3]"),
    ("weight-int", set_item("model", "fc.bias", value=torch.zeros(4, dtype=torch.long)), "'fc.bias' is torch.int64"),
    ("arch-recorded", set_item("config", "model", "arch", value="resnet34"), "is missing"),
    ("width-recorded", set_item("config", "model", "width", value=16), "the model's is"),
    ("classes-recorded", set_item("config", "data", "synthetic", "num_classes", value=5), "'fc.weight'"),
]

# refused by resume only (eval needs just the config and model)
RESUME_CASES = [
    ("epoch-str", set_item("epoch", value="1"), "epoch must be"),
    ("epoch-0", set_item("epoch", value=0), "epoch must be"),
    ("best-nan", set_item("best", value=float("nan")), "best must be a number"),
    ("no-rng", delete("rng"), "no rng"),
    ("no-optimizer-groups", delete("optimizer", "param_groups"), "optimizer has no 'param_groups'"),
    ("optimizer-groups-short", lambda s: s["optimizer"]["param_groups"].pop(), "optimizer.param_groups is a list of 3"),
    ("optimizer-lr-str", set_item("optimizer", "param_groups", 0, "lr", value="0.1"), "param_groups[0].lr"),
    ("optimizer-params-short", lambda s: s["optimizer"]["param_groups"][0]["params"].pop(), "params"),
    ("momentum-shape", set_momentum(lambda m: torch.zeros(3)), "momentum_buffer is [3]"),
    ("momentum-nan", set_momentum(lambda m: m / 0), "momentum_buffer holds NaN"),
    ("optimizer-state-index", lambda s: s["optimizer"]["state"].__setitem__(999, {}), "entry 999 for no parameter"),
    ("scheduler-none", set_item("scheduler", value=None), "scheduler is a NoneType"),
    ("scheduler-step-str", set_item("scheduler", "last_epoch", value="1"), "scheduler.last_epoch"),
    ("scheduler-lrs-short", lambda s: s["scheduler"]["base_lrs"].pop(), "scheduler.base_lrs"),
    ("rng-empty", set_item("rng", value=[]), "rng must be a non-empty list"),
    ("rng-short-state", set_item("rng", 0, "torch", value=torch.zeros(3, dtype=torch.uint8)), "rng[0].torch"),
    ("rng-float-state", lambda s: s["rng"][0].__setitem__("torch", s["rng"][0]["torch"].float()), "rng[0].torch"),
]


def tree_copy(x):
    """A copy of the dicts and lists of a checkpoint, sharing its tensors (mutations replace them)."""
    if isinstance(x, dict):
        return {k: tree_copy(v) for k, v in x.items()}
    return [tree_copy(v) for v in x] if isinstance(x, list) else x


def mutated(good: dict, mutate) -> dict:
    state = tree_copy(good)
    mutate(state)
    return state


@pytest.mark.parametrize("mutate,expected", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_eval_refuses(tmp_path, good, mutate, expected):
    eval_refused(tmp_path, saving(mutated(good, mutate)), expected)


@pytest.mark.parametrize("mutate,expected", [c[1:] for c in MODEL_CASES + RESUME_CASES],
                         ids=[c[0] for c in MODEL_CASES + RESUME_CASES])
def test_resume_refuses(tmp_path, run, good, mutate, expected):
    resume_refused(tmp_path, run, saving(mutated(good, mutate)), expected)


def fifo(path):
    os.mkfifo(path)


def symlink_to(target):
    return lambda path: path.symlink_to(target)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


# files that are no checkpoint at all
FILE_CASES = [
    ("fifo", fifo, "is a FIFO, not a regular file"),
    ("dev-zero", symlink_to("/dev/zero"), "is a character device, not a regular file"),
    ("directory", lambda p: p.mkdir(), "is a directory, not a regular file"),
    ("empty", lambda p: p.write_bytes(b""), "is empty"),
    ("text", lambda p: p.write_text("not a checkpoint\n"), "not a PyTorch checkpoint"),
    ("pickle-object", saving({"model": Evil()}), "objects other than tensors"),
    ("top-level-list", saving([1, 2]), "holds a list, not a dict"),
    ("top-level-tensor", saving(torch.zeros(2)), "holds a Tensor, not a dict"),
]


@pytest.mark.parametrize("write,expected", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_files_that_are_no_checkpoint_are_refused(tmp_path, run, write, expected, monkeypatch):
    monkeypatch.chdir(tmp_path)
    eval_refused(tmp_path, write, expected)
    resume_refused(tmp_path, run, write, expected)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("write,expected", [
    (lambda p: p.write_text("weights\n"), "not a PyTorch checkpoint"),
    (fifo, "is a FIFO"),
    (saving({"conv1.weight": torch.full((8, 3, 7, 7), float("nan"))}), "'conv1.weight' holds NaN"),
    (saving({"state_dict": {"conv1.weight": [1.0]}}), "'conv1.weight' is a list"),
], ids=["text", "fifo", "nan", "list-value"])
def test_model_pretrained_is_read_by_the_same_reader(tmp_path, write, expected):
    """``model.pretrained`` (ImageNet or official weights): the same one-line errors, without the
    'does not fit model.arch' reading of a file that is no checkpoint."""
    path = tmp_path / "weights.pth"
    write(path)
    err = StringIO()
    with redirect_stderr(err), redirect_stdout(StringIO()):
        code = main(["train", *SMALL, f"model.pretrained={path}", "--out", str(tmp_path / "new")])
    (line,) = err.getvalue().splitlines()
    assert code == 2 and line.startswith(f"ffn train: error: config model.pretrained: checkpoint {path}"), line
    assert expected in line and "does not fit" not in line and "weights_only" not in line
    assert not (tmp_path / "new" / "last.pt").exists()


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


@pytest.fixture(scope="module")
def trainer(run, good):
    d, device = distributed.setup()
    # a copy: load_config writes the overrides into its base's tables
    return Trainer(load_config(overrides=SMALL, base=tree_copy(good["config"])), d, device)


def variants(data: bytes, count: int, seed: int = 0) -> list[bytes]:
    """Truncations, then 1-3 flipped bits: anywhere, in the pickle (the file's start) or in the zip
    directory (its end)."""
    rng = random.Random(seed)
    out = [data[:rng.randrange(len(data))] for _ in range(count // 4)]
    while len(out) < count:
        b = bytearray(data)
        region = rng.choice([(0, len(b)), (0, 40_000), (len(b) - 25_000, len(b))])
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(*region)] ^= 1 << rng.randrange(8)
        out.append(bytes(b))
    return out


FUZZ = 40


@pytest.fixture(scope="module")
def fuzzed(run) -> list[bytes]:
    return variants((run / "last.pt").read_bytes(), FUZZ)


@pytest.mark.parametrize("i", range(FUZZ))
def test_fuzz_loads_the_same_state_or_is_refused(tmp_path, good, trainer, fuzzed, i):
    path = tmp_path / "last.pt"
    path.write_bytes(fuzzed[i])
    try:
        state = checkpoint.load_run(path, resume=True)
        trainer.restore(state, path)  # every check of --resume, then the load itself
    except CheckpointError as e:
        assert str(e).startswith(f"checkpoint {path}") and "\n" not in str(e)
    else:
        assert same(state, good)
