"""Training checkpoints: written atomically, read with ``weights_only=True``."""

from __future__ import annotations

import os
import signal
import zipfile
from pathlib import Path

import torch

from ..config import UserError, check_checkpoint_file

# Environment variable of the kill tests: a point name (see :func:`kill_point`) at which the process
# SIGKILLs itself, to check what a kill at that moment leaves behind.
KILL_AT_ENV = "FFN_TEST_KILL_AT"


def kill_point(point: str) -> None:
    """Test hook: SIGKILL this process (no cleanup, no flush) where ``$FFN_TEST_KILL_AT`` is ``point``."""
    if os.environ.get(KILL_AT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def save_atomic(obj: dict, path: str | Path, point: str = "") -> None:
    """Write ``obj`` next to ``path`` (``path.tmp``, flushed to disk) and rename it into place, so a
    crash never leaves half a file at ``path``. ``point`` prefixes the test hook's point names
    (``<point>:<name>.tmp`` with the temporary file open and empty, ``<point>:<name>`` once in place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        kill_point(f"{point}:{tmp.name}")
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    kill_point(f"{point}:{path.name}")


def load(path: str | Path) -> dict:
    """The dict saved at ``path``. A missing, empty or foreign file, or one holding objects other than
    tensors and plain containers, raises :class:`~ffn.config.UserError` naming it; the file is only
    ever unpickled with ``weights_only=True``."""
    path = check_checkpoint_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types; none of its advice is wanted
        if zipfile.is_zipfile(path) and "weights only" in str(e).lower():
            why = "it holds objects other than tensors and plain containers, which are never unpickled"
        else:
            why = f"not a PyTorch checkpoint ({type(e).__name__})"
        raise UserError(f"checkpoint {path}: {why}") from None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path}: holds a {type(state).__name__}, not a checkpoint of `ffn train`")
    return state


def rng_state(device: torch.device) -> dict:
    """The random generators training draws from (dropout, loader seeds), for an exact resume."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
