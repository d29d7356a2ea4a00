"""Segments that share a parameter row (allowed in eval, and in training without running
statistics): the row's weight, bias and alter gradients are the SUM over those segments, as autograd
through per-segment ``F.batch_norm`` sharing one weight gives, on every backend (the public ops,
the raw backward ops, and every raw op against the reference's).

The oracle below uses only torch: the official shift and ``F.batch_norm`` per segment, all in
float64. The Triton kernels take no float64, so they run in float32 against the same oracle."""

import torch
import torch.nn.functional as F

import ffn_kernels
from ffn_kernels import FrameLayout, ops
from ffn_kernels import reference as ref
from conftest import (BACKENDS, DEVICE, FLOAT64_BACKENDS, MEMORY_FORMATS, RAW_BACKENDS, cases,
                      check_outputs, flat, gradcheck, make_input, make_params, official_shift, on,
                      run_raw)

C, HW, FOLD_DIV, EPS = 16, (3, 2), 8, 1e-5
# (layout, parameter rows): two segments on row 0 (row 1 unused); rows 1, 0, 1 (row 2 unused)
CASES = {
    "3-5-rows00": (FrameLayout(clips=2, frames=(3, 5), rows=(0, 0)), 2),
    "2-3-4-rows101": (FrameLayout(clips=1, frames=(2, 3, 4), rows=(1, 0, 1)), 3),
}


def _dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


def _tol(backend):
    return dict(rtol=1e-4, atol=1e-4) if backend == "triton" else dict(rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------
# The oracle: per segment, plain torch
# --------------------------------------------------------------------------------------------


def _segments(layout, t):
    start = 0
    for frames, row in zip(layout.frames, layout.rows):
        n = layout.clips * frames
        yield frames, row, t[start:start + n]
        start += n


def _oracle_shift_then_bn(layout, x, alter, weight, bias):
    """shift_alter then freq_batch_norm (training, no running statistics), per segment."""
    outs = []
    for frames, row, xs in _segments(layout, x):
        y = official_shift(xs, frames, FOLD_DIV) * (1 + alter[row]).view(1, -1, 1, 1)
        outs.append(F.batch_norm(y, None, None, weight[row], bias[row], training=True, eps=EPS))
    return torch.cat(outs)


def _oracle_bnrs(layout, z, identity, weight, bias, rm, rv, training, alter):
    """bn_add_relu_shift_alter per segment: out = relu(BN(z) + identity), next = shift_alter(out)."""
    outs, nexts = [], []
    for (frames, row, zs), (_, _, ids) in zip(_segments(layout, z), _segments(layout, identity)):
        y = F.batch_norm(zs, None if training else rm[row], None if training else rv[row],
                         weight[row], bias[row], training=training, eps=EPS)
        out = torch.relu(y + ids)
        outs.append(out)
        nexts.append(official_shift(out, frames, FOLD_DIV) * (1 + alter[row]).view(1, -1, 1, 1))
    return torch.cat(outs), torch.cat(nexts)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _inputs(layout, rows):
    """float64 activations and per-branch tensors (make_params: weight, bias, running_mean,
    running_var, alter)."""
    return dict(x=make_input(layout, C, HW, torch.float64, seed=0),
                identity=make_input(layout, C, HW, torch.float64, seed=1, scale=1.0, shift=0.0),
                **make_params(rows, C, torch.float64, seed=2))


def _run(fn, tensors, grad_names, dtype, device="cpu", cot_seed=7):
    """fn(**leaves) in ``dtype`` on ``device``; backprop fixed cotangents; outputs and gradients
    in float64 on the CPU."""
    leaves = {k: v.detach().to(device, dtype).clone().requires_grad_(k in grad_names)
              for k, v in tensors.items()}
    outs = fn(**leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    cots = [torch.randn(o.shape, generator=torch.Generator().manual_seed(cot_seed + i),
                        dtype=torch.float64).to(device, dtype) for i, o in enumerate(outs)]
    torch.autograd.backward(outs, cots)
    return ([o.detach().cpu().double() for o in outs],
            {k: leaves[k].grad.cpu().double() for k in grad_names})


def _compare(got, want, tol, what):
    (outs, grads), (ref_outs, ref_grads) = got, want
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        torch.testing.assert_close(o, r, **tol, msg=lambda m: f"{what}: output {i}: {m}")
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], **tol,
                                   msg=lambda m: f"{what}: grad of {k}: {m}")


def _unused_rows(layout, rows):
    return [p for p in range(rows) if p not in layout.rows]


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@cases(BACKENDS, case=CASES)
def test_shift_alter_then_freq_batch_norm_training_sums_shared_rows(backend, case):
    layout, rows = case
    t = _inputs(layout, rows)
    tensors = {k: t[k] for k in ("x", "alter", "weight", "bias")}
    names = tuple(tensors)

    def fused(x, alter, weight, bias):
        y = ops.shift_alter(x, layout, alter, FOLD_DIV)
        return ops.freq_batch_norm(y, layout, weight, bias, None, None, True, 0.1, EPS)

    want = _run(lambda **kw: _oracle_shift_then_bn(layout, **kw), tensors, names, torch.float64)
    got = _run(fused, tensors, names, _dtype(backend), DEVICE[backend])
    _compare(got, want, _tol(backend), f"{backend} shift_alter+freq_batch_norm")
    for p in _unused_rows(layout, rows):
        for k in ("alter", "weight", "bias"):
            assert torch.all(got[1][k][p] == 0), f"grad of {k}, unused row {p}"
    # the sum is what was asked for: with one shared row it differs from every single segment's
    shared = [p for p in set(layout.rows) if layout.rows.count(p) > 1]
    assert shared and all(got[1]["weight"][p].abs().sum() > 0 for p in shared)


@cases(BACKENDS, case=CASES, training={"eval": False, "train-no-stats": True})
def test_bn_add_relu_shift_alter_sums_shared_rows(backend, case, training):
    layout, rows = case
    t = _inputs(layout, rows)
    rm, rv = (None, None) if training else (t["running_mean"], t["running_var"])
    tensors = {k: t[k] for k in ("x", "identity", "alter", "weight", "bias")}
    names = tuple(tensors)

    def fused(x, identity, alter, weight, bias):
        cast = (lambda v: None if v is None else v.to(x.device, x.dtype))
        return ops.bn_add_relu_shift_alter(x, identity, layout, weight, bias, cast(rm), cast(rv),
                                           training, 0.1, EPS, alter, FOLD_DIV)

    def oracle(x, identity, alter, weight, bias):
        return _oracle_bnrs(layout, x, identity, weight, bias, rm, rv, training, alter)

    want = _run(oracle, tensors, names, torch.float64)
    got = _run(fused, tensors, names, _dtype(backend), DEVICE[backend])
    _compare(got, want, _tol(backend), f"{backend} bn_add_relu_shift_alter")
    for p in _unused_rows(layout, rows):
        for k in ("alter", "weight", "bias"):
            assert torch.all(got[1][k][p] == 0), f"grad of {k}, unused row {p}"


@cases(BACKENDS)
def test_raw_backward_ops_sum_shared_rows(backend):
    """The raw ``*_bwd`` ops: a shared row's gradient is the sum of what each of its segments gives
    run alone (as a one-segment layout on that row); unused rows get zero."""
    layout, rows = CASES["3-5-rows00"]
    t = _inputs(layout, rows)
    dtype = _dtype(backend)
    x, w, a = (on(backend, t[k].to(dtype)) for k in ("x", "weight", "alter"))
    kernels = ffn_kernels.backend.kernels_for(x)
    dy = on(backend, torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).to(dtype))
    _, mean, invstd, _, _ = ref.freq_batch_norm_fwd(x.cpu(), *flat(layout), w.cpu(),
                                                    t["bias"].to(dtype), None, None, True,
                                                    [0.1] * layout.num_segments, EPS, False, None)
    mean, invstd = on(backend, mean), on(backend, invstd)

    def grads(x, dy, flat, mean, invstd):
        _, dalter = kernels.shift_alter_bwd(dy, x, *flat, a, FOLD_DIV, True)
        _, dweight, dbias, _ = kernels.freq_batch_norm_bwd(dy, x, x, *flat, w, mean, invstd, True,
                                                           False, False)
        return dalter.cpu(), dweight.cpu(), dbias.cpu()

    total = grads(x, dy, flat(layout), mean, invstd)
    alone, start = [], 0
    for s, (frames, row) in enumerate(zip(layout.frames, layout.rows)):
        n = layout.clips * frames
        alone.append(grads(x[start:start + n], dy[start:start + n], (layout.clips, [frames], [row]),
                           mean[s:s + 1], invstd[s:s + 1]))
        start += n
    for i, name in enumerate(("dalter", "dweight", "dbias")):
        want = sum(g[i] for g in alone)
        torch.testing.assert_close(total[i], want, **_tol(backend), msg=lambda m: f"{name}: {m}")
        for g in alone:  # not merely one segment's value
            assert (g[i][0] - total[i][0]).abs().max() > 1e-3, name
        assert torch.all(total[i][1] == 0), f"{name}: unused row 1"


@cases(RAW_BACKENDS, keep=lambda backend, memory_format: backend != "triton" or
       memory_format == torch.channels_last, memory_format=MEMORY_FORMATS)
def test_raw_ops_with_a_shared_row_match_the_reference(backend, memory_format):
    """Every raw op of the backend against the reference's with a row used by two segments (eval,
    or training without running statistics): parameter gradients are the sum over those
    segments, as in the reference (and autograd)."""
    layout = FrameLayout(clips=2, frames=(2, 3), rows=(1, 1))
    p = make_params(3, 16)
    x = make_input(layout, 16, (3, 3), torch.float32, memory_format)
    dy = make_input(layout, 16, (3, 3), torch.float32, memory_format, seed=2)
    for training, rm, rv in ((True, None, None), (False, p["running_mean"], p["running_var"])):
        got, want = run_raw(backend, "freq_batch_norm_fwd", x, *flat(layout), p["weight"],
                            p["bias"], rm, rv, training, [0.1, 0.1], 1e-5, True, None)
        check_outputs(got, want, torch.float32, backend, param_outputs=(1, 2, 3, 4),
                      what="freq_batch_norm_fwd")
        got, want = run_raw(backend, "freq_batch_norm_bwd", dy, x, want[0], *flat(layout),
                            p["weight"], want[1], want[2], training, True, False)
        check_outputs(got, want, torch.float32, backend, param_outputs=(1, 2),
                      what="freq_batch_norm_bwd")
    got, want = run_raw(backend, "shift_alter_bwd", dy, x, *flat(layout), p["alter"], 8, True)
    check_outputs(got, want, torch.float32, backend, param_outputs=(1,), what="shift_alter_bwd")


@cases(FLOAT64_BACKENDS, case=CASES)
def test_gradcheck_shared_rows(backend, case):
    layout, rows = case
    t = {k: on(backend, v) for k, v in _inputs(layout, rows).items()}
    x, identity = (t[k].clone().requires_grad_() for k in ("x", "identity"))
    w, b, a = (t[k].clone().requires_grad_() for k in ("weight", "bias", "alter"))
    rm, rv = t["running_mean"], t["running_var"]
    assert gradcheck(lambda x, a: ops.shift_alter(x, layout, a, FOLD_DIV), (x, a))
    assert gradcheck(
        lambda x, w, b: ops.freq_batch_norm(x, layout, w, b, None, None, True, 0.1, EPS),
        (x, w, b))
    assert gradcheck(
        lambda z, i, w, b, a: ops.bn_add_relu_shift_alter(z, i, layout, w, b, rm, rv, False, 0.1,
                                                          EPS, a, FOLD_DIV),
        (x, identity, w, b, a))
