"""Triton kernels of ``temporal_conv`` (docs/design.md §3.6): ``y[t] = w0·x[t-1] + w1·x[t] +
w2·x[t+1]`` per channel inside each clip, on the ``(chunk, channel block)`` grid of
:mod:`.kernels`.

A program walks its tiles of pixels and, per tile, its chunk's frames in order with a sliding
window of three frames in registers, so every element is read once (plus one halo frame at each
end of the chunk). The backward pass is one such walk over ``dy`` (dx is the transposed stencil)
that also reads ``x`` once for the taps' gradient: ``Σ dy[f]·x[f-1] = Σ x[f]·dy[f+1]``, so the
three sums pair the current ``x`` frame with the ``dy`` window. Launches per call: fwd 1P, bwd 1P
(+ the ``[3, S, C]`` combine for ``d weight``).
"""

import torch
import triton
import triton.language as tl

from ..validation import unused_acc
from . import kernels as K
from .common import Plan, on_device


@triton.jit
def _window_start(ptr, fb, chw, idx, m, t):
    """The tile ``idx`` of the frame at ``fb`` (a walk's first) and of the frame before it (zero
    at a clip's start)."""
    prev = tl.load(ptr + fb - chw + idx, mask=m & (t > 0), other=0.0).to(tl.float32)
    cur = tl.load(ptr + fb + idx, mask=m, other=0.0).to(tl.float32)
    return prev, cur


@triton.jit
def _program(w_ptr, layout_ptr, NCH, S, C, fold, nb0, REGIONS: tl.constexpr, ALIGN: tl.constexpr,
             BLOCK_C: tl.constexpr):
    """This program's chunk (index, first frame, frames), its segment's frames ``[start, stop)``
    and clip length, its channels and their three taps (``[BLOCK_C, 1]`` each)."""
    k, seg, f0, nf = K._chunk(layout_ptr, NCH, S)
    start, stop, T, row = K._segment(layout_ptr, NCH, S, seg)
    c, cmask, step = K._channels(C, fold, nb0, REGIONS, ALIGN, BLOCK_C)
    w0 = tl.load(w_ptr + 3 * c, mask=cmask, other=0.0)[:, None]
    w1 = tl.load(w_ptr + 3 * c + 1, mask=cmask, other=0.0)[:, None]
    w2 = tl.load(w_ptr + 3 * c + 2, mask=cmask, other=0.0)[:, None]
    return k, f0, nf, start, stop, T, c, cmask, w0, w1, w2


@triton.jit
def _temporal_conv_fwd_kernel(x_ptr, y_ptr,  # [F, C, H, W]
                              w_ptr,  # [C, 3] float32 taps
                              layout_ptr, NCH, S, C, HW, fold, nb0,
                              REGIONS: tl.constexpr, ALIGN: tl.constexpr,
                              HW_ALIGN: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                              BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    k, f0, nf, start, stop, T, c, cmask, w0, w1, w2 = _program(
        w_ptr, layout_ptr, NCH, S, C, fold, nb0, REGIONS, ALIGN, BLOCK_C)
    chw = C * HW
    for p0 in range(0, HW, BLOCK_P):
        idx, m = K._tile(p0, c, cmask, C, HW, CHANNELS_LAST, HW_ALIGN, BLOCK_P)
        fb = f0.to(tl.int64) * chw
        prev, cur = _window_start(x_ptr, fb, chw, idx, m, (f0 - start) % T)
        for i in range(nf):
            f = f0 + i
            inside = (f - start) % T < T - 1  # frame f+1 is in f's clip
            nxt = tl.load(x_ptr + fb + chw + idx, mask=m & (f + 1 < stop), other=0.0)
            nxt = nxt.to(tl.float32)
            v = w1 * cur + w0 * prev + w2 * tl.where(inside, nxt, 0.0)
            tl.store(y_ptr + fb + idx, v.to(y_ptr.dtype.element_ty), mask=m)
            prev = tl.where(inside, cur, 0.0)
            cur = nxt
            fb += chw


@triton.jit
def _temporal_conv_bwd_kernel(dy_ptr, x_ptr, dx_ptr,  # [F, C, H, W]
                              w_ptr,  # [C, 3] float32 taps
                              part_ptr,  # [3, NCH, C] float32 out: per-chunk tap sums (REDUCE)
                              layout_ptr, NCH, S, C, HW, fold, nb0,
                              REDUCE: tl.constexpr, REGIONS: tl.constexpr, ALIGN: tl.constexpr,
                              HW_ALIGN: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                              BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """``dx[f] = w1·dy[f] + w2·dy[f-1] + w0·dy[f+1]`` (inside the clip); with ``REDUCE`` the
    per-chunk sums ``x[f]·dy[f+1]``, ``x[f]·dy[f]``, ``x[f]·dy[f-1]`` (taps 0, 1, 2)."""
    k, f0, nf, start, stop, T, c, cmask, w0, w1, w2 = _program(
        w_ptr, layout_ptr, NCH, S, C, fold, nb0, REGIONS, ALIGN, BLOCK_C)
    chw = C * HW
    sum0 = tl.zeros([BLOCK_C], tl.float32)
    sum1 = tl.zeros([BLOCK_C], tl.float32)
    sum2 = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(0, HW, BLOCK_P):
        idx, m = K._tile(p0, c, cmask, C, HW, CHANNELS_LAST, HW_ALIGN, BLOCK_P)
        fb = f0.to(tl.int64) * chw
        prev, cur = _window_start(dy_ptr, fb, chw, idx, m, (f0 - start) % T)
        acc0 = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        acc1 = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        acc2 = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        for i in range(nf):
            f = f0 + i
            inside = (f - start) % T < T - 1
            nxt = tl.load(dy_ptr + fb + chw + idx, mask=m & (f + 1 < stop), other=0.0)
            nxt = nxt.to(tl.float32)
            later = tl.where(inside, nxt, 0.0)
            v = w1 * cur + w2 * prev + w0 * later
            tl.store(dx_ptr + fb + idx, v.to(dx_ptr.dtype.element_ty), mask=m)
            if REDUCE:
                xv = tl.load(x_ptr + fb + idx, mask=m, other=0.0).to(tl.float32)
                acc0 += xv * later
                acc1 += xv * cur
                acc2 += xv * prev
            prev = tl.where(inside, cur, 0.0)
            cur = nxt
            fb += chw
        if REDUCE:
            sum0 += tl.sum(acc0, 1)
            sum1 += tl.sum(acc1, 1)
            sum2 += tl.sum(acc2, 1)
    if REDUCE:
        out = part_ptr + k * C + c
        tl.store(out, sum0, mask=cmask)
        tl.store(out + NCH * C, sum1, mask=cmask)
        tl.store(out + 2 * NCH * C, sum2, mask=cmask)


def _plan(x, clips, frames):
    return Plan(x, clips, frames, (0,) * len(frames))  # one shared row: the taps


@on_device
def temporal_conv_fwd(x, clips, frames, weight):
    plan = _plan(x, clips, frames)
    y = torch.empty_like(x)
    _temporal_conv_fwd_kernel[plan.grid](x, y, weight.float().contiguous(), *plan.args, **plan.kw)
    return y


@on_device
def temporal_conv_bwd(dy, x, clips, frames, weight, weight_grad):
    plan = _plan(dy, clips, frames)
    dy = plan.like(dy)
    dx = torch.empty_like(dy)
    taps = weight.float().contiguous()
    if not weight_grad:
        _temporal_conv_bwd_kernel[plan.grid](dy, dy, dx, taps, dx, *plan.args, REDUCE=False,
                                             **plan.kw)
        return dx, unused_acc(dy)
    part = dx.new_empty((3, plan.nch, plan.C), dtype=torch.float32)
    # seven tiles live at once (the dy window, x, three sums): twice the threads per tile keeps
    # them within the 128-register cap (.ci/triton_sm90.py)
    kw = dict(plan.kw, num_warps=min(16, 2 * plan.kw["num_warps"]))
    _temporal_conv_bwd_kernel[plan.grid](dy, plan.like(x), dx, taps, part, *plan.args,
                                         REDUCE=True, **kw)
    sums = dx.new_empty((3, plan.S, plan.C), dtype=torch.float32)
    taps_grad = [dx.new_empty((1, plan.C), dtype=torch.float32) for _ in range(3)]
    K._sum_combine_kernel[plan.combine_grid](
        part, sums, *taps_grad, plan.layout, plan.nch, plan.S, plan.C, K=3,
        BLOCK_C=plan.combine_block,
    )
    return dx, torch.cat(taps_grad).t().contiguous()
