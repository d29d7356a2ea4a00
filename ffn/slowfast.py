"""FFN on SlowFast-R50 (the official 3D_Network's ``SlowFast_FFN``; docs/design.md §5.10).

Two pathways of 3D convolutions: the fast one sees every frame of a clip with ``width / 8``
channels, the slow one sees ``1 / alpha`` of the frames with ``width`` channels, and after the stem
and each of the first three stages a time-strided lateral conv carries the fast features into the
slow pathway (concatenated along channels). Convs, lateral convs and the head are shared by the
branches; every BatchNorm is per branch (a :class:`~ffn_kernels.FreqBatchNorm3d` row), and so is
each bottleneck's Weight Alteration (``x + w_b * x`` on the block input, the official
``adaconv_{4,8,16}``).

``frames`` are the fast pathway's counts (16/32/64 officially); the model takes the slow pathway
from the same clip (:func:`slow_indices`), so the data pipeline hands it ordinary clips. The
branches differ in T, so each branch runs its own 3D convs; the fused model differs from the eager
twin in its per-branch passes: BN (+ residual) (+ ReLU) in one fused op, and WA folded into the
weight of the conv it feeds (a ``[C_out, C_in]`` scale instead of a pass over the activation).

Module names follow the official ones, so its checkpoint keys map by appending the branch suffix
(``s2.pathway0_res0.branch2.a_bn`` row ``b`` <-> ``s2.pathway0_res0.branch2.a_bn_{4,8,16}``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ffn_kernels import FrameLayout, FreqBatchNorm3d, ShiftAlter

from .eager import branch_norm
from .models import FrameFlexible

ALPHA = 4  # frame-rate ratio of the fast to the slow pathway
BETA_INV = 8  # channel ratio of the slow to the fast pathway
FUSION_RATIO = 2  # lateral conv: fast channels -> FUSION_RATIO x fast channels
FUSION_KERNEL = 7  # its temporal kernel
COUNTS = (3, 4, 6, 3)  # bottlenecks per stage (ResNet-50)
# temporal kernel of the (slow, fast) pathway in the stem and stages res2..res5 (official config)
TEMPORAL_KERNELS = ((1, 5), (1, 3), (1, 3), (3, 3), (3, 3))


def slow_indices(n: int, alpha: int) -> Tensor:
    """The fast-pathway frames the slow pathway takes from an ``n``-frame clip: ``ceil(n / alpha)``
    frames evenly spread over ``0..n-1`` (``linspace``, truncated), PySlowFast's rule wherever
    ``alpha`` divides ``n``; for other ``n`` the count is the lateral conv's output length, so the
    fused features line up. ``n < alpha`` is refused."""
    if n < alpha:
        raise ValueError(f"SlowFast needs at least alpha={alpha} frames per clip (its slow pathway "
                         f"samples one of every alpha), got {n}")
    # float32 as PySlowFast computes it, on the CPU: the truncation must not depend on the device
    return torch.linspace(0, n - 1, math.ceil(n / alpha), dtype=torch.float32).long()


@dataclass(frozen=True)
class Passes:
    """How the model runs its per-branch work: the fused ops (:data:`FUSED`) or the eager twin's
    PyTorch in the official order (:data:`EAGER`).

    ``norm(bn, x, row, activation=None, residual=None)``: branch ``row``'s BN, then ``+ residual``
    and the activation; ``altered_conv(conv, alter, x, row)``: ``conv(x + w_row * x)``."""

    norm: Callable[..., Tensor]
    altered_conv: Callable[[nn.Conv3d, ShiftAlter, Tensor, int], Tensor]


class Stem(nn.Module):
    """conv (``kt x 7 x 7``, spatial stride 2) -> per-branch BN -> ReLU -> 1x3x3 max pool."""

    def __init__(self, channels: int, kt: int, branches: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, channels, (kt, 7, 7), stride=(1, 2, 2), padding=(kt // 2, 3, 3),
                              bias=False)
        self.bn = FreqBatchNorm3d(channels, branches)

    def forward(self, x: Tensor, row: int, passes: Passes) -> Tensor:
        x = passes.norm(self.bn, self.conv(x), row, activation="relu")
        return F.max_pool3d(x, (1, 3, 3), (1, 2, 2), (0, 1, 1))


class Fuse(nn.Module):
    """The lateral connection: ``slow ++ ReLU(BN(conv_f2s(fast)))``, ``conv_f2s`` a temporal conv
    striding ``alpha`` frames (fast T -> ``ceil(T / alpha)``, the slow pathway's T)."""

    def __init__(self, channels: int, alpha: int, branches: int) -> None:
        super().__init__()
        self.conv_f2s = nn.Conv3d(channels, channels * FUSION_RATIO, (FUSION_KERNEL, 1, 1),
                                  stride=(alpha, 1, 1), padding=(FUSION_KERNEL // 2, 0, 0), bias=False)
        self.bn = FreqBatchNorm3d(channels * FUSION_RATIO, branches)

    def forward(self, slow: Tensor, fast: Tensor, row: int, passes: Passes) -> Tensor:
        return torch.cat([slow, passes.norm(self.bn, self.conv_f2s(fast), row, activation="relu")], 1)


class Transform(nn.Module):
    """A bottleneck's residual path (the official ``branch2``): WA, ``kt x 1 x 1`` conv ``a``,
    ``1 x 3 x 3`` conv ``b`` (carrying the spatial stride), ``1 x 1 x 1`` conv ``c``, each with a
    per-branch BN (``c_bn`` zero-initialised, as the official config)."""

    def __init__(self, cin: int, cout: int, inner: int, kt: int, stride: int, branches: int) -> None:
        super().__init__()
        self.adaconv = ShiftAlter(cin, branches, shift=False)  # WA alone: x + w_b * x
        self.a = nn.Conv3d(cin, inner, (kt, 1, 1), padding=(kt // 2, 0, 0), bias=False)
        self.a_bn = FreqBatchNorm3d(inner, branches)
        self.b = nn.Conv3d(inner, inner, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1),
                           bias=False)
        self.b_bn = FreqBatchNorm3d(inner, branches)
        self.c = nn.Conv3d(inner, cout, 1, bias=False)
        self.c_bn = FreqBatchNorm3d(cout, branches)
        nn.init.zeros_(self.c_bn.weight)


class Bottleneck(nn.Module):
    """``ReLU(branch2(x) + identity)``; the identity is ``branch1`` (1x1x1 conv + per-branch BN)
    where the shape changes."""

    def __init__(self, cin: int, cout: int, inner: int, kt: int, stride: int, branches: int) -> None:
        super().__init__()
        self.branch2 = Transform(cin, cout, inner, kt, stride, branches)
        self.branch1 = self.branch1_bn = None
        if cin != cout or stride != 1:
            self.branch1 = nn.Conv3d(cin, cout, 1, stride=(1, stride, stride), bias=False)
            self.branch1_bn = FreqBatchNorm3d(cout, branches)

    def forward(self, x: Tensor, row: int, passes: Passes) -> Tensor:
        t, norm = self.branch2, passes.norm
        h = norm(t.a_bn, passes.altered_conv(t.a, t.adaconv, x, row), row, activation="relu")
        h = norm(t.b_bn, t.b(h), row, activation="relu")
        identity = x if self.branch1 is None else norm(self.branch1_bn, self.branch1(x), row)
        return norm(t.c_bn, t.c(h), row, activation="relu", residual=identity)


def fused_norm(bn: FreqBatchNorm3d, x: Tensor, row: int, activation: Optional[str] = None,
               residual: Optional[Tensor] = None) -> Tensor:
    return bn(x, row, residual=residual, activation=activation)


def fused_altered_conv(conv: nn.Conv3d, alter: ShiftAlter, x: Tensor, row: int) -> Tensor:
    """``conv(x * (1 + w))`` as a conv with its input channels scaled by ``1 + w``: the scale
    touches the ``[C_out, C_in, k]`` weight, not the activation."""
    scale = (1 + alter.weight[row]).view(1, -1, 1, 1, 1)
    return F.conv3d(x, conv.weight * scale.to(conv.weight.dtype), None, conv.stride, conv.padding)


def eager_norm(bn: FreqBatchNorm3d, x: Tensor, row: int, activation: Optional[str] = None,
               residual: Optional[Tensor] = None) -> Tensor:
    """Branch ``row``'s ``nn.BatchNorm3d``, then ``+ residual`` and ReLU, one op each."""
    y = branch_norm(bn, x, row)
    if residual is not None:
        y = y + residual
    return F.relu(y) if activation == "relu" else y


def eager_altered_conv(conv: nn.Conv3d, alter: ShiftAlter, x: Tensor, row: int) -> Tensor:
    """The official ``x + adaconv(x)`` (a depthwise 1x1x1 conv), then ``conv``."""
    c = x.shape[1]
    return conv(x + F.conv3d(x, alter.weight[row].view(c, 1, 1, 1, 1), groups=c))


FUSED = Passes(fused_norm, fused_altered_conv)
EAGER = Passes(eager_norm, eager_altered_conv)


class FFNSlowFast(FrameFlexible):
    """Frame Flexible SlowFast-R50: shared 3D convs, lateral convs and classifier; per-branch BN
    and WA. ``frames`` are the fast pathway's counts, each a multiple of ``alpha`` (the official
    16/32/64 with ``alpha=4``); ``forward`` is :class:`~ffn.models.FrameFlexible`'s, on clips of
    any ``n >= alpha`` frames at eval (the nearest branch's BNs and WA). ``width`` is the slow
    stem's channel count (64 officially; a multiple of 8, the fast pathway having ``width / 8``);
    smaller widths make quick CPU runs."""

    passes = FUSED  # the eager twin's: EAGER

    def __init__(self, frames: Sequence[int] = (16, 32, 64), num_classes: int = 174,
                 dropout: float = 0.5, width: int = 64, alpha: int = ALPHA) -> None:
        super().__init__(frames)
        if width < BETA_INV or width % BETA_INV:
            raise ValueError(f"width must be a positive multiple of {BETA_INV} (the fast pathway has "
                             f"width / {BETA_INV} channels), got {width}")
        if alpha < 1 or any(t % alpha for t in self.frames):
            raise ValueError(f"frames {self.frames} must be multiples of alpha={alpha} (the slow "
                             f"pathway takes one of every alpha frames)")
        self.config = dict(frames=self.frames, num_classes=num_classes, dropout=dropout,
                           width=width, alpha=alpha)
        self.alpha = alpha
        p = self.num_branches
        fast = width // BETA_INV
        (slow_kt, fast_kt), *stage_kts = TEMPORAL_KERNELS
        self.s1 = nn.ModuleDict({"pathway0_stem": Stem(width, slow_kt, p),
                                 "pathway1_stem": Stem(fast, fast_kt, p)})
        self.s1_fuse = Fuse(fast, alpha, p)
        cins = (width + fast * FUSION_RATIO, fast)
        for i, (count, kts) in enumerate(zip(COUNTS, stage_kts)):
            couts = (width * 4 << i, (width * 4 << i) // BETA_INV)
            inners = (width << i, (width << i) // BETA_INV)
            stride = 1 if i == 0 else 2
            stage = nn.ModuleDict()
            for path in range(2):
                for j in range(count):
                    stage[f"pathway{path}_res{j}"] = Bottleneck(
                        cins[path] if j == 0 else couts[path], couts[path], inners[path], kts[path],
                        stride if j == 0 else 1, p)
            self.add_module(f"s{i + 2}", stage)
            if i < len(COUNTS) - 1:
                self.add_module(f"s{i + 2}_fuse", Fuse(couts[1], alpha, p))
            cins = (couts[0] + couts[1] * FUSION_RATIO, couts[1])
        self.dropout = nn.Dropout(dropout)
        self.head = nn.ModuleDict({"projection": nn.Linear(sum(couts), num_classes)})
        # the official initialisation: He (fan-out) convs, a small normal classifier
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.head["projection"].weight, 0, 0.01)
        nn.init.zeros_(self.head["projection"].bias)

    @property
    def min_frames(self) -> int:
        return self.alpha

    def stages(self) -> list[tuple[nn.ModuleDict, Optional[Fuse]]]:
        return [(getattr(self, f"s{i}"), getattr(self, f"s{i}_fuse", None)) for i in range(2, 6)]

    def clip_logits(self, clips: Tensor, row: int) -> Tensor:
        """Logits ``[N, classes]`` of branch ``row`` for fast-pathway clips ``[N, 3, T, H, W]``."""
        passes = self.passes
        fast = clips
        slow = clips.index_select(2, slow_indices(clips.shape[2], self.alpha).to(clips.device))
        slow = self.s1["pathway0_stem"](slow, row, passes)
        fast = self.s1["pathway1_stem"](fast, row, passes)
        slow = self.s1_fuse(slow, fast, row, passes)
        for stage, fuse in self.stages():
            for name, block in stage.items():
                if name.startswith("pathway0"):
                    slow = block(slow, row, passes)
                else:
                    fast = block(fast, row, passes)
            if fuse is not None:
                slow = fuse(slow, fast, row, passes)
        pooled = torch.cat([slow.mean((2, 3, 4)), fast.mean((2, 3, 4))], 1)
        return self.head["projection"](self.dropout(pooled))

    def branch_logits(self, x: Tensor, layout: FrameLayout) -> tuple[Tensor, ...]:
        # each segment is one branch's N clips of T frames (clip-major): viewed as [N, 3, T, H, W]
        return tuple(self.clip_logits(xs.view(seg.clips, seg.frames, *xs.shape[1:]).transpose(1, 2),
                                      seg.row)
                     for xs, seg in zip(layout.split(x), layout.segments()))


class EagerFFNSlowFast(FFNSlowFast):
    """Eager twin of :class:`FFNSlowFast` (same modules and keys; ``EagerFFNSlowFast.twin(model)``
    copies one), structured like the official code: each BN is ``F.batch_norm`` on its branch's
    row, followed by a separate add and ReLU; WA is the official residual depthwise conv."""

    passes = EAGER
