"""Segments that share a parameter row (allowed in eval, and in training without running
statistics): the row's weight, bias and alter gradients are the SUM over those segments, as autograd
through per-segment ``F.batch_norm`` sharing one weight gives, on every backend that runs CPU
tensors here (reference, the C++ CPU kernels, Triton under ``TRITON_INTERPRET=1``).

The oracle below uses only torch: slicing for the TSM shift and ``F.batch_norm`` per segment, all
in float64. The Triton kernels take no float64, so they run in float32 against the same oracle."""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # before Triton is imported (as in test_triton.py)
    os.environ["TRITON_INTERPRET"] = "1"

import ffn_kernels  # noqa: E402
from ffn_kernels import FrameLayout, ops  # noqa: E402
from ffn_kernels import reference as ref  # noqa: E402

C, HW, FOLD_DIV, EPS = 16, (3, 2), 8, 1e-5
# (layout, parameter rows): two segments on row 0 (row 1 unused); rows 1, 0, 1 (row 2 unused)
CASES = [
    (FrameLayout(clips=2, frames=(3, 5), rows=(0, 0)), 2),
    (FrameLayout(clips=1, frames=(2, 3, 4), rows=(1, 0, 1)), 3),
]
IDS = ["3-5-rows00", "2-3-4-rows101"]


def _backends():
    out = ["reference"]
    if ffn_kernels.backend.extension_loaded():
        out.append("cpu")
        try:
            import triton  # noqa: F401

            out.append("triton")
        except ImportError:
            pass
    return out


@pytest.fixture(params=_backends())
def backend(request):
    previous = ffn_kernels.get_backend()
    ffn_kernels.set_backend(request.param)
    yield request.param
    ffn_kernels.set_backend(previous)


def _dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


def _tol(backend):
    return dict(rtol=1e-4, atol=1e-4) if backend == "triton" else dict(rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------
# The oracle: per segment, plain torch
# --------------------------------------------------------------------------------------------


def _shift(x, frames):
    """TSM shift of clips of ``frames`` frames: channels [0, fold) of frame t take frame t+1,
    [fold, 2*fold) take frame t-1, zeros outside the clip."""
    n, c, h, w = x.shape
    x5 = x.reshape(n // frames, frames, c, h, w)
    fold = c // FOLD_DIV
    zero = torch.zeros_like(x5[:, :1])
    left = torch.cat([x5[:, 1:, :fold], zero[:, :, :fold]], dim=1)
    right = torch.cat([zero[:, :, fold:2 * fold], x5[:, :-1, fold:2 * fold]], dim=1)
    return torch.cat([left, right, x5[:, :, 2 * fold:]], dim=2).reshape(n, c, h, w)


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
        y = _shift(xs, frames) * (1 + alter[row]).view(1, -1, 1, 1)
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
        nexts.append(_shift(out, frames) * (1 + alter[row]).view(1, -1, 1, 1))
    return torch.cat(outs), torch.cat(nexts)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _rand(*shape, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift


def _inputs(layout, rows):
    f = layout.total_frames
    return dict(
        x=_rand(f, C, *HW, seed=0, scale=2.0, shift=0.5),
        identity=_rand(f, C, *HW, seed=1),
        weight=_rand(rows, C, seed=2, scale=0.5, shift=1.0),
        bias=_rand(rows, C, seed=3, scale=0.5),
        alter=_rand(rows, C, seed=4, scale=0.3),
        running_mean=_rand(rows, C, seed=5, scale=0.1),
        running_var=0.5 + torch.rand(rows, C, generator=torch.Generator().manual_seed(6),
                                     dtype=torch.float64),
    )


def _run(fn, tensors, grad_names, dtype, cot_seed=7):
    """fn(**leaves) in ``dtype``; backprop fixed cotangents; outputs and gradients in float64."""
    leaves = {k: v.detach().to(dtype).clone().requires_grad_(k in grad_names)
              for k, v in tensors.items()}
    outs = fn(**leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    cots = [_rand(*o.shape, seed=cot_seed + i).to(dtype) for i, o in enumerate(outs)]
    torch.autograd.backward(outs, cots)
    return ([o.detach().double() for o in outs],
            {k: leaves[k].grad.double() for k in grad_names})


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


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_shift_alter_then_freq_batch_norm_training_sums_shared_rows(backend, case):
    layout, rows = case
    t = _inputs(layout, rows)
    tensors = {k: t[k] for k in ("x", "alter", "weight", "bias")}
    names = tuple(tensors)

    def fused(x, alter, weight, bias):
        y = ops.shift_alter(x, layout, alter, FOLD_DIV)
        return ops.freq_batch_norm(y, layout, weight, bias, None, None, True, 0.1, EPS)

    want = _run(lambda **kw: _oracle_shift_then_bn(layout, **kw), tensors, names, torch.float64)
    got = _run(fused, tensors, names, _dtype(backend))
    _compare(got, want, _tol(backend), f"{backend} shift_alter+freq_batch_norm")
    for p in _unused_rows(layout, rows):
        for k in ("alter", "weight", "bias"):
            assert torch.all(got[1][k][p] == 0), f"grad of {k}, unused row {p}"
    # the sum is what was asked for: with one shared row it differs from every single segment's
    shared = [p for p in set(layout.rows) if layout.rows.count(p) > 1]
    assert shared and all(got[1]["weight"][p].abs().sum() > 0 for p in shared)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-no-stats"])
def test_bn_add_relu_shift_alter_sums_shared_rows(backend, case, training):
    layout, rows = case
    t = _inputs(layout, rows)
    rm, rv = (None, None) if training else (t["running_mean"], t["running_var"])
    tensors = {k: t[k] for k in ("x", "identity", "alter", "weight", "bias")}
    names = tuple(tensors)

    def fused(x, identity, alter, weight, bias):
        cast = (lambda v: None if v is None else v.to(x.dtype))
        return ops.bn_add_relu_shift_alter(x, identity, layout, weight, bias, cast(rm), cast(rv),
                                           training, 0.1, EPS, alter, FOLD_DIV)

    def oracle(x, identity, alter, weight, bias):
        return _oracle_bnrs(layout, x, identity, weight, bias, rm, rv, training, alter)

    want = _run(oracle, tensors, names, torch.float64)
    got = _run(fused, tensors, names, _dtype(backend))
    _compare(got, want, _tol(backend), f"{backend} bn_add_relu_shift_alter")
    for p in _unused_rows(layout, rows):
        for k in ("alter", "weight", "bias"):
            assert torch.all(got[1][k][p] == 0), f"grad of {k}, unused row {p}"


def test_raw_backward_ops_sum_shared_rows(backend):
    """The raw ``*_bwd`` ops: a shared row's gradient is the sum of what each of its segments gives
    run alone (as a one-segment layout on that row); unused rows get zero."""
    layout, rows = CASES[0]
    t = _inputs(layout, rows)
    dtype = _dtype(backend)
    kernels = ffn_kernels.backend.kernels_for(t["x"])
    x, w, a = t["x"].to(dtype), t["weight"].to(dtype), t["alter"].to(dtype)
    dy = _rand(*x.shape, seed=9).to(dtype)
    flat = (layout.clips, list(layout.frames), list(layout.rows))
    _, mean, invstd, _, _ = ref.freq_batch_norm_fwd(x, *flat, w, t["bias"].to(dtype), None, None, True,
                                       [0.1] * layout.num_segments, EPS, False, None)

    def grads(x, dy, flat, mean, invstd):
        _, dalter = kernels.shift_alter_bwd(dy, x, *flat, a, FOLD_DIV, True)
        _, dweight, dbias, _ = kernels.freq_batch_norm_bwd(dy, x, x, *flat, w, mean, invstd, True, False, False)
        return dalter, dweight, dbias

    total = grads(x, dy, flat, mean, invstd)
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


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradcheck_shared_rows(backend, case):
    if backend == "triton":
        pytest.skip("gradcheck needs float64, which the Triton kernels do not take")
    layout, rows = case
    t = _inputs(layout, rows)
    x, identity = (t[k].clone().requires_grad_() for k in ("x", "identity"))
    w, b, a = (t[k].clone().requires_grad_() for k in ("weight", "bias", "alter"))
    rm, rv = t["running_mean"], t["running_var"]
    check = dict(fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda x, a: ops.shift_alter(x, layout, a, FOLD_DIV), (x, a), **check)
    assert torch.autograd.gradcheck(
        lambda x, w, b: ops.freq_batch_norm(x, layout, w, b, None, None, True, 0.1, EPS),
        (x, w, b), **check)
    assert torch.autograd.gradcheck(
        lambda z, i, w, b, a: ops.bn_add_relu_shift_alter(z, i, layout, w, b, rm, rv, False, 0.1,
                                                          EPS, a, FOLD_DIV),
        (x, identity, w, b, a), **check)
