"""``bn_add_relu_shift_alter``, the residual-block boundary (docs/design.md §3.3), on every
backend: the reference against nn.BatchNorm2d + ReLU + the official shift and WA; each backend's
raw ``bn_add_relu_shift_alter_fwd`` / ``_bwd`` against the reference's (also with the Triton
kernels' tiles and chunks shrunk); the public op's values, gradients and running statistics
against the reference semantics (dtypes, memory formats, plane sizes); determinism (CPU thread
count, repeated runs); float64 gradcheck; opcheck; first-order-only autograd; torch.compile of a
block; and the op's argument checks."""

import pytest
import torch
from torch import nn

import ffn_kernels
from ffn_kernels import FreqBatchNorm2d, ShiftAlter, ops, reference
from conftest import (DEVICE, DTYPES, FLOAT64_BACKENDS, FOLD_DIV, LAYOUTS, MEMORY_FORMATS,
                      OPCHECK_BACKENDS, RAW_BACKENDS, ROWS, SHAPES, SMALL_SHAPES, STATS_TOL, TINY,
                      TRAINING, TWO_SEGMENTS, cases, check_differentiable_once, check_outputs,
                      compare_autograd, flat, fold_div_for, gradcheck, make_input, make_params,
                      official_bns, official_shift, official_wa, on, pick, run_raw)

ALTER = {"alter": True, "shift": False}

# ---------------------------------------------------------------------------------------------
# The reference is BN + residual + ReLU, then the official shift and WA
# ---------------------------------------------------------------------------------------------


def test_reference_bn_add_relu_shift_alter_composes_bn_add_relu_and_shift_alter():
    layout = LAYOUTS[0]
    z, identity = make_input(layout, 16), make_input(layout, 16, seed=3)
    p = make_params(3, 16)
    out, next_in = reference.bn_add_relu_shift_alter(
        z, identity, layout, p["weight"], p["bias"], None, None, True, alter_next=p["alter"]
    )
    bns = official_bns(p)
    for seg, zs, ids, outs, nexts in zip(layout.segments(), layout.split(z),
                                         layout.split(identity), layout.split(out),
                                         layout.split(next_in)):
        o = torch.relu(bns[seg.row](zs) + ids)
        torch.testing.assert_close(outs, o.detach())
        torch.testing.assert_close(
            nexts, official_wa(p["alter"][seg.row])(official_shift(o, seg.frames, 8)).detach()
        )


# ---------------------------------------------------------------------------------------------
# Raw ops against the reference's
# ---------------------------------------------------------------------------------------------


def check_raw(backend, shape, dtype, memory_format, training, with_alter):
    """Forward (both outputs, statistics, running statistics) and backward (every gradient) of
    the backend's raw op against the reference's."""
    layout, C, hw = shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    p = make_params(ROWS, C, acc)
    alter = p["alter"] if with_alter else None
    z = make_input(layout, C, hw, dtype, memory_format)
    identity = make_input(layout, C, hw, dtype, memory_format, seed=9)
    momentum = [0.1] * layout.num_segments
    got, want = run_raw(backend, "bn_add_relu_shift_alter_fwd", z, identity, *flat(layout),
                        p["weight"], p["bias"], p["running_mean"], p["running_var"], training,
                        momentum, 1e-5, alter, FOLD_DIV)
    check_outputs(got, want, dtype, backend, param_outputs=(2, 3, 4, 5),
                  what="bn_add_relu_shift_alter_fwd")
    out, mean, invstd = want[0], want[2], want[3]
    dout = make_input(layout, C, hw, dtype, memory_format, seed=5)
    dnext = make_input(layout, C, hw, dtype, memory_format, seed=6)
    got, want = run_raw(backend, "bn_add_relu_shift_alter_bwd", dout, dnext, z, out,
                        *flat(layout), p["weight"], mean, invstd, training, alter, FOLD_DIV)
    check_outputs(got, want, dtype, backend, param_outputs=(2, 3, 4),
                  what="bn_add_relu_shift_alter_bwd")


def raw_grid(backend, shape, dtype, training, with_alter, **_):
    """cuda: every shape and dtype; cpu: the small shapes in float32 and float64 (the public op's
    tests cover its half types); triton (interpreted): the small shapes in float32, bfloat16 with
    alter, float16 on one shape in training with alter."""
    if backend == "cuda":
        return True
    if shape not in SMALL_SHAPES.values():
        return False
    if backend == "cpu":
        return dtype in (torch.float32, torch.float64)
    if dtype == torch.float16:
        return shape == SHAPES["fold-aligned"] and training and with_alter
    return dtype == torch.float32 or (dtype == torch.bfloat16 and with_alter)


@cases(RAW_BACKENDS, raw_grid, shape=SHAPES, dtype=DTYPES, memory_format=MEMORY_FORMATS,
       training=TRAINING, with_alter=ALTER)
def test_bn_add_relu_shift_alter_raw(backend, shape, dtype, memory_format, training, with_alter):
    check_raw(backend, shape, dtype, memory_format, training, with_alter)


@cases(("triton",), shape=pick(SHAPES, "odd", "fold-aligned", "single-high-row"),
       memory_format=MEMORY_FORMATS)
def test_bn_add_relu_shift_alter_raw_small_tiles(backend, shape, memory_format, monkeypatch):
    """Triton tiles and chunks shrunk so the small shapes span several channel blocks, pixel
    blocks and frame chunks per segment (chunks not aligned to clips): masking and the
    cross-chunk combine."""
    from ffn_kernels.triton import common

    monkeypatch.setattr(common, "_TILE", 256)
    monkeypatch.setattr(common, "_CHUNK", 1024)
    for training in (True, False):
        check_raw(backend, shape, torch.float32, memory_format, training, True)


# ---------------------------------------------------------------------------------------------
# The public op against the reference semantics
# ---------------------------------------------------------------------------------------------


def public_grid(backend, shape, dtype, with_alter, **_):
    """cpu and cuda: the whole grid; the reference (which computes the oracle itself): float32,
    for its plumbing; triton (interpreted): one shape in float32 with alter."""
    if backend in ("cpu", "cuda"):
        return True
    if backend == "reference":
        return dtype == torch.float32
    return dtype == torch.float32 and shape == SHAPES["single-high-row"] and with_alter


@cases(keep=public_grid, shape=SMALL_SHAPES, dtype=pick(DTYPES, "float32", "bfloat16"),
       memory_format=MEMORY_FORMATS, training=TRAINING, with_alter=ALTER)
def test_bn_add_relu_shift_alter_matches_reference(backend, shape, dtype, memory_format, training,
                                                   with_alter):
    layout, C, hw = shape
    fold_div = fold_div_for(C)
    p = make_params(ROWS, C)
    tensors = dict(z=make_input(layout, C, hw, dtype, memory_format),
                   identity=make_input(layout, C, hw, dtype, memory_format, seed=4),
                   weight=p["weight"], bias=p["bias"], alter=p["alter"] if with_alter else None)
    stats = {"op": (on(backend, p["running_mean"]).clone(), on(backend, p["running_var"]).clone()),
             "ref": (p["running_mean"].clone(), p["running_var"].clone())}

    def run(name, fn):
        rm, rv = stats[name]
        return lambda z, identity, weight, bias, alter: fn(
            z, identity, layout, weight, bias, rm, rv, training, 0.1, 1e-5, alter, fold_div)

    compare_autograd(run("op", ops.bn_add_relu_shift_alter),
                     run("ref", reference.bn_add_relu_shift_alter), tensors, dtype, backend)
    for a, b in zip(stats["op"], stats["ref"]):
        torch.testing.assert_close(a.cpu(), b, **STATS_TOL[dtype])


# the CPU kernels walk 1x1 frames, and planes under and over 64, differently
@cases(("cpu", "cuda"), hw={"1x1": (1, 1), "2x2": (2, 2), "9x9": (9, 9)},
       memory_format=MEMORY_FORMATS)
def test_bn_add_relu_shift_alter_plane_sizes(backend, hw, memory_format):
    layout, p = LAYOUTS[0], make_params(3, 16, dtype=torch.float64)
    z, identity = (make_input(layout, 16, hw, torch.float64, memory_format, seed=s) for s in (0, 1))
    stats = {"op": (on(backend, p["running_mean"]).clone(), on(backend, p["running_var"]).clone()),
             "ref": (p["running_mean"].clone(), p["running_var"].clone())}

    def run(name, impl):
        rm, rv = stats[name]
        return lambda z, identity, weight, bias, alter: impl.bn_add_relu_shift_alter(
            z, identity, layout, weight, bias, rm, rv, True, 0.1, 1e-5, alter, 8)

    compare_autograd(run("op", ops), run("ref", reference),
                     dict(z=z, identity=identity, weight=p["weight"], bias=p["bias"],
                          alter=p["alter"]), torch.float64, backend)
    for a, b in zip(stats["op"], stats["ref"]):
        torch.testing.assert_close(a.cpu(), b, **STATS_TOL[torch.float64])


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


@cases(("cpu",), hw={"2x2": (2, 2), "9x9": (9, 9), "40x40": (40, 40)},  # grouped planes, and
       memory_format=MEMORY_FORMATS)                                    # one plane per chunk
def test_bn_add_relu_shift_alter_cpu_results_do_not_depend_on_the_thread_count(backend, hw,
                                                                              memory_format):
    previous_threads = torch.get_num_threads()
    layout, p = LAYOUTS[0], make_params(3, 32)
    z, identity = (make_input(layout, 32, hw, memory_format=memory_format, seed=s).requires_grad_()
                   for s in (0, 1))
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            rm, rv = p["running_mean"].clone(), p["running_var"].clone()
            out, nxt = ops.bn_add_relu_shift_alter(z, identity, layout, p["weight"], p["bias"], rm,
                                                   rv, True, 0.1, 1e-5, p["alter"], 8)
            grads = torch.autograd.grad((out * 1.5 + nxt).sum(), (z, identity))
            results.append([out, nxt, rm, rv, *grads])
    finally:
        torch.set_num_threads(previous_threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@cases(("cpu", "cuda"), memory_format=MEMORY_FORMATS)
def test_bn_add_relu_shift_alter_bwd_is_deterministic(backend, memory_format):
    layout, C, hw = SHAPES["multi-chunk"]
    p = {k: on(backend, v) for k, v in make_params(ROWS, C).items()}
    dout, dnext, z = (on(backend, make_input(layout, C, hw, torch.float32, memory_format, seed=s))
                      for s in (5, 6, 7))
    out = torch.relu(z)
    mean = on(backend, torch.zeros(layout.num_segments, C))
    invstd = torch.ones_like(mean)
    kernels = ffn_kernels.backend.kernels_for(z)
    runs = [kernels.bn_add_relu_shift_alter_bwd(dout, dnext, z, out, *flat(layout), p["weight"],
                                                mean, invstd, True, p["alter"], 8)
            for _ in range(3)]
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, what autograd supports, torch.compile
# ---------------------------------------------------------------------------------------------


@cases(FLOAT64_BACKENDS, memory_format=MEMORY_FORMATS, training=TRAINING)
def test_bn_add_relu_shift_alter_gradcheck_float64(backend, memory_format, training):
    def leaf(t):
        return on(backend, t).contiguous(memory_format=memory_format).requires_grad_()

    z, identity = (leaf(make_input(TINY, 8, (3, 2), torch.float64, seed=s)) for s in (0, 1))
    p = {k: on(backend, v) for k, v in make_params(3, 8, torch.float64, seed=2).items()}
    w, b, a = (p[k].requires_grad_() for k in ("weight", "bias", "alter"))
    rm, rv = p["running_mean"], p["running_var"]
    assert gradcheck(
        lambda z, i, w, b, a: ops.bn_add_relu_shift_alter(z, i, TINY, w, b, rm, rv, training,
                                                          0.1, 1e-5, a, 4),
        (z, identity, w, b, a))


def opcheck_cases(device):
    """(op, args) of the forward op and of its backward op (which gets no tensor requiring grad:
    it has no double-backward formula)."""
    x, i = (torch.randn(TINY.total_frames, 8, 3, 2, device=device) for _ in range(2))
    p = {k: v.to(device) for k, v in make_params(3, 8).items()}
    layout = flat(TINY)
    bn = (p["weight"].clone().requires_grad_(), p["bias"].clone().requires_grad_(),
          p["running_mean"], p["running_var"])
    mean, invstd = torch.zeros(3, 8, device=device), torch.ones(3, 8, device=device)
    return {
        "forward": (torch.ops.ffn_kernels.bn_add_relu_shift_alter.default,
                    (x.clone().requires_grad_(), i.clone().requires_grad_(), *layout, *bn, True,
                     [0.1] * 3, 1e-5, p["alter"].clone().requires_grad_(), 4)),
        "backward": (torch.ops.ffn_kernels.bn_add_relu_shift_alter_backward.default,
                     (x, x, x, x.relu(), *layout, p["weight"], mean, invstd, True, p["alter"], 4)),
    }


@cases(OPCHECK_BACKENDS, case={k: k for k in ("forward", "backward")})
def test_bn_add_relu_shift_alter_opcheck(backend, case):
    torch.library.opcheck(*opcheck_cases(DEVICE[backend])[case])


@cases(FLOAT64_BACKENDS)
def test_bn_add_relu_shift_alter_is_differentiable_once(backend):
    p = {k: on(backend, v).requires_grad_(k in ("weight", "bias", "alter"))
         for k, v in make_params(2, 8, torch.float64).items()}
    x = on(backend, make_input(TWO_SEGMENTS, 8, dtype=torch.float64)).requires_grad_()
    check_differentiable_once("bn_add_relu_shift_alter", lambda: ops.bn_add_relu_shift_alter(
        x, x, TWO_SEGMENTS, p["weight"], p["bias"], alter_next=p["alter"])[1], x)


class TinyBlock(nn.Module):
    """A residual block on the three ops, ending at the block boundary."""

    def __init__(self, c=8):
        super().__init__()
        self.shift = ShiftAlter(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = FreqBatchNorm2d(c)
        self.bn2 = FreqBatchNorm2d(c)

    def forward(self, x, layout):
        h = self.bn(self.conv(self.shift(x, layout)), layout, activation="relu")
        out, nxt = self.bn2.add_relu_shift_alter(h, x, layout, self.shift.weight)
        return out + nxt


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_bn_add_relu_shift_alter_block_torch_compile_fullgraph(compile_backend):
    layout = ffn_kernels.FrameLayout(clips=1, frames=(2, 4), rows=(0, 1))
    torch.manual_seed(0)
    model = TinyBlock()
    twin = TinyBlock()
    twin.load_state_dict(model.state_dict())
    compiled = torch.compile(twin, fullgraph=True, backend=compile_backend)
    x = make_input(layout, 8, hw=(4, 4))
    y, yc = model(x, layout), compiled(x, layout)
    torch.testing.assert_close(yc, y, rtol=1e-4, atol=1e-4)
    y.sum().backward(), yc.sum().backward()
    torch.testing.assert_close(twin.conv.weight.grad, model.conv.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(twin.bn.running_mean, model.bn.running_mean)


# ---------------------------------------------------------------------------------------------
# Argument checks (in the C++ op, before any backend: docs/design.md §3.5)
# ---------------------------------------------------------------------------------------------

X = make_input(TWO_SEGMENTS, 4)


@pytest.mark.parametrize("call,error,match", [
    (lambda: ops.bn_add_relu_shift_alter(X[:, :0], X[:, :0], TWO_SEGMENTS, torch.ones(2, 0),
                                         torch.zeros(2, 0)), ValueError, "z must have at least one"),
    (lambda: ops.bn_add_relu_shift_alter(X, X[:-2], TWO_SEGMENTS, torch.ones(2, 4), torch.zeros(2, 4)),
     ValueError, "identity has shape"),
    (lambda: ops.bn_add_relu_shift_alter(X, X, TWO_SEGMENTS, torch.ones(2, 4), torch.zeros(2, 4),
                                         alter_next=torch.zeros(2, 8)), ValueError, "alter_next must have shape"),
])
def test_bn_add_relu_shift_alter_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()
