"""Accuracy-vs-frames results of one or more models: JSON, CSV, a Markdown table and a PNG plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

# model label -> frame count -> {"top1", "top5", ...}; a summary over runs (seeds) also holds
# "top1_min" and "top1_max"
Results = dict[str, dict[int, dict]]


def markdown_table(results: Results, metric: str = "top1", fmt: str = "{:.1f}") -> str:
    """Frame counts down, models across; a cell with a range reads ``mean (min..max)``."""
    labels = list(results)
    frames = sorted({n for r in results.values() for n in r})
    lines = ["| frames | " + " | ".join(labels) + " |", "|---:|" + "---:|" * len(labels)]
    for n in frames:
        cells = [cell(results[m][n], metric, fmt) if n in results[m] else "" for m in labels]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cell(entry: dict, metric: str, fmt: str) -> str:
    text = fmt.format(entry[metric])
    if f"{metric}_min" in entry:
        text += f" ({fmt.format(entry[f'{metric}_min'])}..{fmt.format(entry[f'{metric}_max'])})"
    return text


def write_results(results: Results, out: str | Path, title: str = "Top-1 accuracy vs frames",
                  chance: float | None = None) -> dict[str, Path]:
    """Write ``results.json``, ``results.csv``, ``results.md`` and ``accuracy.png`` into ``out``
    (``chance``: the top-1 of guessing, in %, drawn as a dashed line)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"results.{k}" for k in ("json", "csv", "md")}
    paths["png"] = out / "accuracy.png"
    paths["json"].write_text(json.dumps({m: {str(n): v for n, v in r.items()} for m, r in results.items()},
                                        indent=2))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "frames", "top1", "top5", "videos", "skipped"])
        for m, r in results.items():
            for n, v in sorted(r.items()):
                writer.writerow([m, n, f"{v['top1']:.2f}", f"{v['top5']:.2f}", v["videos"], v["skipped"]])
    paths["md"].write_text(f"{title} (%)\n\n{markdown_table(results)}\n")
    plot(results, paths["png"], title, chance)
    return paths


def plot(results: Results, path: str | Path, title: str, chance: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    plot_accuracy(ax, results, chance)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy(ax, results: Results, chance: float | None = None) -> None:
    """Top-1 vs frames on the matplotlib axes ``ax``, one line per model (a shaded band where the
    results hold a min..max range)."""
    from matplotlib.ticker import MaxNLocator

    for label, r in results.items():
        frames = sorted(r)
        line, = ax.plot(frames, [r[n]["top1"] for n in frames], marker="o", markersize=3, label=label)
        if all("top1_min" in r[n] for n in frames):
            ax.fill_between(frames, [r[n]["top1_min"] for n in frames], [r[n]["top1_max"] for n in frames],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("frames at inference")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
