"""``freq_layer_norm`` (docs/design.md §3.7) on every backend: the reference against
``nn.LayerNorm`` per branch; each backend's raw ``freq_layer_norm_fwd`` / ``_bwd`` against the
reference's; the public op's values and gradients (with and without the residual, whose returned
sum may itself be used) against the reference semantics; rows shared by segments; float64
gradcheck; opcheck; the FreqLayerNorm module; argument checks."""

import pytest
import torch
from torch import nn

from ffn_kernels import FreqLayerNorm, FrameLayout, frame_layout, ops, reference
from conftest import (DEVICE, DTYPES, FLOAT64_BACKENDS, OPCHECK_BACKENDS, RAW_BACKENDS, TINY,
                      TWO_SEGMENTS, cases, check_outputs, compare_autograd, flat, gradcheck, on,
                      pick)

# (layout, tokens per frame (the dims between frames and C), C): several tokens per frame, one
# token per frame, rows shared by two segments, a C that is not a power of two, and tokens longer
# than the CPU kernels' 1024-element stack buffer (their backward reads a token as one run)
SHAPES = {
    "tokens": (FrameLayout(clips=2, frames=(2, 4), rows=(0, 2)), (3, 5), 24),
    "one-token": (FrameLayout(clips=3, frames=(1, 2, 3), rows=(1, 2, 0)), (), 16),
    "shared-row": (FrameLayout(clips=1, frames=(3, 5), rows=(1, 1)), (7,), 40),
    "wide": (FrameLayout(clips=1, frames=(1, 2), rows=(0, 1)), (2,), 1100),
}
RESIDUAL = {"plain": False, "residual": True}


def make_tokens(layout, tokens, C, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(layout.total_frames, *tokens, C, generator=g) * 2 + 0.5).to(dtype)


def make_affine(C, rows=3, dtype=torch.float32, seed=4):
    g = torch.Generator().manual_seed(seed)
    return (1 + 0.5 * torch.randn(rows, C, generator=g)).to(dtype), \
        (0.5 * torch.randn(rows, C, generator=g)).to(dtype)


def test_reference_is_layernorm_per_branch():
    layout, tokens, C = SHAPES["tokens"]
    x = make_tokens(layout, tokens, C, torch.float64)
    w, b = make_affine(C, dtype=torch.float64)
    expected = []
    for seg, xs in zip(layout.segments(), layout.split(x)):
        ln = nn.LayerNorm(C, dtype=torch.float64)
        ln.weight.data.copy_(w[seg.row])
        ln.bias.data.copy_(b[seg.row])
        expected.append(ln(xs))
    torch.testing.assert_close(reference.freq_layer_norm(x, layout, w, b), torch.cat(expected))


def raw_grid(backend, shape, dtype, **_):
    if backend == "cuda":
        return True
    if backend == "cpu":
        return dtype in (torch.float32, torch.float64)
    return dtype in (torch.float32, torch.bfloat16)


@cases(RAW_BACKENDS, raw_grid, shape=SHAPES, dtype=DTYPES, residual=RESIDUAL)
def test_freq_layer_norm_raw(backend, shape, dtype, residual):
    layout, tokens, C = shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = make_affine(C, dtype=acc)
    x = make_tokens(layout, tokens, C, dtype)
    res = make_tokens(layout, tokens, C, dtype, seed=2) if residual else None
    got, want = run_raw_ln(backend, "freq_layer_norm_fwd", x, *flat(layout), w, b, 1e-5, res)
    check_outputs(got, want, dtype, backend, param_outputs=(2, 3), what="freq_layer_norm_fwd")
    s = want[1] if residual else x
    dy = make_tokens(layout, tokens, C, dtype, seed=3)
    for dsum in (None, make_tokens(layout, tokens, C, dtype, seed=5)):
        got, want = run_raw_ln(backend, "freq_layer_norm_bwd", dy, dsum, s, *flat(layout), w,
                               *reference.freq_layer_norm_fwd(x, *flat(layout), w, b, 1e-5, res)[2:])
        check_outputs(got, want, dtype, backend, param_outputs=(1, 2),
                      what=f"freq_layer_norm_bwd(dsum={dsum is not None})")


def run_raw_ln(backend, name, *args):
    import ffn_kernels

    moved = [on(backend, a) for a in args]
    got = getattr(ffn_kernels.backend.kernels_for(moved[0]), name)(*moved)
    return got, getattr(reference, name)(*args)


def public_grid(backend, shape, dtype, **_):
    if backend in ("cpu", "cuda"):
        return True
    if backend == "reference":
        return dtype == torch.float32
    return dtype == torch.float32 and shape is SHAPES["tokens"]


@cases(keep=public_grid, shape=SHAPES, dtype=pick(DTYPES, "float32", "bfloat16", "float16"),
       residual=RESIDUAL)
def test_freq_layer_norm_matches_reference(backend, shape, dtype, residual):
    layout, tokens, C = shape
    w, b = make_affine(C)
    tensors = dict(x=make_tokens(layout, tokens, C, dtype), weight=w, bias=b,
                   residual=make_tokens(layout, tokens, C, dtype, seed=2) if residual else None)
    compare_autograd(lambda **t: ops.freq_layer_norm(t["x"], layout, t["weight"], t["bias"],
                                                     residual=t["residual"]),
                     lambda **t: reference.freq_layer_norm(t["x"], layout, t["weight"],
                                                           t["bias"], residual=t["residual"]),
                     tensors, dtype, backend)


@cases(FLOAT64_BACKENDS, residual=RESIDUAL)
def test_freq_layer_norm_gradcheck_float64(backend, residual):
    layout, tokens, C = SHAPES["tokens"]
    x = on(backend, make_tokens(TINY, (2,), 6, torch.float64)).requires_grad_()
    w, b = (on(backend, t).requires_grad_() for t in make_affine(6, dtype=torch.float64))
    r = on(backend, make_tokens(TINY, (2,), 6, torch.float64, seed=2)).requires_grad_()
    if residual:  # both outputs used: the sum's gradient joins the LayerNorm's
        assert gradcheck(lambda x, w, b, r: ops.freq_layer_norm(x, TINY, w, b, residual=r),
                         (x, w, b, r))
    else:
        assert gradcheck(lambda x, w, b: ops.freq_layer_norm(x, TINY, w, b), (x, w, b))


def opcheck_cases(device):
    x = torch.randn(TINY.total_frames, 2, 8, device=device)
    w, b = (t.to(device) for t in make_affine(8))
    args = (*flat(TINY), w.clone().requires_grad_(), b.clone().requires_grad_(), 1e-5)
    fwd = ops_ = torch.ops.ffn_kernels
    mean = torch.zeros(x.numel() // 8, device=device)
    return {
        "plain": (fwd.freq_layer_norm.default, (x.clone().requires_grad_(), *args, None)),
        "residual": (fwd.freq_layer_norm.default,
                     (x.clone().requires_grad_(), *args, x.clone().requires_grad_())),
        "backward": (ops_.freq_layer_norm_backward.default,
                     (x, x, x, *flat(TINY), w, mean, mean + 1)),
    }


@cases(OPCHECK_BACKENDS, case={k: k for k in ("plain", "residual", "backward")})
def test_freq_layer_norm_opcheck(backend, case):
    torch.library.opcheck(*opcheck_cases(DEVICE[backend])[case])


def test_module_is_nn_layernorm_per_branch_and_loads_its_state_dict():
    ref = nn.LayerNorm(8)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    ln = FreqLayerNorm(8, num_branches=2)
    ln.load_state_dict(ref.state_dict())  # every row from it
    x = make_tokens(TWO_SEGMENTS, (3,), 8)
    with frame_layout(TWO_SEGMENTS):
        torch.testing.assert_close(ln(x), ref(x))
    y, s = ln(x, TWO_SEGMENTS, residual=x)
    torch.testing.assert_close(s, x + x)
    torch.testing.assert_close(y, ref(x + x))


X = make_tokens(TWO_SEGMENTS, (3,), 4)
W, B = make_affine(4, rows=2)


@pytest.mark.parametrize("call,error,match", [
    (lambda: ops.freq_layer_norm(X[:, 0, 0], TWO_SEGMENTS, W, B), ValueError, "at least 2 dims"),
    (lambda: ops.freq_layer_norm(X.int(), TWO_SEGMENTS, W, B), TypeError, "x must be float16"),
    (lambda: ops.freq_layer_norm(X[:-1], TWO_SEGMENTS, W, B), ValueError,
     r"x.shape\[0\] is 9 but the layout holds 10"),
    (lambda: ops.freq_layer_norm(X, TWO_SEGMENTS, W[:, :3], B), ValueError,
     r"weight must have shape \[rows, C=4\]"),
    (lambda: ops.freq_layer_norm(X, TWO_SEGMENTS, W[:1], B), ValueError, "index row 1 of weight"),
    (lambda: ops.freq_layer_norm(X, TWO_SEGMENTS, W, B, residual=X[:, :2]), ValueError,
     "residual has shape"),
    (lambda: ops.freq_layer_norm(X, TWO_SEGMENTS, W, B, eps=0.0), ValueError, "eps must be > 0"),
    (lambda: FreqLayerNorm(0), ValueError, "normalized_shape and num_branches must be >= 1"),
])
def test_freq_layer_norm_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()
