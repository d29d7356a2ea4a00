"""What the ``ffn`` command prints, and when: ``--help`` and user errors before torch is imported;
plain progress lines (no ``\\r`` frames of a bar) where its output is recorded; the banner; the
training-curve plot ``log.png``."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ffn.allocator import mimalloc_library
from ffn.engine import progress as progress_module
from ffn.engine.progress import Progress

ROOT = Path(__file__).resolve().parents[1]

# width 8 on 8x8 crops, 2 steps per epoch: an epoch takes well under a second
SMALL = [
    "data.synthetic.train_videos=4", "data.synthetic.val_videos=2", "data.synthetic.num_frames=4",
    "data.synthetic.frame_size=16", "data.size=8", "data.scale_size=8", "data.batch_size=2",
    "data.workers=0", "model.frames=[1,2]", "model.width=8", "train.max_steps=2",
]


def run_ffn(*args: str, python_options=(), cwd=None, **env) -> subprocess.CompletedProcess:
    """``python -m ffn ARGS`` with stdout and stderr recorded (not terminals), stderr after stdout."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, *python_options, "-m", "ffn", *args], env=env, cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)


def imported_modules(importtime_output: str) -> list[str]:
    """The modules ``python -X importtime`` reports (``import time: self | cumulative | name``)."""
    return [line.rsplit("|", 1)[1].strip() for line in importtime_output.splitlines()
            if line.startswith("import time:") and "|" in line]


# (arguments, exit status, text the output must hold)
NO_TORCH = [
    (["--help"], 0, "usage: ffn"),
    (["train", "--help"], 0, "usage: ffn train"),
    (["eval", "--help"], 0, "usage: ffn eval"),
    (["diagnose", "--help"], 0, "usage: ffn diagnose"),
    (["train", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["train", "no.such.key=1"], 2, "ffn train: error: config root: unknown key(s) ['no']"),
    (["train", "optim.lr=-1"], 2, "ffn train: error: config optim.lr"),
    (["train", "--resume", "optim.lrr=1"], 2, "unknown key(s) ['lrr']"),
    (["eval", "nothere.pt"], 2, "ffn eval: error: checkpoint nothere.pt does not exist"),
    (["eval", "a/x.pt", "b/x.pt", "optim.amp=fp8"], 2, "optim.amp"),
    (["demo", "model.widht=8"], 2, "unknown key(s) ['widht']"),
]


@pytest.mark.parametrize("args,status,expected", NO_TORCH, ids=[" ".join(a) for a, _, _ in NO_TORCH])
def test_help_and_user_errors_answer_without_importing_torch(tmp_path, args, status, expected):
    proc = run_ffn(*args, python_options=["-X", "importtime"], cwd=tmp_path)
    modules = imported_modules(proc.stdout)
    printed = "\n".join(line for line in proc.stdout.splitlines() if not line.startswith("import time:"))
    assert proc.returncode == status, printed
    assert expected in printed and "Traceback" not in printed, printed
    assert not [m for m in modules if m == "torch" or m.startswith("torch.")]
    assert modules.count("ffn") == 1  # one process: not re-executed on mimalloc before answering


IMPORTS = """
import sys, types
import ffn
assert "torch" not in sys.modules, "import ffn imported torch"
assert set(ffn.__all__) <= set(dir(ffn)), dir(ffn)
import ffn.ffnify  # the submodule of the same name as the function
from ffn import FFNResNet, ffnify
from ffn import *
assert callable(ffnify) and not isinstance(ffnify, types.ModuleType) and ffn.ffnify is ffnify
assert FFNResNet.__module__ == "ffn.models" and ffn.models.FFNResNet is FFNResNet
try:
    ffn.no_such_name
except AttributeError:
    print("ok")
"""


def test_import_ffn_is_lazy_and_keeps_its_public_names():
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", IMPORTS], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_a_recorded_train_prints_plain_lines_and_plots_its_log(tmp_path):
    """``ffn train > file``: no ``\\r``; the banner, a line per step (train.log_every=1) and the epoch
    row; ``log.png``. Then ``--resume`` on the system allocator: its banner says so, and the plot
    is rewritten from both epochs' rows."""
    from PIL import Image

    out = tmp_path / "run"
    first = run_ffn("train", *SMALL, "train.epochs=1", "train.log_every=1", "--out", str(out))
    assert first.returncode == 0, first.stdout[-3000:]
    text = first.stdout
    assert "\r" not in text and "Traceback" not in text, text
    allocator = "mimalloc" if mimalloc_library() and sys.platform.startswith("linux") else "system"
    assert f"ffn train: out {out}, device cpu, 1 thread, allocator {allocator}, 1 process\n" in text
    assert "parameters, frames per branch 1/2, 4 training / 2 validation videos, 1 epoch, batch size 2" in text
    lines = text.splitlines()
    steps = [line for line in lines if line.startswith("epoch 1/1: step ")]
    assert [s.split(",")[0] for s in steps] == ["epoch 1/1: step 1/2", "epoch 1/1: step 2/2"], text
    assert all(", loss " in s and ", clips/s " in s and "ETA " in s for s in steps)
    assert any(line.startswith("epoch 1/1 validation: branch 2/2, frames 2, top1 ") for line in lines)
    assert [line.split()[0] for line in lines if line.startswith("epoch=")] == ["epoch=1"]
    png = (out / "log.png").read_bytes()
    with Image.open(out / "log.png") as image:
        assert image.format == "PNG" and image.size[0] > 200
        image.verify()

    second = run_ffn("train", "--out", str(out), "--resume", "--epochs", "2", FFN_ALLOCATOR="system")
    assert second.returncode == 0 and "\r" not in second.stdout, second.stdout[-3000:]
    assert "allocator system" in second.stdout and "epochs 2..2 of 2" in second.stdout
    assert [line.split()[0] for line in second.stdout.splitlines() if line.startswith("epoch=")] == ["epoch=2"]
    assert not list(out.glob("*.tmp")) and (out / "log.png").read_bytes() != png


# --- Progress --------------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_prints_a_line_every_n_steps_or_30_s_and_at_the_last_step():
    clock, file = Clock(), io.StringIO()
    p = Progress(10, "epoch 1/3", every=4, bar=False, file=file, clock=clock)
    for step in range(1, 11):
        clock.now = {6: 40.0}.get(step, clock.now + 1)  # step 6 comes 34 s after step 5
        p.update(loss="0.5")
    p.close()
    lines = file.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "epoch 1/3: step 4/10", "epoch 1/3: step 6/10", "epoch 1/3: step 8/10", "epoch 1/3: step 10/10"]
    assert lines[0] == "epoch 1/3: step 4/10, loss 0.5, 0:00:04 elapsed, ETA 0:00:06"
    assert lines[-1].endswith("0:00:44 elapsed, ETA 0:00:00")


def test_progress_draws_a_bar_only_where_stdout_and_stderr_are_terminals(monkeypatch):
    monkeypatch.setattr(progress_module, "is_terminal", lambda: False)
    assert Progress(3, "x").bar is None
    monkeypatch.setattr(progress_module, "is_terminal", lambda: True)
    with Progress(3, "x") as p:
        assert p.bar is not None
    assert Progress(3, "x", bar=False).bar is None  # train.progress=false: plain lines on a terminal too
    file = io.StringIO()
    p = Progress(3, "x", enabled=False, file=file)  # ranks other than 0
    p.update()
    p.update()
    p.update()
    assert p.bar is None and file.getvalue() == ""
