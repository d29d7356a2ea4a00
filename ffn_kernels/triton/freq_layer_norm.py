"""Triton kernels of ``freq_layer_norm`` (docs/design.md §3.7): the grid is (frame, block of
``BLOCK_M`` tokens of that frame), so a program's tokens share one segment and parameter row
(from a per-frame int32 table); each token's ``C`` channels are one row of the ``[BLOCK_M,
BLOCK_C]`` tile. Launches per call: fwd 1P; bwd 1P writing ``ds`` and per-program parameter
partials, which are added per segment in frame order, then per row in segment order (no atomics).
"""

import functools

import torch
import triton
import triton.language as tl

from .common import _MAXNREG, _TILE, check_dtype, on_device


@functools.lru_cache(maxsize=256)
def _frame_rows(clips: int, frames: tuple, rows: tuple, device: torch.device):
    """Parameter row of every frame, int32 on the device (one copy per layout)."""
    per_frame = [row for t, row in zip(frames, rows) for _ in range(clips * t)]
    return torch.tensor(per_frame, dtype=torch.int32, device=device)


def _plan(x, clips, frames, rows):
    check_dtype(x)
    C = x.shape[-1]
    F = x.shape[0]
    M = x.numel() // max(1, F * C)
    bc = triton.next_power_of_2(C)
    bm = max(1, min(triton.next_power_of_2(M), _TILE // bc))
    grid = (F, triton.cdiv(M, bm))
    kw = dict(BLOCK_M=bm, BLOCK_C=bc, num_warps=max(2, min(8, bm * bc // 256)), maxnreg=_MAXNREG)
    return _frame_rows(int(clips), tuple(frames), tuple(rows), x.device), M, C, grid, kw


@triton.jit
def _tile(f, j, M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Global token indices (int64), element offsets and masks of program (f, j)'s tile."""
    t = j * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_C)
    tmask, cmask = t < M, c < C
    r = f.to(tl.int64) * M + t
    return r, r[:, None] * C + c[None, :], tmask, cmask, tmask[:, None] & cmask[None, :]


@triton.jit
def _freq_layer_norm_fwd_kernel(x_ptr, res_ptr, s_ptr, y_ptr,  # [R, C] tokens
                                w_ptr, b_ptr,  # [P, C] float32
                                mean_ptr, rstd_ptr,  # [R] float32 out
                                rows_ptr, M, C, eps,
                                HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_C: tl.constexpr):
    f = tl.program_id(0)
    r, off, tmask, cmask, m = _tile(f, tl.program_id(1), M, C, BLOCK_M, BLOCK_C)
    v = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:  # the sum is stored and normalised as rounded to the storage dtype
        v += tl.load(res_ptr + off, mask=m, other=0.0).to(tl.float32)
        sv = v.to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + off, sv, mask=m)
        v = sv.to(tl.float32)
    mu = tl.sum(v, 1) / C
    d = tl.where(m, v - mu[:, None], 0.0)
    rs = 1.0 / tl.sqrt(tl.sum(d * d, 1) / C + eps)
    prow = tl.load(rows_ptr + f) * C + tl.arange(0, BLOCK_C)
    w = tl.load(w_ptr + prow, mask=cmask, other=0.0)
    b = tl.load(b_ptr + prow, mask=cmask, other=0.0)
    y = d * rs[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(mean_ptr + r, mu, mask=tmask)
    tl.store(rstd_ptr + r, rs, mask=tmask)


@triton.jit
def _freq_layer_norm_bwd_kernel(dy_ptr, dsum_ptr, s_ptr, ds_ptr,  # [R, C] tokens
                                w_ptr,  # [P, C] float32
                                mean_ptr, rstd_ptr,  # [R] float32
                                part_ptr,  # [F * NB, 2, C] float32 out: Σ dy·x̂, Σ dy per program
                                rows_ptr, M, C,
                                HAS_DSUM: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_C: tl.constexpr):
    f, j = tl.program_id(0), tl.program_id(1)
    r, off, tmask, cmask, m = _tile(f, j, M, C, BLOCK_M, BLOCK_C)
    mu = tl.load(mean_ptr + r, mask=tmask, other=0.0)
    rs = tl.load(rstd_ptr + r, mask=tmask, other=0.0)
    xhat = (tl.load(s_ptr + off, mask=m, other=0.0).to(tl.float32) - mu[:, None]) * rs[:, None]
    dy = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + tl.load(rows_ptr + f) * C + tl.arange(0, BLOCK_C), mask=cmask, other=0.0)
    g = dy * w[None, :]
    mean_g = tl.sum(g, 1) / C
    mean_gx = tl.sum(g * xhat, 1) / C
    ds = rs[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
    if HAS_DSUM:
        ds += tl.load(dsum_ptr + off, mask=m, other=0.0).to(tl.float32)
    tl.store(ds_ptr + off, ds.to(ds_ptr.dtype.element_ty), mask=m)
    out = part_ptr + (f * tl.num_programs(1) + j) * 2 * C + tl.arange(0, BLOCK_C)
    tl.store(out, tl.sum(tl.where(m, dy * xhat, 0.0), 0), mask=cmask)
    tl.store(out + C, tl.sum(dy, 0), mask=cmask)


@on_device
def freq_layer_norm_fwd(x, clips, frames, rows, weight, bias, eps, residual):
    frame_rows, M, C, grid, kw = _plan(x, clips, frames, rows)
    y = torch.empty_like(x)
    s = torch.empty_like(x) if residual is not None else x.new_empty(0)
    mean = x.new_empty(x.numel() // C, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    _freq_layer_norm_fwd_kernel[grid](
        x, x if residual is None else residual, s if residual is not None else x, y,
        weight, bias, mean, rstd, frame_rows, M, C, float(eps),
        HAS_RES=residual is not None, **kw)
    return y, s, mean, rstd


@on_device
def freq_layer_norm_bwd(dy, dsum, s, clips, frames, rows, weight, mean, rstd):
    frame_rows, M, C, grid, kw = _plan(s, clips, frames, rows)
    ds = torch.empty_like(s)
    part = s.new_empty((grid[0], grid[1], 2, C), dtype=torch.float32)
    _freq_layer_norm_bwd_kernel[grid](
        dy, dy if dsum is None else dsum, s, ds, weight, mean, rstd, part, frame_rows, M, C,
        HAS_DSUM=dsum is not None, **kw)
    dweight = torch.zeros(weight.shape, dtype=torch.float32, device=s.device)
    dbias = torch.zeros_like(dweight)
    start = 0
    for t, row in zip(frames, rows):  # segments in order: deterministic, shared rows add up
        stop = start + int(clips) * int(t)
        sums = part[start:stop].sum((0, 1))
        dweight[row] += sums[0]
        dbias[row] += sums[1]
        start = stop
    return ds, dweight, dbias
