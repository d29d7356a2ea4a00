"""`ffn train` / `ffn eval` over a table of bad inputs (tiny data made here): each exits with status 2
and one error line naming the key, argument or file:line, no traceback. The whole table runs through
the command's entry point in this process (a subprocess costs seconds of imports); a sample of it runs
as a user would, ``python -m ffn`` in a subprocess."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch

from ffn.cli import main
from ffn.config import load_config
from ffn.engine.trainer import fit
from conftest import TINY_RUN as TINY

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ffn", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Files the bad inputs refer to: a trained run, frame folders, list and config files."""
    from PIL import Image

    w = tmp_path_factory.mktemp("cli")
    fit(load_config(overrides=[*TINY, f"train.out={w / 'run'}"]))
    for v in range(2):
        (w / "frames" / f"v{v}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(w / "frames" / f"v{v}" / f"{i + 1:05d}.jpg")
    files = {
        "good.txt": "v0 4 0\nv1 4 1\n",
        "label.txt": "v0 4 0\nv1 4 5\n",  # label 5 with data.num_classes=2
        "missing.txt": "v0 4 0\nnowhere 4 1\n",
        "gone.txt": "nowhere 4 0\nnot_here 4 1\n",  # every video unreadable
        "bad.yaml": "optim:\n  lr: 0.1: x\n",
        "list.yaml": "- optim.lr: 0.1\n",
        "bad.toml": "[optim]\nlr = \n",
    }
    for name, text in files.items():
        (w / name).write_text(text)
    (w / "binary.txt").write_bytes(b"\xff\xfe\x00\x81binary\x00")
    (w / "empty.pt").write_bytes(b"")
    (w / "random.pt").write_bytes(np.random.default_rng(0).bytes(300))
    return w


def frames_data(w, train="good.txt", val="good.txt", *extra):
    return ["data.kind=frames", f"data.root={w / 'frames'}", f"data.train_list={w / train}",
            f"data.val_list={w / val}", "data.template={:05d}.jpg", "data.num_classes=2", *extra]


# (command line with {w} for the fixture folder, text the error line must hold)
CASES = [
    # values out of range or of the wrong type, named by key
    ("train optim.lr=nan", "optim.lr"),
    ("train optim.lr=-0.1", "optim.lr"),
    ("train optim.lr=abc", "optim.lr"),
    ("train optim.gamma=-1", "optim.gamma"),
    ("train optim.momentum=1.5", "optim.momentum"),
    ("train --epochs 0", "train.epochs"),
    ("train train.max_steps=-1", "train.max_steps"),
    ("train data.size=0", "data.size"),
    ("train data.batch_size=0", "data.batch_size"),
    ("train model.frames=[4,2]", "model.frames"),
    ("train optim.lrr=0.1", "'lrr'"),
    ("train data.synthetic.travel=0.9", "data.synthetic"),
    ("train FRAMES data.template={:05d.jpg", "data.template"),
    ("train FRAMES data.template=img.jpg", "data.template"),
    ("train FRAMES data.num_classes=0", "data.num_classes"),
    # config files, named
    ("train --config {w}/nothere.toml", "nothere.toml"),
    ("train --config {w}/bad.yaml", "bad.yaml:2"),
    ("train --config {w}/list.yaml", "list.yaml: the top level must be a table"),
    ("train --config {w}/bad.toml", "bad.toml"),
    # list files: file and line
    ("train FRAMES data.train_list={w}/label.txt", "label.txt:2: label 5 is out of range for data.num_classes=2"),
    ("train FRAMES data.val_list={w}/label.txt", "label.txt:2"),
    ("train FRAMES data.train_list={w}/binary.txt", "binary.txt: not a UTF-8 text file"),
    ("train FRAMES data.train_list={w}/none.txt", "data.train_list: list file"),
    ("train FRAMES data.train_list={w}/missing.txt", "nowhere"),  # a missing video without --skip-bad
    ("train FRAMES data.train_list={w}/gone.txt --skip-bad", "no readable training video"),
    # run folders and resuming
    ("train --out {w}/run", "--resume"),
    ("train --out {w}/run --resume {w}/absent.pt", "absent.pt does not exist"),
    ("train --out {w}/run --resume optim.lr=0.5", "optim.lr: 0.01 -> 0.5"),
    ("train --out {w}/run --resume model.frames=[2,4]", "model.frames"),
    ("train --out {w}/run --resume {w}/random.pt", "random.pt"),
    # checkpoints and eval arguments
    ("eval {w}/run/last.pt model.frames=[2,4]", "model.frames=[2, 4] contradicts"),
    ("eval {w}/run/last.pt data.synthetic.num_classes=3", "data.synthetic.num_classes=3"),
    ("eval {w}/run/last.pt FRAMES data.num_classes=4 data.val_list={w}/label.txt", "data.num_classes=4"),
    ("eval {w}/empty.pt", "empty.pt is empty"),
    ("eval {w}/random.pt", "random.pt: not a PyTorch checkpoint"),
    ("eval {w}/nothere.pt", "nothere.pt does not exist"),
    ("eval {w}/run/last.pt {w}/run/best.pt", "--labels"),
    ("eval {w}/run/last.pt --labels a b", "--labels"),
    ("eval {w}/run/last.pt --frames 1..100000000", "--frames"),
]
if not torch.cuda.is_available():
    CASES.append(("train train.device=cuda", "train.device"))


def expand(line: str, w: Path) -> list[str]:
    """The command line of a case: ``FRAMES`` stands for frame-folder data; ``train`` gets the tiny
    settings first (the case's own words override them) and a fresh output folder unless it names one."""
    words = []
    for word in line.split():
        words += frames_data(w) if word == "FRAMES" else [word.replace("{w}", str(w))]
    if words[0] == "eval":
        return words
    return ["train", *TINY, *([] if "--out" in words else ["--out", str(w / "new")]), *words[1:]]


def check(line: str, expected: str, returncode: int, err: str) -> list[str]:
    """What is wrong with the outcome of case ``line`` (nothing: an empty list)."""
    problems = []
    if returncode != 2:
        problems.append(f"exit {returncode}")
    errors = [e for e in err.splitlines() if "error:" in e]
    if "Traceback" in err or len(errors) != 1 or "weights_only" in err:
        problems.append("not one clear error line")
    elif expected not in errors[0]:
        problems.append(f"{expected!r} not in the error line")
    return [f"ffn {line}: {', '.join(problems)}\n    {err.strip()[-600:]}"] if problems else []


@pytest.mark.parametrize("line,expected", CASES, ids=[line for line, _ in CASES])
def test_bad_input_exits_2_naming_the_key_or_file(world, monkeypatch, line, expected):
    monkeypatch.chdir(world)  # eval's default --out is relative
    err = StringIO()
    with redirect_stderr(err), redirect_stdout(StringIO()):
        try:
            code = main(expand(line, world))
        except SystemExit as e:  # argparse
            code = e.code
    assert not check(line, expected, code, err.getvalue()), err.getvalue()


SUBPROCESS_CASES = ["train FRAMES data.train_list={w}/label.txt", "train optim.lr=nan", "eval {w}/random.pt"]


def test_bad_inputs_from_the_command_line(world):
    """``python -m ffn``: the exit status is 2 and stderr is the one error line."""
    cases = [(line, dict(CASES)[line]) for line in SUBPROCESS_CASES]
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda case: run_cli(*expand(case[0], world), cwd=world), cases))
    failures = [f for (line, expected), proc in zip(cases, procs)
                for f in check(line, expected, proc.returncode, proc.stderr)]
    assert not failures, "\n".join(failures)


def test_refused_runs_leave_the_existing_run_alone(world):
    # after the table: nothing written where a run was refused, the existing run untouched
    assert not (world / "new" / "last.pt").exists()
    assert sorted(p.name for p in (world / "run").iterdir()) == ["best.pt", "config.yaml", "last.pt", "log.csv",
                                                                 "log.jsonl", "log.png"]
    assert torch.load(world / "run" / "last.pt", weights_only=True)["epoch"] == 1
