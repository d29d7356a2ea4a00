"""``freq_batch_norm`` (docs/design.md §3.2) on every backend: the reference against per-branch
nn.BatchNorm2d; each backend's raw ``freq_batch_norm_fwd`` / ``freq_batch_norm_bwd`` against the
reference's (statistics, running statistics, every gradient output); the public op's values,
gradients and written-back running statistics against the reference semantics (dtypes, memory
formats, plane sizes); float64 gradcheck; opcheck; first-order-only autograd; the FreqBatchNorm2d
module against nn.BatchNorm2d; and the op's argument checks."""

import pytest
import torch
from torch import nn

from ffn_kernels import FrameLayout, FreqBatchNorm2d, ops, reference
from conftest import (DEVICE, DTYPES, FLOAT64_BACKENDS, LAYOUT_IDS, LAYOUTS, MEMORY_FORMATS,
                      OPCHECK_BACKENDS, RAW_BACKENDS, ROWS, SHAPES, SMALL_SHAPES, STATS_TOL, TINY,
                      TRAINING, TWO_SEGMENTS, cases, check_differentiable_once, check_outputs,
                      compare_autograd, flat, gradcheck, make_input, make_params, official_bns,
                      on, pick, run_raw)

# (relu, residual): plain BN, BN + ReLU, BN + residual + ReLU (the network's last block)
EPILOGUES = {"relu-residual": (True, True), "plain": (False, False), "relu": (True, False)}

# ---------------------------------------------------------------------------------------------
# The reference is per-branch nn.BatchNorm2d
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_reference_freq_batch_norm_is_per_branch_batchnorm2d(layout, training):
    x = make_input(layout, 5)
    residual = make_input(layout, 5, seed=7)
    p = make_params(3, 5)
    bns = official_bns(p)
    rm, rv = p["running_mean"].clone(), p["running_var"].clone()
    y = reference.freq_batch_norm(x, layout, p["weight"], p["bias"], rm, rv, training,
                                  momentum=0.3, eps=1e-4, activation="relu", residual=residual)
    outs = []
    for seg, xs, rs in zip(layout.segments(), layout.split(x), layout.split(residual)):
        bn = bns[seg.row].train(training)
        bn.momentum, bn.eps = 0.3, 1e-4
        outs.append(torch.relu(bn(xs) + rs))
    torch.testing.assert_close(y, torch.cat(outs).detach())
    for r, bn in enumerate(bns):  # rows outside the layout keep their statistics
        torch.testing.assert_close(rm[r], bn.running_mean)
        torch.testing.assert_close(rv[r], bn.running_var)
    if training:
        assert not torch.equal(rm[layout.rows[0]], p["running_mean"][layout.rows[0]])


# ---------------------------------------------------------------------------------------------
# Raw ops against the reference's
# ---------------------------------------------------------------------------------------------

# (training, running statistics given); without them the raw op normalises with batch statistics
# even when training=False and returns empty new statistics
STATS = {"train": (True, True), "eval": (False, True), "train-nostats": (True, False),
         "eval-nostats": (False, False)}


def raw_grid(backend, shape, dtype, stats, epilogue, **_):
    """cuda: every shape and dtype; cpu: the small shapes in float32 and float64 (the public op's
    tests cover its half types); triton (interpreted): the small shapes
    in float32, and bfloat16 with residual and ReLU (which uses every part of the kernels);
    no running statistics in eval only plain (and for triton one shape)."""
    if stats == STATS["eval-nostats"] and epilogue != EPILOGUES["plain"]:
        return False
    if backend == "cuda":
        return True
    if shape not in SMALL_SHAPES.values():
        return False
    if backend == "cpu":
        return dtype in (torch.float32, torch.float64)
    if not stats[1]:  # no running statistics
        return shape == SHAPES["fold-aligned"] and dtype == torch.float32 and not any(epilogue)
    return dtype == torch.float32 or (dtype == torch.bfloat16 and epilogue == (True, True))


@cases(RAW_BACKENDS, raw_grid, shape=SHAPES, dtype=DTYPES, memory_format=MEMORY_FORMATS,
       stats=STATS, epilogue=EPILOGUES)
def test_freq_batch_norm_raw(backend, shape, dtype, memory_format, stats, epilogue):
    (layout, C, hw), (training, running), (relu, residual) = shape, stats, epilogue
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    p = make_params(ROWS, C, acc)
    x = make_input(layout, C, hw, dtype, memory_format)
    res = make_input(layout, C, hw, dtype, memory_format, seed=9) if residual else None
    rm, rv = (p["running_mean"], p["running_var"]) if running else (None, None)
    momentum = [0.1 + 0.1 * s for s in range(layout.num_segments)]
    rm_before = rm.clone() if running else None
    got, want = run_raw(backend, "freq_batch_norm_fwd", x, *flat(layout), p["weight"], p["bias"],
                        rm, rv, training, momentum, 1e-3, relu, res)
    check_outputs(got, want, dtype, backend, param_outputs=(1, 2, 3, 4),
                  what="freq_batch_norm_fwd")
    if running:
        assert torch.equal(rm, rm_before), "freq_batch_norm_fwd must not modify running_mean"
    y, mean, invstd = want[:3]
    dy = make_input(layout, C, hw, dtype, memory_format, seed=4)
    got, want = run_raw(backend, "freq_batch_norm_bwd", dy, x, y, *flat(layout), p["weight"],
                        mean, invstd, training, relu, residual)
    check_outputs(got, want, dtype, backend, param_outputs=(1, 2),
                  what="freq_batch_norm_bwd")
    if relu and not residual:  # the ReLU mask recomputed from x with bias: y (here -1s) is not read
        not_y = torch.full_like(y, -1.0)
        got, want_bias = run_raw(backend, "freq_batch_norm_bwd", dy, x, not_y, *flat(layout),
                                 p["weight"], mean, invstd, training, relu, residual, p["bias"])
        check_outputs(got, want, dtype, backend, param_outputs=(1, 2),
                      what="freq_batch_norm_bwd with bias")
        check_outputs(want_bias, want, dtype, "cpu", param_outputs=(1, 2),
                      what="reference freq_batch_norm_bwd with bias")


@cases(RAW_BACKENDS)
def test_freq_batch_norm_raw_many_segments_momentum(backend):
    """More segments than momenta per statistics-combine launch of the Triton kernels (8): each
    segment blends its running statistics with its own momentum."""
    layout = FrameLayout(clips=1, frames=tuple(range(1, 11)), rows=tuple(range(9, -1, -1)))
    x = make_input(layout, 8, (2, 3))
    p = make_params(10, 8)
    w, b = torch.ones(10, 8), torch.zeros(10, 8)
    momentum = [0.05 * (i + 1) for i in range(10)]
    got, want = run_raw(backend, "freq_batch_norm_fwd", x, *flat(layout), w, b,
                        p["running_mean"], p["running_var"], True, momentum, 1e-5, False, None)
    check_outputs(got, want, torch.float32, backend, param_outputs=(1, 2, 3, 4))


# ---------------------------------------------------------------------------------------------
# The public op against the reference semantics
# ---------------------------------------------------------------------------------------------


def public_grid(backend, shape, dtype, epilogue, **_):
    """cpu and cuda: the whole grid; the reference (which computes the oracle itself): float32,
    for its plumbing; triton (interpreted): one shape in float32 with residual and ReLU."""
    if backend in ("cpu", "cuda"):
        return True
    if backend == "reference":
        return dtype == torch.float32
    return (dtype == torch.float32 and shape == SHAPES["single-high-row"]
            and epilogue == EPILOGUES["relu-residual"])


@cases(keep=public_grid, shape=SMALL_SHAPES, dtype=pick(DTYPES, "float32", "bfloat16", "float16"),
       memory_format=MEMORY_FORMATS, training=TRAINING, epilogue=EPILOGUES)
def test_freq_batch_norm_matches_reference(backend, shape, dtype, memory_format, training,
                                           epilogue):
    (layout, C, hw), (relu, residual) = shape, epilogue
    p = make_params(ROWS, C)
    tensors = dict(x=make_input(layout, C, hw, dtype, memory_format),
                   weight=p["weight"], bias=p["bias"],
                   residual=make_input(layout, C, hw, dtype, memory_format, seed=9)
                   if residual else None)
    stats = {"op": (on(backend, p["running_mean"]).clone(), on(backend, p["running_var"]).clone()),
             "ref": (p["running_mean"].clone(), p["running_var"].clone())}

    def run(name, fn):
        rm, rv = stats[name]
        return lambda x, weight, bias, residual: fn(
            x, layout, weight, bias, rm, rv, training, 0.2, 1e-3, "relu" if relu else None,
            residual)

    compare_autograd(run("op", ops.freq_batch_norm), run("ref", reference.freq_batch_norm),
                     tensors, dtype, backend)
    for a, b in zip(stats["op"], stats["ref"]):
        torch.testing.assert_close(a.cpu(), b, **STATS_TOL[dtype])


# the CPU kernels walk 1x1 frames, and planes under and over 64, differently
@cases(("cpu", "cuda"), hw={"1x1": (1, 1), "2x2": (2, 2), "9x9": (9, 9)},
       memory_format=MEMORY_FORMATS)
def test_freq_batch_norm_plane_sizes(backend, hw, memory_format):
    layout, p = LAYOUTS[0], make_params(3, 16, dtype=torch.float64)
    z, identity = (make_input(layout, 16, hw, torch.float64, memory_format, seed=s) for s in (0, 1))

    def run(impl):
        return lambda z, identity, weight, bias: impl.freq_batch_norm(
            z, layout, weight, bias, None, None, True, 0.1, 1e-5, "relu", identity)

    compare_autograd(run(ops), run(reference),
                     dict(z=z, identity=identity, weight=p["weight"], bias=p["bias"]),
                     torch.float64, backend)


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, what autograd supports
# ---------------------------------------------------------------------------------------------


@cases(FLOAT64_BACKENDS, memory_format=MEMORY_FORMATS, training=TRAINING)
def test_freq_batch_norm_gradcheck_float64(backend, memory_format, training):
    def leaf(t):
        return on(backend, t).contiguous(memory_format=memory_format).requires_grad_()

    x, identity = (leaf(make_input(TINY, 8, (3, 2), torch.float64, seed=s)) for s in (0, 1))
    p = {k: on(backend, v) for k, v in make_params(3, 8, torch.float64, seed=2).items()}
    w, b = p["weight"].requires_grad_(), p["bias"].requires_grad_()
    rm, rv = p["running_mean"], p["running_var"]
    assert gradcheck(
        lambda x, w, b, r: ops.freq_batch_norm(x, TINY, w, b, rm, rv, training, 0.1, 1e-5,
                                               "relu", r), (x, w, b, identity))


def opcheck_cases(device):
    """(op, args) of the forward op (training with ReLU and residual, eval plain) and of its
    backward op (which gets no tensor requiring grad: it has no double-backward formula)."""
    x, i = (torch.randn(TINY.total_frames, 8, 3, 2, device=device) for _ in range(2))
    p = {k: v.to(device) for k, v in make_params(3, 8).items()}
    layout = flat(TINY)
    bn = (p["weight"].clone().requires_grad_(), p["bias"].clone().requires_grad_(),
          p["running_mean"], p["running_var"])
    mean, invstd = torch.zeros(3, 8, device=device), torch.ones(3, 8, device=device)
    return {
        "train-relu-residual": (torch.ops.ffn_kernels.freq_batch_norm.default,
                                (x.clone().requires_grad_(), *layout, *bn, True, [0.1] * 3, 1e-5,
                                 True, i.clone().requires_grad_())),
        "eval-plain": (torch.ops.ffn_kernels.freq_batch_norm.default,
                       (x.clone().requires_grad_(), *layout, *bn, False, [0.1] * 3, 1e-5, False,
                        None)),
        "backward": (torch.ops.ffn_kernels.freq_batch_norm_backward.default,
                     (x, x, x, *layout, p["weight"], mean, invstd, True, True, True)),
        "backward-mask-from-x": (torch.ops.ffn_kernels.freq_batch_norm_backward.default,
                                 (x, x, x, *layout, p["weight"], mean, invstd, True, True, False,
                                  p["bias"])),
    }


@cases(OPCHECK_BACKENDS, case={k: k for k in ("train-relu-residual", "eval-plain", "backward",
                                              "backward-mask-from-x")})
def test_freq_batch_norm_opcheck(backend, case):
    torch.library.opcheck(*opcheck_cases(DEVICE[backend])[case])


def test_freq_batch_norm_backward_refuses_bias_with_a_residual():
    """bias recomputes the ReLU mask from x, which a residual also feeds: that call is an error."""
    x = torch.randn(TINY.total_frames, 8, 3, 2)
    p = make_params(3, 8)
    stats = torch.zeros(3, 8), torch.ones(3, 8)
    with pytest.raises(ValueError, match="bias .* without a residual"):
        torch.ops.ffn_kernels.freq_batch_norm_backward(
            x, x, x, *flat(TINY), p["weight"], *stats, True, True, True, p["bias"])


@cases(FLOAT64_BACKENDS)
def test_freq_batch_norm_is_differentiable_once(backend):
    p = {k: on(backend, v).requires_grad_(k in ("weight", "bias"))
         for k, v in make_params(2, 8, torch.float64).items()}
    x = on(backend, make_input(TWO_SEGMENTS, 8, dtype=torch.float64)).requires_grad_()
    check_differentiable_once("freq_batch_norm", lambda: ops.freq_batch_norm(
        x, TWO_SEGMENTS, p["weight"], p["bias"], activation="relu"), x)


# ---------------------------------------------------------------------------------------------
# The module: running statistics, state_dict, eval
# ---------------------------------------------------------------------------------------------


@cases(momentum={"momentum0.1": 0.1, "cumulative": None})
def test_freq_batch_norm_module_running_stats_follow_batchnorm2d(backend, momentum):
    layout = FrameLayout(clips=2, frames=(2, 3), rows=(1, 0))
    fbn = FreqBatchNorm2d(4, num_branches=2, momentum=momentum).to(DEVICE[backend])
    bns = [nn.BatchNorm2d(4, momentum=momentum) for _ in range(2)]
    for step in range(3):
        x = make_input(layout, 4, seed=step)
        y = fbn(on(backend, x), layout)
        ref = torch.cat([bns[seg.row](xs) for seg, xs in zip(layout.segments(), layout.split(x))])
        torch.testing.assert_close(y.cpu(), ref.detach())
    for r, bn in enumerate(bns):
        torch.testing.assert_close(fbn.running_mean[r].cpu(), bn.running_mean)
        torch.testing.assert_close(fbn.running_var[r].cpu(), bn.running_var)
        assert fbn.num_batches_tracked[r].cpu() == bn.num_batches_tracked
    fbn.eval(), [bn.eval() for bn in bns]
    x = make_input(layout, 4, seed=10)
    torch.testing.assert_close(fbn(on(backend, x), layout).cpu(), torch.cat(
        [bns[s.row](xs) for s, xs in zip(layout.segments(), layout.split(x))]).detach())
    fbn.reset_running_stats()
    assert fbn.running_mean.abs().sum() == 0 and fbn.num_batches_tracked.sum() == 0


@cases()
def test_freq_batch_norm_module_cumulative_momentum_resumes_from_a_loaded_counter(backend):
    layout = TWO_SEGMENTS
    fbn = FreqBatchNorm2d(4, num_branches=2, momentum=None).to(DEVICE[backend])
    fbn(on(backend, make_input(layout, 4)), layout)  # the host counter now holds 1 per row
    bn = nn.BatchNorm2d(4, momentum=None)
    state = {k: v.cpu() for k, v in fbn.state_dict().items()}
    state["num_batches_tracked"] = torch.tensor([7, 7])
    fbn.load_state_dict(state)
    bn.load_state_dict(dict(running_mean=state["running_mean"][0], running_var=state["running_var"][0],
                            weight=state["weight"][0], bias=state["bias"][0],
                            num_batches_tracked=torch.tensor(7)))
    x = make_input(layout, 4, seed=3)
    fbn(on(backend, x), layout), bn(layout.split(x)[0])
    torch.testing.assert_close(fbn.running_mean[0].cpu(), bn.running_mean)
    assert fbn.num_batches_tracked.tolist() == [8, 8]


def test_freq_batch_norm_module_training_step_reads_nothing_back_and_copies_nothing_to_the_device(
        monkeypatch):
    """A training step must not wait on the device: no ``.tolist()``/``.item()``, and no index
    tensor built from a host list (an index op), once the module is warm."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    layout = FrameLayout(clips=2, frames=(2, 3), rows=(1, 0))
    fbn = FreqBatchNorm2d(4, num_branches=2, momentum=None)
    x = make_input(layout, 4)
    fbn(x, layout)
    reads = []
    for name in ("tolist", "item"):
        monkeypatch.setattr(torch.Tensor, name, lambda self, _n=name: reads.append(_n))
    with Record() as record:
        fbn(x, layout)
    assert reads == []
    assert not [op for op in record.ops if "index" in op or "local_scalar" in op], record.ops


@cases()
def test_freq_batch_norm_module_state_dict_and_eval_does_not_touch_stats(backend):
    fbn = FreqBatchNorm2d(4, num_branches=3).eval().to(DEVICE[backend])
    assert set(fbn.state_dict()) == {"weight", "bias", "running_mean", "running_var",
                                     "num_batches_tracked"}
    before = fbn.running_mean.clone()
    fbn(on(backend, make_input(LAYOUTS[0], 4)), LAYOUTS[0])
    assert torch.equal(before, fbn.running_mean)


def test_freq_batch_norm_module_loads_a_batchnorm2d_state_dict_into_every_row():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    bn.num_batches_tracked.fill_(9)
    fbn = FreqBatchNorm2d(4, num_branches=3)
    fbn.load_state_dict(bn.state_dict())
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(fbn, name), getattr(bn, name).expand(3, 4)), name
    assert fbn.num_batches_tracked.tolist() == [9, 9, 9]
    with pytest.raises(RuntimeError, match="size mismatch"):
        fbn.load_state_dict(nn.BatchNorm2d(5).state_dict())
    layout = FrameLayout(clips=2, frames=(2, 3), rows=(2, 0))
    x = make_input(layout, 4)
    fbn.eval(), bn.eval()
    torch.testing.assert_close(fbn(x, layout), bn(x).detach())


# ---------------------------------------------------------------------------------------------
# Argument checks (in the C++ op, before any backend: docs/design.md §3.5)
# ---------------------------------------------------------------------------------------------

X = make_input(TWO_SEGMENTS, 4)


def bn(x, layout=TWO_SEGMENTS, **kw):
    p = make_params(2, 4)
    args = dict(weight=p["weight"], bias=p["bias"], running_mean=p["running_mean"],
                running_var=p["running_var"], training=True)
    args.update(kw)
    return ops.freq_batch_norm(x, layout, **args)


@pytest.mark.parametrize("call,error,match", [
    (lambda: bn(X[:, :0], weight=torch.ones(2, 0), bias=torch.ones(2, 0), running_mean=None,
                running_var=None), ValueError, "x must have at least one channel"),
    (lambda: bn(X, weight=torch.ones(2, 3)), ValueError, r"weight must have shape \[rows, C=4\]"),
    (lambda: bn(X, running_var=torch.ones(1, 4)), ValueError, "of running_var, which has only 1 rows"),
    (lambda: bn(X, running_var=None), ValueError, "running_mean and running_var must be given together"),
    (lambda: bn(X, running_mean=None, running_var=None, training=False), ValueError, "training=False needs"),
    (lambda: bn(X, residual=X[:, :2]), ValueError, "residual has shape"),
    (lambda: bn(X, residual=X.double()), TypeError, "residual has dtype"),
    (lambda: bn(X, activation="gelu"), ValueError, "activation must be None or 'relu'"),
    (lambda: bn(X, momentum=[0.1]), ValueError, "momentum has 1 values but the layout has 2 segments"),
    (lambda: bn(X, momentum=None), ValueError, "momentum=None"),
    (lambda: bn(X, eps=0.0), ValueError, "eps must be > 0"),
    (lambda: bn(X, momentum=float("nan")), ValueError, r"momentum must be in \[0, 1\]"),
    (lambda: bn(X, momentum=[0.1, -0.1]), ValueError, r"momentum must be in \[0, 1\]"),
    (lambda: bn(X, momentum=1.5), ValueError, r"momentum must be in \[0, 1\]"),
    (lambda: bn(make_input(FrameLayout(2, (2, 3), (1, 1)), 4), FrameLayout(2, (2, 3), (1, 1))),
     ValueError, "repeat a row"),
    (lambda: bn(torch.randn(1, 4, 1, 1), FrameLayout.single(1, 1)), ValueError,
     "more than 1 value per channel"),
])
def test_freq_batch_norm_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()
