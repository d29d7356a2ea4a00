"""Pure-PyTorch reference of the fused ops, written for clarity (docs/design.md §3).

This module is the oracle of every test and the "eager" side of the op benchmarks. It has two
parts:

* the op semantics — :func:`shift_alter`, :func:`freq_batch_norm`, :func:`bn_add_relu_shift_alter`,
  :func:`temporal_conv`, :func:`freq_layer_norm` — written per segment with ordinary PyTorch (slicing shift,
  ``F.batch_norm``, ``F.conv1d``), differentiable by
  autograd and updating running statistics in place like ``nn.BatchNorm2d``;
* the *raw backend API* (``*_fwd`` / ``*_bwd``) that every backend (C++ CPU, CUDA, Triton and this
  reference) implements with the same signature; the reference versions derive their backward
  passes from the semantics with ``torch.autograd.grad``.

Raw backend API: the functions below, with the signatures of the ops' contracts
(``csrc/ops/<op>.h``); ``frames``/``rows`` are lists of ints, ``clips`` an int; ``S`` segments,
``P`` parameter rows; "acc" dtype as in :mod:`.validation`. They return:

* ``shift_alter_fwd -> y`` and ``shift_alter_bwd -> (dx, dalter[P,C])``;
* ``freq_batch_norm_fwd -> (y, mean[S,C], invstd[S,C], new_running_mean[P,C],
  new_running_var[P,C])`` and ``freq_batch_norm_bwd -> (dx, dweight[P,C], dbias[P,C], dresidual)``;
* ``bn_add_relu_shift_alter_fwd -> (out, next_in, mean, invstd, new_rm, new_rv)`` and
  ``bn_add_relu_shift_alter_bwd -> (dz, didentity, dweight, dbias, dalter)``;
* ``temporal_conv_fwd -> y`` and ``temporal_conv_bwd -> (dx, dweight[C, 3])`` (no ``rows``: the
  taps are shared by all branches);
* ``freq_layer_norm_fwd -> (y, s, mean[R], rstd[R])`` (``s = x + residual``, empty without one;
  ``R`` tokens) and ``freq_layer_norm_bwd -> (ds, dweight, dbias)``.

An output a call does not produce is an empty tensor of the dtype it has when produced
(:func:`.validation.unused_acc`, :func:`.validation.unused_activation`).

``mean``/``invstd`` are per segment: batch statistics in training (biased variance), the running
statistics of the segment's row in eval. ``new_running_*`` are updated copies of the running
statistics (the public op writes them back in place); rows not in the layout are unchanged.
Parameter gradients of rows not in the layout are zero; a row used by several segments gets the
sum of their gradients (as autograd through the op semantics gives). ``y`` in
``freq_batch_norm_bwd`` is only read when ``relu`` is set (its sign is the ReLU mask) and no
``bias`` is given (with ``bias``, and no residual, the mask is recomputed from ``x``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .layout import FrameLayout
from .validation import acc_dtype as _acc
from .validation import memory_format_of as _format_of
from .validation import momenta as _momenta
from .validation import unused_acc, unused_activation


# ---------------------------------------------------------------------------------------------
# Op semantics
# ---------------------------------------------------------------------------------------------


def temporal_shift(x: Tensor, frames: int, fold_div: int = 8, reverse: bool = False) -> Tensor:
    """TSM shift of ``[N*T, C, H, W]`` clips of ``frames`` frames, as in the TSM paper: channels
    ``[0, fold)`` of frame t take frame t+1, ``[fold, 2*fold)`` take frame t-1, zeros outside.
    ``reverse=True`` shifts the other way (the adjoint, used by the backward pass)."""
    nt, c, h, w = x.shape
    x5 = x.reshape(nt // frames, frames, c, h, w)
    fold = c // fold_div
    back, fwd = (slice(fold, 2 * fold), slice(0, fold)) if reverse else (slice(0, fold), slice(fold, 2 * fold))
    out = torch.zeros_like(x5)
    out[:, :-1, back] = x5[:, 1:, back]
    out[:, 1:, fwd] = x5[:, :-1, fwd]
    out[:, :, 2 * fold :] = x5[:, :, 2 * fold :]
    return out.reshape(nt, c, h, w)


def shift_alter(
    x: Tensor, layout: FrameLayout, alter: Optional[Tensor] = None, fold_div: int = 8
) -> Tensor:
    """``y[f, c] = (1 + alter[p_s, c]) * x[src(f, c)]`` per segment (pure shift if ``alter`` is None)."""
    outs = []
    for seg, xs in zip(layout.segments(), layout.split(x)):
        y = temporal_shift(xs, seg.frames, fold_div)
        if alter is not None:
            y = y * (1 + alter[seg.row]).to(y.dtype).view(1, -1, 1, 1)
        outs.append(y)
    return torch.cat(outs).contiguous(memory_format=_format_of(x))


def freq_batch_norm(
    x: Tensor,
    layout: FrameLayout,
    weight: Tensor,
    bias: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: float | Sequence[float] = 0.1,
    eps: float = 1e-5,
    activation: Optional[str] = None,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """Per segment ``s``: ``act(BN_{p_s}(x) + residual)`` with ``F.batch_norm`` on row ``p_s``;
    running statistics of that row are updated in place in training."""
    momenta = _momenta(momentum, layout)
    res = layout.split(residual) if residual is not None else [None] * layout.num_segments
    outs = []
    for seg, xs, rs in zip(layout.segments(), layout.split(x), res):
        rm = running_mean[seg.row] if running_mean is not None else None
        rv = running_var[seg.row] if running_var is not None else None
        y = F.batch_norm(
            xs.float() if xs.dtype in (torch.float16, torch.bfloat16) else xs,
            rm, rv, weight[seg.row], bias[seg.row],
            training=training or rm is None, momentum=momenta[seg.index], eps=eps,
        )
        if rs is not None:
            y = y + rs.to(y.dtype)
        if activation == "relu":
            y = torch.relu(y)
        outs.append(y.to(x.dtype))
    return torch.cat(outs).contiguous(memory_format=_format_of(x))


def bn_add_relu_shift_alter(
    z: Tensor,
    identity: Tensor,
    layout: FrameLayout,
    weight: Tensor,
    bias: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: float | Sequence[float] = 0.1,
    eps: float = 1e-5,
    alter_next: Optional[Tensor] = None,
    fold_div: int = 8,
) -> tuple[Tensor, Tensor]:
    """Residual-block boundary: ``out = relu(BN(z) + identity)``, ``next_in = shift_alter(out)``."""
    out = freq_batch_norm(
        z, layout, weight, bias, running_mean, running_var, training, momentum, eps,
        activation="relu", residual=identity,
    )
    return out, shift_alter(out, layout, alter_next, fold_div)


def temporal_conv(x: Tensor, layout: FrameLayout, weight: Tensor) -> Tensor:
    """TEA's temporal depthwise conv1d per segment: ``y[t, c] = w[c, 0]·x[t-1, c] + w[c, 1]·x[t, c]
    + w[c, 2]·x[t+1, c]`` inside each clip, zero beyond its ends (``weight [C, 3]``, shared by the
    branches), as ``F.conv1d`` over the clip's frames, computed in the acc dtype."""
    acc = _acc(x)
    C, H, W = x.shape[1:]
    taps = weight.to(acc).reshape(C, 1, 3)
    outs = []
    for seg, xs in zip(layout.segments(), layout.split(x)):
        y = F.conv1d(_sequences(xs.to(acc), seg), taps, padding=1, groups=C)
        n, t = seg.clips, seg.frames
        outs.append(y.reshape(n, H * W, C, t).permute(0, 3, 2, 1).reshape(n * t, C, H, W))
    return torch.cat(outs).to(x.dtype).contiguous(memory_format=_format_of(x))


def freq_layer_norm(x: Tensor, layout: FrameLayout, weight: Tensor, bias: Tensor, eps: float = 1e-5,
                    residual: Optional[Tensor] = None):
    """Per segment ``s``: ``F.layer_norm`` over the last dim of ``x [F, ..., C]`` with row ``p_s``
    of ``weight``/``bias``, in the acc dtype. With a residual, of ``x + residual`` (rounded to x's
    dtype), and the sum is returned too: ``(y, x + residual)``."""
    s = x if residual is None else x + residual
    acc, C = _acc(x), x.shape[-1]
    y = torch.cat([
        F.layer_norm(ss.to(acc), (C,), weight[seg.row].to(acc), bias[seg.row].to(acc), eps)
        for seg, ss in zip(layout.segments(), layout.split(s))
    ]).to(x.dtype)
    return y if residual is None else (y, s)


def _sequences(xs: Tensor, seg) -> Tensor:
    """A segment's ``[N*T, C, H, W]`` frames as one length-T sequence per (clip, pixel) and
    channel, ``[N*H*W, C, T]``: the official code's permute copy."""
    n, t = seg.clips, seg.frames
    C, H, W = xs.shape[1:]
    return xs.reshape(n, t, C, H * W).permute(0, 3, 2, 1).reshape(n * H * W, C, t)


# ---------------------------------------------------------------------------------------------
# Raw backend API
# ---------------------------------------------------------------------------------------------


def shift_alter_fwd(x, clips, frames, rows, alter, fold_div):
    return shift_alter(x, FrameLayout(clips, tuple(frames), tuple(rows)), alter, fold_div)


def shift_alter_bwd(dy, x, clips, frames, rows, alter, fold_div, alter_grad):
    """``dx`` = reverse shift of ``(1 + a)·dy``; ``d alter[p]`` = Σ ``dy · shift(x)`` over the
    segments of row ``p``."""
    layout = FrameLayout(clips, tuple(frames), tuple(rows))
    acc = _acc(x)
    dx = torch.empty_like(dy)
    dalter = torch.zeros(alter.shape, dtype=acc, device=x.device) if alter_grad else unused_acc(x)
    for seg, dys, xs in zip(layout.segments(), layout.split(dy), layout.split(x)):
        g = dys if alter is None else dys * (1 + alter[seg.row]).to(dys.dtype).view(1, -1, 1, 1)
        dx[seg.start : seg.stop] = temporal_shift(g, seg.frames, fold_div, reverse=True)
        if alter_grad:
            shifted = temporal_shift(xs, seg.frames, fold_div).to(acc)
            dalter[seg.row] += (dys.to(acc) * shifted).sum(dim=(0, 2, 3))
    return dx, dalter


def freq_batch_norm_fwd(x, clips, frames, rows, weight, bias, running_mean, running_var, training,
                        momentum, eps, relu, residual):
    layout = FrameLayout(clips, tuple(frames), tuple(rows))
    new_rm = running_mean.clone() if running_mean is not None else unused_acc(x)
    new_rv = running_var.clone() if running_var is not None else unused_acc(x)
    mean, invstd = _stats(x, layout, running_mean, running_var, training, eps)
    y = freq_batch_norm(
        x, layout, weight, bias, new_rm if running_mean is not None else None,
        new_rv if running_var is not None else None, training, list(momentum), eps,
        "relu" if relu else None, residual,
    )
    return y, mean, invstd, new_rm, new_rv


def freq_batch_norm_bwd(dy, x, y, clips, frames, rows, weight, mean, invstd, training, relu,
                        has_residual, bias=None):
    """BN backward from the saved statistics (the ``sum_dy`` / ``sum_dy_xmu`` formula). The ReLU
    mask is ``y > 0``, or with ``bias`` (no residual) that of the forward's ``y`` recomputed from
    ``x``."""
    layout = FrameLayout(clips, tuple(frames), tuple(rows))
    acc = _acc(x)
    dx = torch.empty_like(x)
    dres = torch.empty_like(x) if has_residual else unused_activation(x)
    dweight = torch.zeros(weight.shape, dtype=acc, device=x.device)
    dbias = torch.zeros(weight.shape, dtype=acc, device=x.device)
    ys = layout.split(y) if relu and bias is None else [None] * layout.num_segments
    for seg, dys, xs, yseg in zip(layout.segments(), layout.split(dy), layout.split(x), ys):
        g = dys.to(acc)
        mu, istd = mean[seg.index].view(1, -1, 1, 1), invstd[seg.index].view(1, -1, 1, 1)
        xhat = (xs.to(acc) - mu) * istd
        if relu and bias is not None:
            w, b = (t[seg.row].to(acc).view(1, -1, 1, 1) for t in (weight, bias))
            yseg = (xhat * w + b).to(x.dtype)
        if relu:
            g = g * (yseg > 0)
        if has_residual:
            dres[seg.start : seg.stop] = g
        sum_g, sum_gx = g.sum(dim=(0, 2, 3)), (g * xhat).sum(dim=(0, 2, 3))
        scale = (weight[seg.row].to(acc)).view(1, -1, 1, 1) * istd
        if training:
            n = xs.numel() // xs.shape[1]
            g = g - (sum_g / n).view(1, -1, 1, 1) - xhat * (sum_gx / n).view(1, -1, 1, 1)
        dx[seg.start : seg.stop] = g * scale
        dweight[seg.row] += sum_gx
        dbias[seg.row] += sum_g
    return dx, dweight, dbias, dres


def bn_add_relu_shift_alter_fwd(z, identity, clips, frames, rows, weight, bias, running_mean,
                                running_var, training, momentum, eps, alter_next, fold_div):
    out, mean, invstd, new_rm, new_rv = freq_batch_norm_fwd(
        z, clips, frames, rows, weight, bias, running_mean, running_var, training, momentum, eps,
        True, identity,
    )
    next_in = shift_alter_fwd(out, clips, frames, rows, alter_next, fold_div)
    return out, next_in, mean, invstd, new_rm, new_rv


def bn_add_relu_shift_alter_bwd(dout, dnext, z, out, clips, frames, rows, weight, mean, invstd,
                                training, alter_next, fold_div):
    dout_total, dalter = shift_alter_bwd(
        dnext, out, clips, frames, rows, alter_next, fold_div, alter_next is not None
    )
    dout_total = dout_total + dout
    dz, dweight, dbias, didentity = freq_batch_norm_bwd(
        dout_total, z, out, clips, frames, rows, weight, mean, invstd, training, True, True
    )
    return dz, didentity, dweight, dbias, dalter


def temporal_conv_fwd(x, clips, frames, weight):
    return temporal_conv(x, _shared_layout(clips, frames), weight)


def temporal_conv_bwd(dy, x, clips, frames, weight, weight_grad):
    """``dx`` = the conv with the taps reversed (its adjoint); ``d weight[c, k]`` = Σ ``dy[t]·
    x[t-1+k]`` inside the clips, over every segment (the taps are shared)."""
    layout = _shared_layout(clips, frames)
    dx = temporal_conv(dy, layout, weight.reshape(-1, 3).flip(1))
    if not weight_grad:
        return dx, unused_acc(x)
    acc = _acc(x)
    dweight = torch.zeros(weight.shape, dtype=acc, device=x.device)
    for seg, dys, xs in zip(layout.segments(), layout.split(dy), layout.split(x)):
        d = _sequences(dys.to(acc), seg)
        padded = F.pad(_sequences(xs.to(acc), seg), (1, 1))  # zero frames beyond the clip's ends
        for k in range(3):
            dweight[:, k] += (d * padded[..., k : k + seg.frames]).sum((0, 2))
    return dx, dweight


def freq_layer_norm_fwd(x, clips, frames, rows, weight, bias, eps, residual):
    layout = FrameLayout(clips, tuple(frames), tuple(rows))
    out = freq_layer_norm(x, layout, weight, bias, eps, residual)
    y, s = (out, x) if residual is None else out
    tokens = s.to(_acc(x)).reshape(-1, s.shape[-1])
    mean = tokens.mean(-1)
    rstd = torch.rsqrt(tokens.var(-1, unbiased=False) + eps)
    return y, (unused_activation(x) if residual is None else s), mean, rstd


def freq_layer_norm_bwd(dy, dsum, s, clips, frames, rows, weight, mean, rstd):
    """``ds = rstd·(g − mean(g) − x̂·mean(g·x̂)) (+ dsum)`` per token, ``g = dy·weight[p]``;
    ``dweight[p] = Σ dy·x̂``, ``dbias[p] = Σ dy`` over the tokens of the segments of row ``p``."""
    layout = FrameLayout(clips, tuple(frames), tuple(rows))
    acc, C = _acc(s), s.shape[-1]
    shape = (s.shape[0], -1, C)
    mu, rs = mean.view(s.shape[0], -1, 1), rstd.view(s.shape[0], -1, 1)
    xhat = (s.to(acc).reshape(shape) - mu) * rs
    d = dy.to(acc).reshape(shape)
    ds = torch.empty_like(xhat)
    dweight = torch.zeros(weight.shape, dtype=acc, device=s.device)
    dbias = torch.zeros(weight.shape, dtype=acc, device=s.device)
    for seg in layout.segments():
        part = slice(seg.start, seg.stop)
        g = d[part] * weight[seg.row].to(acc)
        ds[part] = rs[part] * (g - g.mean(-1, keepdim=True)
                               - xhat[part] * (g * xhat[part]).mean(-1, keepdim=True))
        dweight[seg.row] += (d[part] * xhat[part]).sum((0, 1))
        dbias[seg.row] += d[part].sum((0, 1))
    if dsum is not None:
        ds = ds + dsum.to(acc).reshape(shape)
    return ds.reshape(s.shape).to(s.dtype), dweight, dbias


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _shared_layout(clips, frames) -> FrameLayout:
    """The layout of an op whose parameters all branches share (its rows are never read)."""
    return FrameLayout(clips, tuple(frames), (0,) * len(frames))


def _stats(x, layout, running_mean, running_var, training, eps):
    means, invstds = [], []
    for seg, xs in zip(layout.segments(), layout.split(x)):
        if training or running_mean is None:
            xa = xs.to(_acc(x))
            mu = xa.mean(dim=(0, 2, 3))
            var = xa.var(dim=(0, 2, 3), unbiased=False)
        else:
            mu, var = running_mean[seg.row].to(_acc(x)), running_var[seg.row].to(_acc(x))
        means.append(mu)
        invstds.append(torch.rsqrt(var + eps))
    return torch.stack(means), torch.stack(invstds)
