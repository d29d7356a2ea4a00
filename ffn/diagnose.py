"""``ffn diagnose``: normalization shifting, the cause of Temporal Frequency Deviation, measured.

At inference with ``n`` frames, every BatchNorm normalises with the running statistics of the branch
that serves ``n`` (the nearest one, :func:`ffn.models.nearest_branch`). Those were learnt on clips
of the branch's own frame count; clips of another count give each layer inputs with other
statistics, and the normalised activations are off. For every BN layer and frame count, this module
measures the per-channel mean ``μ_b`` and (biased) variance ``σ²_b`` of the layer's input over all
its values (N·T·H·W per batch), pooled over the whole validation set, and compares them with the
running statistics ``μ_r``, ``σ²_r`` of the serving row. Per channel:

* ``mean shift = |μ_b − μ_r| / sqrt(σ²_r + ε)``: how far the normalised activations' mean is from
  0, in units of the scale BN divides by;
* ``var shift = |log((σ²_b + ε) / (σ²_r + ε))|``: the log ratio of the variance BN would divide by
  on these clips to the one it does divide by (0 when equal, log 2 = 0.69 for a factor of 2).

A layer's number is the mean over its channels. Both are 0 exactly where the running statistics are
those of the clips. The statistics are pooled rather than per batch, so the number says what the
layer sees at ``n`` frames on this data, not how noisy one batch is; they are summed on the fly
(per-batch moments merged with Chan's formula, in float64), never storing activations.

In an :class:`~ffn.models.FFNResNet`, each BN's input is taken from the output of the convolution
that feeds it (the stem conv, a block's convs, a downsample conv): the block-boundary BNs run inside
the fused ``bn_add_relu_shift_alter`` op, which no hook on the BN sees. In other models (e.g. those
of :func:`ffn.ffnify`) a BN called as a module shows its input to a hook on itself.
"""

from __future__ import annotations

import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from ffn_kernels import FreqBatchNorm2d

from .config import DataConfig
from .data import build_source, eval_dataset
from .engine.evaluate import accuracy
from .models import FFNResNet
from .report import markdown_table, plot_accuracy

METRICS = ("mean_shift", "var_shift")


@dataclass
class Moments:
    """Per-channel count, mean and sum of squared deviations (M2), merged batch by batch."""

    count: int = 0
    mean: Optional[Tensor] = None
    m2: Optional[Tensor] = None

    def add(self, x: Tensor) -> None:
        """Add the values of ``x`` ``[F, C, H, W]`` (or ``[N, C, T, H, W]``), per channel."""
        n = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x.detach().float(), dim=[0, *range(2, x.dim())], correction=0)
        mean, m2 = mean.double(), var.double() * n
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    @property
    def var(self) -> Tensor:
        return self.m2 / self.count


def norm_layers(model: nn.Module) -> dict[str, tuple[nn.Module, FreqBatchNorm2d]]:
    """Every BN of ``model`` by name, in depth order, with the module whose hook sees its input: for
    an :class:`~ffn.models.FFNResNet`, whose block-boundary BNs normalise inside the fused op, the
    conv that feeds it (its output); for other models, the BN itself (its input)."""
    names = {m: name for name, m in model.named_modules()}
    if not isinstance(model, FFNResNet):
        return {name: (m, m) for m, name in names.items() if isinstance(m, FreqBatchNorm2d)}
    pairs = [(model.conv1, model.bn1)]
    for block in model.blocks():
        pairs += block.pairs()
        if block.downsample is not None:
            pairs.append((block.downsample.conv, block.downsample.bn))
    layers = {names[bn]: (conv, bn) for conv, bn in pairs}
    missed = [n for m, n in names.items() if isinstance(m, FreqBatchNorm2d) and n not in layers]
    if missed:  # FFNResNet grew layers this function does not know: refuse rather than omit them
        raise ValueError(f"no input found for BatchNorm layers {missed}")
    return layers


def shift(moments: Moments, bn: FreqBatchNorm2d, row: int) -> dict[str, float]:
    """``{"mean_shift", "var_shift"}`` (module docstring) of ``moments`` against ``bn``'s row ``row``,
    each the mean over channels."""
    eps = bn.eps
    mean_r, var_r = bn.running_mean[row].double().cpu(), bn.running_var[row].double().cpu()
    mean_b, var_b = moments.mean.cpu(), moments.var.cpu()
    return {"mean_shift": ((mean_b - mean_r).abs() / (var_r + eps).sqrt()).mean().item(),
            "var_shift": ((var_b + eps) / (var_r + eps)).log().abs().mean().item()}


@dataclass
class Diagnosis:
    """One model's results: ``accuracy[n]`` as :func:`ffn.engine.evaluate.accuracy` gives it,
    ``branch[n]`` the frame count of the branch serving ``n``, ``layers[name][n]`` the shifts."""

    accuracy: dict[int, dict] = field(default_factory=dict)
    branch: dict[int, int] = field(default_factory=dict)
    layers: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)

    def mean_over_layers(self, n: int) -> dict[str, float]:
        return {k: sum(v[n][k] for v in self.layers.values()) / len(self.layers) for k in METRICS}


@torch.no_grad()
def diagnose(model: nn.Module, cfg: DataConfig, frames: Iterable[int], device: torch.device,
             amp_dtype: Optional[torch.dtype] = None, progress: bool = True,
             desc: str = "diagnose") -> Diagnosis:
    """Accuracy and the shift of every BN layer at every count in ``frames`` on the validation split
    of ``cfg``, for an FFN ``model`` (``frames``, ``branch_for`` and the forward of
    :class:`~ffn.models.FFNResNet`); one eval pass per count yields both (the statistics come from
    hooks, :func:`norm_layers`). Progress: a bar on a terminal (``progress=False``: never), else
    a plain line on stderr per frame count (or every 30 s)."""
    from .engine.progress import Progress

    frames = list(frames)
    layers = norm_layers(model)
    source = build_source(cfg, "val")
    moments: dict[str, Moments] = {}
    batches = math.ceil(len(source) / cfg.batch_size)
    bar = Progress(len(frames) * batches, desc, unit="batch", every=batches, bar=None if progress else False,
                   file=sys.stderr)
    current = {}

    def record(name):  # the BN's own input (a pre-hook), or the output of the conv feeding it
        return lambda m, args, out=None: moments[name].add(args[0] if out is None else out)

    def step(*_):  # a forward hook's non-None return value would replace the output
        bar.update(**current)

    hooks = [m.register_forward_pre_hook(record(name)) if m is bn else m.register_forward_hook(record(name))
             for name, (m, bn) in layers.items()]
    hooks.append(model.register_forward_hook(step))
    result, reported = Diagnosis(), set()
    try:
        for n in frames:
            current["frames"] = n
            moments.update({name: Moments() for name in layers})
            result.accuracy[n] = accuracy(model, eval_dataset(cfg, n, source=source), cfg.batch_size,
                                          cfg.workers, device, amp_dtype=amp_dtype, reported=reported)
            unseen = [name for name, m in moments.items() if m.mean is None]
            if unseen:  # e.g. a BN that normalises inside a fused op, called other than as a module
                raise ValueError(f"the inputs of BatchNorm layers {unseen} were not seen")
            row = model.branch_for(n)
            result.branch[n] = model.frames[row]
            for name, (_, bn) in layers.items():
                result.layers.setdefault(name, {})[n] = shift(moments[name], bn, row)
    finally:
        for h in hooks:
            h.remove()
        bar.close()
    return result


def write_diagnosis(results: dict[str, Diagnosis], out: str | Path,
                    chance: Optional[float] = None) -> dict[str, Path]:
    """Write ``shift.csv`` (one row per model, layer and frame count), ``diagnose.md`` (per frame
    count: top-1 and the shifts averaged over layers) and ``diagnose.png`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "shift.csv", "md": out / "diagnose.md", "png": out / "diagnose.png"}
    with paths["csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "layer", "frames", "branch_frames", *METRICS])
        for label, r in results.items():
            for layer, by_n in r.layers.items():
                for n, v in by_n.items():
                    writer.writerow([label, layer, n, r.branch[n], *(f"{v[k]:.5f}" for k in METRICS)])
    summary = summary_results(results)
    sections = [f"## {title}\n\n{markdown_table(summary, metric, fmt)}" for title, metric, fmt in (
        ("Top-1 accuracy (%)", "top1", "{:.1f}"),
        ("Mean shift, averaged over BN layers", "mean_shift", "{:.3f}"),
        ("Variance shift |log ratio|, averaged over BN layers", "var_shift", "{:.3f}"))]
    branches = "; ".join(f"{label}: {sorted(set(r.branch.values()))}" for label, r in results.items())
    paths["md"].write_text("# Normalization shift by frame count\n\nBranch frame counts: "
                           f"{branches}. Per layer: {paths['csv'].name}.\n\n" + "\n\n".join(sections) + "\n")
    plot_diagnosis(results, paths["png"], chance)
    return paths


def summary_results(results: dict[str, Diagnosis]) -> dict[str, dict[int, dict]]:
    """Per model and frame count, the accuracy and the shifts averaged over layers, in the form of
    :mod:`ffn.report`'s results."""
    return {label: {n: {**acc, **r.mean_over_layers(n)} for n, acc in r.accuracy.items()}
            for label, r in results.items()}


def plot_diagnosis(results: dict[str, Diagnosis], path: str | Path, chance: Optional[float] = None) -> None:
    """One heat map of the mean shift (layers x frames) per model on a shared colour scale; beside
    them, the layer-averaged shifts and the top-1 accuracy vs frames."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    k = len(labels)
    rows = max(len(r.layers) for r in results.values())
    fig = plt.figure(figsize=(3.2 * k + 5, 0.16 * rows + 3.2), layout="constrained")
    grid = fig.add_gridspec(2, k + 1, width_ratios=[1] * k + [1.5])
    top = max(v["mean_shift"] for r in results.values() for by_n in r.layers.values() for v in by_n.values())
    maps = []
    for i, label in enumerate(labels):
        r = results[label]
        frames = sorted(r.accuracy)
        ax = fig.add_subplot(grid[:, i])
        image = ax.imshow([[by_n[n]["mean_shift"] for n in frames] for by_n in r.layers.values()],
                          aspect="auto", cmap="magma", vmin=0, vmax=top, interpolation="nearest")
        ax.set_xticks(range(len(frames)), [str(n) if j % 2 == 0 or len(frames) <= 10 else ""
                                           for j, n in enumerate(frames)], fontsize=7)
        for j in range(1, len(frames)):  # where the serving branch changes
            if r.branch[frames[j]] != r.branch[frames[j - 1]]:
                ax.axvline(j - 0.5, color="white", linewidth=1, linestyle=":")
        # name the layers where they differ from the heat map on the left
        same = i > 0 and list(r.layers) == list(results[labels[i - 1]].layers)
        ax.set_yticks(range(len(r.layers)), [] if same else list(r.layers), fontsize=6)
        ax.set_xlabel("frames at inference")
        ax.set_title(f"{label}\nmean shift per BN layer", fontsize=9)
        maps.append(ax)
    fig.colorbar(image, ax=maps, fraction=0.04, pad=0.02)
    summary = summary_results(results)
    ax = fig.add_subplot(grid[0, k])
    for j, label in enumerate(labels):
        frames = sorted(summary[label])
        for metric, style in zip(METRICS, ("-", "--")):
            ax.plot(frames, [summary[label][n][metric] for n in frames], style, color=f"C{j}", marker="o",
                    markersize=2.5, label=f"{label}: {metric.replace('_', ' ')}")
    ax.set_ylabel("mean over layers")
    ax.set_title("normalization shift", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    plot_accuracy(fig.add_subplot(grid[1, k], sharex=ax), summary, chance)
    fig.savefig(path, dpi=100)
    plt.close(fig)
