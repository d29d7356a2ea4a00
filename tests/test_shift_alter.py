"""``shift_alter`` (docs/design.md §3.1) on every backend: the reference against the official TSM
shift and depthwise WA; each backend's raw ``shift_alter_fwd`` / ``shift_alter_bwd`` against the
reference's; the public op's values and gradients against the reference semantics (dtypes, memory
formats, plane sizes, non-contiguous input); float64 gradcheck; opcheck; first-order-only autograd;
the ShiftAlter module; and its argument checks."""

import pytest
import torch

import ffn_kernels
from ffn_kernels import FrameLayout, ShiftAlter, ops, reference
from conftest import (DEVICE, DTYPES, FLOAT64_BACKENDS, FOLD_DIV, LAYOUT_IDS, LAYOUTS,
                      MEMORY_FORMATS, OPCHECK_BACKENDS, RAW_BACKENDS, ROWS, SHAPES, SMALL_SHAPES,
                      TINY, TWO_SEGMENTS, cases, check_differentiable_once, check_outputs,
                      compare_autograd, flat, fold_div_for, gradcheck, make_input, make_params,
                      official_shift, official_wa, on, pick, public_grid, raw_grid,
                      run_raw)

ALTER = {"alter": True, "shift": False}

# ---------------------------------------------------------------------------------------------
# The reference is the official structure
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("fold_div", [8, 3])
def test_reference_shift_alter_is_official_shift_then_depthwise_conv(layout, fold_div):
    x = make_input(layout, 16)
    p = make_params(3, 16)
    y = reference.shift_alter(x, layout, p["alter"], fold_div)
    expected = torch.cat([
        official_wa(p["alter"][seg.row])(official_shift(xs, seg.frames, fold_div))
        for seg, xs in zip(layout.segments(), layout.split(x))
    ])
    torch.testing.assert_close(y, expected.detach())
    pure = reference.shift_alter(x, layout, None, fold_div)
    torch.testing.assert_close(pure, torch.cat([
        official_shift(xs, seg.frames, fold_div)
        for seg, xs in zip(layout.segments(), layout.split(x))
    ]))


def test_reference_shift_never_crosses_clip_boundaries():
    layout = FrameLayout(clips=3, frames=(4,))
    x = torch.arange(12.0).view(12, 1, 1, 1).expand(12, 8, 1, 1).contiguous()
    y = reference.shift_alter(x, layout, None, fold_div=8)[:, 0, 0, 0]
    # channel 0 takes frame t+1 of the same clip; the last frame of each clip gets zero
    assert y.tolist() == [1, 2, 3, 0, 5, 6, 7, 0, 9, 10, 11, 0]


# ---------------------------------------------------------------------------------------------
# Raw ops against the reference's
# ---------------------------------------------------------------------------------------------


@cases(RAW_BACKENDS, raw_grid, shape=SHAPES, dtype=DTYPES, memory_format=MEMORY_FORMATS,
       with_alter=ALTER)
def test_shift_alter_raw(backend, shape, dtype, memory_format, with_alter):
    layout, C, hw = shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    alter = make_params(ROWS, C, acc)["alter"] if with_alter else None
    x = make_input(layout, C, hw, dtype, memory_format)
    dy = make_input(layout, C, hw, dtype, memory_format, seed=3)
    got, want = run_raw(backend, "shift_alter_fwd", x, *flat(layout), alter, FOLD_DIV)
    check_outputs(got, want, dtype, backend, what="shift_alter_fwd")
    for alter_grad in ([True, False] if with_alter else [False]):
        got, want = run_raw(backend, "shift_alter_bwd", dy, x, *flat(layout), alter, FOLD_DIV,
                            alter_grad)
        check_outputs(got, want, dtype, backend, param_outputs=(1,),
                      what=f"shift_alter_bwd(alter_grad={alter_grad})")


def test_shift_alter_raw_cpu_kernels_refuse_empty_planes_instead_of_crashing():
    if not ffn_kernels.backend.extension_loaded():
        pytest.skip("needs the compiled CPU kernels")
    x = torch.randn(10, 0, 4, 4)
    with pytest.raises(ValueError, match="at least one channel"):
        torch.ops.ffn_kernels.shift_alter_bwd(x, x, 2, [2, 3], [0, 1], None, 8, False)


# ---------------------------------------------------------------------------------------------
# The public op against the reference semantics
# ---------------------------------------------------------------------------------------------


@cases(keep=public_grid, shape=SMALL_SHAPES, dtype=pick(DTYPES, "float32", "bfloat16", "float16"),
       memory_format=MEMORY_FORMATS, with_alter=ALTER)
def test_shift_alter_matches_reference(backend, shape, dtype, memory_format, with_alter):
    layout, C, hw = shape
    fold_div = fold_div_for(C)
    tensors = dict(x=make_input(layout, C, hw, dtype, memory_format),
                   alter=make_params(ROWS, C)["alter"] if with_alter else None)
    compare_autograd(lambda x, alter: ops.shift_alter(x, layout, alter, fold_div),
                     lambda x, alter: reference.shift_alter(x, layout, alter, fold_div), tensors,
                     dtype, backend)


# the CPU kernels walk 1x1 frames, and planes under and over 64, differently
@cases(("cpu", "cuda"), hw={"1x1": (1, 1), "2x2": (2, 2), "9x9": (9, 9)},
       memory_format=MEMORY_FORMATS)
def test_shift_alter_plane_sizes(backend, hw, memory_format):
    layout, p = LAYOUTS[0], make_params(3, 16, dtype=torch.float64)
    compare_autograd(lambda z, alter: ops.shift_alter(z, layout, alter, 8),
                     lambda z, alter: reference.shift_alter(z, layout, alter, 8),
                     dict(z=make_input(layout, 16, hw, torch.float64, memory_format, seed=0),
                          alter=p["alter"]), torch.float64, backend)


@cases()
def test_shift_alter_non_contiguous_input_is_made_contiguous(backend):
    layout = LAYOUTS[0]
    x = make_input(layout, 16).transpose(2, 3)  # neither NCHW nor channels_last
    alter = make_params(3, 16)["alter"]
    y = ops.shift_alter(on(backend, x), layout, on(backend, alter))
    assert y.is_contiguous()
    torch.testing.assert_close(y.cpu(), reference.shift_alter(x.contiguous(), layout, alter))


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, what autograd supports
# ---------------------------------------------------------------------------------------------


@cases(FLOAT64_BACKENDS, memory_format=MEMORY_FORMATS)
def test_shift_alter_gradcheck_float64(backend, memory_format):
    def leaf(t):
        return on(backend, t).contiguous(memory_format=memory_format).requires_grad_()

    x = leaf(make_input(TINY, 8, (3, 2), torch.float64, seed=0))
    a = on(backend, make_params(3, 8, torch.float64, seed=4)["alter"]).requires_grad_()
    assert gradcheck(lambda x, a: ops.shift_alter(x, TINY, a, 4), (x, a))


def opcheck_cases(device):
    """(op, args) of the forward op (with and without alter) and of its backward op (which gets
    no tensor requiring grad: it has no double-backward formula)."""
    x = torch.randn(TINY.total_frames, 8, 3, 2, device=device)
    alter = make_params(3, 8)["alter"].to(device)
    layout = flat(TINY)
    return {
        "alter": (torch.ops.ffn_kernels.shift_alter.default,
                  (x.clone().requires_grad_(), *layout, alter.clone().requires_grad_(), 4)),
        "shift": (torch.ops.ffn_kernels.shift_alter.default,
                  (x.clone().requires_grad_(), *layout, None, 8)),
        "backward": (torch.ops.ffn_kernels.shift_alter_backward.default,
                     (x, x, *layout, alter, 4, True)),
    }


@cases(OPCHECK_BACKENDS, case={k: k for k in ("alter", "shift", "backward")})
def test_shift_alter_opcheck(backend, case):
    torch.library.opcheck(*opcheck_cases(DEVICE[backend])[case])


@cases(FLOAT64_BACKENDS)
def test_shift_alter_is_differentiable_once(backend):
    alter = on(backend, make_params(2, 8, torch.float64)["alter"]).requires_grad_()
    x = on(backend, make_input(TWO_SEGMENTS, 8, dtype=torch.float64)).requires_grad_()
    check_differentiable_once("shift_alter", lambda: ops.shift_alter(x, TWO_SEGMENTS, alter), x)


# ---------------------------------------------------------------------------------------------
# The module and the argument checks (in the C++ op, before any backend: docs/design.md §3.5)
# ---------------------------------------------------------------------------------------------


def test_shift_alter_module_starts_near_identity():
    sa = ShiftAlter(4, num_branches=3)
    assert sa.weight.shape == (3, 4) and sa.weight.abs().max() < 0.01


X = make_input(TWO_SEGMENTS, 4)


@pytest.mark.parametrize("call,error,match", [
    (lambda: ops.shift_alter(X[0], TWO_SEGMENTS), ValueError, "x must be 4-D"),
    (lambda: ops.shift_alter(X.int(), TWO_SEGMENTS), TypeError, "x must be float16"),
    # empty channels or frames crashed the interpreter (division by zero in the CPU kernels)
    (lambda: ops.shift_alter(X[:, :0], TWO_SEGMENTS), ValueError, "x must have at least one channel"),
    (lambda: ops.shift_alter(X[:, :, :0], TWO_SEGMENTS), ValueError, "x must have at least one channel"),
    (lambda: ShiftAlter(0, 2), ValueError, "num_channels and num_branches must be >= 1"),
    (lambda: ops.shift_alter(X[:-1], TWO_SEGMENTS), ValueError, r"x.shape\[0\] is 9 but the layout holds 10"),
    (lambda: ops.shift_alter(X, TWO_SEGMENTS, torch.zeros(2, 5)), ValueError, r"alter must have shape \[rows, C=4\]"),
    (lambda: ops.shift_alter(X, TWO_SEGMENTS, torch.zeros(4)), ValueError, "alter must have shape"),
    (lambda: ops.shift_alter(X, TWO_SEGMENTS, torch.zeros(1, 4)), ValueError, "index row 1 of alter, which has only 1 rows"),
    (lambda: ops.shift_alter(X, TWO_SEGMENTS, None, fold_div=1), ValueError, "fold_div must be an int >= 2"),
    (lambda: ops.shift_alter(X, TWO_SEGMENTS, torch.zeros(2, 4, device="meta")), ValueError, "mixed devices"),
    (lambda: ops.shift_alter(X, TWO_SEGMENTS, None, fold_div=5), ValueError, "fold_div=5 exceeds the 4 channels"),
])
def test_shift_alter_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()
