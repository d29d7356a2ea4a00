"""FFN on TEA: a Res2Net-50 (26w x 4s) whose every bottleneck carries a motion excitation (ME)
module and a multiple temporal aggregation (MTA) path, on the packed layout (docs/design.md §5.8).

As in :class:`ffn.models.FFNResNet`, all branches of a step live in one tensor: every shared conv
(including ME's convs and the temporal conv1d taps) runs once on it, and every BatchNorm is
per branch (a :class:`~ffn_kernels.FreqBatchNorm2d` row per branch) through the fused ops. TEA-FFN
has no Weight Alteration and no TSM shift at block inputs: its temporal modelling is ME and MTA.

The two temporal operations act within each clip of each segment. They read the
:class:`~ffn_kernels.FrameLayout` (segment ``s`` is ``N`` clips of ``T_s`` frames, clip-major and
contiguous in dim 0). The temporal conv is the fused op :func:`ffn_kernels.ops.temporal_conv` (one
pass over the packed tensor, clip boundaries from the layout); ME's difference runs on pooled
``[F, C, 1, 1]`` tensors in plain PyTorch, each frame's neighbour in the packed tensor masked out
where it belongs to another clip or branch (docs/design.md §5.8).

``forward`` is :class:`~ffn.models.FrameFlexible`'s: eval at any frame count ``n`` uses the nearest
branch's BatchNorms and runs ME and the temporal conv over the ``n`` given frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ffn_kernels as kernels
from ffn_kernels import FrameLayout, FreqBatchNorm2d, ops, reference

from .models import Downsample, ResNetTrunk, clip_means

BASE_WIDTH = 26  # Res2Net-50 26w x 4s
SCALE = 4
REDUCTION = 16  # ME's channel reduction
COUNTS = (3, 4, 6, 3)


@dataclass(frozen=True)
class Passes:
    """How a TEA model runs its per-branch passes: the packed model's fused ops (:data:`FUSED`),
    or the eager twin's PyTorch, one branch at a time (:data:`EAGER`).

    ``norm(bn, x, layout, activation=None, residual=None)``: the per-branch BN (+ residual, ReLU);
    ``temporal_conv(x, layout, weight)``: MTA's conv1d over each clip's frames."""

    norm: Callable[..., Tensor]
    temporal_conv: Callable[[Tensor, FrameLayout, Tensor], Tensor]


def fused_norm(bn: FreqBatchNorm2d, x: Tensor, layout: FrameLayout,
               activation: Optional[str] = None, residual: Optional[Tensor] = None) -> Tensor:
    return bn(x, layout, activation=activation, residual=residual)


def frame_masks(layout: FrameLayout, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(has_prev, has_next)``, ``[F]`` booleans: frame f is not the first / not the last frame of
    its clip (``t > 0`` / ``t < T_s - 1``, from the layout: segment s is ``N`` clips of ``T_s``
    frames, clip-major)."""
    prev, nxt = [], []
    for seg in layout.segments():
        t = torch.arange(seg.frames, device=device).repeat(seg.clips)
        prev.append(t > 0)
        nxt.append(t < seg.frames - 1)
    if len(prev) == 1:
        return prev[0], nxt[0]
    return torch.cat(prev), torch.cat(nxt)


def neighbours(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` moved by one packed frame: ``(x[f-1], x[f+1])`` at ``f`` (zero beyond the ends).
    Across a clip or segment boundary these read another clip: :func:`frame_masks` zeroes those."""
    zero = torch.zeros_like(x[:1])
    return torch.cat([zero, x[:-1]]), torch.cat([x[1:], zero])


def _per_frame(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def motion_difference(feat: Tensor, moved: Tensor, layout: FrameLayout) -> Tensor:
    """ME's temporal difference ``moved[t+1] - feat[t]`` for ``t < T-1`` and 0 at each clip's last
    frame, within each clip of each segment (``[F, ...]`` in and out)."""
    _, has_next = frame_masks(layout, feat.device)
    _, moved_next = neighbours(moved)
    return (moved_next - feat) * _per_frame(has_next, feat)


class TemporalConv(nn.Module):
    """MTA's temporal depthwise conv1d (3 taps per channel, no bias, shared by the branches):
    ``conv`` is a :class:`ffn_kernels.TemporalConv` (``conv.weight [C, 1, 3]``, the official
    ``shifts.i.conv.weight``), initialised as TEA does: ``mode="shift"`` or ``"fixed"`` (identity).
    The model's :class:`Passes` choose the kernel: the fused op, or the official conv1d."""

    def __init__(self, channels: int, mode: str) -> None:
        super().__init__()
        self.conv = kernels.TemporalConv(channels, init="shift" if mode == "shift" else "identity")

    def forward(self, x: Tensor, layout: FrameLayout, passes: Passes) -> Tensor:
        return passes.temporal_conv(x, layout, self.conv.weight)


class MotionExcitation(nn.Module):
    """TEA's ME module: ``b = BN1(conv1 x)`` (C -> C/16), ``d[t] = conv2(b)[t+1] - b[t]`` (conv2: a
    shared depthwise 3x3; 0 at a clip's last frame), ``y = sigmoid(BN3(conv3(avgpool d))) - 0.5``,
    ``x + x*y``. BN1 and BN3 are per branch."""

    def __init__(self, channels: int, branches: int) -> None:
        super().__init__()
        reduced = max(1, channels // REDUCTION)
        self.conv1 = nn.Conv2d(channels, reduced, 1, bias=False)
        self.bn1 = FreqBatchNorm2d(reduced, branches)
        self.conv2 = nn.Conv2d(reduced, reduced, 3, padding=1, groups=reduced, bias=False)
        self.conv3 = nn.Conv2d(reduced, channels, 1, bias=False)
        self.bn3 = FreqBatchNorm2d(channels, branches)

    def forward(self, x: Tensor, layout: FrameLayout, passes: Passes) -> Tensor:
        b = passes.norm(self.bn1, self.conv1(x), layout)
        y = passes.norm(self.bn3, self.conv3(motion_pool(b, self.conv2(b), layout)), layout)
        return excite(x, y)


def motion_pool(b: Tensor, moved: Tensor, layout: FrameLayout) -> Tensor:
    """``avgpool(moved[t+1] - b[t])`` ``[F, C, 1, 1]``: the spatial average commutes with the
    difference, so both are pooled first and the difference is taken on ``[F, C, 1, 1]``."""
    return motion_difference(b.mean((2, 3), keepdim=True), moved.mean((2, 3), keepdim=True), layout)


def excite(x: Tensor, y: Tensor) -> Tensor:
    """ME's gate: ``x + x * (sigmoid(y) - 0.5)``, ``y [F, C, 1, 1]``."""
    return torch.addcmul(x, x, torch.sigmoid(y) - 0.5)


class TEABlock(nn.Module):
    """Res2Net bottleneck (26w x 4s) with ME and MTA. ``stage``: the first block of a stage (its
    split groups are not chained, its last group is average-pooled with the stride)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, branches: int, stage: bool) -> None:
        super().__init__()
        width = int(math.floor(planes * (BASE_WIDTH / 64.0)))
        self.width, self.stage = width, stage
        self.me = MotionExcitation(width * SCALE, branches)
        self.conv1 = nn.Conv2d(inplanes, width * SCALE, 1, bias=False)
        self.bn1 = FreqBatchNorm2d(width * SCALE, branches)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
                                   for _ in range(SCALE - 1))
        self.bns = nn.ModuleList(FreqBatchNorm2d(width, branches) for _ in range(SCALE - 1))
        self.shifts = nn.ModuleList([TemporalConv(width, "fixed") for _ in range(SCALE - 1)]
                                    + [TemporalConv(width, "shift")])
        self.pool = nn.AvgPool2d(3, stride=stride, padding=1) if stage else None
        out = planes * self.expansion
        self.conv3 = nn.Conv2d(width * SCALE, out, 1, bias=False)
        self.bn3 = FreqBatchNorm2d(out, branches)
        self.downsample = (Downsample(inplanes, out, stride, branches)
                           if stride != 1 or inplanes != out else None)

    def forward(self, x: Tensor, layout: FrameLayout, passes: Passes) -> Tensor:
        norm = passes.norm
        h = norm(self.bn1, self.conv1(x), layout, activation="relu")
        h = self.me(h, layout, passes)
        parts = h.split(self.width, 1)
        outs = []
        sp = parts[0]
        for i, (conv, bn, shift) in enumerate(zip(self.convs, self.bns, self.shifts)):
            if i > 0:
                sp = parts[i] if self.stage else sp + parts[i]
            sp = norm(bn, conv(shift(sp, layout, passes)), layout, activation="relu")
            outs.append(sp)
        last = self.shifts[-1](parts[-1], layout, passes)
        outs.append(self.pool(last) if self.stage else last)
        h = self.conv3(torch.cat(outs, 1))
        identity = x if self.downsample is None else norm(
            self.downsample.bn, self.downsample.conv(x), layout)
        return norm(self.bn3, h, layout, activation="relu", residual=identity)


class FFNTEA(ResNetTrunk):
    """Frame Flexible TEA (Res2Net-50 26w x 4s with ME and MTA): shared convs, temporal taps and
    classifier, per-branch BatchNorm. ``width`` is the stem's channel count (64 in TEA and the
    official checkpoints; stage ``i`` has ``width << i`` planes, and Res2Net's split width is
    ``floor(planes * 26 / 64)``); smaller widths make quick CPU runs."""

    def __init__(self, frames: Sequence[int] = (4, 8, 16), num_classes: int = 400,
                 dropout: float = 0.5, width: int = 64) -> None:
        super().__init__(frames)
        self.config = dict(frames=self.frames, num_classes=num_classes, dropout=dropout,
                           width=width)
        self._build_trunk(width, COUNTS, TEABlock.expansion,
                          lambda inplanes, planes, stride, first: TEABlock(
                              inplanes, planes, stride, self.num_branches, stage=first),
                          dropout, num_classes)

    def features(self, x: Tensor, layout: FrameLayout, passes: Optional[Passes] = None) -> Tensor:
        passes = passes or FUSED
        x = self.maxpool(passes.norm(self.bn1, self.conv1(x), layout, activation="relu"))
        for block in self.blocks():
            x = block(x, layout, passes)
        return x

    def branch_logits(self, x: Tensor, layout: FrameLayout) -> tuple[Tensor, ...]:
        pooled = torch.cat(clip_means(self.features(x, layout).mean((2, 3)), layout))
        logits = self.fc(self.dropout(pooled))
        return (logits,) if layout.num_segments == 1 else logits.split(layout.clips)


def eager_norm(bn: FreqBatchNorm2d, x: Tensor, layout: FrameLayout,
               activation: Optional[str] = None, residual: Optional[Tensor] = None) -> Tensor:
    """One branch's ``nn.BatchNorm2d`` (the layout has one segment), then ``+ residual``, ReLU."""
    from .eager import branch_norm

    (seg,) = layout.segments()
    y = branch_norm(bn, x, seg.row)
    if residual is not None:
        y = y + residual
    return F.relu(y) if activation == "relu" else y


FUSED = Passes(fused_norm, ops.temporal_conv)
# the official code's conv1d (two permute copies around nn.Conv1d) is the reference's
EAGER = Passes(eager_norm, reference.temporal_conv)


class EagerFFNTEA(FFNTEA):
    """Eager twin of :class:`FFNTEA` (same modules and keys), structured like the official code:
    the branches run one after another, each BN is ``F.batch_norm`` on its row views."""

    def branch_logits(self, x: Tensor, layout: FrameLayout) -> tuple[Tensor, ...]:
        out = []
        for xs, seg in zip(layout.split(x), layout.segments()):
            one = FrameLayout.single(seg.clips, seg.frames, seg.row)
            feats = self.features(xs, one, EAGER).mean((2, 3))
            out.append(self.fc(self.dropout(feats.view(seg.clips, seg.frames, -1).mean(1))))
        return tuple(out)
