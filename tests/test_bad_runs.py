"""Runs never overwritten or mixed, the lost-run class of issue 25: paths taken as written, a run
folder locked while a training writes to it, `--resume` without a config, a failed write, Ctrl-C.
Each case checks the message (one line, exit status) and that the run already there is intact.
In-process through the command's entry point on tiny synthetic settings; a subprocess only where
another process is the point (a lock holder that dies, a real SIGINT)."""

import errno
import hashlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ffn.cli import main
from ffn.config import load_config
from ffn.engine import checkpoint, distributed, logs, rundir, trainer
from ffn.engine.trainer import Trainer, fit
from conftest import TINY_RUN as TINY

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ("last.pt", "best.pt")


def ffn(*argv) -> tuple[int, str]:
    """``ffn ARGV`` in this process: (exit status, stderr)."""
    err = StringIO()
    with redirect_stderr(err), redirect_stdout(StringIO()):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def digests(folder: Path, names=CHECKPOINTS) -> dict:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names if (folder / n).is_file()}


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A completed 1-epoch run, copied by the tests that need a run in place."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


@pytest.fixture
def run(base, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base, out)
    return out


# --- paths taken as written ---------------------------------------------------------------------------

def test_out_is_the_folder_as_written(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(base, tmp_path / "runs" / "exp")  # ` #2` was once a comment: this run was overwritten
    before = digests(tmp_path / "runs" / "exp")
    code, err = ffn("train", *TINY, "--out", "runs/exp #2", "--overwrite")
    assert code == 0, err
    assert checkpoint.load(tmp_path / "runs/exp #2/last.pt")["config"]["train"]["out"] == "runs/exp #2"
    assert digests(tmp_path / "runs" / "exp") == before


@pytest.mark.parametrize("out", ["null", "2024", "~", "yes", "a: b", "[x]", "{x: 1}", "x=y", "1e3"])
def test_out_values_that_read_as_yaml_are_folder_names(tmp_path, monkeypatch, out):
    trained = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainer, "fit", lambda cfg, *args, **kwargs: trained.append(cfg))
    assert ffn("train", *TINY, "--out", out) == (0, "")
    assert ffn("train", *TINY, f"train.out={out}", f"data.root={out}") == (0, "")
    assert [(cfg.train.out, cfg.data.root) for cfg in trained] == [(out, ""), (out, out)]


# --- one training per run folder ----------------------------------------------------------------------

@pytest.mark.parametrize("how", [[], ["--overwrite"], ["--resume"]], ids=["new", "overwrite", "resume"])
def test_a_training_into_a_locked_folder_is_refused_naming_the_holder(run, how):
    before = digests(run, (*CHECKPOINTS, "log.jsonl", "log.csv", "config.yaml"))
    with rundir.locked(run):
        code, err = ffn("train", *TINY, "--out", run, "train.epochs=2", *how)
    line = one_line(err)
    assert code == 2 and line.startswith(f"ffn train: error: train.out {run} is in use by another training"), line
    assert f"(pid {os.getpid()} on {socket.gethostname()}, started " in line and "in use" in line, line
    assert digests(run, (*CHECKPOINTS, "log.jsonl", "log.csv", "config.yaml")) == before
    assert not (run / rundir.LOCK_FILE).exists()


HOLDER = "import sys, time\nfrom ffn.engine.rundir import locked\nwith locked(sys.argv[1]):\n" \
         "    print('locked', flush=True)\n    time.sleep(120)\n"


def test_the_lock_of_a_process_that_dies_is_released(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = ffn("train", *TINY, "--out", out)
        assert code == 2 and f"in use by another training (pid {holder.pid} on " in one_line(err)
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own; the system drops its lock
        holder.wait()
    assert (out / rundir.LOCK_FILE).exists()  # stale: taken over
    with rundir.locked(out):
        assert f"pid {os.getpid()} " in (out / rundir.LOCK_FILE).read_text()
    assert not (out / rundir.LOCK_FILE).exists()


def test_only_the_main_process_takes_the_lock(tmp_path, monkeypatch):
    out, started = tmp_path / "run", []
    monkeypatch.setenv("RANK", "1")  # a rank of the training that holds the lock goes on
    monkeypatch.setattr(distributed, "setup", lambda device, timeout: started.append(device) or (None, None))
    monkeypatch.setattr(trainer, "Trainer", lambda *args: SimpleNamespace(run=lambda resume: out))
    with rundir.locked(out):
        assert fit(load_config(overrides=[*TINY, f"train.out={out}"])) == out
        assert sorted(p.name for p in out.iterdir()) == [rundir.LOCK_FILE]  # the test's own
    assert started == ["auto"]


def test_a_run_refused_after_taking_the_lock_releases_it(tmp_path):
    out = tmp_path / "run"
    code, err = ffn("train", *TINY, "--out", out, "data.kind=frames", f"data.train_list={tmp_path / 'none.txt'}",
                    "data.num_classes=2")
    assert code == 2 and "none.txt" in one_line(err)
    assert not out.exists()  # made for the lock, removed with it
    (out / "kept").mkdir(parents=True)
    with rundir.locked(out):
        pass
    assert sorted(p.name for p in out.iterdir()) == ["kept"]  # a folder it did not make stays


# --- --resume without a config, Ctrl-C ----------------------------------------------------------------

class HalfMade:
    """What a DataLoader iterator interrupted in its ``__init__`` is: its ``__del__`` fails."""

    def __del__(self):
        raise AttributeError("'HalfMade' object has no attribute '_shutdown'")


def interrupt_at(epoch):
    train_epoch = Trainer.train_epoch

    def interrupted(self, net, e):
        if e == epoch:
            half_made = HalfMade()  # noqa: F841 - freed with this frame, after Ctrl-C
            raise KeyboardInterrupt
        return train_epoch(self, net, e)
    return interrupted


def test_ctrl_c_in_the_first_epoch_then_resume_without_a_config(tmp_path, monkeypatch):
    out = tmp_path / "exp 1"
    with monkeypatch.context() as m:
        m.setattr(sys, "unraisablehook", sys.__unraisablehook__)  # Python's, which prints on stderr
        m.setattr(Trainer, "train_epoch", interrupt_at(0))
        code, err = ffn("train", *TINY, "--out", out)
    assert code == 130
    assert one_line(err) == f"ffn train: interrupted; continue with: ffn train --out {shlex.quote(str(out))} --resume"
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "log.csv", "log.jsonl"]  # no checkpoint yet
    code, err = ffn(*shlex.split(one_line(err).split(": ", 2)[2])[1:])  # the command it printed, no config
    assert code == 0, err
    state = checkpoint.load(out / "last.pt")  # the killed run's config, not the defaults (width 64)
    assert state["epoch"] == 1 and state["config"]["model"]["width"] == 8


def test_ctrl_c_later_leaves_the_last_epochs_checkpoints(run, monkeypatch):
    before = digests(run)
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    monkeypatch.setattr(Trainer, "train_epoch", interrupt_at(1))
    code, err = ffn("train", "--out", run, "--resume", "train.epochs=2")
    assert code == 130 and one_line(err).endswith(f"--out {run} --resume")
    assert digests(run) == before and not list(run.glob("*.tmp")) and not (run / rundir.LOCK_FILE).exists()


def test_a_ctrl_c_that_python_swallowed_still_ends_the_run(tmp_path, monkeypatch):
    train_epoch = Trainer.train_epoch

    def swallowing(self, net, epoch):  # as Python does in an after-fork hook of a DataLoader worker
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            pass
        return train_epoch(self, net, epoch)
    monkeypatch.setattr(Trainer, "train_epoch", swallowing)
    code, err = ffn("train", *TINY, "--out", tmp_path / "run")
    assert code == 130 and "interrupted" in one_line(err) and not (tmp_path / "run" / "last.pt").exists()


def test_ctrl_c_in_eval_is_one_line(base, tmp_path, monkeypatch):
    from ffn.engine import evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, "accuracy_by_frames", interrupted)
    code, err = ffn("eval", base / "last.pt", "--frames", "1..2", "--out", tmp_path / "eval")
    assert code == 130 and one_line(err) == "ffn eval: interrupted" and not (tmp_path / "eval").exists()


@pytest.mark.parametrize("overrides", [[], ["train.epochs=1"]], ids=["bare", "overrides"])
def test_resume_without_a_run_or_config_is_refused(tmp_path, overrides):
    out = tmp_path / "never"
    code, err = ffn("train", "--out", out, "--resume", *overrides)
    assert code == 2 and "holds neither last.pt nor config.yaml" in one_line(err) and not out.exists()


def test_sigint_ends_with_the_command_that_resumes(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "FFN_ALLOCATOR": "system"}
    proc = subprocess.Popen([sys.executable, "-m", "ffn", "train", *TINY, "train.epochs=200", "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the banner: the run has started (its config.yaml is written)
        if line.startswith("ffn train: out "):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert one_line(err) == f"ffn train: interrupted; continue with: ffn train --out {out} --resume"
    assert (out / "config.yaml").is_file() and not (out / rundir.LOCK_FILE).exists()


# --- a failed write -----------------------------------------------------------------------------------

def raise_(error):
    def fail(*args, **kwargs):
        raise error
    return fail


def fail_writing(path, data):  # the log's writer: its temporary file could not be written
    raise OSError(errno.ENOSPC, "No space left on device", f"{path}.tmp")


def dev_full(path, mode):  # the checkpoint's temporary file on a device that is always full
    return open("/dev/full", mode)


SHORT_WRITE = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
FAILURES = {  # what fails: (object, attribute, replacement), the file named, the reason given
    "enospc": ((torch, "save", raise_(OSError(errno.ENOSPC, "No space left on device"))), "last.pt",
               "No space left on device"),
    "short-write": ((torch, "save", raise_(SHORT_WRITE)), "last.pt", "the write failed"),
    "dev-full": ((checkpoint, "open", dev_full), "last.pt", "No space left on device"),
    "log": ((logs, "write_atomic", fail_writing), "log.jsonl", "No space left on device"),
    "config": ((rundir, "write_atomic", raise_(OSError(errno.EDQUOT, "Disk quota exceeded"))), "config.yaml",
               "Disk quota exceeded"),
}


@pytest.mark.parametrize("failure", FAILURES)
def test_a_failed_write_is_one_line_and_leaves_the_checkpoints(run, monkeypatch, failure):
    (obj, name, replacement), file, reason = FAILURES[failure]
    before = digests(run)
    monkeypatch.setattr(obj, name, replacement, raising=False)
    code, err = ffn("train", "--out", run, "--resume", "train.epochs=2")
    line = one_line(err)
    assert code == 2 and line.startswith(f"ffn train: error: could not write ") and reason in line, line
    assert line.split("could not write ")[1].split(":")[0].endswith(file), line
    monkeypatch.undo()
    assert digests(run) == before and checkpoint.load(run / "last.pt")["epoch"] == 1
    assert not list(run.glob("*.tmp")) and not (run / rundir.LOCK_FILE).exists()


def test_a_rank_whose_peers_never_start_fails_within_train_dist_timeout(tmp_path):
    """An orphaned process (rank 1 of 2, nobody listening at MASTER_PORT) gives up after
    train.dist_timeout minutes with one line, not after torch's 30 minutes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ffn", "train", *TINY, f"train.out={tmp_path / 'run'}",
                           "train.dist_timeout=0.02"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and time.monotonic() - start < 60
    assert proc.stderr.rstrip().splitlines()[-1].startswith(
        "ffn train: error: config train.dist_timeout: rank 1 of 2 could not join the others within 0.02 min")
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
