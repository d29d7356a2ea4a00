"""The Triton backend's raw API against the reference's (values, every gradient output, statistics,
running statistics, memory formats, dtypes) and the interpreter traffic meter.

Without a CUDA GPU the kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set here before
Triton is imported), so shapes stay tiny."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import ffn_kernels.triton as tk  # noqa: E402
import ffn_kernels.triton as api  # noqa: E402
from ffn_kernels.triton import common, traffic  # noqa: E402
from ffn_kernels import reference as ref  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
P = 3  # parameter rows
# (clips, frames, rows): unequal segments, frame counts 1..20, permuted rows, one segment on a high row
LAYOUTS = [
    (2, [4, 8, 16], [0, 1, 2]),
    (1, [1, 3, 20], [2, 0, 1]),
    (3, [2, 5], [1, 0]),
    (2, [12], [2]),
]
IDS = ["4-8-16", "1-3-20", "2-5", "12"]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=5e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=5e-2)}
# parameter gradients sum many products (and, for bf16, low-precision intermediates of the reference)
PARAM_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=5e-2),
             torch.bfloat16: dict(rtol=3e-2, atol=0.5)}


def _input(layout, channels, dtype, channels_last, hw=(3, 5), seed=0, scale=2.0, shift=0.5):
    clips, frames, _ = layout
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(clips * sum(frames), channels, *hw, generator=g) * scale + shift
    x = x.to(device=DEVICE, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _params(channels, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = dict(
        weight=1 + 0.5 * torch.randn(P, channels, generator=g),
        bias=0.5 * torch.randn(P, channels, generator=g),
        running_mean=0.1 * torch.randn(P, channels, generator=g),
        running_var=0.5 + torch.rand(P, channels, generator=g),
        alter=0.3 * torch.randn(P, channels, generator=g),
    )
    return {k: v.to(DEVICE) for k, v in out.items()}


def _check(outs, ref_outs, dtype, param_outputs=()):
    """Same dtype, shape, memory format and values (``param_outputs``: indices of float32 [P, C]
    parameter gradients or statistics, compared with their own tolerance)."""
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert o.dtype == r.dtype and o.shape == r.shape, (i, o.dtype, r.dtype, o.shape, r.shape)
        assert o.is_contiguous() == r.is_contiguous(), i
        assert o.is_contiguous(memory_format=torch.channels_last) == r.is_contiguous(
            memory_format=torch.channels_last), i
        tol = PARAM_TOL[dtype] if i in param_outputs else TOL[dtype]
        torch.testing.assert_close(o.float(), r.float(), **tol, msg=lambda m: f"output {i}: {m}")


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("with_alter", [False, True], ids=["shift", "alter"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_shift_alter(layout, channels_last, with_alter, dtype):
    x = _input(layout, 20, dtype, channels_last)
    dy = _input(layout, 20, dtype, channels_last, seed=2)
    alter = _params(20)["alter"] if with_alter else None
    args = (*layout, alter, 8)
    _check([tk.shift_alter_fwd(x, *args)], [ref.shift_alter_fwd(x, *args)], dtype)
    for alter_grad in ([False, True] if with_alter else [False]):
        _check(tk.shift_alter_bwd(dy, x, *args, alter_grad),
               ref.shift_alter_bwd(dy, x, *args, alter_grad), dtype, param_outputs=(1,))


# (relu, residual): plain BN, BN+ReLU, BN+residual+ReLU (the last block of a network); bf16 only
# on the last, which uses every part of the kernels (keeps the interpreted run short)
BN_CASES = [
    pytest.param(False, False, torch.float32, id="bn-f32"),
    pytest.param(True, False, torch.float32, id="relu-f32"),
    pytest.param(True, True, torch.float32, id="res-relu-f32"),
    pytest.param(True, True, torch.bfloat16, id="res-relu-bf16"),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu,with_res,dtype", BN_CASES)
def test_bn(layout, channels_last, training, relu, with_res, dtype):
    x = _input(layout, 20, dtype, channels_last)
    res = _input(layout, 20, dtype, channels_last, seed=3) if with_res else None
    dy = _input(layout, 20, dtype, channels_last, seed=2, scale=1.0, shift=0.0)
    p = _params(20)
    momentum = [0.1, 0.3, 0.05][: len(layout[1])]
    fwd_args = (*layout, p["weight"], p["bias"], p["running_mean"], p["running_var"], training,
                momentum, 1e-5, relu, res)
    out, ref_out = tk.freq_batch_norm_fwd(x, *fwd_args), ref.freq_batch_norm_fwd(x, *fwd_args)
    _check(out, ref_out, dtype, param_outputs=(1, 2, 3, 4))
    y, mean, invstd = ref_out[:3]
    bwd_args = (*layout, p["weight"], mean, invstd, training, relu, with_res)
    _check(tk.freq_batch_norm_bwd(dy, x, y, *bwd_args), ref.freq_batch_norm_bwd(dy, x, y, *bwd_args), dtype,
           param_outputs=(1, 2))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_bn_without_running_stats(channels_last):
    """No running statistics: batch statistics even when ``training=False``, empty new stats."""
    layout = LAYOUTS[2]
    x = _input(layout, 12, torch.float32, channels_last)
    p = _params(12)
    for training in (True, False):
        args = (*layout, p["weight"], p["bias"], None, None, training, [0.1, 0.1], 1e-5, False, None)
        _check(tk.freq_batch_norm_fwd(x, *args), ref.freq_batch_norm_fwd(x, *args), torch.float32)


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_alter,dtype", [
    pytest.param(False, torch.float32, id="shift-f32"),
    pytest.param(True, torch.float32, id="alter-f32"),
    pytest.param(True, torch.bfloat16, id="alter-bf16"),
])
def test_bnrs(layout, channels_last, training, with_alter, dtype):
    _check_bnrs(layout, 16, dtype, channels_last, training, with_alter)


def _check_bnrs(layout, channels, dtype, channels_last, training, with_alter):
    """bnrs forward (outputs, statistics, running statistics) and backward (every gradient)."""
    z = _input(layout, channels, dtype, channels_last)
    identity = _input(layout, channels, dtype, channels_last, seed=3)
    dout = _input(layout, channels, dtype, channels_last, seed=4, scale=1.0, shift=0.0)
    dnext = _input(layout, channels, dtype, channels_last, seed=5, scale=1.0, shift=0.0)
    p = _params(channels)
    alter = p["alter"] if with_alter else None
    momentum = [0.1, 0.3, 0.05][: len(layout[1])]
    fwd_args = (*layout, p["weight"], p["bias"], p["running_mean"], p["running_var"], training,
                momentum, 1e-5, alter, 8)
    ref_out = ref.bn_add_relu_shift_alter_fwd(z, identity, *fwd_args)
    _check(tk.bn_add_relu_shift_alter_fwd(z, identity, *fwd_args), ref_out, dtype, param_outputs=(2, 3, 4, 5))
    y, mean, invstd = ref_out[0], ref_out[2], ref_out[3]
    bwd_args = (*layout, p["weight"], mean, invstd, training, alter, 8)
    _check(tk.bn_add_relu_shift_alter_bwd(dout, dnext, z, y, *bwd_args), ref.bn_add_relu_shift_alter_bwd(dout, dnext, z, y, *bwd_args),
           dtype, param_outputs=(2, 3, 4))


@pytest.mark.parametrize("layout", LAYOUTS[1:], ids=IDS[1:])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_small_tiles(monkeypatch, layout, channels_last):
    """Tiles and chunks shrunk so the tiny shapes span several channel blocks, pixel blocks and
    frame chunks per segment (chunks not aligned to clips): masking and the cross-chunk combine."""
    monkeypatch.setattr(common, "_TILE", 256)
    monkeypatch.setattr(common, "_CHUNK", 1024)
    for training in (True, False):
        _check_bnrs(layout, 20, torch.float32, channels_last, training, True)


def test_repeated_rows():
    """A row used by two segments (allowed without running statistics, and in eval): parameter
    gradients are the sum over those segments, as in the reference (and autograd)."""
    layout = (2, [2, 3], [1, 1])
    x = _input(layout, 12, torch.float32, True)
    dy = _input(layout, 12, torch.float32, True, seed=2)
    p = _params(12)
    for training, rm, rv in ((True, None, None), (False, p["running_mean"], p["running_var"])):
        args = (*layout, p["weight"], p["bias"], rm, rv, training, [0.1, 0.1], 1e-5, True, None)
        ref_out = ref.freq_batch_norm_fwd(x, *args)
        _check(tk.freq_batch_norm_fwd(x, *args), ref_out, torch.float32)
        bwd_args = (*layout, p["weight"], ref_out[1], ref_out[2], training, True, False)
        _check(tk.freq_batch_norm_bwd(dy, x, ref_out[0], *bwd_args), ref.freq_batch_norm_bwd(dy, x, ref_out[0], *bwd_args),
               torch.float32, param_outputs=(1, 2))
    sa_args = (*layout, p["alter"], 8, True)
    _check(tk.shift_alter_bwd(dy, x, *sa_args), ref.shift_alter_bwd(dy, x, *sa_args),
           torch.float32, param_outputs=(1,))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_float16(channels_last):
    _check_bnrs(LAYOUTS[2], 16, torch.float16, channels_last, True, True)


def test_float64_rejected():
    x = torch.zeros(4, 8, 2, 2, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        tk.shift_alter_fwd(x, 1, [4], [0], None, 8)


@pytest.mark.skipif(DEVICE != "cpu", reason="the traffic meter runs the Triton interpreter")
def test_traffic_meter():
    layout = LAYOUTS[0]
    x = _input(layout, 16, torch.float32, False)
    with traffic.meter() as m:
        y = tk.shift_alter_fwd(x, *layout, None, 8)
    # the shift scatters: every element of x is read once and every element of y written once;
    # the rest of the reads is the small int32 layout table
    assert m.written == y.numel() * y.element_size()
    assert 0 < m.read - x.numel() * x.element_size() < 0.01 * x.numel() * x.element_size()
    table = traffic.report(clips=1, frames=(2, 3), channels=16, hw=(3, 4))
    assert {row["op"] for row in table} == {"shift_alter", "freq_batch_norm", "bn_add_relu_shift_alter"}
    for row in table:
        assert row["measured"] >= row["minimum"] * 0.9


def test_many_segments_momentum():
    """More segments than momenta per statistics-combine launch (8): each segment blends its
    running statistics with its own momentum."""
    frames = list(range(1, 11))
    layout = (1, frames, list(range(9, -1, -1)))
    x = _input(layout, 8, torch.float32, False, hw=(2, 3))
    g = torch.Generator().manual_seed(1)
    rm = (0.1 * torch.randn(10, 8, generator=g)).to(DEVICE)
    rv = (0.5 + torch.rand(10, 8, generator=g)).to(DEVICE)
    w, b = torch.ones(10, 8, device=DEVICE), torch.zeros(10, 8, device=DEVICE)
    momentum = [0.05 * (i + 1) for i in range(10)]
    args = (*layout, w, b, rm, rv, True, momentum, 1e-5, False, None)
    _check(tk.freq_batch_norm_fwd(x, *args), ref.freq_batch_norm_fwd(x, *args), torch.float32, param_outputs=(1, 2, 3, 4))


# what a tensor built from host data (torch.tensor, as_tensor of a list, .to(device) of a fresh
# CPU tensor) or a read back to the host (.item(), .tolist()) dispatches to
_HOST_OPS = ("aten.lift_fresh", "aten.lift_fresh_copy", "aten.scalar_tensor", "aten._to_copy",
             "aten._local_scalar_dense")


def _training_step(layout, x, dy, p, momentum):
    """Training forward and backward of the three ops through the raw Triton API."""
    w, b, rm, rv, alter = (p[k] for k in ("weight", "bias", "running_mean", "running_var", "alter"))
    y = tk.shift_alter_fwd(x, *layout, alter, 8)
    tk.shift_alter_bwd(dy, x, *layout, alter, 8, True)
    y, mean, invstd, *_ = tk.freq_batch_norm_fwd(x, *layout, w, b, rm, rv, True, momentum, 1e-5, True, dy)
    tk.freq_batch_norm_bwd(dy, x, y, *layout, w, mean, invstd, True, True, True)
    out, _, mean, invstd, *_ = tk.bn_add_relu_shift_alter_fwd(x, dy, *layout, w, b, rm, rv, True, momentum, 1e-5,
                                           alter, 8)
    tk.bn_add_relu_shift_alter_bwd(dy, dy, x, out, *layout, w, mean, invstd, True, alter, 8)


def test_no_host_data_per_call():
    """After a first call (which builds the cached layout table), a training forward and backward
    creates no device tensor from Python values and reads nothing back to the host: no blocking
    copy per call, nothing that breaks CUDA-graph capture. Momenta change between the calls
    (as with ``momentum=None``'s cumulative average) and must not need a new tensor either."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Spy(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func.overloadpacket) in _HOST_OPS:
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    layout = LAYOUTS[2]
    x = _input(layout, 16, torch.float32, False)
    dy = _input(layout, 16, torch.float32, False, seed=2)
    p = _params(16)
    _training_step(layout, x, dy, p, [0.1, 0.2])
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        with Spy() as spy:
            _training_step(layout, x, dy, p, [0.5, 0.25])
    finally:
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert spy.seen == []


def test_device_guard(monkeypatch):
    """Every entry point launches with its input's device current. CPU tensors take no guard in
    production; here CPU is declared a guarded device type and the guard records the device and
    whether each kernel launch happens inside it."""
    import contextlib

    from ffn_kernels.triton import kernels as K

    entered, launches = [], []

    @contextlib.contextmanager
    def guard(device):
        entered.append(device)
        try:
            yield
        finally:
            entered.append(None)

    class Launch:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(bool(entered) and entered[-1] is not None)
            return self.kernel[grid]

    monkeypatch.setattr(common, "_GUARDED", (torch.device(DEVICE).type,))
    monkeypatch.setattr(common, "_device_guard", guard)
    for name in ("_stats_kernel", "_stats_combine_kernel", "_fwd_kernel", "_bwd_kernel",
                 "_sum_combine_kernel"):
        monkeypatch.setattr(K, name, Launch(getattr(K, name)))
    layout = LAYOUTS[2]
    x = _input(layout, 16, torch.float32, True)
    _training_step(layout, x, x.clone(), _params(16), [0.1, 0.2])
    assert entered == [x.device, None] * 6  # one guard per entry point, with x's device
    assert launches and all(launches)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_gpu():
    """Inputs on ``cuda:1`` while ``cuda:0`` is current: same results as the reference there."""
    layout = LAYOUTS[0]
    with torch.cuda.device(0):
        x = _input(layout, 20, torch.float32, True).to("cuda:1")
        res = _input(layout, 20, torch.float32, True, seed=3).to("cuda:1")
        p = {k: v.to("cuda:1") for k, v in _params(20).items()}
        args = (*layout, p["weight"], p["bias"], p["running_mean"], p["running_var"], True,
                [0.1, 0.3, 0.05], 1e-5, p["alter"], 8)
        _check(tk.bn_add_relu_shift_alter_fwd(x, res, *args), ref.bn_add_relu_shift_alter_fwd(x, res, *args), torch.float32,
               param_outputs=(2, 3, 4, 5))
