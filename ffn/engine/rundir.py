"""What a run folder (``train.out``) holds besides checkpoints and logs: the lock of the training
writing to it, the config it was started with, and the one-line report of a write that failed.
Torch-free: the ``ffn`` command reads the saved config before importing torch."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from ..config import UserError, read_config_file

LOCK_FILE = "train.lock"
# The config of the run, written as it starts: `ffn train --out OUT --resume` after a kill before the
# first checkpoint starts the run again with it (YAML, so `--config OUT/config.yaml` reads it too)
CONFIG_FILE = "config.yaml"


@contextlib.contextmanager
def locked(out: str | Path):
    """Hold ``out``'s exclusive lock (``flock`` on :data:`LOCK_FILE`, which names this process) for
    the body: a second training into ``out`` is refused with :class:`UserError` naming the holder.
    The system releases the lock when the process dies, however it dies; the file is removed on a
    normal exit (a killed run's stale file is taken over by the next run), and so is the folder if
    this made it and nothing was written there (a run refused as it starts leaves no folder)."""
    out = Path(out)
    check_out_folder(out, "train.out (--out)")
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise UserError(f"train.out {out}: cannot lock {path}: {e.strerror}") from None
            holder = path.read_text(errors="replace").strip() if path.is_file() else ""
            raise UserError(f"train.out {out} is in use by another training ({holder or 'holder unknown'}); "
                            f"wait for it to end, or give another --out") from None
        # the holder before us may have removed the file we opened: then lock the new one
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # before unlocking: no one locks a file that is going away
        os.close(fd)
        if made:
            with contextlib.suppress(OSError):  # not empty: the run's
                out.rmdir()


def check_out_folder(out: str | Path, what: str) -> None:
    """``out`` can be a folder of results: it is one, or can be made in the nearest folder above it
    that exists; else :class:`UserError` naming ``what``."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise UserError(f"{what} {out} is a file, not a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise UserError(f"{what} {out}: not writable")
        return
    parent = next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir():
        raise UserError(f"{what} {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{what} {out}: cannot be made in {parent} (not writable)")


def write_config(out: str | Path, config: dict) -> None:
    """``out/config.yaml``: the run's ``config`` (see :data:`CONFIG_FILE`), written atomically."""
    import yaml

    path = Path(out) / CONFIG_FILE
    with writing(path):
        write_atomic(path, yaml.safe_dump(config, sort_keys=False).encode())


def saved_config(out: str | Path) -> dict | None:
    """The config a run in ``out`` was started with (:func:`write_config`), or None."""
    path = Path(out) / CONFIG_FILE
    return read_config_file(path) if path.is_file() else None


def write_atomic(path: Path, data: bytes) -> None:
    """``data`` into ``path.tmp``, flushed to disk, then renamed to ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def writing(path: Path):
    """Report a failed write of ``path`` in the body (a full disk, a quota, an I/O error; torch's
    ``inline_container.cc ... unexpected pos`` is how ``torch.save`` reports a short write) as one
    :class:`UserError` line naming it, after removing its temporary file: what was written before,
    such as the previous epoch's checkpoints, stays as it was."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "inline_container" not in str(e) and "PytorchStreamWriter" not in str(e):
            raise
        cause = e if isinstance(e, OSError) else next(
            (c for c in (e.__cause__, e.__context__) if isinstance(c, OSError)), None)
        # the file the error names (log.csv of a log's two files), else the one written
        path = Path(str(getattr(cause, "filename", None) or path).removesuffix(".tmp"))
        path.with_name(path.name + ".tmp").unlink(missing_ok=True)
        if cause is not None and cause.errno is not None:
            why = os.strerror(cause.errno)
        else:
            why = "the write failed" + (" (disk full?)" if _free_bytes(path.parent) < 2**20 else "")
        raise UserError(f"could not write {path}: {why}; the files written before it are intact") from None


def _free_bytes(folder: Path) -> int:
    try:
        st = os.statvfs(folder)
    except OSError:
        return 1 << 62
    return st.f_bavail * st.f_frsize
