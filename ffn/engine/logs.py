"""The per-epoch training log, as CSV and JSON lines."""

from __future__ import annotations

import csv
import json
from pathlib import Path


class RunLog:
    """``log.csv`` and ``log.jsonl`` in ``out``. A run resumed after ``completed`` epochs drops rows of
    later epochs (written before a crash that came before their checkpoint)."""

    def __init__(self, out: str | Path, completed: int = 0) -> None:
        self.csv, self.jsonl = Path(out) / "log.csv", Path(out) / "log.jsonl"
        rows = self.rows()
        for path in (self.csv, self.jsonl):
            path.unlink(missing_ok=True)
        for row in rows:
            if row["epoch"] <= completed:
                self.write(row)

    def rows(self) -> list[dict]:
        if not self.jsonl.is_file():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line]

    def write(self, row: dict) -> None:
        self.csv.parent.mkdir(parents=True, exist_ok=True)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        new = not self.csv.is_file()
        with self.csv.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
