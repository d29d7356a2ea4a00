"""The per-epoch training log, as CSV and JSON lines."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path


class RunLog:
    """``log.csv`` and ``log.jsonl`` in ``out``. A run resumed after ``completed`` epochs drops rows of
    later epochs (written before a kill that came before their checkpoint).

    Both files are rewritten whole on every row (a temporary file, then a rename; ``log.jsonl``
    first, it is the one read back), so a kill never leaves a partial row or an empty log behind.
    """

    def __init__(self, out: str | Path, completed: int = 0) -> None:
        self.csv, self.jsonl = Path(out) / "log.csv", Path(out) / "log.jsonl"
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

    def _save(self) -> None:
        self.csv.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.jsonl, "".join(json.dumps(row) + "\n" for row in self._rows))
        text = io.StringIO()
        if self._rows:
            writer = csv.DictWriter(text, fieldnames=list(self._rows[0]))
            writer.writeheader()
            writer.writerows(self._rows)
        _write_atomic(self.csv, text.getvalue())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
