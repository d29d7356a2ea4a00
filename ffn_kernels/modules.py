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


def _rows_from_single(module: nn.Module, state_dict: dict, prefix: str, names) -> None:
    """Expands the entries of a single-branch module's state_dict (an ``nn.BatchNorm2d``'s or
    ``nn.LayerNorm``'s ``[C]`` tensors) to every branch row of ``module``'s ``[P, C]`` ones."""
    for name in names:
        value, own = state_dict.get(prefix + name), getattr(module, name)
        if isinstance(value, Tensor) and own is not None and value.shape == own.shape[1:]:
            state_dict[prefix + name] = value.expand_as(own)


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
        _rows_from_single(self, state_dict, prefix,
                          ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"))
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


class TemporalConv(nn.Module):
    """TEA's temporal depthwise conv inside every clip, 3 taps per channel shared by all branches:
    ``y[t] = w0·x[t-1] + w1·x[t] + w2·x[t+1]``, zero beyond the clip's ends
    (:func:`ffn_kernels.ops.temporal_conv`).

    ``weight [C, 1, 3]`` is ``nn.Conv1d(C, C, 3, padding=1, groups=C, bias=False)``'s, so such a
    conv's state_dict loads. ``init="identity"`` (TEA's "fixed") starts as the identity;
    ``init="shift"`` as TEA's shift: the first ``C // 2`` channels read frame t+1, the next
    ``C // 2`` frame t-1, an odd last one frame t.

    >>> tc = TemporalConv(64, init="shift")
    >>> layout = FrameLayout(clips=2, frames=(4, 8, 16), rows=(0, 1, 2))
    >>> tc(torch.randn(layout.total_frames, 64, 7, 7), layout).shape
    torch.Size([56, 64, 7, 7])
    """

    INITS = ("identity", "shift")

    def __init__(self, num_channels: int, init: str = "identity", device=None, dtype=None) -> None:
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        if init not in self.INITS:
            raise ValueError(f"init must be one of {self.INITS}, got {init!r}")
        self.num_channels, self.init = num_channels, init
        self.weight = nn.Parameter(torch.empty((num_channels, 1, 3), device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        w = self.weight
        with torch.no_grad():
            w.zero_()
            fold = w.shape[0] // 2 if self.init == "shift" else 0
            w[:fold, 0, 2] = 1
            w[fold:2 * fold, 0, 0] = 1
            w[2 * fold:, 0, 1] = 1

    def extra_repr(self) -> str:
        return f"{self.num_channels}, init={self.init!r}"

    def forward(self, x: Tensor, layout: Optional[FrameLayout] = None) -> Tensor:
        """``layout`` defaults to the context's (``ffn_kernels.frame_layout``)."""
        return ops.temporal_conv(x, resolve_layout(layout, type(self).__name__), self.weight)


class FreqBatchNorm3d(FreqBatchNorm2d):
    """Per-branch BatchNorm of 3D-CNN activations ``[N, C, T, H, W]`` (``nn.BatchNorm3d`` with one
    row of parameters and statistics per branch), on the fused ``freq_batch_norm`` op.

    In a 3D network the branches differ in T, so a tensor holds one branch, or several that share T
    stacked along N in equal parts (``rows``: one row, or one per part). The op sees
    ``[N, C, T*H, W]``: each sample is one "frame" of the packed layout, so the statistics are over
    N×T×H×W per channel, as ``nn.BatchNorm3d``'s. That view costs no copy for NCTHW-contiguous and
    ``channels_last_3d`` tensors (the latter is channels_last in the view); other strides are copied
    once. State-dict keys and conventions are :class:`FreqBatchNorm2d`'s (an ``nn.BatchNorm3d``
    state_dict loads into every row).

    >>> bn = FreqBatchNorm3d(8, num_branches=3)
    >>> bn(torch.randn(2, 8, 4, 7, 7), rows=2).shape  # the 16-frame branch's row
    torch.Size([2, 8, 4, 7, 7])
    """

    def forward(self, x: Tensor, rows, residual: Optional[Tensor] = None,
                activation: Optional[str] = None) -> Tensor:
        """``act(BN_row(x) + residual)``; ``rows`` is an int or one int per equal part of N."""
        if x.dim() != 5:
            raise ValueError(f"x must be 5-D [N, C, T, H, W], got shape {tuple(x.shape)}")
        rows = (rows,) if isinstance(rows, int) else tuple(rows)
        if not rows or x.shape[0] % len(rows):
            raise ValueError(f"rows {rows} must split the batch of {x.shape[0]} into equal parts")
        layout = FrameLayout(clips=x.shape[0] // len(rows), frames=(1,) * len(rows), rows=rows)
        flat = x.flatten(2, 3)
        if residual is not None:
            if residual.shape != x.shape:
                raise ValueError(f"residual has shape {tuple(residual.shape)} but x has "
                                 f"{tuple(x.shape)}")
            residual = residual.flatten(2, 3)
        return super().forward(flat, layout, residual, activation).unflatten(2, x.shape[2:4])

    def add_relu_shift_alter(self, *args, **kwargs):
        raise NotImplementedError("FreqBatchNorm3d: the TSM shift is a 2D-network op; use "
                                  "forward(x, rows, residual=identity, activation='relu')")


class FreqLayerNorm(nn.Module):
    """LayerNorm over the last dimension with one row of ``weight``/``bias`` per branch
    (:func:`ffn_kernels.ops.freq_layer_norm`), for the transformer blocks of an FFN model.

    ``x`` is ``[F, ..., C]`` with dim 0 in the layout (``layout`` defaults to the context's,
    ``ffn_kernels.frame_layout``). With ``residual``, it normalises ``x + residual`` and returns
    ``(y, x + residual)``. An ``nn.LayerNorm`` state_dict loads into every row.

    >>> ln = FreqLayerNorm(64, num_branches=3)
    >>> layout = FrameLayout(clips=2, frames=(4, 8, 16), rows=(0, 1, 2))
    >>> ln(torch.randn(layout.total_frames, 49, 64), layout).shape
    torch.Size([56, 49, 64])
    """

    def __init__(self, normalized_shape: int, num_branches: int = 3, eps: float = 1e-5,
                 elementwise_affine: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if normalized_shape < 1 or num_branches < 1:
            raise ValueError(f"normalized_shape and num_branches must be >= 1, got "
                             f"{normalized_shape}, {num_branches}")
        self.normalized_shape, self.num_branches = normalized_shape, num_branches
        self.eps, self.elementwise_affine = eps, elementwise_affine
        shape = (num_branches, normalized_shape)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @classmethod
    def from_layer_norm(cls, ln: nn.LayerNorm, num_branches: int) -> "FreqLayerNorm":
        """A ``FreqLayerNorm`` whose every branch row starts from ``ln`` (its eps, parameters,
        ``requires_grad`` and train/eval mode), as a pretrained LayerNorm initialises every branch
        of an FFN model."""
        if len(ln.normalized_shape) != 1:
            raise ValueError(f"{cls.__name__} normalises the last dim only; this LayerNorm "
                             f"normalises {tuple(ln.normalized_shape)}")
        if ln.elementwise_affine and ln.bias is None:
            raise ValueError(f"{cls.__name__} has a bias with its weight; this LayerNorm was built "
                             f"with bias=False")
        kw = {} if ln.weight is None else dict(device=ln.weight.device, dtype=ln.weight.dtype)
        new = cls(ln.normalized_shape[0], num_branches, ln.eps, ln.elementwise_affine, **kw)
        new.load_state_dict(ln.state_dict())
        if ln.elementwise_affine:
            new.weight.requires_grad_(ln.weight.requires_grad)
            new.bias.requires_grad_(ln.bias.requires_grad)
        return new.train(ln.training)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        _rows_from_single(self, state_dict, prefix, ("weight", "bias"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, num_branches={self.num_branches}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")

    def forward(self, x: Tensor, layout: Optional[FrameLayout] = None,
                residual: Optional[Tensor] = None):
        layout = resolve_layout(layout, type(self).__name__)
        weight, bias = self.weight, self.bias
        if weight is None:
            shape = (self.num_branches, self.normalized_shape)
            weight, bias = torch.ones(shape, device=x.device), torch.zeros(shape, device=x.device)
        return ops.freq_layer_norm(x, layout, weight, bias, self.eps, residual)


class FreqLayerNorm2d(FreqLayerNorm):
    """:class:`FreqLayerNorm` over the channels of ``[F, C, H, W]`` feature maps: the
    ``LayerNorm2d`` of ConvNeXt (torchvision's and timm's), which normalises each pixel's C values.
    """

    def forward(self, x: Tensor, layout: Optional[FrameLayout] = None) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1), layout).permute(0, 3, 1, 2)
