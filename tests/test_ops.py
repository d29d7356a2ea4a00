"""The fused ops against the reference semantics: values, gradients, running statistics, memory
formats, dtypes, gradcheck, opcheck, torch.compile, and the backend that actually ran."""

import pytest
import torch
from torch import nn

import ffn_kernels
from ffn_kernels import FrameLayout, FreqBatchNorm2d, ShiftAlter, ops, reference
from conftest import LAYOUTS, make_input, make_params

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-9),
       torch.bfloat16: dict(rtol=2e-2, atol=3e-2), torch.float16: dict(rtol=2e-3, atol=3e-3)}
# parameter gradients sum over N*T*H*W low-precision products: compare them loosely
PARAM_TOL = {**TOL, torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=3e-2, atol=0.5), torch.float16: dict(rtol=1e-2, atol=5e-2)}


def compare(op_fn, ref_fn, tensors, dtype):
    """Run both functions on fresh leaf copies of ``tensors``, backprop one random cotangent per
    output and compare outputs and every gradient."""
    results = []
    for fn in (op_fn, ref_fn):
        leaves = {k: (v.detach().clone().requires_grad_(v.is_floating_point()) if v is not None else None)
                  for k, v in tensors.items()}
        outs = fn(**leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        g = torch.Generator().manual_seed(5)
        cot = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
        torch.autograd.backward(outs, cot)
        grads = {k: v.grad for k, v in leaves.items() if v is not None and v.grad is not None}
        results.append((outs, grads))
    (outs, grads), (ref_outs, ref_grads) = results
    for o, r in zip(outs, ref_outs):
        assert o.dtype == r.dtype and o.shape == r.shape
        assert o.is_contiguous(memory_format=torch.channels_last) == r.is_contiguous(
            memory_format=torch.channels_last)
        torch.testing.assert_close(o, r, **TOL[dtype])
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        tol = (TOL if k in ACTIVATIONS else PARAM_TOL)[dtype]
        torch.testing.assert_close(grads[k], ref_grads[k], **tol, msg=lambda m: f"grad of {k}: {m}")
    return outs


ACTIVATIONS = ("x", "z", "identity", "residual")


def only_plumbing_on_reference(backend, dtype, channels_last):
    """The reference backend computes the oracle itself: run one dtype/format through the op
    plumbing (validation, formats, autograd) and leave the full matrix to the compiled kernels."""
    if backend == "reference" and (dtype != torch.float32 or channels_last):
        pytest.skip("reference backend: float32 NCHW covers its plumbing")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_alter", [True, False])
def test_shift_alter_matches_reference(backend, layout, dtype, channels_last, with_alter):
    only_plumbing_on_reference(backend, dtype, channels_last)
    p = make_params(3, 16)
    tensors = dict(x=make_input(layout, 16, dtype=dtype, channels_last=channels_last),
                   alter=p["alter"] if with_alter else None)
    compare(lambda x, alter: ops.shift_alter(x, layout, alter, 8),
            lambda x, alter: reference.shift_alter(x, layout, alter, 8), tensors, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu,with_residual", [(True, True), (False, False), (True, False)])
def test_freq_batch_norm_matches_reference(backend, layout, dtype, channels_last, training, relu,
                                           with_residual):
    only_plumbing_on_reference(backend, dtype, channels_last)
    p = make_params(3, 6)
    tensors = dict(x=make_input(layout, 6, dtype=dtype, channels_last=channels_last),
                   weight=p["weight"], bias=p["bias"],
                   residual=make_input(layout, 6, dtype=dtype, channels_last=channels_last, seed=9)
                   if with_residual else None)
    stats = {}
    for name, fn in (("op", ops.freq_batch_norm), ("ref", reference.freq_batch_norm)):
        stats[name] = (p["running_mean"].clone(), p["running_var"].clone())

    def run(name, fn):
        rm, rv = stats[name]
        return lambda x, weight, bias, residual: fn(
            x, layout, weight, bias, rm, rv, training, 0.2, 1e-3, "relu" if relu else None, residual)

    compare(run("op", ops.freq_batch_norm), run("ref", reference.freq_batch_norm), tensors, dtype)
    for a, b in zip(stats["op"], stats["ref"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("with_alter", [True, False])
def test_bn_add_relu_shift_alter_matches_reference(backend, layout, dtype, channels_last, training,
                                                   with_alter):
    only_plumbing_on_reference(backend, dtype, channels_last)
    p = make_params(3, 16)
    tensors = dict(z=make_input(layout, 16, dtype=dtype, channels_last=channels_last),
                   identity=make_input(layout, 16, dtype=dtype, channels_last=channels_last, seed=4),
                   weight=p["weight"], bias=p["bias"], alter=p["alter"] if with_alter else None)
    stats = {k: (p["running_mean"].clone(), p["running_var"].clone()) for k in ("op", "ref")}

    def run(name, fn):
        rm, rv = stats[name]
        return lambda z, identity, weight, bias, alter: fn(
            z, identity, layout, weight, bias, rm, rv, training, 0.1, 1e-5, alter, 8)

    compare(run("op", ops.bn_add_relu_shift_alter), run("ref", reference.bn_add_relu_shift_alter),
            tensors, dtype)
    for a, b in zip(stats["op"], stats["ref"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (9, 9)])  # the CPU kernels walk 1x1 frames, and
@pytest.mark.parametrize("channels_last", [False, True])  # planes under and over 64, differently
def test_plane_sizes(backend, hw, channels_last):
    only_plumbing_on_reference(backend, torch.float64, channels_last)
    layout, p = LAYOUTS[0], make_params(3, 16, dtype=torch.float64)
    z, identity = (make_input(layout, 16, hw, torch.float64, channels_last, seed=s) for s in (0, 1))
    stats = {k: (p["running_mean"].clone(), p["running_var"].clone()) for k in ("op", "ref")}

    def all_three(name, impl):
        rm, rv = stats[name]
        return lambda z, identity, weight, bias, alter: (
            *impl.bn_add_relu_shift_alter(z, identity, layout, weight, bias, rm, rv, True, 0.1, 1e-5, alter, 8),
            impl.freq_batch_norm(z, layout, weight, bias, None, None, True, 0.1, 1e-5, "relu", identity),
            impl.shift_alter(z, layout, alter, 8))

    compare(all_three("op", ops), all_three("ref", reference),
            dict(z=z, identity=identity, weight=p["weight"], bias=p["bias"], alter=p["alter"]), torch.float64)
    for a, b in zip(stats["op"], stats["ref"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.skipif(not ffn_kernels.backend.extension_loaded(), reason="needs the compiled CPU kernels")
@pytest.mark.parametrize("hw", [(2, 2), (9, 9), (40, 40)])  # grouped planes, and one plane per chunk
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_results_do_not_depend_on_the_thread_count(hw, channels_last):
    previous_backend, previous_threads = ffn_kernels.get_backend(), torch.get_num_threads()
    ffn_kernels.set_backend("cpu")
    layout, p = LAYOUTS[0], make_params(3, 32)
    z, identity = (make_input(layout, 32, hw, channels_last=channels_last, seed=s).requires_grad_()
                   for s in (0, 1))
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            rm, rv = p["running_mean"].clone(), p["running_var"].clone()
            out, nxt = ops.bn_add_relu_shift_alter(z, identity, layout, p["weight"], p["bias"], rm, rv,
                                                   True, 0.1, 1e-5, p["alter"], 8)
            grads = torch.autograd.grad((out * 1.5 + nxt).sum(), (z, identity))
            results.append([out, nxt, rm, rv, *grads])
    finally:
        torch.set_num_threads(previous_threads)
        ffn_kernels.set_backend(previous_backend)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# gradcheck and opcheck
# --------------------------------------------------------------------------------------------

SMALL = FrameLayout(clips=2, frames=(1, 2, 3), rows=(1, 2, 0))


def _f64(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()


@pytest.fixture
def compiled_backend():
    """The compiled kernels where built (the reference backend's gradients are its own autograd)."""
    previous = ffn_kernels.get_backend()
    ffn_kernels.set_backend("cpu" if ffn_kernels.backend.extension_loaded() else "reference")
    yield
    ffn_kernels.set_backend(previous)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(compiled_backend, channels_last, training):
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def act(seed):
        return _f64(SMALL.total_frames, 8, 3, 2, seed=seed).detach().contiguous(
            memory_format=fmt).requires_grad_()

    x, identity = act(0), act(1)
    w = (1 + _f64(3, 8, seed=2).detach()).requires_grad_()
    b = _f64(3, 8, seed=3)
    a = (0.3 * _f64(3, 8, seed=4).detach()).requires_grad_()
    rm, rv = torch.zeros(3, 8, dtype=torch.float64), 0.5 + torch.rand(3, 8, dtype=torch.float64)
    # fast_mode checks random vector-Jacobian products: the same formulas at a fraction of the time
    check = dict(fast_mode=True)
    assert torch.autograd.gradcheck(lambda x, a: ops.shift_alter(x, SMALL, a, 4), (x, a), **check)
    assert torch.autograd.gradcheck(
        lambda x, w, b, r: ops.freq_batch_norm(x, SMALL, w, b, rm, rv, training, 0.1, 1e-5,
                                               "relu", r), (x, w, b, identity), **check)
    assert torch.autograd.gradcheck(
        lambda z, i, w, b, a: ops.bn_add_relu_shift_alter(z, i, SMALL, w, b, rm, rv, training,
                                                          0.1, 1e-5, a, 4),
        (x, identity, w, b, a), **check)


def _opcheck_cases():
    """(op, args) pairs; the backward ops get no tensors that require grad (they have no
    double-backward formula)."""
    x = torch.randn(SMALL.total_frames, 8, 3, 2)
    i = torch.randn(SMALL.total_frames, 8, 3, 2)
    p = make_params(3, 8)
    layout = (SMALL.clips, list(SMALL.frames), list(SMALL.rows))
    bn = (p["weight"].clone().requires_grad_(), p["bias"].clone().requires_grad_(),
          p["running_mean"], p["running_var"])
    alter = p["alter"].clone().requires_grad_()
    x, i = x.requires_grad_(), i.requires_grad_()
    return [
        (torch.ops.ffn_kernels.shift_alter.default, (x, *layout, alter, 4)),
        (torch.ops.ffn_kernels.shift_alter.default, (x, *layout, None, 8)),
        (torch.ops.ffn_kernels.freq_batch_norm.default,
         (x, *layout, *bn, True, [0.1, 0.1, 0.1], 1e-5, True, i)),
        (torch.ops.ffn_kernels.freq_batch_norm.default, (x, *layout, *bn, False, [0.1] * 3, 1e-5, False, None)),
        (torch.ops.ffn_kernels.bn_add_relu_shift_alter.default,
         (x, i, *layout, *bn, True, [0.1] * 3, 1e-5, alter, 4)),
    ] + _backward_cases(x.detach(), layout, p)


def _backward_cases(x, layout, p):
    mean, invstd = torch.zeros(3, 8), torch.ones(3, 8)
    return [
        (torch.ops.ffn_kernels.shift_alter_backward.default, (x, x, *layout, p["alter"], 4, True)),
        (torch.ops.ffn_kernels.freq_batch_norm_backward.default,
         (x, x, x, *layout, p["weight"], mean, invstd, True, True, True)),
        (torch.ops.ffn_kernels.bn_add_relu_shift_alter_backward.default,
         (x, x, x, x.relu(), *layout, p["weight"], mean, invstd, True, p["alter"], 4)),
    ]


@pytest.mark.parametrize("case", range(8))
def test_opcheck(backend, case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


# --------------------------------------------------------------------------------------------
# running statistics, modules, formats
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_running_stats_follow_batchnorm2d(backend, momentum):
    layout = FrameLayout(clips=2, frames=(2, 3), rows=(1, 0))
    fbn = FreqBatchNorm2d(4, num_branches=2, momentum=momentum)
    bns = [nn.BatchNorm2d(4, momentum=momentum) for _ in range(2)]
    for step in range(3):
        x = make_input(layout, 4, seed=step)
        y = fbn(x, layout)
        ref = torch.cat([bns[seg.row](xs) for seg, xs in zip(layout.segments(), layout.split(x))])
        torch.testing.assert_close(y, ref.detach())
    for r, bn in enumerate(bns):
        torch.testing.assert_close(fbn.running_mean[r], bn.running_mean)
        torch.testing.assert_close(fbn.running_var[r], bn.running_var)
        assert fbn.num_batches_tracked[r] == bn.num_batches_tracked
    fbn.eval(), [bn.eval() for bn in bns]
    x = make_input(layout, 4, seed=10)
    torch.testing.assert_close(fbn(x, layout), torch.cat(
        [bns[s.row](xs) for s, xs in zip(layout.segments(), layout.split(x))]).detach())
    fbn.reset_running_stats()
    assert fbn.running_mean.abs().sum() == 0 and fbn.num_batches_tracked.sum() == 0


def test_module_cumulative_momentum_resumes_from_a_loaded_counter(backend):
    layout = FrameLayout(clips=2, frames=(2, 3), rows=(0, 1))
    fbn = FreqBatchNorm2d(4, num_branches=2, momentum=None)
    fbn(make_input(layout, 4), layout)  # the host counter now holds 1 per row
    bn = nn.BatchNorm2d(4, momentum=None)
    state = dict(fbn.state_dict(), num_batches_tracked=torch.tensor([7, 7]))
    fbn.load_state_dict(state)
    bn.load_state_dict(dict(running_mean=state["running_mean"][0], running_var=state["running_var"][0],
                            weight=state["weight"][0], bias=state["bias"][0],
                            num_batches_tracked=torch.tensor(7)))
    x = make_input(layout, 4, seed=3)
    fbn(x, layout), bn(layout.split(x)[0])
    torch.testing.assert_close(fbn.running_mean[0], bn.running_mean)
    assert fbn.num_batches_tracked.tolist() == [8, 8]


def test_module_training_step_reads_nothing_back_and_copies_nothing_to_the_device(monkeypatch):
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


def test_module_state_dict_and_eval_does_not_touch_stats(backend):
    fbn = FreqBatchNorm2d(4, num_branches=3).eval()
    assert set(fbn.state_dict()) == {"weight", "bias", "running_mean", "running_var",
                                     "num_batches_tracked"}
    before = fbn.running_mean.clone()
    fbn(make_input(LAYOUTS[0], 4), LAYOUTS[0])
    assert torch.equal(before, fbn.running_mean)
    sa = ShiftAlter(4, num_branches=3)
    assert sa.weight.shape == (3, 4) and sa.weight.abs().max() < 0.01


def test_non_contiguous_input_is_made_contiguous(backend):
    layout = LAYOUTS[0]
    x = make_input(layout, 16).transpose(2, 3)  # neither NCHW nor channels_last
    p = make_params(3, 16)
    y = ops.shift_alter(x, layout, p["alter"])
    assert y.is_contiguous()
    torch.testing.assert_close(y, reference.shift_alter(x.contiguous(), layout, p["alter"]))


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


class TinyBlock(nn.Module):
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
def test_torch_compile_fullgraph(compile_backend):
    layout = FrameLayout(clips=1, frames=(2, 4), rows=(0, 1))
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


# --------------------------------------------------------------------------------------------
# which kernels ran
# --------------------------------------------------------------------------------------------


def _ran_kernels(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.mark.skipif(ffn_kernels.get_backend() == "reference",
                    reason="FFN_KERNELS_BACKEND=reference chosen explicitly")
def test_cpu_ops_run_the_compiled_kernels():
    assert ffn_kernels.backend.extension_loaded(), (
        "ffn_kernels._C is not built: install with `pip install --no-build-isolation .`")
    assert ffn_kernels.backend_name("cpu") == "cpu"
    layout = LAYOUTS[0]
    p = {k: v.requires_grad_() for k, v in make_params(3, 16).items()}
    x = make_input(layout, 16).requires_grad_()

    def step():
        h = ops.freq_batch_norm(ops.shift_alter(x, layout, p["alter"]), layout, p["weight"],
                                p["bias"], activation="relu")
        out, nxt = ops.bn_add_relu_shift_alter(h, x, layout, p["weight"], p["bias"],
                                               alter_next=p["alter"])
        (out.sum() + nxt.sum()).backward()

    names = _ran_kernels(step)
    for raw in ffn_kernels.backend.RAW_OPS:
        assert f"ffn_kernels_C::{raw}" in names, f"{raw} did not run through the C++ kernels"


# --------------------------------------------------------------------------------------------
# What autograd supports: first-order reverse mode only, and never a silent zero beyond it
# --------------------------------------------------------------------------------------------


def _first_order_cases():
    layout = FrameLayout(clips=2, frames=(2, 3), rows=(0, 1))
    p = {k: v.double().requires_grad_(k in ("weight", "bias", "alter")) for k, v in make_params(2, 8).items()}
    x = make_input(layout, 8, dtype=torch.float64).requires_grad_()
    return {
        "shift_alter": lambda: ops.shift_alter(x, layout, p["alter"]),
        "freq_batch_norm": lambda: ops.freq_batch_norm(x, layout, p["weight"], p["bias"],
                                                       activation="relu"),
        "bn_add_relu_shift_alter": lambda: ops.bn_add_relu_shift_alter(
            x, x, layout, p["weight"], p["bias"], alter_next=p["alter"])[1],
    }, x


@pytest.mark.parametrize("op", ["shift_alter", "freq_batch_norm", "bn_add_relu_shift_alter"])
def test_double_backward_and_forward_mode_raise_naming_the_op(backend, op):
    cases, x = _first_order_cases()
    y = cases[op]()
    with pytest.raises(RuntimeError, match=f"ffn_kernels::{op} is differentiable once"):
        torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    (g,) = torch.autograd.grad(cases[op]().pow(2).sum(), x)  # first order still works
    assert g.abs().sum() > 0
    with pytest.raises(RuntimeError):
        torch.func.jvp(lambda t: cases[op]() * t, (x.detach(),), (torch.ones_like(x),))


def test_module_loads_a_batchnorm2d_state_dict_into_every_row():
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
