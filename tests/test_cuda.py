"""The CUDA backend (csrc/cuda/): registration of every raw op for CUDA tensors, and, on a machine
with a GPU, every raw op against the reference (values, gradient outputs, running statistics,
memory formats, dtypes, unequal segments, multi-chunk reductions, determinism).

Without a GPU only the registration test can run, and only in a build with CUDA kernels:
`.ci/cuda_build.sh` builds one and sets FFN_KERNELS_EXPECT_CUDA=1 so a missing kernel fails.
"""

import os

import pytest
import torch

from ffn_kernels import FrameLayout, backend, reference
from conftest import LAYOUTS, make_input, make_params

EXPECT_CUDA = os.environ.get("FFN_KERNELS_EXPECT_CUDA") == "1"
HAS_GPU = torch.cuda.is_available()
requires_gpu = pytest.mark.skipif(
    not HAS_GPU or not backend.extension_has_cuda(),
    reason="needs a CUDA device and an extension built with CUDA kernels "
    f"(cuda available: {HAS_GPU}); the kernels are only compiled and registered here",
)


def test_every_raw_op_has_a_cuda_kernel():
    if not backend.extension_loaded():
        if EXPECT_CUDA:
            pytest.fail(f"ffn_kernels._C did not load: {backend._extension_error}")
        pytest.skip("ffn_kernels._C is not built; nothing to query")
    has = {op: torch._C._dispatch_has_kernel_for_dispatch_key(f"ffn_kernels_C::{op}", "CUDA")
           for op in backend.RAW_OPS}
    if not any(has.values()) and not EXPECT_CUDA:
        pytest.skip("ffn_kernels._C was built without CUDA kernels (CPU-only build); "
                    "set FFN_KERNELS_EXPECT_CUDA=1 to require them")
    assert all(has.values()), f"ops without a CUDA kernel: {[op for op, ok in has.items() if not ok]}"
    assert backend.extension_has_cuda()


def test_info_reports_kernels_and_backends(capsys):
    from ffn_kernels import info
    info.main()
    out = capsys.readouterr().out
    for label in ("torch", "triton", "extension ffn_kernels._C", "CPU kernels", "CUDA kernels",
                  "backend for cpu tensors", "backend for cuda tensors"):
        assert label in out
    lines = {line.split(" : ")[0].strip(): line.split(" : ", 1)[1] for line in out.splitlines()}
    assert lines["backend for cuda tensors"] == backend.backend_name("cuda")
    assert lines["backend for cpu tensors"] == backend.backend_name("cpu")


# ---------------------------------------------------------------------------------------------
# GPU: raw ops against the reference (run on CPU copies of the same inputs)
# ---------------------------------------------------------------------------------------------

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-9),
       torch.bfloat16: dict(rtol=2e-2, atol=3e-2), torch.float16: dict(rtol=2e-3, atol=3e-3)}
# parameter gradients sum many products: looser
PARAM_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-8, atol=1e-8),
             torch.bfloat16: dict(rtol=3e-2, atol=0.5), torch.float16: dict(rtol=1e-2, atol=5e-2)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# (layout, channels, spatial): vectors spanning channels/shift folds (C=16), no vectorization
# (C*H*W = 54), fold-aligned vectors (C=64), one segment on a high row, and a shape whose
# reductions split every segment into several chunks (one of them partial).
CASES = [
    (LAYOUTS[0], 16, (7, 5)),
    (LAYOUTS[1], 6, (3, 3)),
    (LAYOUTS[2], 64, (4, 4)),
    (LAYOUTS[3], 24, (5, 5)),
    (FrameLayout(clips=4, frames=(4, 8, 16), rows=(2, 0, 1)), 32, (28, 28)),
]
CASE_IDS = ["unequal3", "odd", "fold-aligned", "single-high-row", "multi-chunk"]


def _flat(layout):
    return layout.clips, list(layout.frames), list(layout.rows)


def _cuda(v):
    return v.cuda() if isinstance(v, torch.Tensor) else v


def _run(name, *args):
    """(reference on CPU, CUDA kernel) results of raw op `name`, as tuples."""
    ref = getattr(reference, name)(*args)
    got = getattr(torch.ops.ffn_kernels_C, name)(*[_cuda(a) for a in args])
    ref, got = (ref if isinstance(ref, tuple) else (ref,)), (got if isinstance(got, tuple) else (got,))
    assert len(ref) == len(got)
    return ref, got


def _check(ref, got, dtype, param_outputs=(), what=""):
    for i, (r, g) in enumerate(zip(ref, got)):
        label = f"{what} output {i}"
        assert g.is_cuda, label
        assert g.dtype == r.dtype and g.shape == r.shape, f"{label}: {g.dtype}{tuple(g.shape)} vs {r.dtype}{tuple(r.shape)}"
        if r.dim() == 4:
            assert g.is_contiguous(memory_format=torch.channels_last) == r.is_contiguous(
                memory_format=torch.channels_last), f"{label}: memory format"
        tol = (PARAM_TOL if i in param_outputs else TOL)[dtype]
        torch.testing.assert_close(g.cpu(), r, **tol, msg=lambda m: f"{label}: {m}")


def _params(rows, channels, dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return {k: v.to(acc) for k, v in make_params(rows, channels).items()}


@requires_gpu
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("with_alter", [True, False], ids=["alter", "shift"])
def test_shift_alter(case, dtype, channels_last, with_alter):
    layout, C, hw = case
    p = _params(4, C, dtype)
    alter = p["alter"] if with_alter else None
    x = make_input(layout, C, hw, dtype, channels_last)
    dy = make_input(layout, C, hw, dtype, channels_last, seed=3)
    ref, got = _run("shift_alter_fwd", x, *_flat(layout), alter, 8)
    _check(ref, got, dtype, what="shift_alter_fwd")
    for alter_grad in ([True, False] if with_alter else [False]):
        ref, got = _run("shift_alter_bwd", dy, x, *_flat(layout), alter, 8, alter_grad)
        _check(ref, got, dtype, param_outputs=(1,), what=f"shift_alter_bwd(alter_grad={alter_grad})")


@requires_gpu
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training,running", [(True, True), (False, True), (True, False)],
                         ids=["train", "eval", "train-nostats"])
@pytest.mark.parametrize("relu,residual", [(True, True), (False, False), (True, False)],
                         ids=["relu-res", "plain", "relu"])
def test_bn(case, dtype, channels_last, training, running, relu, residual):
    layout, C, hw = case
    p = _params(4, C, dtype)
    x = make_input(layout, C, hw, dtype, channels_last)
    res = make_input(layout, C, hw, dtype, channels_last, seed=9) if residual else None
    rm, rv = (p["running_mean"], p["running_var"]) if running else (None, None)
    momentum = [0.1 + 0.1 * s for s in range(layout.num_segments)]
    rm_before = rm.clone() if running else None
    ref, got = _run("freq_batch_norm_fwd", x, *_flat(layout), p["weight"], p["bias"], rm, rv, training,
                    momentum, 1e-3, relu, res)
    _check(ref, got, dtype, param_outputs=(1, 2, 3, 4), what="freq_batch_norm_fwd")
    if running:
        assert torch.equal(rm, rm_before), "freq_batch_norm_fwd must not modify running_mean in place"
    y, mean, invstd = ref[0], ref[1], ref[2]
    dy = make_input(layout, C, hw, dtype, channels_last, seed=4)
    ref, got = _run("freq_batch_norm_bwd", dy, x, y, *_flat(layout), p["weight"], mean, invstd, training, relu,
                    residual)
    _check(ref, got, dtype, param_outputs=(1, 2), what="freq_batch_norm_bwd")


@requires_gpu
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_alter", [True, False], ids=["alter", "shift"])
def test_bnrs(case, dtype, channels_last, training, with_alter):
    layout, C, hw = case
    p = _params(4, C, dtype)
    alter = p["alter"] if with_alter else None
    z = make_input(layout, C, hw, dtype, channels_last)
    identity = make_input(layout, C, hw, dtype, channels_last, seed=9)
    momentum = [0.1] * layout.num_segments
    ref, got = _run("bn_add_relu_shift_alter_fwd", z, identity, *_flat(layout), p["weight"], p["bias"],
                    p["running_mean"], p["running_var"], training, momentum, 1e-5, alter, 8)
    _check(ref, got, dtype, param_outputs=(2, 3, 4, 5), what="bn_add_relu_shift_alter_fwd")
    out, mean, invstd = ref[0], ref[2], ref[3]
    dout = make_input(layout, C, hw, dtype, channels_last, seed=5)
    dnext = make_input(layout, C, hw, dtype, channels_last, seed=6)
    ref, got = _run("bn_add_relu_shift_alter_bwd", dout, dnext, z, out, *_flat(layout), p["weight"], mean, invstd,
                    training, alter, 8)
    _check(ref, got, dtype, param_outputs=(2, 3, 4), what="bn_add_relu_shift_alter_bwd")


@requires_gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_repeated_rows(channels_last):
    """A row used by two segments (eval, or no running statistics): parameter gradients are the
    sum over those segments, as in the reference (and autograd) and the CPU kernels."""
    layout = FrameLayout(clips=2, frames=(2, 3), rows=(1, 1))
    p = _params(3, 16, torch.float32)
    x = make_input(layout, 16, (3, 3), torch.float32, channels_last)
    dy = make_input(layout, 16, (3, 3), torch.float32, channels_last, seed=2)
    for training, rm, rv in ((True, None, None), (False, p["running_mean"], p["running_var"])):
        ref, got = _run("freq_batch_norm_fwd", x, *_flat(layout), p["weight"], p["bias"], rm, rv, training,
                        [0.1, 0.1], 1e-5, True, None)
        _check(ref, got, torch.float32, param_outputs=(1, 2, 3, 4), what="freq_batch_norm_fwd")
        ref, got = _run("freq_batch_norm_bwd", dy, x, ref[0], *_flat(layout), p["weight"], ref[1], ref[2],
                        training, True, False)
        _check(ref, got, torch.float32, param_outputs=(1, 2), what="freq_batch_norm_bwd")
    ref, got = _run("shift_alter_bwd", dy, x, *_flat(layout), p["alter"], 8, True)
    _check(ref, got, torch.float32, param_outputs=(1,), what="shift_alter_bwd")


@requires_gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_backward_is_deterministic(channels_last):
    layout, C, hw = CASES[-1]
    p = _params(4, C, torch.float32)
    args = [_cuda(t) for t in (make_input(layout, C, hw, torch.float32, channels_last, seed=s)
                               for s in (5, 6, 7))]
    out = torch.relu(args[2])
    mean = torch.zeros(layout.num_segments, C, device="cuda")
    invstd = torch.ones_like(mean)
    runs = [torch.ops.ffn_kernels_C.bn_add_relu_shift_alter_bwd(args[0], args[1], args[2], out, *_flat(layout),
                                             p["weight"].cuda(), mean, invstd, True,
                                             p["alter"].cuda(), 8) for _ in range(3)]
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


@requires_gpu
def test_public_ops_run_on_the_cuda_backend():
    """The differentiable ops pick the CUDA kernels for CUDA tensors and match the reference."""
    from ffn_kernels import ops
    layout, C, hw = CASES[0]
    p = {k: v.cuda() for k, v in make_params(3, C).items()}
    x = make_input(layout, C, hw).cuda().requires_grad_()
    assert backend.backend_name(x.device) == "cuda"
    y = ops.freq_batch_norm(x, layout, p["weight"], p["bias"], p["running_mean"].clone(),
                            p["running_var"].clone(), True, 0.1, 1e-5, "relu")
    y.sum().backward()
    xr = x.detach().cpu().requires_grad_()
    yr = reference.freq_batch_norm(xr, layout, p["weight"].cpu(), p["bias"].cpu(),
                                   p["running_mean"].cpu().clone(), p["running_var"].cpu().clone(),
                                   True, 0.1, 1e-5, "relu")
    yr.sum().backward()
    torch.testing.assert_close(y.detach().cpu(), yr.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.cpu(), xr.grad, rtol=1e-4, atol=1e-4)
