"""Deployment: the whole model as ``torch.export`` programs, or one branch folded into plain
convolutions.

:func:`export_model` keeps the fused ops (``torch.ops.ffn_kernels.*``): its programs run where
``ffn_kernels`` is imported (Python, or an AOTInductor package loaded by a process that imported
it), one program per branch, dynamic in the batch and in the frame counts that branch serves.
:func:`export_branch` needs no custom op at all (plain aten: ONNX, onnxruntime, any runtime):

In eval mode a branch's BatchNorm is an affine map per output channel, so it folds into the conv
before it (``w' = w·γ/σ``, ``b' = β - μ·γ/σ``). Weight Alteration scales the *input* channels of
conv1 after the temporal shift (``conv1((1 + a) · shift(x))``), so it folds into conv1's input
channels (``w'[:, c] = w[:, c]·(1 + a[c])``); zero padding commutes with that scaling. What is left
is ``nn.Conv2d`` + ReLU + the parameter-free temporal shift, which needs no custom op.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ffn_kernels import FreqBatchNorm2d
from ffn_kernels.reference import temporal_shift

from .models import Block, FFNResNet, clip_average, frames_served


class FoldedBlock(nn.Module):
    """A residual block with BN and WA folded in: shift -> convs (ReLU between) -> + identity -> ReLU."""

    def __init__(self, convs: list[nn.Conv2d], downsample: Optional[nn.Conv2d], fold_div: int):
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.downsample = downsample
        self.fold_div = fold_div

    def forward(self, x: Tensor, frames: int) -> Tensor:
        h = temporal_shift(x, frames, self.fold_div)
        for conv in self.convs[:-1]:
            h = F.relu(conv(h))
        h = self.convs[-1](h)
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


class FoldedTSM(nn.Module):
    """Single-branch TSM-ResNet for inference: ``[N, n, 3, H, W]`` clips of any ``n`` -> logits."""

    def __init__(self, stem: nn.Conv2d, blocks: list[FoldedBlock], fc: nn.Linear):
        super().__init__()
        self.conv1 = stem
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.blocks = nn.ModuleList(blocks)
        self.fc = fc

    def forward(self, x: Tensor) -> Tensor:
        clips, frames = x.shape[:2]
        h = self.maxpool(F.relu(self.conv1(x.flatten(0, 1))))
        for block in self.blocks:
            h = block(h, frames)
        return self.fc(clip_average(h.mean((2, 3)), clips, frames))


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: FreqBatchNorm2d, row: int,
                 in_scale: Optional[Tensor] = None) -> nn.Conv2d:
    """``bn[row](conv(in_scale · x))`` as one conv with bias (``bn`` in eval, running stats)."""
    scale = bn.weight[row] * torch.rsqrt(bn.running_var[row] + bn.eps)
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    if in_scale is not None:
        weight = weight * in_scale.view(1, -1, 1, 1)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                       conv.padding, conv.dilation, conv.groups, bias=True,
                       device=weight.device, dtype=weight.dtype)
    folded.weight.copy_(weight)
    folded.bias.copy_(bn.bias[row] - bn.running_mean[row] * scale)
    return folded


def _fold_block(block: Block, row: int) -> FoldedBlock:
    wa = block.alter.weight
    in_scale = None if wa is None else 1 + wa[row]
    convs = [fold_conv_bn(conv, bn, row, in_scale if i == 0 else None)
             for i, (conv, bn) in enumerate(block.pairs())]
    ds = block.downsample
    return FoldedBlock(convs, None if ds is None else fold_conv_bn(ds.conv, ds.bn, row),
                       block.alter.fold_div)


def export_branch(model: FFNResNet, row: int) -> FoldedTSM:
    """Fold branch ``row`` of ``model`` (use ``model.branch_for(n)`` for ``n``-frame input) into a
    plain :class:`FoldedTSM` whose outputs equal ``model``'s in eval mode on that branch."""
    if not 0 <= row < model.num_branches:
        raise ValueError(f"row must be in [0, {model.num_branches}), got {row}")
    return FoldedTSM(fold_conv_bn(model.conv1, model.bn1, row),
                     [_fold_block(b, row) for b in model.blocks()], copy.deepcopy(model.fc)).eval()


def export_model(model: FFNResNet, size: int | tuple[int, int], *, max_clips: int = 64,
                 max_frames: int = 64, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> dict[int, torch.export.ExportedProgram]:
    """``torch.export`` of ``model`` in eval on ``[N, T, 3, H, W]`` clips of ``size`` pixels: one
    program per branch row, dynamic in ``N`` (1..``max_clips``) and in ``T`` over the frame counts
    (from 2 up to ``max_frames``) that :func:`~ffn.models.nearest_branch` sends to that branch.

    One program per branch because the branch is chosen by ``T`` in Python: a single program would
    have to hold every branch's weights behind a data-dependent switch. Pick the program with
    ``model.branch_for(T)``. The programs call the fused ops, so the process that runs them must
    ``import ffn_kernels``."""
    if model.training:
        raise ValueError("export_model exports eval mode: call model.eval() first")
    h, w = (size, size) if isinstance(size, int) else size
    clips = torch.export.Dim("N", min=1, max=max_clips)
    programs = {}
    for row in range(model.num_branches):
        served = frames_served(model.frames, row, max_frames)
        lo, hi = max(served.start, 2), served.stop - 1
        if hi < lo:
            continue  # a branch that serves no count in 2..max_frames
        example = torch.zeros(2, lo, 3, h, w, dtype=dtype, device=device)
        frames = torch.export.Dim(f"T{row}", min=lo, max=hi) if hi > lo else None
        programs[row] = torch.export.export(
            model, (example,), dynamic_shapes=({0: clips, 1: frames} if frames else {0: clips},))
    return programs
