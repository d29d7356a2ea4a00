"""Progress of a long loop: a tqdm bar on a terminal, plain lines where the output is recorded.

A bar redraws itself with ``\\r`` frames, which a log file, a pipe or a CI job's output keeps as one
endless line. Where stdout or stderr is not a terminal (or where asked), :class:`Progress` prints
instead one line every ``every`` steps or every ``seconds`` seconds, whichever comes first, and one
at the last step: the step, the caller's values (e.g. the loss) and the time left.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO

SECONDS = 30.0  # the longest time between two plain lines


def is_terminal() -> bool:
    """Whether stdout and stderr are both terminals (a bar is drawn on stderr; where either is
    recorded, the record gets plain lines instead)."""
    return all(getattr(s, "isatty", lambda: False)() for s in (sys.stdout, sys.stderr))


def duration(seconds: float) -> str:
    """``h:mm:ss``."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """``total`` steps of a loop named ``desc``.

    ``bar=None`` draws a tqdm bar where :func:`is_terminal`, else plain lines; ``bar=False`` always
    prints plain lines (to ``file``, default stdout). ``enabled=False`` prints nothing (the ranks
    other than 0). :meth:`update` takes the values to show (``loss="1.234"``)."""

    def __init__(self, total: int, desc: str, *, unit: str = "step", every: int = 50,
                 seconds: float = SECONDS, bar: Optional[bool] = None, enabled: bool = True,
                 file: Optional[TextIO] = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.every, self.seconds, self.clock = max(1, every), seconds, clock
        self.enabled, self.file = enabled, file
        self.count = 0
        self.start = self.last = clock()
        self.bar = None
        if enabled and (is_terminal() if bar is None else bar):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)

    def update(self, n: int = 1, **values) -> None:
        self.count += n
        if not self.enabled:
            return
        if self.bar is not None:
            if values:
                self.bar.set_postfix(values, refresh=False)
            self.bar.update(n)
            return
        now = self.clock()
        if self.count % self.every and now - self.last < self.seconds and self.count < self.total:
            return
        self.last = now
        elapsed = now - self.start
        left = elapsed / self.count * (self.total - self.count) if self.count else 0.0
        shown = "".join(f", {k} {v}" for k, v in values.items())
        print(f"{self.desc}: {self.unit} {self.count}/{self.total}{shown}, {duration(elapsed)} elapsed, "
              f"ETA {duration(left)}", file=self.file or sys.stdout, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
