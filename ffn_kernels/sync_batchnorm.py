"""Frequency-indexed BatchNorm with statistics of the whole distributed batch.

The fused ``freq_batch_norm`` op computes each branch's statistics inside its kernel, so it cannot
see other processes' frames. :class:`SyncFreqBatchNorm2d` therefore runs the training
normalisation in plain PyTorch: per branch and channel, the sum and count are all-reduced (one call
for all branches), then the centred sum of squares (two-pass, float32), both through the
differentiable all-reduce (its backward all-reduces the gradient) so gradients flow through the
global statistics as in ``nn.SyncBatchNorm``. Evaluation, and training in a single process, use the fused op.

Like :class:`~ffn_kernels.FreqBatchNorm2d`, it takes the layout as an argument or, without one,
from the ``ffn_kernels.frame_layout`` context, so an ffnified model (``ffn.ffnify``) converts too;
the activation-fused BN (:class:`~ffn_kernels.FreqBatchNormAct2d`, what timm's ``BatchNormAct2d``
becomes) becomes :class:`SyncFreqBatchNormAct2d`. The pair sits beside the module it subclasses,
as ``nn.SyncBatchNorm`` does in torch.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import ops
from .layout import FrameLayout, resolve_layout
from .modules import FreqBatchNorm2d, FreqBatchNormAct2d
from .validation import memory_format_of, momenta


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class SyncFreqBatchNorm2d(FreqBatchNorm2d):
    """Drop-in :class:`~ffn_kernels.FreqBatchNorm2d` (same parameters and buffers)."""

    process_group = None

    def _syncing(self) -> bool:
        return (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)

    def forward(self, x: Tensor, layout: Optional[FrameLayout] = None, residual: Optional[Tensor] = None,
                activation: Optional[str] = None) -> Tensor:
        """As :meth:`FreqBatchNorm2d.forward`: ``layout`` defaults to the context's."""
        layout = resolve_layout(layout, type(self).__name__)
        if not self._syncing():
            return super().forward(x, layout, residual, activation)
        return self._sync_norm(x, layout, residual, activation)

    def add_relu_shift_alter(self, z: Tensor, identity: Tensor, layout: Optional[FrameLayout] = None,
                             alter_next: Optional[Tensor] = None, fold_div: int = 8) -> tuple[Tensor, Tensor]:
        layout = resolve_layout(layout, type(self).__name__)
        if not self._syncing():
            return super().add_relu_shift_alter(z, identity, layout, alter_next, fold_div)
        out = self._sync_norm(z, layout, identity, "relu")
        return out, ops.shift_alter(out, layout, alter_next, fold_div)

    def _sync_norm(self, x: Tensor, layout: FrameLayout, residual: Optional[Tensor],
                   activation: Optional[str]) -> Tensor:
        layout.check(x.shape[0], self.num_branches)
        weight, bias, running_mean, running_var, _, momentum = self._args(x, layout)
        rows = layout.rows
        segments = [s.float() for s in layout.split(x)]
        # the ranks' sums and counts are added in float64: a float32 count is inexact past 2**24
        # (as the fused kernels' int64 counts are exact), and so is a float32 sum of the partials
        sums = torch.stack([s.sum((0, 2, 3)) for s in segments]).double()  # [S, C]
        # filled on the device (a tensor built from a host list would be a copy per call)
        counts = torch.stack([sums.new_full((), float(s.numel() // s.shape[1])) for s in segments])
        totals = _AllReduceSum.apply(torch.cat([sums, counts[:, None]], 1), self.process_group)
        count = totals[:, -1:].detach()  # [S, 1]
        mean = (totals[:, :-1] / count).float()
        centred = [s - m.view(1, -1, 1, 1) for s, m in zip(segments, mean)]
        squares = torch.stack([(c * c).sum((0, 2, 3)) for c in centred]).double()
        var = _AllReduceSum.apply(squares, self.process_group) / count
        # float64 eps, as the fused ops (an eps of 1e-50 is 0 in float32)
        scale = torch.stack([weight[r] for r in rows]).float() * torch.rsqrt(var + self.eps).float()
        y = torch.cat([c * k.view(1, -1, 1, 1) + bias[r].float().view(1, -1, 1, 1)
                       for c, k, r in zip(centred, scale, rows)])
        if residual is not None:
            y = y + residual.float()
        if activation == "relu":
            y = torch.relu(y)
        elif activation is not None:
            raise ValueError(f"activation must be None or 'relu', got {activation!r}")
        if running_mean is not None:
            with torch.no_grad():
                unbiased = var * count / (count - 1).clamp(min=1)
                for s, (r, m) in enumerate(zip(rows, momenta(momentum, layout))):
                    running_mean[r].lerp_(mean[s].to(running_mean.dtype), m)
                    running_var[r].lerp_(unbiased[s].to(running_var.dtype), m)
        self._count(layout)
        return y.to(x.dtype).contiguous(memory_format=memory_format_of(x))


class SyncFreqBatchNormAct2d(FreqBatchNormAct2d, SyncFreqBatchNorm2d):
    """Drop-in :class:`~ffn_kernels.FreqBatchNormAct2d`: ``act(drop(SyncFreqBatchNorm2d(x)))``
    (its forward calls this class's BN, the synchronised one, by the method order)."""


_SYNC = {FreqBatchNorm2d: SyncFreqBatchNorm2d, FreqBatchNormAct2d: SyncFreqBatchNormAct2d}


def convert_sync_freq_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every :class:`FreqBatchNorm2d` in ``module`` by a :class:`SyncFreqBatchNorm2d` (a
    :class:`~ffn_kernels.FreqBatchNormAct2d` by a :class:`SyncFreqBatchNormAct2d`) that shares its
    parameters, buffers and submodules (``state_dict`` keys unchanged). Modules synchronised
    already are kept; another ``FreqBatchNorm2d`` subclass raises ``ValueError`` naming it (left
    as it is, it would normalise with this process's frames alone)."""
    found = []  # all checked before any is replaced

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            sync_class = _SYNC.get(type(child))
            if sync_class is not None:
                found.append((parent, name, sync_class))
            elif isinstance(child, FreqBatchNorm2d) and not isinstance(child, SyncFreqBatchNorm2d):
                cls = type(child)
                raise ValueError(f"convert_sync_freq_batchnorm: module {prefix + name!r} "
                                 f"({cls.__module__}.{cls.__qualname__}) is a FreqBatchNorm2d "
                                 f"subclass with no synchronised counterpart")
            elif not isinstance(child, FreqBatchNorm2d):
                visit(child, f"{prefix}{name}.")

    visit(module, "")
    for parent, name, sync_class in found:
        sync = sync_class.__new__(sync_class)
        sync.__dict__.update(getattr(parent, name).__dict__)  # the same Parameter, buffer, module objects
        sync.process_group = process_group
        setattr(parent, name, sync)
    return module
