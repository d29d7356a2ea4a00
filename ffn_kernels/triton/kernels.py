"""Triton kernels of the fused ops (docs/design.md §2, §3, §4.6).

Every pass runs on the grid ``(chunk, channel block)``. A *chunk* is a run of consecutive frames
inside one segment (see :func:`ffn_kernels.triton.common._frame_layout_table`), so a program knows
its segment, parameter row and clip length from a few scalar loads of ``layout_ptr``, the
:class:`~ffn_kernels.FrameLayout` of the call as an int32 device table:

    layout_ptr = [chunk_seg[NCH], chunk_first_frame[NCH], chunk_num_frames[NCH],
                  seg_start[S+1], seg_frames[S] + pad, seg_row[S] + pad, seg_first_chunk[S+1]]

A program walks its frames and, per frame, tiles of ``[BLOCK_C, BLOCK_P]`` (channels x pixels).
Element ``(f, c, p)`` lives at ``f*C*HW + c*HW + p`` (NCHW) or ``f*C*HW + p*C + c`` (channels_last);
``CHANNELS_LAST`` is a constexpr so the compiler sees which tile axis is contiguous and vectorises
along it.
The frame offset ``f*C*HW`` is a scalar int64, offsets inside a frame are int32 (fewer registers
per element). ``ALIGN`` / ``HW_ALIGN`` (powers of two dividing the channel-block bounds and
``H*W``) let the compiler vectorise loads and stores where the shapes allow.

When a pass shifts (TSM), channel blocks respect the fold boundaries (``REGIONS``): the blocks
of ``[0, fold)``, ``[fold, 2*fold)`` and ``[2*fold, C)`` are numbered in turn (``nb0`` blocks in
each of the first two), so a program's shift direction, target frame and in-clip test are
scalars and its shifted loads/stores stay contiguous.

Reductions never use atomics: each program writes per-(chunk, channel) partials, and a combine
kernel folds a segment's chunks in chunk order (deterministic), one program per channel block
walking the segments in order; a parameter row used by several segments gets the sum of their
gradients, added in segment order (as autograd and the reference give).

Three ops share the two elementwise kernels; the constexpr flags each op sets (``?``: when the
argument is given or the mode asks for it; launches in ``shift_alter.py``, ``freq_batch_norm.py``,
``bn_add_relu_shift_alter.py`` through :mod:`.common`):

=======================  ======================================  ===================================
op                       ``_fwd_kernel``                         ``_bwd_kernel``
=======================  ======================================  ===================================
shift_alter              SHIFT, HAS_ALTER?                       SHIFT, HAS_ALTER?, ALTER_GRAD?
freq_batch_norm          NORM, STORE_Y, HAS_RES?, RELU?          HAS_DY, NORM, TRAINING?, HAS_RES?,
                                                                 RELU?, G_STORED?, MASK_FROM_X?
bn_add_relu_shift_alter  NORM, STORE_Y, HAS_RES, RELU, SHIFT,    HAS_DY, SHIFT, NORM, HAS_RES, RELU,
                         HAS_ALTER?                              TRAINING?, HAS_ALTER?, ALTER_GRAD?,
                                                                 G_STORED?
=======================  ======================================  ===================================

The BN ops run ``_stats_kernel`` + ``_stats_combine_kernel`` before the forward in training (only
the combine in eval). A backward with parameter gradients (BN, or ``ALTER_GRAD``) runs a ``REDUCE``
pass and ``_sum_combine_kernel``; BN in training then needs a second pass to ``STORE`` dx (with a
residual, the ``REDUCE`` pass stores g as its gradient and the second pass reads it back).
"""

import triton
import triton.language as tl


@triton.jit
def _shift_target(t, T, step):
    """The frame offset from frame ``t`` (of ``T``) to the frame whose TSM shift reads frame
    ``t``, and whether that frame is inside the clip, for a channel block whose region shifts by
    ``step``. The forward shift makes frame ``u`` of channels ``[0, fold)`` read ``u+1`` and of
    ``[fold, 2*fold)`` read ``u-1``, so the target is ``t-1`` (``step = -1``) resp. ``t+1``
    (``step = 1``); this is also the source of the reverse (adjoint) shift. Out-of-clip offsets
    wrap around the clip, which makes the map a permutation: scattering ``where(valid, v, 0)``
    with it writes every element exactly once, zeros included."""
    dst = t + step
    valid = (dst >= 0) & (dst < T)
    off = step + T * ((dst < 0).to(tl.int32) - (dst >= T).to(tl.int32))  # no select chain
    return off, valid


@triton.jit
def _segment(layout_ptr, NCH, S, s):
    """``(first frame, end frame, frames per clip, parameter row)`` of segment ``s``."""
    segs = layout_ptr + 3 * NCH
    start = tl.load(segs + s)
    stop = tl.load(segs + s + 1)
    T = tl.load(segs + (S + 1) + s)
    row = tl.load(segs + 2 * (S + 1) + s)
    return start, stop, T, row


@triton.jit
def _chunk(layout_ptr, NCH, S):
    """This program's chunk: ``(index, segment, first frame, number of frames)``."""
    k = tl.program_id(0)
    seg = tl.load(layout_ptr + k)
    f0 = tl.load(layout_ptr + NCH + k)
    nf = tl.load(layout_ptr + 2 * NCH + k)
    return k, seg, f0, nf


@triton.jit
def _channels(C, fold, nb0, REGIONS: tl.constexpr, ALIGN: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's channels, their mask and (``REGIONS``) the shift step of their region."""
    j = tl.program_id(1)
    if REGIONS:
        # region r in 0..2 by arithmetic, not selects (LLVM turns select chains on r into a
        # lookup table, which ptxas places on the stack)
        r = tl.minimum(j // nb0, 2)
        lo = tl.minimum(r * fold, C)
        hi = tl.minimum(lo + fold + (r >> 1) * C, C)
        c0 = lo + (j - r * nb0) * BLOCK_C
        step = 2 * r - 1 - 3 * (r >> 1)  # -1, 1, 0
    else:
        c0 = j * BLOCK_C
        hi = C
        step = 0
    c0 = tl.multiple_of(c0, ALIGN)
    hi = tl.multiple_of(hi, ALIGN)
    c = c0 + tl.arange(0, BLOCK_C)
    return c, c < hi, step


@triton.jit
def _tile(p0, c, cmask, C, HW, CHANNELS_LAST: tl.constexpr, HW_ALIGN: tl.constexpr,
          BLOCK_P: tl.constexpr):
    """int32 offsets inside a frame and mask of the ``[BLOCK_C, BLOCK_P]`` tile at pixel ``p0``.
    (``HW_ALIGN`` hints go on values computed here: a hint on the argument ``HW`` itself is
    dropped, having no defining op to carry it.)"""
    q = tl.arange(0, BLOCK_P)
    left = tl.multiple_of(HW - p0, HW_ALIGN)  # pixels from p0 to the end of the plane
    if CHANNELS_LAST:
        idx = (p0 + q)[None, :] * C + c[:, None]
    else:
        rows = tl.multiple_of(c * HW + p0, HW_ALIGN)
        idx = rows[:, None] + q[None, :]
    return idx, cmask[:, None] & (q < left)[None, :]


@triton.jit
def _welford_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan et al. merge of two (mean, M2, count) summaries, in the dtype of ``mean_a``/``m2_a``.
    Inside a chunk the counts are float32 (at most ``_CHUNK`` values: exact); across chunks they
    are int64, as a float32 count stops growing at 2**24. The weight is a float32 division (a
    float64 one would call ptxas's slow path, which uses stack)."""
    n = n_a + n_b
    w_b = n_b.to(tl.float32) / tl.maximum(n, 1).to(tl.float32)
    delta = mean_b - mean_a
    return mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a.to(tl.float32) * w_b, n


@triton.jit
def _stats_kernel(x_ptr,  # [F, C, H, W] activation
                  part_ptr,  # [2, NCH, C] float32 out: per-chunk (mean, M2)
                  layout_ptr, NCH, S, C, HW, fold, nb0,
                  REGIONS: tl.constexpr, ALIGN: tl.constexpr, HW_ALIGN: tl.constexpr,
                  CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Per-lane Welford over the chunk, merged across lanes; writes ``part[2, NCH, C]`` =
    (mean, M2) of this chunk's frames x pixels for each channel (its count, frames x ``HW``, is
    in the layout table)."""
    k, seg, f0, nf = _chunk(layout_ptr, NCH, S)
    c, cmask, step = _channels(C, fold, nb0, REGIONS, ALIGN, BLOCK_C)
    mean = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    m2 = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    cnt = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    for i in range(nf):
        xf = x_ptr + (f0 + i).to(tl.int64) * C * HW
        for p0 in range(0, HW, BLOCK_P):
            idx, m = _tile(p0, c, cmask, C, HW, CHANNELS_LAST, HW_ALIGN, BLOCK_P)
            v = tl.load(xf + idx, mask=m, other=0.0).to(tl.float32)
            cnt += m.to(tl.float32)
            delta = v - mean
            mean += tl.where(m, delta / tl.maximum(cnt, 1.0), 0.0)
            m2 += tl.where(m, delta * (v - mean), 0.0)
    mean, m2, cnt = tl.reduce((mean, m2, cnt), 1, _welford_combine)
    out = part_ptr + k * C + c
    tl.store(out, mean, mask=cmask)
    tl.store(out + NCH * C, m2, mask=cmask)


@triton.jit
def _stats_combine_kernel(part_ptr,  # [2, NCH, C] float32 from _stats_kernel
                          mean_ptr, invstd_ptr,  # [S, C] float32 out
                          rm_ptr, rv_ptr,  # [P, C] float32 running stats (updated copies)
                          layout_ptr, NCH, S, C, HW, eps: tl.float64, s_lo, s_hi,
                          mom0, mom1, mom2, mom3, mom4, mom5, mom6, mom7,
                          BATCH: tl.constexpr, UPDATE: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per segment ``s_lo <= s < s_hi`` (at most 8): merge the chunks' partials (``BATCH``) or
    read the row's running statistics, write ``mean``/``invstd[S, C]`` and (``UPDATE``) blend
    the batch statistics into the running statistics ``rm``/``rv`` (updated copies) with the
    segment's momentum and unbiased variance. The momenta ``mom0..mom7`` of segments ``s_lo..`` are
    scalar arguments: no host-to-device copy per call (and nothing that breaks graph capture).
    Counts are int64 (exact at any size) and ``invstd`` is computed in float64 with a float64
    ``eps``, as ATen's CPU BatchNorm does (an ``eps`` of 1e-50 is 0 in float32)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    first_chunk = layout_ptr + 3 * NCH + 3 * (S + 1)
    for s in range(s_lo, s_hi):
        start, stop, T, row = _segment(layout_ptr, NCH, S, s)
        prow = row * C + c
        if BATCH:
            # merged in float64: a segment may have tens of thousands of chunks, and a float32
            # merge of that many partials loses digits as a float32 sum of that many values does
            mean64 = tl.zeros([BLOCK_C], tl.float64)
            m2 = tl.zeros([BLOCK_C], tl.float64)
            n = tl.zeros([BLOCK_C], tl.int64)
            for k in range(tl.load(first_chunk + s), tl.load(first_chunk + s + 1)):
                src = part_ptr + k * C + c
                count = tl.load(layout_ptr + 2 * NCH + k).to(tl.int64) * HW  # chunk frames x HW
                mean64, m2, n = _welford_combine(
                    mean64, m2, n, tl.load(src, mask=cmask, other=0.0).to(tl.float64),
                    tl.load(src + NCH * C, mask=cmask, other=0.0).to(tl.float64), count)
            mean = mean64.to(tl.float32)
            var = m2 * (1.0 / tl.maximum(n, 1).to(tl.float32)).to(tl.float64)
            if UPDATE:
                j = s - s_lo
                mom = tl.where(j == 0, mom0, tl.where(j == 1, mom1, tl.where(j == 2, mom2, tl.where(
                    j == 3, mom3, tl.where(j == 4, mom4, tl.where(j == 5, mom5, tl.where(
                        j == 6, mom6, mom7)))))))
                rm = tl.load(rm_ptr + prow, mask=cmask)
                rv = tl.load(rv_ptr + prow, mask=cmask)
                unbiased = (var * (n.to(tl.float32) / tl.maximum(n - 1, 1).to(tl.float32))).to(
                    tl.float32)
                tl.store(rm_ptr + prow, (1.0 - mom) * rm + mom * mean, mask=cmask)
                tl.store(rv_ptr + prow, (1.0 - mom) * rv + mom * unbiased, mask=cmask)
        else:
            mean = tl.load(rm_ptr + prow, mask=cmask, other=0.0)
            var = tl.load(rv_ptr + prow, mask=cmask, other=1.0).to(tl.float64)
        tl.store(mean_ptr + s * C + c, mean, mask=cmask)
        tl.store(invstd_ptr + s * C + c, tl.math.rsqrt(var + eps).to(tl.float32), mask=cmask)


@triton.jit
def _fwd_kernel(x_ptr, res_ptr,  # [F, C, H, W] input and residual (HAS_RES)
                y_ptr, nxt_ptr,  # [F, C, H, W] out: act(BN(x) + res) (STORE_Y), its shift (SHIFT)
                mean_ptr, invstd_ptr,  # [S, C] float32 per-segment statistics (NORM)
                w_ptr, b_ptr, alter_ptr,  # [P, C] float32 parameter rows
                layout_ptr, NCH, S, C, HW, fold, nb0,
                NORM: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
                STORE_Y: tl.constexpr, SHIFT: tl.constexpr, HAS_ALTER: tl.constexpr,
                REGIONS: tl.constexpr, ALIGN: tl.constexpr, HW_ALIGN: tl.constexpr,
                CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """``v = act(BN(x) + res)`` (each part optional), stored to ``y``, and/or
    ``shift_alter(v)`` scattered to ``nxt``: each frame sends its values to the frame that reads
    them, so ``x``/``res`` are read once and the shifted output needs no second pass."""
    k, seg, f0, nf = _chunk(layout_ptr, NCH, S)
    start, stop, T, row = _segment(layout_ptr, NCH, S, seg)
    c, cmask, step = _channels(C, fold, nb0, REGIONS, ALIGN, BLOCK_C)
    prow = row * C + c
    if NORM:
        scale = tl.load(w_ptr + prow, mask=cmask, other=0.0) * tl.load(
            invstd_ptr + seg * C + c, mask=cmask, other=0.0)
        shift = tl.load(b_ptr + prow, mask=cmask, other=0.0) - scale * tl.load(
            mean_ptr + seg * C + c, mask=cmask, other=0.0)
    if HAS_ALTER:
        a1 = 1.0 + tl.load(alter_ptr + prow, mask=cmask, other=0.0)
    for i in range(nf):
        f = f0 + i
        fb = f.to(tl.int64) * C * HW
        if SHIFT:
            off, valid = _shift_target((f - start) % T, T, step)
            nxt_f = nxt_ptr + fb + off.to(tl.int64) * C * HW
        for p0 in range(0, HW, BLOCK_P):
            idx, m = _tile(p0, c, cmask, C, HW, CHANNELS_LAST, HW_ALIGN, BLOCK_P)
            v = tl.load(x_ptr + fb + idx, mask=m, other=0.0).to(tl.float32)
            if NORM:
                v = v * scale[:, None] + shift[:, None]
            if HAS_RES:
                v += tl.load(res_ptr + fb + idx, mask=m, other=0.0).to(tl.float32)
            if RELU:
                v = tl.maximum(v, 0.0)
            if STORE_Y:
                yv = v.to(y_ptr.dtype.element_ty)
                tl.store(y_ptr + fb + idx, yv, mask=m)
                v = yv.to(tl.float32)  # next_in is the shift of the stored (rounded) y
            if SHIFT:
                if HAS_ALTER:
                    v = v * a1[:, None]
                v = tl.where(valid, v, 0.0)
                tl.store(nxt_f + idx, v.to(nxt_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_kernel(dy_ptr, dnext_ptr,  # [F, C, H, W] gradients of y (HAS_DY) and of its shift (SHIFT)
                x_ptr, y_ptr,  # [F, C, H, W] forward input (NORM) and output (RELU / ALTER_GRAD)
                dx_ptr, dres_ptr,  # [F, C, H, W] out: input and residual (HAS_RES) gradients
                part_ptr,  # [K, NCH, C] float32 out: per-chunk partial sums (REDUCE)
                sums_ptr,  # [2, S, C] float32 segment sums read by a training STORE pass
                mean_ptr, invstd_ptr,  # [S, C] float32
                w_ptr, b_ptr, alter_ptr,  # [P, C] float32 (b_ptr: MASK_FROM_X)
                layout_ptr, NCH, S, C, HW, fold, nb0,
                HAS_DY: tl.constexpr, SHIFT: tl.constexpr, HAS_ALTER: tl.constexpr,
                ALTER_GRAD: tl.constexpr, RELU: tl.constexpr, NORM: tl.constexpr,
                TRAINING: tl.constexpr, HAS_RES: tl.constexpr, G_STORED: tl.constexpr,
                MASK_FROM_X: tl.constexpr,
                REDUCE: tl.constexpr, STORE: tl.constexpr, REGIONS: tl.constexpr,
                ALIGN: tl.constexpr, HW_ALIGN: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Backward of ``_fwd_kernel``. The incoming gradient of the BN output is, per element,
    ``g = (dy + (1+a) * dnext[reverse shift]) * (y > 0)`` (each term optional).

    ``REDUCE`` writes per-chunk partials ``part[K, NCH, C]``: ``Σ g·xhat``, ``Σ g`` (``NORM``)
    and ``Σ y·dnext[reverse shift]`` (``ALTER_GRAD``; equal to ``Σ dnext·shift(y)``).
    ``STORE`` writes ``dx`` (the BN input gradient, or ``g`` without ``NORM``) and ``dres = g``;
    in training it needs the segment sums ``sums[2, S, C]`` from a previous ``REDUCE`` pass.
    ``G_STORED`` (training BN with a residual): the ``REDUCE`` pass writes ``dres = g`` and the
    ``STORE`` pass reads g back from it, one tensor instead of the up to three g is made of.
    ``MASK_FROM_X`` (ReLU without a residual): the mask is that of the forward's y recomputed from
    x (``x * scale + shift``, rounded as y was stored), so y is not read."""
    k, seg, f0, nf = _chunk(layout_ptr, NCH, S)
    start, stop, T, row = _segment(layout_ptr, NCH, S, seg)
    c, cmask, step = _channels(C, fold, nb0, REGIONS, ALIGN, BLOCK_C)
    prow = row * C + c
    if HAS_ALTER:
        a1 = 1.0 + tl.load(alter_ptr + prow, mask=cmask, other=0.0)
    if NORM:
        mu = tl.load(mean_ptr + seg * C + c, mask=cmask, other=0.0)
        istd = tl.load(invstd_ptr + seg * C + c, mask=cmask, other=0.0)
        scale = tl.load(w_ptr + prow, mask=cmask, other=0.0) * istd
        if MASK_FROM_X:  # the forward's shift, as _fwd_kernel computes it
            shift = tl.load(b_ptr + prow, mask=cmask, other=0.0) - scale * mu
        if STORE and TRAINING:
            n = ((stop - start).to(tl.int64) * HW).to(tl.float32)  # > 2**31 values per channel
            mean_gx = tl.load(sums_ptr + seg * C + c, mask=cmask, other=0.0) / n
            mean_g = tl.load(sums_ptr + (S + seg) * C + c, mask=cmask, other=0.0) / n
    acc_gx = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    acc_g = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    acc_da = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    for i in range(nf):
        f = f0 + i
        fb = f.to(tl.int64) * C * HW
        if SHIFT:
            off, valid = _shift_target((f - start) % T, T, step)
            dnext_f = dnext_ptr + fb + off.to(tl.int64) * C * HW
        for p0 in range(0, HW, BLOCK_P):
            idx, m = _tile(p0, c, cmask, C, HW, CHANNELS_LAST, HW_ALIGN, BLOCK_P)
            if G_STORED and not REDUCE:  # the reduce pass stored g as dres: read it back
                g = tl.load(dres_ptr + fb + idx, mask=m, other=0.0).to(tl.float32)
            else:
                if HAS_DY:
                    g = tl.load(dy_ptr + fb + idx, mask=m, other=0.0).to(tl.float32)
                else:
                    g = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
                if MASK_FROM_X:
                    xv = tl.load(x_ptr + fb + idx, mask=m, other=0.0).to(tl.float32)
                    yv = (xv * scale[:, None] + shift[:, None]).to(dx_ptr.dtype.element_ty)
                    yv = yv.to(tl.float32)
                elif RELU or (ALTER_GRAD and REDUCE):
                    yv = tl.load(y_ptr + fb + idx, mask=m, other=0.0).to(tl.float32)
                if SHIFT:
                    dn = tl.load(dnext_f + idx, mask=m & valid, other=0.0)
                    dn = dn.to(tl.float32)
                    if ALTER_GRAD and REDUCE:
                        acc_da += yv * dn
                    if HAS_ALTER:
                        dn = dn * a1[:, None]
                    g += dn
                if RELU:
                    g = tl.where(yv > 0, g, 0.0)
                if G_STORED:
                    tl.store(dres_ptr + fb + idx, g.to(dres_ptr.dtype.element_ty), mask=m)
            if NORM:
                if REDUCE or TRAINING:
                    if not MASK_FROM_X:  # (with it, read above: MASK_FROM_X has no G_STORED)
                        xv = tl.load(x_ptr + fb + idx, mask=m, other=0.0).to(tl.float32)
                    xhat = (xv - mu[:, None]) * istd[:, None]
                if REDUCE:
                    acc_gx += g * xhat
                    acc_g += g
                if STORE:
                    if TRAINING:
                        dx = (g - mean_g[:, None] - xhat * mean_gx[:, None]) * scale[:, None]
                    else:
                        dx = g * scale[:, None]
            else:
                dx = g
            if STORE:
                tl.store(dx_ptr + fb + idx, dx.to(dx_ptr.dtype.element_ty), mask=m)
                if HAS_RES and not G_STORED:
                    tl.store(dres_ptr + fb + idx, g.to(dres_ptr.dtype.element_ty), mask=m)
    if REDUCE:
        out = part_ptr + k * C + c
        if NORM:
            tl.store(out, tl.sum(acc_gx, 1), mask=cmask)
            tl.store(out + NCH * C, tl.sum(acc_g, 1), mask=cmask)
            out += 2 * NCH * C
        if ALTER_GRAD:
            tl.store(out, tl.sum(acc_da, 1), mask=cmask)


@triton.jit
def _chunk_sum(part_ptr, first_chunk, j, s, NCH, C, c, cmask, BLOCK_C: tl.constexpr):
    """Sum of slot ``j``'s partials over the chunks of segment ``s``, in chunk order."""
    acc = tl.zeros([BLOCK_C], tl.float32)
    for k in range(tl.load(first_chunk + s), tl.load(first_chunk + s + 1)):
        acc += tl.load(part_ptr + (j * NCH + k) * C + c, mask=cmask, other=0.0)
    return acc


@triton.jit
def _sum_combine_kernel(part_ptr,  # [K, NCH, C] float32 partials
                        sums_ptr,  # [K, S, C] float32 out: per-segment sums
                        out0_ptr, out1_ptr, out2_ptr,  # [P, C] float32 out: per-row sums
                        layout_ptr, NCH, S, C,
                        K: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per segment and slot ``j < K``: sum the chunks' partials in chunk order into
    ``sums[j, s]``; row ``p`` of output ``j`` (``[P, C]``) gets the sum over the segments with
    row ``p``, added in segment order and stored once, by its first segment (rows kept in
    registers: no re-read of a value this program stored)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    first_chunk = layout_ptr + 3 * NCH + 3 * (S + 1)
    seg_row = layout_ptr + 3 * NCH + 2 * (S + 1)
    for s in range(S):
        row = tl.load(seg_row + s)
        # segments before s with the same row (they stored it already)
        earlier = tl.full([], 0, tl.int32)
        for r in range(s):
            earlier += (tl.load(seg_row + r) == row).to(tl.int32)
        for j in tl.static_range(K):
            acc = _chunk_sum(part_ptr, first_chunk, j, s, NCH, C, c, cmask, BLOCK_C)
            tl.store(sums_ptr + (j * S + s) * C + c, acc, mask=cmask)
            if earlier == 0:
                for r in range(s + 1, S):  # later segments sharing the row, in order
                    if tl.load(seg_row + r) == row:
                        acc += _chunk_sum(part_ptr, first_chunk, j, r, NCH, C, c, cmask, BLOCK_C)
                if j == 0:
                    tl.store(out0_ptr + row * C + c, acc, mask=cmask)
                elif j == 1:
                    tl.store(out1_ptr + row * C + c, acc, mask=cmask)
                else:
                    tl.store(out2_ptr + row * C + c, acc, mask=cmask)
