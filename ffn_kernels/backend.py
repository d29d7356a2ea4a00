"""Which kernels run an op (docs/design.md §4).

Every backend is a module-like object with the raw API of :mod:`ffn_kernels.reference`
(``shift_alter_fwd``, ``freq_batch_norm_fwd``, ...), the signatures of ``csrc/ops/<op>.h``. The
public ops check and normalise their arguments in C++ (``csrc/ops/``), then call the raw op
``torch.ops.ffn_kernels.<op>_fwd`` / ``_bwd`` through the dispatcher, whose kernel for the
tensor's device type is the route: the compiled kernels (``csrc/cpu``, ``csrc/cuda``), or the
Python kernel registered here, which runs :func:`kernels_for` (Triton, the reference, or an error
naming the problem). :func:`set_backend` sets those registrations; no route flag lives in C++.
The choice comes from ``FFN_KERNELS_BACKEND`` (``auto|cuda|triton|cpu|reference``, read at
import) or :func:`set_backend`:

* ``auto``: CUDA tensors use the CUDA extension if it was built with CUDA kernels, else Triton;
  CPU tensors use the C++ CPU kernels. (Without the extension the public ops do not exist; the raw
  API of :func:`kernels_for` then falls back to the reference for CPU tensors.)
* ``cpu`` / ``cuda``: the compiled extension (an error if it is missing).
* ``triton``: the Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
* ``reference``: the pure-PyTorch reference everywhere.

The compiled CPU kernels come in two builds, baseline and AVX2 + FMA; the extension registers the
AVX2 one where the CPU has it, unless ``FFN_KERNELS_CPU_ISA=baseline`` (:func:`cpu_isa` says which).
They write outputs larger than the last-level cache keeps with streaming stores, unless
``FFN_KERNELS_CPU_STREAM=never``.
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
    "bn_add_relu_shift_alter_fwd", "bn_add_relu_shift_alter_bwd", "temporal_conv_fwd",
    "temporal_conv_bwd", "freq_layer_norm_fwd", "freq_layer_norm_bwd",
)

CPU_ISA_ENV = "FFN_KERNELS_CPU_ISA"
CPU_ISA_CHOICES = ("auto", "baseline")
CPU_STREAM_ENV = "FFN_KERNELS_CPU_STREAM"
CPU_STREAM_CHOICES = ("auto", "never")


def _check_cpu_env() -> None:
    """The CPU kernels' variables, read by the extension when it loads (csrc/cpu/isa.cpp):
    ``FFN_KERNELS_CPU_ISA``, ``auto`` (the AVX2 build where the CPU has AVX2 and FMA) or
    ``baseline``; ``FFN_KERNELS_CPU_STREAM``, ``auto`` (outputs larger than the last-level cache
    keeps are written with streaming stores, docs/design.md §4.4) or ``never``."""
    for env, choices in ((CPU_ISA_ENV, CPU_ISA_CHOICES), (CPU_STREAM_ENV, CPU_STREAM_CHOICES)):
        value = os.environ.get(env, "auto")
        if value not in choices + ("",):
            raise ValueError(f"{env}={value!r}: expected one of {', '.join(choices)}")


_check_cpu_env()
_extension_error: str | None = None
try:
    importlib.import_module("ffn_kernels._C")  # registers torch.ops.ffn_kernels.*
except ImportError as exc:  # the package must import without its compiled part
    _extension_error = str(exc)


def extension_loaded() -> bool:
    return _extension_error is None


def _compiled_keys() -> frozenset:
    """The dispatch keys (``CPU``, ``CUDA``) with compiled kernels of every raw op, asked of the
    dispatcher at import, before any Python kernel is registered (no GPU needed)."""
    if not extension_loaded():
        return frozenset()
    return frozenset(key for key in ("CPU", "CUDA") if all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"ffn_kernels::{op}", key)
        for op in RAW_OPS))


_compiled_for = _compiled_keys()


def compiled_kernels(dispatch_key: str) -> bool:
    """Whether the compiled extension carries kernels for ``dispatch_key`` (``CPU``, ``CUDA``)."""
    return dispatch_key in _compiled_for


def cpu_isa() -> str | None:
    """The instruction set of the CPU kernels registered in this process (``avx2`` or
    ``baseline``), or None without the extension."""
    return torch.ops.ffn_kernels.cpu_isa() if extension_loaded() else None


def extension_has_cuda() -> bool:
    """Whether the compiled extension carries CUDA kernels (a dispatcher query, no GPU needed)."""
    return compiled_kernels("CUDA")


def _compiled() -> SimpleNamespace:
    ops = torch.ops.ffn_kernels
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


def _python_kernel(name: str):
    def run(*args):
        return getattr(kernels_for(args[0]), name)(*args)

    run.__name__ = name
    return run


def _register(lib: torch.library.Library, dispatch_key: str) -> torch.library.Library:
    for name in RAW_OPS:
        lib.impl(name, _python_kernel(name), dispatch_key)
    return lib


# Device types without compiled kernels (CUDA in a CPU-only build, any other device type) run the
# raw ops' CompositeExplicitAutograd kernel: the Python backends.
_python_fallback = (_register(torch.library.Library("ffn_kernels", "IMPL"),
                              "CompositeExplicitAutograd") if _extension_error is None else None)
# Where a Python backend is chosen for a device type that has compiled kernels, its Python
# kernels stand in for them (the dispatcher keeps the compiled ones and restores them when this
# library is destroyed).
_python_override: torch.library.Library | None = None


def _python_keys() -> list[str]:
    """The dispatch keys with compiled kernels whose tensors the current choice runs in Python."""
    if _choice is None:  # the Python route raises the variable's error at the first op call
        return sorted(_compiled_for)
    return [key for key in sorted(_compiled_for) if backend_name(key.lower()) != key.lower()]


def _set_routes() -> None:
    global _python_override
    if not extension_loaded():
        return
    if _python_override is not None:
        _python_override._destroy()
        _python_override = None
    keys = _python_keys()
    if keys:
        lib = torch.library.Library("ffn_kernels", "IMPL")
        with warnings.catch_warnings():  # the dispatcher notes that a kernel is overridden
            warnings.filterwarnings("ignore", message="Warning only once for all operators")
            for key in keys:
                _register(lib, key)
        _python_override = lib


if _extension_error is None:
    _set_routes()
else:
    warnings.warn(
        f"ffn_kernels: compiled extension not available ({_extension_error}); ffn_kernels.ops "
        "will raise until it is built (ffn_kernels.reference still works)",
        RuntimeWarning,
        stacklevel=2,
    )
