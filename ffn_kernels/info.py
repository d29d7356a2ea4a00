"""What this installation can run: ``python -m ffn_kernels.info`` (paste it into bug reports).

Prints, as ``torch.utils.collect_env`` users expect: Python, the OS, the CPU's vector ISA and
torch's thread count; the torch / CUDA / Triton versions; whether the compiled extension loaded and
what it was built with (torch version, compiler); whether it carries CPU and CUDA kernels (a
dispatcher query: no GPU needed); whether each backend can run here; and which backend CPU and
CUDA tensors use under the current ``FFN_KERNELS_BACKEND`` choice.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import sys
from typing import Sequence

import torch

from . import __version__, backend


def _has_kernels(dispatch_key: str) -> dict[str, bool]:
    if not backend.extension_loaded():
        return {op: False for op in backend.RAW_OPS}
    return {op: torch._C._dispatch_has_kernel_for_dispatch_key(f"ffn_kernels::{op}", dispatch_key)
            for op in backend.RAW_OPS}


def _kernels_line(dispatch_key: str) -> str:
    has = _has_kernels(dispatch_key)
    if all(has.values()):
        return "yes (all raw ops)"
    if not any(has.values()):
        return "no"
    return "partial, missing: " + ", ".join(op for op, ok in has.items() if not ok)


def _triton_version() -> str:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _build_info() -> str:
    if not backend.extension_loaded():
        return "-"
    return torch.ops.ffn_kernels.build_info()


def _usable() -> str:
    """Each backend and whether it can run ops here (and on which tensors)."""
    cuda = torch.cuda.is_available()
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    has_triton = importlib.util.find_spec("triton") is not None
    rows = {
        "cpu": backend.extension_loaded() and all(_has_kernels("CPU").values()),
        "cuda": cuda and backend.extension_has_cuda(),
        "triton": has_triton and (cuda or interpret),
        "reference": True,
    }
    notes = {"triton": "" if cuda or not has_triton else " (CPU tensors need TRITON_INTERPRET=1)"}
    return ", ".join(f"{name} {'yes' if ok else 'no'}{notes.get(name, '') if not ok else ''}"
                     for name, ok in rows.items())


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _choice(device: str) -> str:
    try:
        return backend.backend_name(device)
    except ValueError as exc:  # an invalid FFN_KERNELS_BACKEND
        return f"error: {exc}"


def report() -> list[tuple[str, str]]:
    """The facts printed by ``python -m ffn_kernels.info``, as (label, value) pairs."""
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [
        ("ffn_kernels", __version__),
        ("Python", sys.version.split()[0] + f" ({sys.executable})"),
        ("OS", platform.platform()),
        ("CPU", f"{cpu_model()} ({platform.machine()}), ISA {torch.backends.cpu.get_cpu_capability()}, "
                f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}"),
        ("torch", torch.__version__),
        ("torch CUDA build", torch.version.cuda or "none (CPU-only torch)"),
        ("CUDA devices", str(cuda_devices) + (f" ({torch.cuda.get_device_name(0)})" if cuda_devices else "")),
        ("triton", _triton_version()),
        ("extension ffn_kernels._C", "loaded" if backend.extension_loaded()
         else f"not loaded ({backend._extension_error})"),
        ("extension built with", _build_info()),
        ("CPU kernels", _kernels_line("CPU") + (f", {backend.cpu_isa()} build"
                                                 if backend.extension_loaded() else "")),
        ("CUDA kernels", _kernels_line("CUDA")),
        ("backends usable here", _usable()),
        ("FFN_KERNELS_BACKEND", os.environ.get("FFN_KERNELS_BACKEND", "auto")),
        (backend.CPU_ISA_ENV, os.environ.get(backend.CPU_ISA_ENV, "auto")),
        (backend.CPU_STREAM_ENV, os.environ.get(backend.CPU_STREAM_ENV, "auto")),
        ("backend for cpu tensors", _choice("cpu")),
        ("backend for cuda tensors", _choice("cuda")),
    ]


def main(argv: Sequence[str] = ()) -> None:
    argparse.ArgumentParser(
        prog="python -m ffn_kernels.info", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).parse_args(argv)
    rows = report()
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}} : {value}")


if __name__ == "__main__":
    main(sys.argv[1:])
