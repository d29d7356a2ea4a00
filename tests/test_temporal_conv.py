"""``temporal_conv`` (docs/design.md §3.6) on every backend: the reference against a frame-by-frame
spelling of TEA's conv1d; each backend's raw ``temporal_conv_fwd`` / ``_bwd`` against the
reference's; the public op's values and gradients against the reference semantics (dtypes, memory
formats); float64 gradcheck; opcheck; first-order-only autograd; its argument checks."""

import pytest
import torch

from ffn_kernels import FrameLayout, ops, reference
from conftest import (DEVICE, DTYPES, FLOAT64_BACKENDS, LAYOUT_IDS, LAYOUTS, MEMORY_FORMATS,
                      OPCHECK_BACKENDS, RAW_BACKENDS, SHAPES, SMALL_SHAPES, TINY, TWO_SEGMENTS,
                      cases, check_differentiable_once, check_outputs, compare_autograd, gradcheck,
                      make_input, on, pick, public_grid, raw_grid, run_raw)


def make_taps(channels, dtype=torch.float32, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(channels, 3, generator=g).to(dtype)


def flat(layout):
    """The layout as this op's raw entries take it: ``clips, frames`` (no rows: shared taps)."""
    return layout.clips, list(layout.frames)


def frame_by_frame(x, layout, taps):
    """TEA's zero-padded conv1d over each clip's frames, one output frame at a time."""
    out = torch.zeros_like(x)
    for seg in layout.segments():
        for f in range(seg.start, seg.stop):
            t = (f - seg.start) % seg.frames
            out[f] = taps[:, 1].view(-1, 1, 1) * x[f]
            if t > 0:
                out[f] += taps[:, 0].view(-1, 1, 1) * x[f - 1]
            if t < seg.frames - 1:
                out[f] += taps[:, 2].view(-1, 1, 1) * x[f + 1]
    return out


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_reference_is_the_clipwise_conv1d(layout):
    x = make_input(layout, 6, (2, 3), torch.float64)
    taps = make_taps(6, torch.float64)
    torch.testing.assert_close(reference.temporal_conv(x, layout, taps),
                               frame_by_frame(x, layout, taps))


def test_reference_never_reads_another_clip():
    layout = FrameLayout(clips=2, frames=(3, 2), rows=(0, 1))
    x = torch.arange(1.0, 11.0).view(10, 1, 1, 1)
    y = reference.temporal_conv(x, layout, torch.tensor([[1.0, 0.0, 0.0]]))  # y[t] = x[t-1]
    assert y.flatten().tolist() == [0, 1, 2, 0, 4, 5, 0, 7, 0, 9]


# ---------------------------------------------------------------------------------------------
# Raw ops against the reference's
# ---------------------------------------------------------------------------------------------


@cases(RAW_BACKENDS, raw_grid, shape=SHAPES, dtype=DTYPES, memory_format=MEMORY_FORMATS)
def test_temporal_conv_raw(backend, shape, dtype, memory_format):
    layout, C, hw = shape
    taps = make_taps(C, torch.float64 if dtype == torch.float64 else torch.float32)
    x = make_input(layout, C, hw, dtype, memory_format)
    dy = make_input(layout, C, hw, dtype, memory_format, seed=3)
    got, want = run_raw(backend, "temporal_conv_fwd", x, *flat(layout), taps)
    check_outputs(got, want, dtype, backend, what="temporal_conv_fwd")
    for weight_grad in (True, False):
        got, want = run_raw(backend, "temporal_conv_bwd", dy, x, *flat(layout), taps, weight_grad)
        check_outputs(got, want, dtype, backend, param_outputs=(1,),
                      what=f"temporal_conv_bwd(weight_grad={weight_grad})")


@cases(("triton",), frames_per_chunk={"1": 1, "2": 2, "3": 3})
def test_temporal_conv_triton_windows_cross_chunk_boundaries(backend, frames_per_chunk, monkeypatch):
    """A Triton program slides its window over one chunk of frames, reading a halo frame at each
    end: chunks of 1-3 frames start and end inside clips and at their edges."""
    from ffn_kernels.triton import common

    layout, C, hw = FrameLayout(clips=2, frames=(3, 5), rows=(0, 1)), 8, (2, 3)
    monkeypatch.setattr(common, "_CHUNK", frames_per_chunk * 8 * 6)  # BLOCK_C=8 x 6 pixels
    x, dy = make_input(layout, C, hw), make_input(layout, C, hw, seed=3)
    taps = make_taps(C)
    got, want = run_raw(backend, "temporal_conv_fwd", x, *flat(layout), taps)
    check_outputs(got, want, torch.float32, backend, what="temporal_conv_fwd")
    got, want = run_raw(backend, "temporal_conv_bwd", dy, x, *flat(layout), taps, True)
    check_outputs(got, want, torch.float32, backend, param_outputs=(1,), what="temporal_conv_bwd")


# ---------------------------------------------------------------------------------------------
# The public op against the reference semantics
# ---------------------------------------------------------------------------------------------


@cases(keep=public_grid, shape=SMALL_SHAPES, dtype=pick(DTYPES, "float32", "bfloat16", "float16"),
       memory_format=MEMORY_FORMATS)
def test_temporal_conv_matches_reference(backend, shape, dtype, memory_format):
    layout, C, hw = shape
    tensors = dict(x=make_input(layout, C, hw, dtype, memory_format), weight=make_taps(C))
    compare_autograd(lambda x, weight: ops.temporal_conv(x, layout, weight),
                     lambda x, weight: reference.temporal_conv(x, layout, weight), tensors, dtype,
                     backend)


@cases(("cpu", "cuda"), hw={"1x1": (1, 1), "9x9": (9, 9)}, memory_format=MEMORY_FORMATS)
def test_temporal_conv_plane_sizes_and_conv1d_weight(backend, hw, memory_format):
    """1x1 frames and planes over 64 are walked differently; nn.Conv1d's [C, 1, 3] weight is
    taken as is (and gets its gradient in that shape)."""
    layout = LAYOUTS[0]
    compare_autograd(lambda x, weight: ops.temporal_conv(x, layout, weight),
                     lambda x, weight: reference.temporal_conv(x, layout, weight.view(-1, 3)),
                     dict(x=make_input(layout, 16, hw, torch.float64, memory_format),
                          weight=make_taps(16, torch.float64).view(16, 1, 3)),
                     torch.float64, backend)


@cases(("cpu",), hw={"2x2": (2, 2), "40x40": (40, 40)}, memory_format=MEMORY_FORMATS)
def test_temporal_conv_cpu_results_do_not_depend_on_the_thread_count(backend, hw, memory_format):
    """The CPU kernels walk each clip's frames per task (the neighbours' chunks stay in cache);
    the taps' gradient still adds its per-chunk partials in one fixed order."""
    layout = LAYOUTS[2]
    x = make_input(layout, 24, hw, memory_format=memory_format).requires_grad_()
    taps = make_taps(24).requires_grad_()
    previous_threads, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = ops.temporal_conv(x, layout, taps)
            results.append([y, *torch.autograd.grad((y * y).sum(), (x, taps))])
    finally:
        torch.set_num_threads(previous_threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    expected = reference.temporal_conv(x, layout, taps)
    torch.testing.assert_close(results[0][0], expected)


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, what autograd supports
# ---------------------------------------------------------------------------------------------


@cases(FLOAT64_BACKENDS, memory_format=MEMORY_FORMATS)
def test_temporal_conv_gradcheck_float64(backend, memory_format):
    x = on(backend, make_input(TINY, 8, (3, 2), torch.float64, seed=0))
    x = x.contiguous(memory_format=memory_format).requires_grad_()
    w = on(backend, make_taps(8, torch.float64)).requires_grad_()
    assert gradcheck(lambda x, w: ops.temporal_conv(x, TINY, w), (x, w))


def opcheck_cases(device):
    x = torch.randn(TINY.total_frames, 8, 3, 2, device=device)
    taps = make_taps(8).to(device)
    return {
        "learnt": (torch.ops.ffn_kernels.temporal_conv.default,
                   (x.clone().requires_grad_(), *flat(TINY), taps.clone().requires_grad_())),
        "frozen": (torch.ops.ffn_kernels.temporal_conv.default,
                   (x.clone().requires_grad_(), *flat(TINY), taps)),
        "backward": (torch.ops.ffn_kernels.temporal_conv_backward.default,
                     (x, x, *flat(TINY), taps, True)),
    }


@cases(OPCHECK_BACKENDS, case={k: k for k in ("learnt", "frozen", "backward")})
def test_temporal_conv_opcheck(backend, case):
    torch.library.opcheck(*opcheck_cases(DEVICE[backend])[case])


@cases(FLOAT64_BACKENDS)
def test_temporal_conv_is_differentiable_once(backend):
    w = on(backend, make_taps(8, torch.float64)).requires_grad_()
    x = on(backend, make_input(TWO_SEGMENTS, 8, dtype=torch.float64)).requires_grad_()
    check_differentiable_once("temporal_conv", lambda: ops.temporal_conv(x, TWO_SEGMENTS, w), x)


# ---------------------------------------------------------------------------------------------
# The argument checks (in the C++ op, before any backend: docs/design.md §3.5)
# ---------------------------------------------------------------------------------------------

X = make_input(TWO_SEGMENTS, 4)
W = make_taps(4)


@pytest.mark.parametrize("call,error,match", [
    (lambda: ops.temporal_conv(X[0], TWO_SEGMENTS, W), ValueError, "x must be 4-D"),
    (lambda: ops.temporal_conv(X.int(), TWO_SEGMENTS, W), TypeError, "x must be float16"),
    (lambda: ops.temporal_conv(X[:-1], TWO_SEGMENTS, W), ValueError,
     r"x.shape\[0\] is 9 but the layout holds 10"),
    (lambda: ops.temporal_conv(X, TWO_SEGMENTS, W[:3]), ValueError, r"weight must have shape \[C=4, 3\]"),
    (lambda: ops.temporal_conv(X, TWO_SEGMENTS, W[:, :2]), ValueError, "weight must have shape"),
    (lambda: ops.temporal_conv(X, TWO_SEGMENTS, W.int()), TypeError, "weight must be a floating"),
    (lambda: ops.temporal_conv(X, TWO_SEGMENTS, W.to("meta")), ValueError, "mixed devices"),
    (lambda: ops.temporal_conv(X, (2, (2, 3)), W), TypeError, "layout must be a ffn_kernels.FrameLayout"),
])
def test_temporal_conv_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------


def test_module_starts_as_identity_or_as_teas_shift():
    from ffn_kernels import TemporalConv, frame_layout

    layout = TWO_SEGMENTS
    x = make_input(layout, 6)
    torch.testing.assert_close(TemporalConv(6)(x, layout), x)
    # TEA's shift init is TSM's shift with half the channels each way (fold_div=2)
    with frame_layout(layout):
        y = TemporalConv(6, init="shift")(x)
    torch.testing.assert_close(y, reference.shift_alter(x, layout, None, fold_div=2))


def test_module_loads_a_depthwise_conv1d():
    from ffn_kernels import TemporalConv

    conv = torch.nn.Conv1d(4, 4, 3, padding=1, groups=4, bias=False)
    tc = TemporalConv(4)
    tc.load_state_dict(conv.state_dict())
    x = make_input(TWO_SEGMENTS, 4)
    torch.testing.assert_close(tc(x, TWO_SEGMENTS),
                               reference.temporal_conv(x, TWO_SEGMENTS, conv.weight.detach()))
    with pytest.raises(ValueError, match="init must be one of"):
        TemporalConv(4, init="random")
