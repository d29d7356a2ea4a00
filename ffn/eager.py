"""Eager twin of :class:`ffn.models.FFNResNet`, structured like the official FFN code.

The official ``resnet_TSM_FFN.py`` runs the branches one after another; every block shifts its
input with the branch's frame count (slicing TSM), adds Weight Alteration as a depthwise 1x1 conv
(``y = x + conv(x)``) and uses one ``nn.BatchNorm2d`` per branch. This twin computes exactly that,
branch by branch with ordinary PyTorch ops, and uses each branch's own frame count for the shift
(the official training code shifts every branch with 16 frames, a known defect).

Parameter layout (the documented choice): the twin *is* an ``FFNResNet`` with another forward, so
it has the same modules and ``state_dict`` keys by construction. Branch ``p``'s BatchNorm is row
``p`` of the ``[P, C]`` tensors of a :class:`~ffn_kernels.FreqBatchNorm2d`, applied with
``F.batch_norm`` on row views (whose in-place running-stat updates land in the buffers, as an
``nn.BatchNorm2d`` of that branch would); branch ``p``'s WA conv weight is
``alter.weight[p].view(C, 1, 1, 1)``. Only the forward differs, so comparing the two checks the
packed layout and fused ops against the official computation.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ffn_kernels import FrameLayout, FreqBatchNorm2d, ShiftAlter
from ffn_kernels.reference import temporal_shift

from .models import Block, FFNResNet, clip_average


def branch_norm(bn: FreqBatchNorm2d, x: Tensor, row: int) -> Tensor:
    """``nn.BatchNorm2d`` of branch ``row``."""
    if bn.training:
        bn.num_batches_tracked[row] += 1
    return F.batch_norm(x, bn.running_mean[row], bn.running_var[row], bn.weight[row],
                        bn.bias[row], bn.training, bn.momentum, bn.eps)


def branch_shift_alter(alter: ShiftAlter, x: Tensor, row: int, frames: int) -> Tensor:
    """Slicing TSM shift over ``frames``, then WA as the official residual depthwise conv."""
    x = temporal_shift(x, frames, alter.fold_div)
    if alter.weight is None:
        return x
    c = x.shape[1]
    return x + F.conv2d(x, alter.weight[row].view(c, 1, 1, 1), groups=c)


def branch_block(block: Block, x: Tensor, row: int, frames: int) -> Tensor:
    h = branch_shift_alter(block.alter, x, row, frames)
    *inner, (conv, bn) = block.pairs()
    for c, b in inner:
        h = F.relu(branch_norm(b, c(h), row))
    h = branch_norm(bn, conv(h), row)
    identity = x if block.downsample is None else branch_norm(
        block.downsample.bn, block.downsample.conv(x), row)
    return F.relu(h + identity)


class EagerFFNResNet(FFNResNet):
    """Same constructor, parameters and ``forward`` API as :class:`FFNResNet`; runs one branch at a
    time. ``EagerFFNResNet.twin(model)`` copies a packed model (:meth:`~ffn.models.FrameFlexible.twin`)."""

    def branch_forward(self, x: Tensor, clips: int, frames: int, row: int) -> Tensor:
        """Logits ``[clips, classes]`` of branch ``row`` for ``[clips*frames, 3, H, W]`` frames."""
        x = self.maxpool(F.relu(branch_norm(self.bn1, self.conv1(x), row)))
        for block in self.blocks():
            x = branch_block(block, x, row, frames)
        return self.fc(self.dropout(clip_average(x.mean((2, 3)), clips, frames)))

    def branch_logits(self, x: Tensor, layout: FrameLayout) -> tuple[Tensor, ...]:
        return tuple(self.branch_forward(xs, seg.clips, seg.frames, seg.row)
                     for xs, seg in zip(layout.split(x), layout.segments()))
