"""Collects benchmark rows, prints them as tables and writes JSON, CSV and a PNG chart."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from timing import Timing


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n## {title}")
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)), flush=True)


class Report:
    def __init__(self, out_dir: str, meta: dict) -> None:
        self.out = Path(out_dir)
        self.meta = meta
        self.sections: dict[str, list[dict]] = {"overhead": [], "ops": [], "traffic": [],
                                                 "roofline": [], "model": [], "profile": [],
                                                 "projection": []}

    def print_header(self) -> None:
        print("# ffn-kernels benchmark: " + ", ".join(f"{k}={v}" for k, v in self.meta.items()))

    def key(self) -> dict:
        """Fields that key every row: where and with what it was measured."""
        return {k: self.meta[k] for k in ("device", "torch", "ffn_kernels", "dtype")}

    def op_row(self, stage: str, op: str, mode: str, shape, timings: dict[str, Timing]) -> None:
        ms = {k: t.ms for k, t in timings.items()}
        self.sections["ops"].append({
            **self.key(), "stage": stage, "op": op, "mode": mode, "shape": "x".join(map(str, shape)),
            "fused_ms": ms.get("fused"), "eager_ms": ms.get("eager"), "compile_ms": ms.get("compile"),
            "eager/fused": _ratio(ms.get("eager"), ms.get("fused")),
            "compile/fused": _ratio(ms.get("compile"), ms.get("fused")),
        })

    def add(self, section: str, row: dict) -> None:
        self.sections[section].append({**self.key(), **row})

    def print_ops(self) -> None:
        print_table("Ops: median ms (speedup = eager/fused, compile/fused; > 1 means fused is faster)",
                    self.sections["ops"], ["stage", "op", "mode", "fused_ms", "eager_ms",
                                           "compile_ms", "eager/fused", "compile/fused"])

    def print_section(self, section: str, title: str, columns: list[str]) -> None:
        print_table(title, self.sections[section], columns)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps({"meta": self.meta, **self.sections}, indent=1))
        rows = [{"section": s, **r} for s, rs in self.sections.items() for r in rs]
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with open(self.out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        self._plot()
        print(f"\nwrote {self.out / 'results.json'}, results.csv and the chart")

    def _plot(self) -> None:
        try:
            import matplotlib
        except ImportError:  # e.g. a bare GPU image: the tables, JSON and CSV are the results
            print("matplotlib is not installed: no results.png")
            return

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [s for s in ("ops", "traffic", "model") if self.sections[s]]
        if not panels:
            return
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
        for ax, section in zip(axes[0], panels):
            getattr(self, f"_plot_{section}")(ax)
        fig.suptitle(f"ffn-kernels on {self.meta['device']} ({self.meta['dtype']}, torch {self.meta['torch']})")
        fig.tight_layout()
        fig.savefig(self.out / "results.png", dpi=110)
        plt.close(fig)

    def _plot_ops(self, ax) -> None:
        rows = [r for r in self.sections["ops"] if r["mode"] == "fwd+bwd"]
        labels = [f"{r['stage']}\n{r['op'].replace('_', ' ')}" for r in rows]
        xs = range(len(rows))
        for offset, key, label in ((-0.2, "eager/fused", "vs eager"), (0.2, "compile/fused", "vs torch.compile")):
            ax.bar([x + offset for x in xs], [r[key] or 0 for r in rows], width=0.4, label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(xs), labels, rotation=90, fontsize=6)
        ax.set_ylabel("speedup of fused (fwd+bwd)")
        ax.set_title("Ops: forward+backward speedup")
        ax.legend()

    def _plot_traffic(self, ax) -> None:
        rows = self.sections["traffic"]
        labels = [f"{r['op'].replace('_', ' ')}\n{r['pass']}" for r in rows]
        xs = range(len(rows))
        for offset, key, label in ((-0.27, "fused_B/elem", "fused (Triton, counted)"),
                                   (0, "eager_B/elem", "eager (aten in+out)"),
                                   (0.27, "minimum_B/elem", "minimum")):
            ax.bar([x + offset for x in xs], [r[key] for r in rows], width=0.27, label=label)
        ax.set_xticks(list(xs), labels, rotation=90, fontsize=7)
        ax.set_ylabel("bytes per element of x")
        ax.set_title("Memory traffic")
        ax.legend(fontsize=7)

    def _plot_model(self, ax) -> None:
        """Speed of every configuration relative to the best eager one of its task (median bar,
        min..max whisker from the spread of both)."""
        rows = [r for r in self.sections["model"] if r.get("best_eager/ms")]
        labels = [f"{r['task']}\n{r['impl']}" for r in rows]
        ratios = [r["best_eager/ms"] for r in rows]
        best = [r["ms"] * r["best_eager/ms"] for r in rows]  # the best eager median of the task
        lo = [ratio - b / r["max_ms"] for ratio, b, r in zip(ratios, best, rows)]
        hi = [b / r["min_ms"] - ratio for ratio, b, r in zip(ratios, best, rows)]
        colors = ["tab:blue" if r["impl"].startswith("fused") else "tab:gray" for r in rows]
        ax.bar(range(len(rows)), ratios, yerr=[lo, hi], color=colors, capsize=2)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
        ax.set_ylabel("speed vs the best eager configuration")
        ax.set_title(f"FFN model (allocator: {self.meta.get('allocator', '?')})")
