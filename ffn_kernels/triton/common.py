"""What the Triton ops share: the launch plan of a call (block sizes, chunking, the device table
of the :class:`~ffn_kernels.FrameLayout`), the statistics pass and the generic forward and backward
launches of :mod:`.kernels`; each op's file (``shift_alter.py``, ``freq_batch_norm.py``,
``bn_add_relu_shift_alter.py``) states which of them it uses with which tensors.

Launch counts per call (``P`` = pass over the big tensors, ``c`` = tiny ``[S, C]`` combine):
shift_alter fwd 1P, bwd 1P (+c for ``d alter``); freq_batch_norm and bn_add_relu_shift_alter fwd
training 2P + c, eval c + 1P, bwd training 2P + c, eval 1P + c.
"""

from __future__ import annotations

import functools

import torch
import triton

from ..validation import memory_format_of, unused_acc
from . import kernels as K

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TILE = 2048  # elements per [BLOCK_C, BLOCK_P] tile
_CHUNK = 1 << 15  # elements a program covers (frames per chunk follow from it)
_MAXNREG = 128  # registers per thread at most (the sm_90 CI gate)
_MOMENTA = 8  # segment momenta per statistics-combine launch (scalar kernel arguments)


@functools.lru_cache(maxsize=256)
def _frame_layout_table(clips: int, frames: tuple, rows: tuple, chunk_frames: int,
                        device: torch.device):
    """The int32 table described in :mod:`.kernels` (cached: one host-to-device copy per
    layout) and its number of chunks."""
    seg, first, count, chunk_lo, starts = [], [], [], [0], [0]
    for s, t in enumerate(frames):
        n = clips * t
        for f in range(0, n, chunk_frames):
            seg.append(s)
            first.append(starts[-1] + f)
            count.append(min(chunk_frames, n - f))
        chunk_lo.append(len(seg))
        starts.append(starts[-1] + n)
    table = seg + first + count + starts + list(frames) + [0] + list(rows) + [0] + chunk_lo
    return torch.tensor(table, dtype=torch.int32, device=device), len(seg)


def check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in _DTYPES:
        raise TypeError(
            f"ffn_kernels.triton: x has dtype {x.dtype}; the Triton kernels take float32, "
            "float16 or bfloat16 (use the reference or C++ backend for float64)"
        )


def _pow2_divisor(n: int, cap: int = 16) -> int:
    """The largest power of two <= ``cap`` dividing ``n`` (``cap`` for 0)."""
    return cap if n == 0 else min(cap, n & -n)


def _launch(tile: int) -> dict:
    """Warps for a tile (about 8 elements per thread at most) and the register cap: ptxas's own
    choice for 256-thread blocks (64) spills in the largest backward variants, 128 does not and
    still fits two such blocks per SM (``.ci/triton_sm90.py`` checks every variant at sm_90)."""
    return dict(num_warps=max(2, min(8, tile // 256)), maxnreg=_MAXNREG)


class Plan:
    """Launch configuration of one call: block sizes from ``C`` and ``H*W`` (the tile grows
    along the contiguous axis: pixels for NCHW, channels for channels_last), frames per
    chunk, the metadata table, and for the ops that shift (``fold_div`` given) channel blocks
    that respect the fold boundaries (see :mod:`.kernels`)."""

    def __init__(self, x: torch.Tensor, clips: int, frames, rows, fold_div=None):
        check_dtype(x)
        self.fmt = memory_format_of(x)
        self.channels_last = self.fmt == torch.channels_last
        if not x.is_contiguous(memory_format=self.fmt):
            raise ValueError("ffn_kernels.triton: x must be NCHW contiguous or channels_last")
        F, C, H, W = x.shape
        hw = H * W
        if F >= 2**31:
            raise ValueError(f"ffn_kernels.triton: x has {F} frames; the Triton kernels take fewer "
                             "than 2**31 (their layout table is int32)")
        if C * hw >= 2**31:
            raise ValueError("ffn_kernels.triton: a frame (C*H*W) must have fewer than 2**31 "
                             "elements (int32 offsets inside a frame)")
        if self.channels_last:
            bc = min(triton.next_power_of_2(C), 128)
        else:
            bp = min(triton.next_power_of_2(hw), 1024)
            bc = min(triton.next_power_of_2(C), max(1, _TILE // bp))
        regions = fold_div is not None
        fold = C // fold_div if regions else 0
        if regions and fold > 0:  # blocks no wider than a fold (at least 8 channels)
            bc = min(bc, max(8, triton.next_power_of_2(fold)))
        if self.channels_last:
            bp = min(triton.next_power_of_2(hw), max(1, _TILE // bc))
        nb0 = max(1, triton.cdiv(fold, bc))
        nblocks = 2 * nb0 + triton.cdiv(C - min(C, 2 * fold), bc) if regions else triton.cdiv(C, bc)
        align = min(bc, _pow2_divisor(C), _pow2_divisor(fold))
        chunk_frames = max(1, _CHUNK // (bc * hw))
        self.layout, self.nch = _frame_layout_table(int(clips), tuple(frames), tuple(rows),
                                                   chunk_frames, x.device)
        self.C, self.S, self.hw = C, len(frames), hw
        self.grid = (self.nch, nblocks)
        self.combine_block = min(triton.next_power_of_2(C), 256)
        self.combine_grid = (triton.cdiv(C, self.combine_block),)
        hw_align = min(bp, _pow2_divisor(hw))  # pixel tiles start at multiples of it
        self.kw = dict(REGIONS=regions, ALIGN=align, HW_ALIGN=hw_align,
                       CHANNELS_LAST=self.channels_last,
                       BLOCK_C=bc, BLOCK_P=bp, **_launch(bc * bp))
        self.args = (self.layout, self.nch, self.S, C, hw, fold, nb0)

    def like(self, t):
        """``t`` in this call's memory format (a no-op for inputs that already are)."""
        return None if t is None else t.contiguous(memory_format=self.fmt)


def stats(plan, x, running_mean, running_var, training, momentum, eps):
    """``mean``/``invstd[S, C]`` and updated copies of the running statistics."""
    has_running = running_mean is not None
    batch = training or not has_running
    C, S = plan.C, plan.S
    mean = x.new_empty((S, C), dtype=torch.float32)
    invstd = torch.empty_like(mean)
    if has_running:
        new_rm, new_rv = running_mean.clone(), running_var.clone()
    else:
        new_rm, new_rv = unused_acc(x), unused_acc(x)
    part = mean
    if batch:
        part = x.new_empty((2, plan.nch, C), dtype=torch.float32)
        K._stats_kernel[plan.grid](x, part, *plan.args, **plan.kw)
    update = batch and has_running
    for s_lo in range(0, S, _MOMENTA):  # momenta as scalar arguments, 8 segments per launch
        s_hi = min(S, s_lo + _MOMENTA)
        moms = [float(m) for m in momentum[s_lo:s_hi]] if update else []
        K._stats_combine_kernel[plan.combine_grid](
            part, mean, invstd, new_rm, new_rv, plan.layout, plan.nch, S, C, plan.hw,
            float(eps), s_lo, s_hi,
            *moms, *[0.0] * (_MOMENTA - len(moms)),
            BATCH=batch, UPDATE=update, BLOCK_C=plan.combine_block,
        )
    return mean, invstd, new_rm, new_rv


def forward(plan, x, *, res=None, y=None, nxt=None, mean=None, invstd=None, weight=None,
            bias=None, alter=None, relu=False):
    """One elementwise pass: ``y = act(BN(x) + res)`` (BN when ``mean`` is given) and/or
    ``nxt = shift_alter(act(...))``."""
    norm, shift = mean is not None, nxt is not None

    def pick(t):  # unused pointer arguments get any tensor: constexpr flags keep them unread
        return x if t is None else t

    K._fwd_kernel[plan.grid](
        x, pick(plan.like(res)), pick(y), pick(nxt), pick(mean),
        pick(invstd), pick(weight), pick(bias), pick(alter), *plan.args,
        NORM=norm, HAS_RES=res is not None, RELU=relu, STORE_Y=y is not None, SHIFT=shift,
        HAS_ALTER=shift and alter is not None, **plan.kw,
    )


def backward(plan, dx, param_grads, *, dy=None, dnext=None, x=None, y=None, dres=None,
             weight=None, bias=None, mean=None, invstd=None, training=False, relu=False,
             alter=None):
    """Fill ``dx``, ``dres`` and ``param_grads`` (float32 ``[P, C]`` zeros: dweight and dbias
    when BN (``mean`` given), then dalter). Training BN needs the segment sums before ``dx``,
    so it reduces in one pass and stores in a second; otherwise one pass does both. With
    ``bias`` the ReLU mask is recomputed from ``x`` instead of read from ``y``."""
    norm = mean is not None
    alter_grad = len(param_grads) > (2 if norm else 0)
    two_pass = norm and training

    def pick(t):  # unused pointer arguments get any tensor: constexpr flags keep them unread
        return dx if t is None else t

    tensors = (pick(plan.like(dy)), pick(plan.like(dnext)), pick(x), pick(plan.like(y)), dx,
               pick(dres))
    params = (pick(mean), pick(invstd), pick(weight), pick(bias), pick(alter), *plan.args)
    flags = dict(
        HAS_DY=dy is not None, SHIFT=dnext is not None, HAS_ALTER=alter is not None,
        ALTER_GRAD=alter_grad, RELU=relu, NORM=norm, TRAINING=training, HAS_RES=dres is not None,
        G_STORED=two_pass and dres is not None, MASK_FROM_X=relu and bias is not None,
        **plan.kw,
    )
    sums = dx
    if param_grads:
        part = dx.new_empty((len(param_grads), plan.nch, plan.C), dtype=torch.float32)
        sums = dx.new_empty((len(param_grads), plan.S, plan.C), dtype=torch.float32)
        K._bwd_kernel[plan.grid](*tensors, part, sums, *params, REDUCE=True,
                                 STORE=not two_pass, **flags)
        K._sum_combine_kernel[plan.combine_grid](
            part, sums, *param_grads, *[sums] * (3 - len(param_grads)), plan.layout, plan.nch,
            plan.S, plan.C, K=len(param_grads), BLOCK_C=plan.combine_block,
        )
    if two_pass or not param_grads:
        K._bwd_kernel[plan.grid](*tensors, dx, sums, *params, REDUCE=False, STORE=True, **flags)


def zeros(p):
    return torch.zeros(p.shape, dtype=torch.float32, device=p.device)


_GUARDED = ("cuda",)  # device types whose tensors launch under a device guard (ROCm is "cuda")
_device_guard = torch.cuda.device


def on_device(fn):
    """Run an entry point with its first tensor's device current (Triton launches on the current
    device, so a tensor on ``cuda:1`` would otherwise launch on ``cuda:0``). CPU tensors (the
    interpreter) take no guard."""

    @functools.wraps(fn)
    def guarded(x, *args, **kwargs):
        if x.device.type in _GUARDED:
            with _device_guard(x.device):
                return fn(x, *args, **kwargs)
        return fn(x, *args, **kwargs)

    return guarded
