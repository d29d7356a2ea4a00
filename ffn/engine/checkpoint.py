"""Training checkpoints: written atomically; read, by every path that reads one (``--resume``, ``ffn
eval``/``diagnose``/``demo``, ``model.pretrained``), through :func:`load` and the checks here.

A checkpoint is refused with :class:`CheckpointError`, one line naming the file and the first
problem: not a regular file, empty, damaged (a zip record whose CRC does not match: torch itself
never checks them, so a flipped bit would load as a different weight), not loadable with
``torch.load(weights_only=True)``, the wrong top-level type or keys, a tensor of another shape than
the model's, a config this version does not accept, or NaN/Inf values in the weights or optimizer
state (a diverged run: evaluating it gives chance accuracy, resuming it trains on NaN).
"""

from __future__ import annotations

import math
import os
import signal
import zipfile
from pathlib import Path
from typing import Any, Mapping, NoReturn

import numpy as np
import torch
from torch import Tensor, nn

from ..config import UserError, check_checkpoint_file, load_config

# Environment variable of the kill tests: a point name (see :func:`kill_point`) at which the process
# SIGKILLs itself, to check what a kill at that moment leaves behind.
KILL_AT_ENV = "FFN_TEST_KILL_AT"

# what `ffn train` saves (Trainer.state); eval needs only the first two
RUN_KEYS = ("config", "model", "epoch", "best", "optimizer", "scheduler", "scaler", "rng")


class CheckpointError(UserError):
    """A checkpoint that cannot be used: ``checkpoint PATH: <the first problem>``, one line."""


def _refuse(path: str | Path, problem: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path}: {problem}")


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
    """The dict saved at ``path``, unpickled only with ``weights_only=True``; anything else raises
    :class:`CheckpointError`."""
    try:
        path = check_checkpoint_file(path)  # missing, empty, a FIFO or device: refused before opening
    except UserError as e:
        raise CheckpointError(str(e)) from None
    if zipfile.is_zipfile(path):  # torch.save's format; older files (legacy pickles) have no CRCs
        _check_crcs(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types; none of its advice is wanted
        if zipfile.is_zipfile(path) and "weights only" in str(e).lower():
            why = "it holds objects other than tensors and plain containers, which are never unpickled"
        else:
            why = f"not a PyTorch checkpoint ({type(e).__name__})"
        raise _refuse(path, why) from None
    if not isinstance(state, dict):
        raise _refuse(path, f"holds a {type(state).__name__}, not a dict")
    return state


def _check_crcs(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise _refuse(path, f"damaged zip archive ({type(e).__name__}: {e})") from None
    if bad is not None:
        raise _refuse(path, f"damaged: record {bad} does not match its CRC")


def load_run(path: str | Path, resume: bool = False) -> dict:
    """A checkpoint written by ``ffn train``: its config valid here, its model weights a finite
    ``{name: tensor}`` mapping and, for ``resume``, an epoch, a best score and the optimizer,
    schedule, scaler and generator states. The states are checked against the model by
    :func:`check_weights` and :func:`check_training_state`."""
    state = load(path)
    need = RUN_KEYS if resume else RUN_KEYS[:2]
    missing = [k for k in need if k not in state]
    if missing:
        raise _refuse(path, f"not a checkpoint of `ffn train` (no {', '.join(missing)})")
    if not isinstance(state["config"], dict):
        raise _refuse(path, f"its config is a {type(state['config']).__name__}, not a table")
    try:
        load_config(base=state["config"])
    except UserError as e:
        raise _refuse(path, f"its config is not valid here: {e}") from None
    check_tensors(state["model"], path, "model")
    if resume:
        epoch, best = state["epoch"], state["best"]
        if type(epoch) is not int or epoch < 1:
            raise _refuse(path, f"epoch must be a completed epoch count >= 1, got {epoch!r}")
        if type(best) not in (int, float) or math.isnan(best):
            raise _refuse(path, f"best must be a number, got {best!r}")
    return state


def check_tensors(tensors: Any, path: str | Path, what: str) -> None:
    """``tensors`` is a ``{name: tensor}`` mapping of dense tensors with finite values."""
    if not isinstance(tensors, Mapping):
        raise _refuse(path, f"{what} is a {type(tensors).__name__}, not a mapping of tensors")
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, Tensor) or t.layout is not torch.strided:
            raise _refuse(path, f"{what} entry {name!r} is a {type(t).__name__}, not a dense tensor")
        _check_finite(t, path, f"{what} {name!r}")


def _check_finite(t: Tensor, path: str | Path, where: str) -> None:
    if not (t.is_floating_point() or t.is_complex()):
        return
    # numpy where it can: torch's thread pool costs ~1 ms per small tensor on a busy machine
    finite = (np.isfinite(t.detach().numpy()).all() if t.dtype in _NUMPY_DTYPES and t.device.type == "cpu"
              else torch.isfinite(t).all())
    if not finite:
        raise _refuse(path, f"{where} holds NaN or Inf values (a diverged run?): refused")


_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128)


def check_weights(weights: Mapping[str, Tensor], model: nn.Module, path: str | Path) -> None:
    """``weights`` has exactly ``model``'s state-dict keys, each of its shape and kind (floating or
    integral): the first key that differs is named."""
    ours = model.state_dict()
    for keys, what in ((ours.keys() - weights.keys(), "is missing"),
                       (weights.keys() - ours.keys(), "is not in the model")):
        if keys:
            raise _refuse(path, f"model weight {min(keys)!r} {what} ({len(keys)} such; another architecture?)")
    for name, t in weights.items():
        want = ours[name]
        if t.shape != want.shape or t.is_floating_point() != want.is_floating_point():
            raise _refuse(path, f"model weight {name!r} is {t.dtype} {list(t.shape)}, the model's "
                                  f"is {want.dtype} {list(want.shape)} (another width, depth or class count?)")


def check_training_state(state: dict, path: str | Path, optimizer: torch.optim.Optimizer,
                         scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                         device: torch.device) -> None:
    """The optimizer, schedule, scaler and generator states of ``state`` have the structure of this
    run's (just set up), their numbers are finite and each momentum buffer is its parameter's shape,
    so that loading them can neither fail half-way nor train on something else."""
    fresh = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "rng": rng_state(device)}
    _same_structure(state["optimizer"], {"param_groups": fresh["optimizer"]["param_groups"], "state": {}},
                    path, "optimizer")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, entry in state["optimizer"]["state"].items():
        if type(i) is not int or not 0 <= i < len(params) or not isinstance(entry, dict):
            raise _refuse(path, f"optimizer state has an entry {i!r} for no parameter")
        for key, t in entry.items():
            if not isinstance(t, Tensor):
                continue
            if t.dim() and t.shape != params[i].shape:  # a momentum buffer (0-dim: a step count)
                raise _refuse(path, f"optimizer state {i} {key} is {list(t.shape)}, its parameter "
                              f"{list(params[i].shape)}")
            _check_finite(t, path, f"optimizer state {i} {key}")
    for key in ("scheduler", "scaler"):
        _same_structure(state[key], fresh[key], path, key)
    rng = state["rng"]
    if not isinstance(rng, list) or not rng:
        raise _refuse(path, f"rng must be a non-empty list of generator states, got {_describe(rng)}")
    for i, entry in enumerate(rng):  # a CUDA generator's state is restored where the run resumes on CUDA
        want = {k: v for k, v in fresh["rng"].items() if k == "torch" or isinstance(entry, dict) and k in entry}
        _same_structure(entry, want, path, f"rng[{i}]")


def _same_structure(saved: Any, fresh: Any, path: str | Path, where: str) -> None:
    """``saved`` is shaped as ``fresh``: a dict with (at least) its keys, a list of its length, a
    tensor of its shape and dtype, a finite number where it has a number, a plain value where it has one."""
    def refuse(what: str) -> NoReturn:
        raise _refuse(path, f"{where} {what}")

    if isinstance(fresh, dict):
        if not isinstance(saved, dict):
            refuse(f"is a {type(saved).__name__}, not a dict")
        for k, v in fresh.items():
            if k not in saved:
                refuse(f"has no {k!r}")
            _same_structure(saved[k], v, path, f"{where}.{k}")
    elif isinstance(fresh, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(fresh):
            refuse(f"is {_describe(saved)}, expected a list of {len(fresh)}")
        for i, (s, f) in enumerate(zip(saved, fresh)):
            _same_structure(s, f, path, f"{where}[{i}]")
    elif isinstance(fresh, Tensor):
        if not isinstance(saved, Tensor) or saved.shape != fresh.shape or saved.dtype != fresh.dtype:
            refuse(f"is {_describe(saved)}, expected a {fresh.dtype} tensor {list(fresh.shape)}")
    elif type(fresh) in (int, float):
        if type(saved) not in (int, float) or not math.isfinite(saved):
            refuse(f"is {_describe(saved)}, expected a finite number")
    elif not (saved is None or type(saved) in (bool, int, float, str)):
        refuse(f"is {_describe(saved)}, expected a plain value")


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor {list(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return repr(value) if type(value) in (int, float, bool) or value is None else f"a {type(value).__name__}"


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
