"""What this installation can run: ``python -m ffn_kernels.info``.

Prints the torch / CUDA / Triton versions, whether the compiled extension loaded, whether it
carries CPU and CUDA kernels (a dispatcher query: no GPU needed) and which backend CPU and CUDA
tensors would use under the current ``FFN_KERNELS_BACKEND`` choice.
"""

from __future__ import annotations

import importlib.metadata
import os

import torch

from . import __version__, backend


def _has_kernels(dispatch_key: str) -> dict[str, bool]:
    if not backend.extension_loaded():
        return {op: False for op in backend.RAW_OPS}
    return {op: torch._C._dispatch_has_kernel_for_dispatch_key(f"ffn_kernels_C::{op}", dispatch_key)
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


def report() -> list[tuple[str, str]]:
    """The facts printed by ``python -m ffn_kernels.info``, as (label, value) pairs."""
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [
        ("ffn_kernels", __version__),
        ("torch", torch.__version__),
        ("torch CUDA build", torch.version.cuda or "none (CPU-only torch)"),
        ("CUDA devices", str(cuda_devices) + (f" ({torch.cuda.get_device_name(0)})" if cuda_devices else "")),
        ("triton", _triton_version()),
        ("extension ffn_kernels._C", "loaded" if backend.extension_loaded()
         else f"not loaded ({backend._extension_error})"),
        ("CPU kernels", _kernels_line("CPU")),
        ("CUDA kernels", _kernels_line("CUDA")),
        ("FFN_KERNELS_BACKEND", os.environ.get("FFN_KERNELS_BACKEND", "auto") + f" (current choice: {backend.get_backend()})"),
        ("backend for cpu tensors", backend.backend_name("cpu")),
        ("backend for cuda tensors", backend.backend_name("cuda")),
    ]


def main() -> None:
    rows = report()
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}} : {value}")


if __name__ == "__main__":
    main()
