"""Which kernels run an op (docs/design.md §4).

Every backend is a module-like object with the raw API of :mod:`ffn_kernels.reference`
(``shift_alter_fwd``, ``freq_batch_norm_fwd``, ...). The public ops dispatch in C++
(``csrc/ops/``): for each device type they call either the compiled raw ops
``torch.ops.ffn_kernels_C.*`` or their Python twins ``torch.ops.ffn_kernels_py.*`` defined here,
which run :func:`kernels_for` (Triton, the reference, or an error naming the problem).
:func:`set_backend` sets that route. The choice comes from ``FFN_KERNELS_BACKEND``
(``auto|cuda|triton|cpu|reference``, read at import) or :func:`set_backend`:

* ``auto``: CUDA tensors use the CUDA extension if it was built with CUDA kernels, else Triton;
  CPU tensors use the C++ CPU kernels. (Without the extension the public ops do not exist; the raw
  API of :func:`kernels_for` then falls back to the reference for CPU tensors.)
* ``cpu`` / ``cuda``: the compiled extension (an error if it is missing).
* ``triton``: the Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
* ``reference``: the pure-PyTorch reference everywhere.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import SimpleNamespace

import torch

CHOICES = ("auto", "cuda", "triton", "cpu", "reference")
RAW_OPS = (
    "shift_alter_fwd", "shift_alter_bwd", "freq_batch_norm_fwd", "freq_batch_norm_bwd",
    "bn_add_relu_shift_alter_fwd", "bn_add_relu_shift_alter_bwd",
)

_extension_error: str | None = None
try:
    importlib.import_module("ffn_kernels._C")  # registers torch.ops.ffn_kernels_C.*
except ImportError as exc:  # the package must import without its compiled part
    _extension_error = str(exc)


def extension_loaded() -> bool:
    return _extension_error is None


def extension_has_cuda() -> bool:
    """Whether the compiled extension carries CUDA kernels (a dispatcher query, no GPU needed)."""
    return extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "ffn_kernels_C::freq_batch_norm_fwd", "CUDA"
    )


def _compiled() -> SimpleNamespace:
    ops = torch.ops.ffn_kernels_C
    return SimpleNamespace(name="compiled", **{n: getattr(ops, n) for n in RAW_OPS})


def _triton():
    return importlib.import_module("ffn_kernels.triton")


def _reference():
    return importlib.import_module("ffn_kernels.reference")


def _check_choice(name: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {name!r}")
    return name


_env_choice = os.environ.get("FFN_KERNELS_BACKEND", "auto").strip().lower() or "auto"
# an invalid FFN_KERNELS_BACKEND must not break `import ffn_kernels` (nor `python -m
# ffn_kernels.info`, which reports it): it fails at first use, naming the variable
_choice: str | None = _env_choice if _env_choice in CHOICES else None


def set_backend(name: str) -> None:
    """Choose the backend for subsequent op calls (one of :data:`CHOICES`)."""
    global _choice
    _choice = _check_choice(name)
    _set_routes()


def get_backend() -> str:
    if _choice is None:
        raise ValueError(
            f"FFN_KERNELS_BACKEND must be one of {CHOICES}, got {_env_choice!r}; fix the variable "
            "or call ffn_kernels.set_backend(...)"
        )
    return _choice


def backend_name(device: torch.device | str) -> str:
    """Name of the backend that runs ops on ``device`` under the current choice."""
    device_type = torch.device(device).type
    choice = get_backend()
    if choice != "auto":
        return choice
    if device_type == "cuda":
        return "cuda" if extension_has_cuda() else "triton"
    if device_type == "cpu":
        return "cpu" if extension_loaded() else "reference"
    return "reference"


def kernels_for(x: torch.Tensor):
    """The raw-API module that runs ops for tensor ``x``."""
    name = backend_name(x.device)
    if name == "reference":
        return _reference()
    if name == "triton":
        return _triton()
    if not extension_loaded():
        raise RuntimeError(
            f"backend {name!r} needs the compiled extension ffn_kernels._C, which failed to load "
            f"({_extension_error}); reinstall with `pip install --no-build-isolation .` or choose "
            "FFN_KERNELS_BACKEND=reference"
        )
    if name != x.device.type:
        raise RuntimeError(f"backend {name!r} cannot run tensors on device {x.device}")
    if name == "cuda" and not extension_has_cuda():
        raise RuntimeError("backend 'cuda': ffn_kernels._C was built without CUDA kernels")
    return _compiled()


def missing_extension(*args, **kwargs):
    """Stands in for the public ops when ``ffn_kernels._C`` did not load: they live in it."""
    raise RuntimeError(
        f"ffn_kernels.ops need the compiled extension ffn_kernels._C, which failed to load "
        f"({_extension_error}); reinstall with `pip install --no-build-isolation .` (the pure-PyTorch "
        "ffn_kernels.reference and the model's eager twin work without it)"
    )


def _define_python_routes() -> torch.library.Library:
    """``ffn_kernels_py::<raw>``: the raw ops' schemas, run by the backend :func:`kernels_for`
    picks (the C++ dispatch calls them when the chosen backend is not compiled)."""
    lib = torch.library.Library("ffn_kernels_py", "DEF")
    for name in RAW_OPS:
        lib.define(str(getattr(torch.ops.ffn_kernels_C, name).default._schema).split("::", 1)[1])

        def run(*args, _name=name):
            return getattr(kernels_for(args[0]), _name)(*args)

        lib.impl(name, run, "CompositeExplicitAutograd")
    return lib


def _set_routes() -> None:
    if not extension_loaded():
        return
    if _choice is None:  # the Python route raises the variable's error at the first op call
        torch.ops.ffn_kernels_C.set_python_route(True, True)
        return
    torch.ops.ffn_kernels_C.set_python_route(
        backend_name("cpu") != "cpu", backend_name("cuda") != "cuda" or not extension_has_cuda()
    )


if _extension_error is None:
    _python_routes = _define_python_routes()
    _set_routes()
else:
    warnings.warn(
        f"ffn_kernels: compiled extension not available ({_extension_error}); ffn_kernels.ops "
        "will raise until it is built (ffn_kernels.reference still works)",
        RuntimeWarning,
        stacklevel=2,
    )
