"""The per-epoch training log, as CSV and JSON lines, and its plot."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .rundir import write_atomic


class RunLog:
    """``log.csv`` and ``log.jsonl`` in ``out``, and the plot of their rows, ``log.png``
    (:meth:`plot`). A run resumed after ``completed`` epochs drops rows of later epochs (written
    before a kill that came before their checkpoint).

    Both files are rewritten whole on every row (a temporary file, then a rename; ``log.jsonl``
    first, it is the one read back), so a kill never leaves a partial row or an empty log behind.
    """

    def __init__(self, out: str | Path, completed: int = 0) -> None:
        self.csv, self.jsonl, self.png = Path(out) / "log.csv", Path(out) / "log.jsonl", Path(out) / "log.png"
        self._rows = [row for row in self.rows() if row.get("epoch", 0) <= completed]
        self._save()

    def rows(self) -> list[dict]:
        """The rows in ``log.jsonl`` (lines that do not parse, such as a torn last line of a log
        written by an older version, are left out)."""
        if not self.jsonl.is_file():
            return []
        rows = []
        for line in self.jsonl.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def write(self, row: dict) -> None:
        self._rows.append(row)
        self._save()

    def plot(self) -> Path:
        """Write ``log.png`` (:func:`plot_log` of every row, those of the epochs before a resume
        too), atomically like the log."""
        png = io.BytesIO()
        plot_log(self._rows, png, title=str(self.png.parent))
        write_atomic(self.png, png.getvalue())
        return self.png

    def _save(self) -> None:
        self.csv.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.jsonl, "".join(json.dumps(row) + "\n" for row in self._rows).encode())
        text = io.StringIO()
        if self._rows:
            writer = csv.DictWriter(text, fieldnames=list(self._rows[0]))
            writer.writeheader()
            writer.writerows(self._rows)
        write_atomic(self.csv, text.getvalue().encode())


def plot_log(rows: list[dict], file, title: str = "") -> None:
    """Training curves of log rows as a PNG written to ``file`` (a path or a binary file): the
    training loss and its cross-entropy and distillation parts per epoch; the validation top-1 of
    each branch (solid) and its training top-1 (dashed) per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def series(key: str) -> tuple[list, list]:
        points = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        return [e for e, _ in points], [v for _, v in points]

    branches = sorted({int(k.split("@")[1]) for r in rows for k in r
                       if k.startswith(("val_top1@", "train_top1@")) and k.split("@")[1].isdigit()})
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("loss", "loss"), ("ce", "cross-entropy"), ("kl", "distillation (KL)")):
        x, y = series(key)
        if x:
            loss_ax.plot(x, y, marker="o", markersize=3, label=label)
    loss_ax.set_ylabel("training loss (epoch mean)")
    for i, t in enumerate(branches):
        color = f"C{i % 10}"
        for key, style, what in ((f"val_top1@{t}", "-", "validation"), (f"train_top1@{t}", "--", "training")):
            x, y = series(key)
            if x:
                acc_ax.plot(x, y, style, color=color, marker="o", markersize=3, label=f"{t} frames, {what}")
    acc_ax.set_ylabel("top-1 accuracy (%)")
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(file, format="png", dpi=100)
    plt.close(fig)
