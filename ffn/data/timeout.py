"""The per-video time limit of ``data.decode_timeout``: a decode that hangs becomes a
:class:`~ffn.data.records.BadSampleError`, which ``--skip-bad`` counts, instead of a stalled run."""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from .records import BadSampleError


@contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise :class:`BadSampleError` naming ``what`` if the block runs longer than ``seconds``.

    A ``SIGALRM`` timer (two system calls per video, no thread): the handler raises in the loading
    thread as soon as it is back in Python, which a decode is between frames (PIL's chunks, PyAV's
    frames); a system call that blocks is interrupted by the signal. Signals reach only the main
    thread, which is where DataLoader workers (and ``data.workers=0``) load; in any other thread, or
    with ``seconds=0``, there is no limit. A timer already set (by the caller) is restored after."""
    outer = signal.getitimer(signal.ITIMER_REAL)[0]
    if seconds <= 0 or 0 < outer <= seconds or threading.current_thread() is not threading.main_thread():
        yield  # no limit, or the caller's timer fires first
        return

    def expired(signum, frame):
        raise BadSampleError(f"{what}: not read within data.decode_timeout={seconds:g} s (a hung decode?)")

    previous = signal.signal(signal.SIGALRM, expired)
    start = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:  # the caller's timer, less the time spent here (at once where that has run out)
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3))
