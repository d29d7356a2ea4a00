"""The process's memory allocator for long CPU jobs (docs/design.md §7).

A video model's activations are tens to hundreds of MB each. glibc serves such buffers with fresh
``mmap`` calls and returns them on free (and torch's 64-byte-aligned requests fragment its heap when
it does keep them), so every new activation pays page faults on first touch: here a fresh-output
pass over a ResNet-50 layer1 activation (``[56, 256, 56, 56]`` fp32, 180 MB) costs 73 ms, of which
45 ms are 44,000 page faults; into a reused buffer it costs 28 ms. mimalloc keeps freed memory
committed for reuse (``MIMALLOC_PURGE_DELAY=-1``), so the same pass costs 28 ms every time.

An allocator is chosen when a process starts, so :func:`use_mimalloc` re-executes the running
command with ``libmimalloc`` preloaded (from the ``cmeel-mimalloc`` wheel). The ``ffn`` command and
``bench/run.py`` call it first; ``import ffn_kernels`` / ``import ffn`` never do, since a library
must not change its user's process. ``FFN_ALLOCATOR=system`` keeps glibc.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata

ENV = "FFN_ALLOCATOR"
CHOICES = ("mimalloc", "system")
_REEXEC = "_FFN_ALLOCATOR_REEXEC"  # set in the re-executed process: never loop


def mimalloc_library() -> str | None:
    """Path of the installed ``libmimalloc.so`` (``cmeel-mimalloc``), or None."""
    try:
        files = metadata.files("cmeel-mimalloc") or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == "libmimalloc.so":
            path = str(f.locate())
            return path if os.path.exists(path) else None
    return None


def active() -> str:
    """``"mimalloc"`` if it serves this process's allocations, else ``"system"``."""
    try:
        with open("/proc/self/maps") as maps:
            return "mimalloc" if any("libmimalloc" in line for line in maps) else "system"
    except OSError:
        return "system"


def requested() -> str:
    choice = os.environ.get(ENV, "mimalloc").strip().lower() or "mimalloc"
    if choice not in CHOICES:
        raise ValueError(f"{ENV} must be one of {CHOICES}, got {choice!r}")
    return choice


def use_mimalloc() -> str:
    """Re-execute this command with mimalloc preloaded, unless ``FFN_ALLOCATOR=system``, mimalloc
    is not installed, this is not Linux, or it is already active. Returns the allocator in use (in
    the process that goes on)."""
    if requested() == "system" or active() == "mimalloc" or os.environ.get(_REEXEC):
        return active()
    library = mimalloc_library()
    if library is None or not sys.platform.startswith("linux"):
        return "system"
    preload = os.environ.get("LD_PRELOAD")
    env = dict(os.environ, LD_PRELOAD=library + (":" + preload if preload else ""))
    env.setdefault("MIMALLOC_PURGE_DELAY", "-1")  # keep freed pages committed for reuse
    env[_REEXEC] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    return "mimalloc"  # not reached


def system_env() -> dict:
    """This process's environment for a child that must run on the system allocator."""
    env = dict(os.environ, **{ENV: "system"})
    env.pop(_REEXEC, None)
    preload = [p for p in env.pop("LD_PRELOAD", "").split(":") if p and "libmimalloc" not in p]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return env
