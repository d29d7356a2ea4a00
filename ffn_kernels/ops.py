"""The fused ops (DESIGN.md §3) as ``torch.library`` custom ops.

Public functions (take a :class:`~ffn_kernels.FrameLayout`):

* :func:`shift_alter` — temporal shift + Weight Alteration, ``y = (1 + alter[p]) * x[src]``;
* :func:`freq_batch_norm` — frequency-indexed BatchNorm (+ residual, + ReLU);
* :func:`bn_add_relu_shift_alter` — the residual-block boundary, ``out = relu(BN(z) + identity)``
  and ``next_in = shift_alter(out)`` in one pass.

Each is registered once as ``torch.ops.ffn_kernels.<name>`` with a fake kernel and an autograd
formula whose backward is a separate custom op (``<name>_backward``), so ``torch.compile`` traces
them and ``torch.library.opcheck`` passes. The op implementations validate their arguments, bring
every activation-sized tensor to the memory format of the input and call the raw kernels of the
backend chosen by :mod:`ffn_kernels.backend`. The BatchNorm ops are functional (they return the
updated running statistics); the public wrappers write them back in place, as ``nn.BatchNorm2d``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import validation as V
from .backend import kernels_for
from .layout import FrameLayout

Layout = tuple[int, list[int], list[int]]  # (clips, frames, rows) as the op schemas carry it


def _layout(clips: int, frames: Sequence[int], rows: Sequence[int]) -> FrameLayout:
    return FrameLayout(int(clips), tuple(int(t) for t in frames), tuple(int(r) for r in rows))


def _flat(layout: FrameLayout) -> Layout:
    if not isinstance(layout, FrameLayout):
        raise TypeError(f"layout must be a ffn_kernels.FrameLayout, got {type(layout).__name__}")
    return layout.clips, list(layout.frames), list(layout.rows)


def _like(t: Optional[Tensor], fmt: torch.memory_format) -> Optional[Tensor]:
    return None if t is None else t.contiguous(memory_format=fmt)


def _param(t: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    return None if t is None else t.to(V.acc_dtype(x)).contiguous()


def _empty_param(x: Tensor, like: Optional[Tensor]) -> Tensor:
    if like is None:
        return x.new_empty(0, dtype=V.acc_dtype(x))
    return x.new_empty(like.shape, dtype=V.acc_dtype(x))


def _grad_if(needed: bool, g: Tensor, p: Optional[Tensor]) -> Optional[Tensor]:
    """A parameter gradient (computed in the acc dtype) in the parameter's dtype, if wanted."""
    return g.to(p.dtype) if needed and p is not None else None


# ---------------------------------------------------------------------------------------------
# shift_alter
# ---------------------------------------------------------------------------------------------


def _check_shift(x, layout, alter, fold_div):
    V.check_input("x", x, layout)
    V.check_param("alter", alter, x, layout)
    V.check_fold_div(fold_div)


@torch.library.custom_op("ffn_kernels::shift_alter", mutates_args=())
def _shift_alter(
    x: Tensor, clips: int, frames: list[int], rows: list[int], alter: Optional[Tensor], fold_div: int
) -> Tensor:
    _check_shift(x, _layout(clips, frames, rows), alter, fold_div)
    x = x.contiguous(memory_format=V.memory_format_of(x))
    return kernels_for(x).shift_alter_fwd(x, clips, frames, rows, _param(alter, x), fold_div)


@_shift_alter.register_fake
def _(x, clips, frames, rows, alter, fold_div):
    _check_shift(x, _layout(clips, frames, rows), alter, fold_div)
    return torch.empty_like(x, memory_format=V.memory_format_of(x))


@torch.library.custom_op("ffn_kernels::shift_alter_backward", mutates_args=())
def _shift_alter_backward(
    dy: Tensor, x: Tensor, clips: int, frames: list[int], rows: list[int],
    alter: Optional[Tensor], fold_div: int, alter_grad: bool,
) -> tuple[Tensor, Tensor]:
    fmt = V.memory_format_of(x)
    x = x.contiguous(memory_format=fmt)
    return kernels_for(x).shift_alter_bwd(
        dy.contiguous(memory_format=fmt), x, clips, frames, rows, _param(alter, x), fold_div,
        alter_grad,
    )


@_shift_alter_backward.register_fake
def _(dy, x, clips, frames, rows, alter, fold_div, alter_grad):
    dalter = _empty_param(x, alter) if alter_grad else _empty_param(x, None)
    return torch.empty_like(x, memory_format=V.memory_format_of(x)), dalter


def _shift_alter_setup(ctx, inputs, output):
    x, clips, frames, rows, alter, fold_div = inputs
    ctx.args = (clips, frames, rows, fold_div)
    ctx.alter_grad = alter is not None and ctx.needs_input_grad[4]
    # a pure shift (or a frozen alter) needs only dy to go backward: keep x only for d alter
    ctx.save_for_backward(x if ctx.alter_grad else None, alter)


def _shift_alter_grad(ctx, dy):
    x, alter = ctx.saved_tensors
    clips, frames, rows, fold_div = ctx.args
    dx, dalter = _shift_alter_backward(
        dy, dy if x is None else x, clips, frames, rows, alter, fold_div, ctx.alter_grad
    )
    return dx, None, None, None, _grad_if(ctx.alter_grad, dalter, alter), None


_shift_alter.register_autograd(_shift_alter_grad, setup_context=_shift_alter_setup)


def shift_alter(
    x: Tensor, layout: FrameLayout, alter: Optional[Tensor] = None, fold_div: int = 8
) -> Tensor:
    """Temporal shift of every segment's clips plus Weight Alteration.

    ``y[f, c] = (1 + alter[p_s, c]) * x[src(f, c)]`` where ``src`` moves channels ``[0, fold)`` one
    frame back in time (frame t reads t+1), channels ``[fold, 2*fold)`` one frame forward, leaves
    the rest, and gives zeros outside the clip (``fold = C // fold_div``). ``alter`` is ``[P, C]``
    (one row per branch) or ``None`` for a pure shift.
    """
    return _shift_alter(x, *_flat(layout), alter, fold_div)


# ---------------------------------------------------------------------------------------------
# freq_batch_norm
# ---------------------------------------------------------------------------------------------


def _check_norm(x, layout, weight, bias, running_mean, running_var, training, momentum, eps):
    V.check_input("x", x, layout)
    for name, p in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        V.check_param(name, p, x, layout)
    V.check_norm(x, layout, running_mean, running_var, training, momentum, eps)


@torch.library.custom_op("ffn_kernels::freq_batch_norm", mutates_args=())
def _freq_batch_norm(
    x: Tensor, clips: int, frames: list[int], rows: list[int], weight: Tensor, bias: Tensor,
    running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
    momentum: list[float], eps: float, relu: bool, residual: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    layout = _layout(clips, frames, rows)
    _check_norm(x, layout, weight, bias, running_mean, running_var, training, momentum, eps)
    V.check_like("residual", residual, x)
    fmt = V.memory_format_of(x)
    x = x.contiguous(memory_format=fmt)
    return kernels_for(x).bn_fwd(
        x, clips, frames, rows, _param(weight, x), _param(bias, x), _param(running_mean, x),
        _param(running_var, x), training, momentum, eps, relu, _like(residual, fmt),
    )


@_freq_batch_norm.register_fake
def _(x, clips, frames, rows, weight, bias, running_mean, running_var, training, momentum, eps,
      relu, residual):
    layout = _layout(clips, frames, rows)
    _check_norm(x, layout, weight, bias, running_mean, running_var, training, momentum, eps)
    V.check_like("residual", residual, x)
    stats = x.new_empty((layout.num_segments, x.shape[1]), dtype=V.acc_dtype(x))
    return (torch.empty_like(x, memory_format=V.memory_format_of(x)), stats, torch.empty_like(stats),
            _empty_param(x, running_mean), _empty_param(x, running_var))


@torch.library.custom_op("ffn_kernels::freq_batch_norm_backward", mutates_args=())
def _freq_batch_norm_backward(
    dy: Tensor, x: Tensor, y: Tensor, clips: int, frames: list[int], rows: list[int],
    weight: Tensor, mean: Tensor, invstd: Tensor, training: bool, relu: bool, has_residual: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    fmt = V.memory_format_of(x)
    x = x.contiguous(memory_format=fmt)
    return kernels_for(x).bn_bwd(
        dy.contiguous(memory_format=fmt), x, y.contiguous(memory_format=fmt), clips, frames, rows,
        _param(weight, x), mean, invstd, training, relu, has_residual,
    )


@_freq_batch_norm_backward.register_fake
def _(dy, x, y, clips, frames, rows, weight, mean, invstd, training, relu, has_residual):
    fmt = V.memory_format_of(x)
    dres = torch.empty_like(x, memory_format=fmt) if has_residual else x.new_empty(0)
    return (torch.empty_like(x, memory_format=fmt), _empty_param(x, weight),
            _empty_param(x, weight), dres)


def _freq_batch_norm_setup(ctx, inputs, output):
    x, clips, frames, rows, weight, _, _, _, training, _, _, relu, residual = inputs
    y, mean, invstd, new_rm, new_rv = output
    ctx.mark_non_differentiable(mean, invstd, new_rm, new_rv)
    ctx.args = (clips, frames, rows, training, relu, residual is not None)
    # y is needed only for its ReLU mask; without ReLU x stands in (never read)
    ctx.save_for_backward(x, y if relu else None, weight, mean, invstd)


def _freq_batch_norm_grad(ctx, dy, *_):
    x, y, weight, mean, invstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    clips, frames, rows, training, relu, has_residual = ctx.args
    dx, dw, db, dres = _freq_batch_norm_backward(
        dy, x, x if y is None else y, clips, frames, rows, weight, mean, invstd, training, relu,
        has_residual,
    )
    return (dx, None, None, None, _grad_if(need[4], dw, weight), _grad_if(need[5], db, weight),
            None, None, None, None, None, None, dres if has_residual else None)


_freq_batch_norm.register_autograd(_freq_batch_norm_grad, setup_context=_freq_batch_norm_setup)


def _write_back(training, running_mean, running_var, new_rm, new_rv) -> None:
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new_rm)
            running_var.copy_(new_rv)


def freq_batch_norm(
    x: Tensor,
    layout: FrameLayout,
    weight: Tensor,
    bias: Tensor,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    training: bool = True,
    momentum: float | Sequence[float] = 0.1,
    eps: float = 1e-5,
    activation: Optional[str] = None,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """Frequency-indexed BatchNorm: segment ``s`` is normalised with parameter row ``p_s``.

    ``y = act(weight[p]·(x - μ)·rsqrt(σ² + eps) + bias[p] + residual)``. In training μ and the
    biased σ² come from the segment's frames × H × W and row ``p``'s running statistics are updated
    in place like ``nn.BatchNorm2d`` (``momentum`` is one float or one per segment); in eval the
    running statistics are used. ``weight``, ``bias`` and the running statistics are ``[P, C]``.
    """
    if activation not in (None, "relu"):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    y, _, _, new_rm, new_rv = _freq_batch_norm(
        x, *_flat(layout), weight, bias, running_mean, running_var, bool(training),
        V.momenta(momentum, layout), float(eps), activation == "relu", residual,
    )
    _write_back(training, running_mean, running_var, new_rm, new_rv)
    return y


# ---------------------------------------------------------------------------------------------
# bn_add_relu_shift_alter
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("ffn_kernels::bn_add_relu_shift_alter", mutates_args=())
def _bn_add_relu_shift_alter(
    z: Tensor, identity: Tensor, clips: int, frames: list[int], rows: list[int], weight: Tensor,
    bias: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
    momentum: list[float], eps: float, alter_next: Optional[Tensor], fold_div: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    layout = _layout(clips, frames, rows)
    _check_block(z, identity, layout, weight, bias, running_mean, running_var, training, momentum,
                 eps, alter_next, fold_div)
    fmt = V.memory_format_of(z)
    z = z.contiguous(memory_format=fmt)
    return kernels_for(z).bnrs_fwd(
        z, _like(identity, fmt), clips, frames, rows, _param(weight, z), _param(bias, z),
        _param(running_mean, z), _param(running_var, z), training, momentum, eps,
        _param(alter_next, z), fold_div,
    )


def _check_block(z, identity, layout, weight, bias, running_mean, running_var, training, momentum,
                 eps, alter_next, fold_div):
    _check_norm(z, layout, weight, bias, running_mean, running_var, training, momentum, eps)
    if identity is None:
        raise ValueError("identity must be a tensor (the residual branch input)")
    V.check_like("identity", identity, z, "z")
    V.check_param("alter_next", alter_next, z, layout)
    V.check_fold_div(fold_div)


@_bn_add_relu_shift_alter.register_fake
def _(z, identity, clips, frames, rows, weight, bias, running_mean, running_var, training,
      momentum, eps, alter_next, fold_div):
    layout = _layout(clips, frames, rows)
    _check_block(z, identity, layout, weight, bias, running_mean, running_var, training, momentum,
                 eps, alter_next, fold_div)
    fmt = V.memory_format_of(z)
    stats = z.new_empty((layout.num_segments, z.shape[1]), dtype=V.acc_dtype(z))
    return (torch.empty_like(z, memory_format=fmt), torch.empty_like(z, memory_format=fmt), stats,
            torch.empty_like(stats), _empty_param(z, running_mean), _empty_param(z, running_var))


@torch.library.custom_op("ffn_kernels::bn_add_relu_shift_alter_backward", mutates_args=())
def _bn_add_relu_shift_alter_backward(
    dout: Tensor, dnext: Tensor, z: Tensor, out: Tensor, clips: int, frames: list[int],
    rows: list[int], weight: Tensor, mean: Tensor, invstd: Tensor, training: bool,
    alter_next: Optional[Tensor], fold_div: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    fmt = V.memory_format_of(z)
    z = z.contiguous(memory_format=fmt)
    return kernels_for(z).bnrs_bwd(
        dout.contiguous(memory_format=fmt), dnext.contiguous(memory_format=fmt), z,
        out.contiguous(memory_format=fmt), clips, frames, rows, _param(weight, z), mean, invstd,
        training, _param(alter_next, z), fold_div,
    )


@_bn_add_relu_shift_alter_backward.register_fake
def _(dout, dnext, z, out, clips, frames, rows, weight, mean, invstd, training, alter_next,
      fold_div):
    fmt = V.memory_format_of(z)
    return (torch.empty_like(z, memory_format=fmt), torch.empty_like(z, memory_format=fmt),
            _empty_param(z, weight), _empty_param(z, weight), _empty_param(z, alter_next))


def _bnrs_setup(ctx, inputs, output):
    (z, _, clips, frames, rows, weight, _, _, _, training, _, _, alter_next, fold_div) = inputs
    out, _, mean, invstd, new_rm, new_rv = output
    ctx.mark_non_differentiable(mean, invstd, new_rm, new_rv)
    ctx.args = (clips, frames, rows, training, fold_div)
    ctx.save_for_backward(z, out, weight, mean, invstd, alter_next)


def _bnrs_grad(ctx, dout, dnext, *_):
    z, out, weight, mean, invstd, alter_next = ctx.saved_tensors
    need = ctx.needs_input_grad
    clips, frames, rows, training, fold_div = ctx.args
    dz, didentity, dw, db, dalter = _bn_add_relu_shift_alter_backward(
        dout, dnext, z, out, clips, frames, rows, weight, mean, invstd, training, alter_next,
        fold_div,
    )
    return (dz, didentity, None, None, None, _grad_if(need[5], dw, weight),
            _grad_if(need[6], db, weight), None, None, None, None, None,
            _grad_if(need[12], dalter, alter_next), None)


_bn_add_relu_shift_alter.register_autograd(_bnrs_grad, setup_context=_bnrs_setup)


def bn_add_relu_shift_alter(
    z: Tensor,
    identity: Tensor,
    layout: FrameLayout,
    weight: Tensor,
    bias: Tensor,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    training: bool = True,
    momentum: float | Sequence[float] = 0.1,
    eps: float = 1e-5,
    alter_next: Optional[Tensor] = None,
    fold_div: int = 8,
) -> tuple[Tensor, Tensor]:
    """Residual-block boundary in one pass: returns ``(out, next_in)`` with
    ``out = relu(freq_batch_norm(z) + identity)`` (the block output, the next block's identity) and
    ``next_in = shift_alter(out, layout, alter_next, fold_div)`` (the next block's conv1 input)."""
    out, next_in, _, _, new_rm, new_rv = _bn_add_relu_shift_alter(
        z, identity, *_flat(layout), weight, bias, running_mean, running_var, bool(training),
        V.momenta(momentum, layout), float(eps), alter_next, fold_div,
    )
    _write_back(training, running_mean, running_var, new_rm, new_rv)
    return out, next_in
