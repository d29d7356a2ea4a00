"""``nn.Module`` wrappers that own the per-branch parameters of the fused ops.

They follow ``nn.BatchNorm2d`` conventions (parameter/buffer names, ``train()``/``eval()``,
``reset_running_stats``, ``momentum=None`` for a cumulative average) with one row per branch.
Their ``layout`` argument may be left out inside a ``with ffn_kernels.frame_layout(layout):``
block, so that a 2D network that calls ``bn(x)`` runs them unchanged (``ffn.ffnify``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import ops
from .layout import FrameLayout, resolve_layout


class FreqBatchNorm2d(nn.Module):
    """BatchNorm with private statistics and affine parameters per branch (``num_branches`` rows).

    >>> bn = FreqBatchNorm2d(64, num_branches=3)
    >>> layout = FrameLayout(clips=2, frames=(4, 8, 16), rows=(0, 1, 2))
    >>> bn(torch.randn(layout.total_frames, 64, 7, 7), layout).shape
    torch.Size([56, 64, 7, 7])
    """

    def __init__(
        self,
        num_features: int,
        num_branches: int = 3,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if num_features < 1 or num_branches < 1:
            raise ValueError(
                f"num_features and num_branches must be >= 1, got {num_features}, {num_branches}"
            )
        self.num_features, self.num_branches = num_features, num_branches
        self.eps, self.momentum = eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        kw = dict(device=device, dtype=dtype)
        shape = (num_branches, num_features)
        if affine:
            self.weight = nn.Parameter(torch.empty(shape, **kw))
            self.bias = nn.Parameter(torch.empty(shape, **kw))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(shape, **kw))
            self.register_buffer("running_var", torch.ones(shape, **kw))
            self.register_buffer(
                "num_batches_tracked", torch.zeros(num_branches, dtype=torch.long, device=device)
            )
        else:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)
        self.reset_parameters()

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm2d, num_branches: int) -> "FreqBatchNorm2d":
        """A ``FreqBatchNorm2d`` whose every branch row starts from ``bn`` (its settings, parameters,
        running statistics, counter, ``requires_grad`` and train/eval mode), as an ImageNet BN
        initialises every branch of an FFN model."""
        like = bn.weight if bn.affine else bn.running_mean
        kw = {} if like is None else dict(device=like.device, dtype=like.dtype)
        new = cls(bn.num_features, num_branches, bn.eps, bn.momentum, bn.affine,
                  bn.track_running_stats, **kw)
        new.load_state_dict(bn.state_dict())
        if bn.affine:
            new.weight.requires_grad_(bn.weight.requires_grad)
            new.bias.requires_grad_(bn.bias.requires_grad)
        return new.train(bn.training)

    def reset_running_stats(self) -> None:
        self._counts = None
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def _host_counts(self) -> list[int]:
        """A host copy of ``num_batches_tracked`` for ``momentum=None``: read from the device once
        (after construction, a reset or a state_dict load), then counted alongside it, so training
        steps never wait on the device."""
        if self._counts is None:
            self._counts = self.num_batches_tracked.tolist()
        return self._counts

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self._counts = None
        # an nn.BatchNorm2d state_dict ([C] tensors, a scalar counter) initialises every branch row,
        # as an ImageNet checkpoint initialises every branch of an FFN model
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            value, own = state_dict.get(prefix + name), getattr(self, name)
            if isinstance(value, Tensor) and own is not None and value.shape == own.shape[1:]:
                state_dict[prefix + name] = value.expand_as(own)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_branches={self.num_branches}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _args(self, x: Tensor, layout: FrameLayout) -> tuple:
        """(weight, bias, running_mean, running_var, training, momentum) for one call. Nothing is
        counted here: :meth:`_count` does it once the call succeeded."""
        if max(layout.rows) >= self.num_branches:
            raise ValueError(f"layout rows {layout.rows} index row {max(layout.rows)}, but "
                             f"{type(self).__name__} has num_branches={self.num_branches}")
        use_batch_stats = self.training or not self.track_running_stats
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.momentum is None:
            counts = self._host_counts()  # cumulative moving average per branch, this call included
            momentum = [1.0 / (counts[r] + 1) for r in layout.rows]
        weight, bias = self.weight, self.bias
        if not self.affine:
            shape = (self.num_branches, self.num_features)
            weight = torch.ones(shape, device=x.device)
            bias = torch.zeros(shape, device=x.device)
        # like nn.BatchNorm2d, eval without tracked statistics normalises with the batch's own
        track = self.track_running_stats
        return (weight, bias, self.running_mean if track else None,
                self.running_var if track else None, use_batch_stats, momentum)

    def _count(self, layout: FrameLayout) -> None:
        """After a training call: ``num_batches_tracked[row] += 1`` per segment, and its host copy
        too whatever the momentum, as nn.BatchNorm2d counts every batch (momentum switched
        0.1 -> None resumes the cumulative average from the true count)."""
        if not (self.training and self.track_running_stats):
            return
        for r in layout.rows:
            # one view per row: indexing with the list would copy it to the device every call
            self.num_batches_tracked[r].add_(1)
            if self._counts is not None:
                self._counts[r] += 1

    def forward(
        self,
        x: Tensor,
        layout: Optional[FrameLayout] = None,
        residual: Optional[Tensor] = None,
        activation: Optional[str] = None,
    ) -> Tensor:
        """``act(BN(x) + residual)`` per segment; ``activation`` is None or ``"relu"``; ``layout``
        defaults to the context's (``ffn_kernels.frame_layout``)."""
        layout = resolve_layout(layout, type(self).__name__)
        w, b, rm, rv, training, momentum = self._args(x, layout)
        y = ops.freq_batch_norm(
            x, layout, w, b, rm, rv, training, momentum, self.eps, activation, residual
        )
        self._count(layout)
        return y

    def add_relu_shift_alter(
        self,
        z: Tensor,
        identity: Tensor,
        layout: Optional[FrameLayout] = None,
        alter_next: Optional[Tensor] = None,
        fold_div: int = 8,
    ) -> tuple[Tensor, Tensor]:
        """The residual-block boundary with this BN: ``(relu(BN(z) + identity), shift_alter(...))``."""
        layout = resolve_layout(layout, type(self).__name__)
        w, b, rm, rv, training, momentum = self._args(z, layout)
        out = ops.bn_add_relu_shift_alter(
            z, identity, layout, w, b, rm, rv, training, momentum, self.eps, alter_next, fold_div
        )
        self._count(layout)
        return out


class FreqBatchNormAct2d(FreqBatchNorm2d):
    """timm's ``BatchNormAct2d`` made per-branch: ``act(drop(FreqBatchNorm2d(x)))``.

    timm fuses the activation (and an optional dropout) into a ``BatchNorm2d`` subclass so that its
    checkpoints keep BatchNorm's keys. This class keeps them too, which is why it is a
    ``FreqBatchNorm2d`` subclass holding ``drop`` and ``act`` rather than a
    ``Sequential(FreqBatchNorm2d, drop, act)`` (that would rename ``bn1.weight`` to
    ``bn1.0.weight``): the BN's parameters and buffers keep their names (one row per branch), and
    ``drop`` and ``act`` are timm's own modules (``bn1.act.*`` where they hold state, as a PReLU),
    so the ffnified model's ``state_dict`` has the timm model's keys and a timm checkpoint loads
    into it (every branch row from the BN, as ``FreqBatchNorm2d`` loads any ``BatchNorm2d``).
    """

    def __init__(self, num_features: int, num_branches: int = 3, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True,
                 drop: Optional[nn.Module] = None, act: Optional[nn.Module] = None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, num_branches, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.drop = nn.Identity() if drop is None else drop
        self.act = nn.Identity() if act is None else act

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm2d, num_branches: int) -> "FreqBatchNormAct2d":
        """Every branch row from ``bn`` (:meth:`FreqBatchNorm2d.from_batch_norm`), and ``bn``'s own
        ``drop`` and ``act`` modules (moved, not copied)."""
        alone = nn.BatchNorm2d.__new__(nn.BatchNorm2d)
        alone.__dict__.update(bn.__dict__)
        alone.__dict__["_modules"] = {}  # bn's parameters and buffers, without its drop and act
        new = super().from_batch_norm(alone, num_branches)
        new.drop, new.act = bn.drop, bn.act
        return new

    def forward(self, x: Tensor, layout: Optional[FrameLayout] = None) -> Tensor:
        """``act(drop(BN(x)))``, timm's order; ``layout`` defaults to the context's."""
        return self.act(self.drop(super().forward(x, layout)))

    def add_relu_shift_alter(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} applies its own activation: the fused "
                                  f"residual-block boundary (BN + add + ReLU) does not apply to it")


class ShiftAlter(nn.Module):
    """Temporal shift followed by per-branch Weight Alteration ``y = (1 + weight[p]) * shift(x)``.

    ``alter=False`` gives a pure temporal shift with no parameters; ``shift=False`` gives Weight
    Alteration alone (an FFN on TSN), computed in plain PyTorch (no fused op has it); with both
    False the module is the identity. The WA weights start from N(0, ``init_std``) as in FFN.
    """

    def __init__(
        self,
        num_channels: int,
        num_branches: int = 3,
        fold_div: int = 8,
        alter: bool = True,
        init_std: float = 1e-3,
        device=None,
        dtype=None,
        shift: bool = True,
    ) -> None:
        super().__init__()
        if num_channels < 1 or num_branches < 1:
            raise ValueError(
                f"num_channels and num_branches must be >= 1, got {num_channels}, {num_branches}"
            )
        if fold_div < 2:
            raise ValueError(f"fold_div must be >= 2, got {fold_div}")
        self.num_channels, self.num_branches, self.fold_div = num_channels, num_branches, fold_div
        self.init_std, self.shift = init_std, shift
        if alter:
            self.weight = nn.Parameter(
                torch.empty((num_branches, num_channels), device=device, dtype=dtype)
            )
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.normal_(self.weight, 0.0, self.init_std)

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, num_branches={self.num_branches}, fold_div={self.fold_div}, "
            f"alter={self.weight is not None}, shift={self.shift}"
        )

    def forward(self, x: Tensor, layout: Optional[FrameLayout] = None) -> Tensor:
        """``layout`` defaults to the context's (``ffn_kernels.frame_layout``)."""
        layout = resolve_layout(layout, type(self).__name__)
        if self.shift:
            return ops.shift_alter(x, layout, self.weight, self.fold_div)
        if self.weight is None:
            return x
        layout.check(x.shape[0], self.num_branches)
        # one [C] factor per frame; rounded to x's dtype before the multiply, as the fused op does
        scale = torch.cat([(1 + self.weight[s.row]).expand(s.stop - s.start, -1)
                           for s in layout.segments()])
        return x * scale.to(x.dtype)[:, :, None, None]
