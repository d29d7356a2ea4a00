"""TSM-ResNet FFN on the packed multi-branch layout (docs/design.md §2, §5).

All branches of a step live in one tensor ``[N*(T_0+T_1+...), C, H, W]``: every shared convolution
runs once on it, and the per-branch work (BatchNorm, Weight Alteration, temporal shift) runs in the
fused ops of :mod:`ffn_kernels`, which know where each branch starts.

The shift and WA of a block act on its input, so they are computed by whatever produced that input:
the stem for the first block, and the previous block's boundary op
(``bn_add_relu_shift_alter``) for every other one, across stage boundaries too. A block therefore
receives two tensors: ``x``, the unshifted output of the previous block (its identity and downsample
input), and ``x_in``, the shifted and altered ``x`` (its conv1 input). The WA parameters live in the
block they feed (``layerK.J.alter.weight``, ``[P, C_in]``).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ffn_kernels import FrameLayout, FreqBatchNorm2d, ShiftAlter, ops

Clips = Union[Tensor, Sequence[Tensor]]


class Downsample(nn.Module):
    """The identity path of a block that changes shape: a shared 1x1 conv and a per-branch BN."""

    def __init__(self, inplanes: int, planes: int, stride: int, branches: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn = FreqBatchNorm2d(planes, branches)

    def forward(self, x: Tensor, layout: FrameLayout) -> Tensor:
        return self.bn(self.conv(x), layout)


class Block(nn.Module):
    """A residual block: ``pairs()`` lists its (shared conv, per-branch BN) pairs in order; all but
    the last are followed by ReLU, the last one's BN is the block boundary (+ identity, ReLU)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, branches: int, fold_div: int,
                 weight_alteration: bool) -> None:
        super().__init__()
        self.alter = ShiftAlter(inplanes, branches, fold_div, alter=weight_alteration)
        out = planes * self.expansion
        self.downsample = (Downsample(inplanes, out, stride, branches)
                           if stride != 1 or inplanes != out else None)

    def pairs(self) -> list[tuple[nn.Conv2d, FreqBatchNorm2d]]:
        raise NotImplementedError

    def forward(self, x: Tensor, x_in: Tensor, layout: FrameLayout,
                next_alter: Optional[ShiftAlter]) -> tuple[Tensor, Optional[Tensor]]:
        """``(out, next_in)``: the block output and the next block's conv1 input (``None`` when
        ``next_alter`` is None, i.e. no block follows)."""
        (conv1, bn1), *inner, (conv, bn) = self.pairs()
        if torch.is_grad_enabled() and conv1.bias is None:
            h = ConvOfShifted.apply(x_in, x, conv1.weight, self.alter.weight, layout,
                                    self.alter.fold_div, conv1)
        else:
            h = conv1(x_in)
        h = bn1(h, layout, activation="relu")
        for c, b in inner:
            h = b(c(h), layout, activation="relu")
        h = conv(h)
        identity = x if self.downsample is None else self.downsample(x, layout)
        if next_alter is None:
            return bn(h, layout, residual=identity, activation="relu"), None
        return bn.add_relu_shift_alter(h, identity, layout, next_alter.weight, next_alter.fold_div)


class ConvOfShifted(torch.autograd.Function):
    """``conv(x_in)`` for a block's first conv, whose input ``x_in = shift_alter(x)`` is the block
    input shifted and altered. It keeps ``x`` for backward instead of ``x_in`` (``x`` is kept
    anyway, by the op that produced it) and recomputes ``x_in`` there: one cheap elementwise pass
    per block instead of an activation held from forward to backward (docs/design.md §5)."""

    @staticmethod
    def forward(ctx, x_in, x, weight, alter, layout, fold_div, conv):
        ctx.save_for_backward(x, weight, alter)
        ctx.layout, ctx.fold_div, ctx.conv = layout, fold_div, conv
        ctx.dtype = x_in.dtype
        return conv(x_in)  # the module itself, so its hooks see the call

    @staticmethod
    def backward(ctx, dy):
        x, weight, alter = ctx.saved_tensors
        conv = ctx.conv
        with torch.no_grad():
            x_in = ops.shift_alter(x, ctx.layout, alter, ctx.fold_div)
        # the forward ran in dy's dtype (autocast casts the conv's operands)
        dx_in, dw, _ = torch.ops.aten.convolution_backward(
            dy, x_in.to(dy.dtype), weight.to(dy.dtype), None, conv.stride, conv.padding,
            conv.dilation, False, (0, 0), conv.groups,
            (ctx.needs_input_grad[0], ctx.needs_input_grad[2], False))
        return (None if dx_in is None else dx_in.to(ctx.dtype), None,
                None if dw is None else dw.to(weight.dtype), None, None, None, None)


class BasicBlock(Block):
    expansion = 1

    def __init__(self, inplanes, planes, stride, branches, fold_div, weight_alteration):
        super().__init__(inplanes, planes, stride, branches, fold_div, weight_alteration)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = FreqBatchNorm2d(planes, branches)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = FreqBatchNorm2d(planes, branches)

    def pairs(self):
        return [(self.conv1, self.bn1), (self.conv2, self.bn2)]


class Bottleneck(Block):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), as torchvision and the official FFN."""

    expansion = 4

    def __init__(self, inplanes, planes, stride, branches, fold_div, weight_alteration):
        super().__init__(inplanes, planes, stride, branches, fold_div, weight_alteration)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = FreqBatchNorm2d(planes, branches)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = FreqBatchNorm2d(planes, branches)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = FreqBatchNorm2d(planes * 4, branches)

    def pairs(self):
        return [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]


DEPTHS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


def nearest_branch(frames: Sequence[int], n: int) -> int:
    """Row of the branch whose frame count is nearest to ``n``; ties go to more frames (and among
    branches with the same count, to the first).

    ``n`` may be a ``torch.SymInt`` (a traced frame count): it is only compared with constants
    (``2n < a + b`` for neighbouring counts ``a < b``), so under torch.compile / torch.export each
    branch's frame counts form one range that a guard or a ``Dim`` bound decides."""
    by_count = sorted((t, r) for r, t in enumerate(frames))  # (count, row): first row of a count
    by_count = [tr for i, tr in enumerate(by_count) if i == 0 or tr[0] != by_count[i - 1][0]]
    for (t, r), (t_next, _) in zip(by_count, by_count[1:]):
        if 2 * n < t + t_next:
            return r
    return by_count[-1][1]


def frames_served(frames: Sequence[int], row: int, limit: int) -> range:
    """The frame counts in ``1..limit`` that :func:`nearest_branch` sends to ``row`` (one range:
    the counts are split at the midpoints between neighbouring branches)."""
    served = [n for n in range(1, limit + 1) if nearest_branch(frames, n) == row]
    return range(served[0], served[-1] + 1) if served else range(1, 1)


def pack_clips(clips: Sequence[Tensor], rows: Sequence[int]) -> tuple[Tensor, FrameLayout]:
    """``[N, T_b, 3, H, W]`` clips of every branch -> the packed ``[N*ΣT_b, 3, H, W]`` tensor."""
    n = clips[0].shape[0]
    for b, c in enumerate(clips):
        if c.dim() != 5 or c.shape[0] != n or c.shape[2:] != clips[0].shape[2:]:
            raise ValueError(
                f"clips[{b}] has shape {tuple(c.shape)}; every branch needs [N, T, C, H, W] with the "
                f"N, C, H, W of clips[0] {tuple(clips[0].shape)}"
            )
    layout = FrameLayout(clips=n, frames=tuple(c.shape[1] for c in clips), rows=tuple(rows))
    return torch.cat([c.flatten(0, 1) for c in clips]), layout


class FrameFlexible(nn.Module):
    """The forward contract of an FFN model (docs/design.md §5.3), for :class:`FFNResNet` and the
    models of :func:`ffn.ffnify`: ``frames`` are the branches' training frame counts (strictly
    increasing; parameter row ``b`` belongs to branch ``b``), and ``forward`` takes

    * a list/tuple of clip batches ``[N, T, 3, H, W]``, each ``T`` one of ``frames`` (the training
      step, all given branches packed into one tensor) -> a tuple of logits ``[N, classes]``;
    * one clip batch ``[N, n, 3, H, W]`` of any ``n`` -> logits ``[N, classes]`` from the branch
      nearest to ``n`` (:func:`nearest_branch`), shifting over ``n`` frames;
    * a packed ``[F, 3, H, W]`` tensor and its :class:`~ffn_kernels.FrameLayout` -> a tuple of
      logits per segment.

    Subclasses compute :meth:`branch_logits` of packed frames. ``min_frames``: the fewest frames
    per clip the model can take (SlowFast's ``alpha``).
    """

    min_frames = 1

    def __init__(self, frames: Sequence[int]) -> None:
        super().__init__()
        frames = tuple(int(t) for t in frames)
        if not frames or frames[0] < 1 or any(a >= b for a, b in zip(frames, frames[1:])):
            raise ValueError(f"frames must be positive and strictly increasing, got {frames}")
        self.frames = frames

    @property
    def num_branches(self) -> int:
        return len(self.frames)

    def branch_for(self, n: int) -> int:
        return nearest_branch(self.frames, n)

    def forward(self, x: Clips, layout: Optional[FrameLayout] = None):
        packed, layout, single = self._pack(x, layout)
        logits = self.branch_logits(packed, layout)
        return logits[0] if single else logits

    def _pack(self, x: Clips, layout: Optional[FrameLayout]) -> tuple[Tensor, FrameLayout, bool]:
        if isinstance(x, (list, tuple)):
            if not x:
                raise ValueError("forward needs at least one branch's clips")
            counts = [c.shape[1] if c.dim() == 5 else None for c in x]
            if any(t not in self.frames for t in counts) or len(set(counts)) != len(counts):
                raise ValueError(
                    f"training clips have frame counts {counts}; each must be a distinct one of the "
                    f"branches' {self.frames} (for another count, pass one [N, n, 3, H, W] batch)"
                )
            return (*pack_clips(x, [self.frames.index(t) for t in counts]), False)
        if x.dim() == 5:
            n, t = x.shape[:2]
            return x.flatten(0, 1), FrameLayout.single(n, t, self.branch_for(t)), True
        if x.dim() == 4 and layout is not None:
            return x, layout, False
        raise ValueError(
            f"forward takes a list of [N, T, 3, H, W] clips, one [N, n, 3, H, W] batch, or a packed "
            f"[F, 3, H, W] tensor with its layout; got shape {tuple(x.shape)}, layout={layout}"
        )

    def branch_logits(self, x: Tensor, layout: FrameLayout) -> tuple[Tensor, ...]:
        """Logits ``[clips, classes]`` per segment of packed frames ``x``."""
        raise NotImplementedError

    @classmethod
    def twin(cls, model: "FrameFlexible") -> "FrameFlexible":
        """A ``cls`` (e.g. the eager twin) with ``model``'s configuration (``model.config``, the
        constructor's arguments, recorded by the models that have a twin), weights, dtype, device
        and mode."""
        like = next(model.parameters())
        twin = cls(**model.config).to(like.device, like.dtype)
        twin.load_state_dict(model.state_dict())
        return twin.train(model.training)


class ResNetTrunk(FrameFlexible):
    """The ResNet skeleton that :class:`FFNResNet` and :class:`~ffn.tea.FFNTEA` share: a stem
    (7x7 conv, per-branch BN, max pool), four stages of blocks (stage ``i`` has ``width << i``
    planes; the first block of stages 2-4 strides 2), dropout and the classifier, He-initialised
    as the official code does. ``config`` holds the constructor's arguments
    (:meth:`~FrameFlexible.twin`)."""

    def _build_trunk(self, width: int, counts: Sequence[int], expansion: int,
                     make_block: Callable[[int, int, int, bool], nn.Module], dropout: float,
                     num_classes: int) -> None:
        """``make_block(inplanes, planes, stride, first_of_stage)`` builds each block."""
        if width < 8 or width % 8:
            raise ValueError(f"width must be a positive multiple of 8, got {width}")
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = FreqBatchNorm2d(width, self.num_branches)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = width
        for i, count in enumerate(counts):
            planes = width << i
            blocks = []
            for j in range(count):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(make_block(inplanes, planes, stride, j == 0))
                inplanes = planes * expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(inplanes, num_classes)
        # as the official FFN and TEA: He init for 2D convs (TEA's temporal taps keep their
        # shift/identity init), a small normal for the new classifier
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.fc.weight, 0, 1e-3)
        nn.init.zeros_(self.fc.bias)

    def blocks(self) -> list[nn.Module]:
        return [b for i in range(1, 5) for b in getattr(self, f"layer{i}")]


class FFNResNet(ResNetTrunk):
    """Frame Flexible TSM-ResNet-{18,34,50,101}: shared convs and classifier, per-branch BN and WA.

    ``frames`` and ``forward`` are those of :class:`FrameFlexible`. ``width`` is the first stage's
    channel count (64 in ResNet and the official checkpoints; smaller widths make quick CPU
    experiments such as ``ffn demo``).
    """

    def __init__(self, depth: int = 50, frames: Sequence[int] = (4, 8, 16),
                 num_classes: int = 400, fold_div: int = 8, dropout: float = 0.5,
                 weight_alteration: bool = True, width: int = 64) -> None:
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth}")
        super().__init__(frames)
        self.config = dict(depth=depth, frames=self.frames, num_classes=num_classes,
                           fold_div=fold_div, dropout=dropout, weight_alteration=weight_alteration,
                           width=width)
        self.fold_div = fold_div
        block, counts = DEPTHS[depth]
        self._build_trunk(width, counts, block.expansion,
                          lambda inplanes, planes, stride, first: block(
                              inplanes, planes, stride, self.num_branches, fold_div, weight_alteration),
                          dropout, num_classes)

    def features(self, x: Tensor, layout: FrameLayout) -> Tensor:
        """The last block's output for packed frames ``x`` (one conv call per layer per step)."""
        x = self.maxpool(self.bn1(self.conv1(x), layout, activation="relu"))
        blocks = self.blocks()
        # Each block's shift + WA (its `alter`) acts on the block's input, i.e. on the previous
        # block's output: so it is applied where that output is made, inside the previous block's
        # boundary op (bn_add_relu_shift_alter fuses BN + add + ReLU + the next block's
        # shift_alter in one pass over the activation, instead of writing the output and reading
        # it back). The first block's alter has no previous block: it runs here, on the stem's
        # output. Each block thus gets `x` (unshifted: its identity and downsample input) and
        # `x_in` (shifted and altered: its conv1 input) and is handed the following block's
        # alter; the last block gets None (nothing follows, no shift to compute).
        x_in = blocks[0].alter(x, layout)
        for block, following in zip(blocks, blocks[1:] + [None]):
            x, x_in = block(x, x_in, layout, following.alter if following is not None else None)
        return x

    def branch_logits(self, x: Tensor, layout: FrameLayout) -> tuple[Tensor, ...]:
        pooled = torch.cat(clip_means(self.features(x, layout).mean((2, 3)), layout))
        logits = self.fc(self.dropout(pooled))
        # one segment needs no split (and a traced, unbacked batch size could not be split on)
        return (logits,) if layout.num_segments == 1 else logits.split(layout.clips)


def clip_average(feats: Tensor, clips: int, frames: int) -> Tensor:
    """``[clips*frames, D]`` frame features -> ``[clips, D]`` clip features (TSN's average)."""
    return feats.view(clips, frames, -1).mean(1)


def clip_means(feats: Tensor, layout: FrameLayout) -> list[Tensor]:
    """``[F, D]`` per-frame features or logits in ``layout`` -> ``[clips, D]`` per segment."""
    return [clip_average(f, layout.clips, seg.frames)
            for f, seg in zip(layout.split(feats), layout.segments())]
