"""The backends themselves rather than one op (docs/design.md §4): which backend runs (the choice,
its environment variable, ``python -m ffn_kernels.info``, the kernels a call reaches), the CUDA
kernels' registration (runs without a GPU: ``.ci/cuda_build.sh`` sets FFN_KERNELS_EXPECT_CUDA=1
so a missing kernel fails), and the Triton launch code: float64 refused, the traffic meter, no host
data per call, the device guard, a second GPU. The ops on each backend: tests/test_<op>.py."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import ffn_kernels
from ffn_kernels import backend as backends
from ffn_kernels import ops
from conftest import (DEVICE, FOLD_DIV, LAYOUTS, TWO_SEGMENTS, cases, check_outputs, flat,
                      load_script, make_input, make_params, on, only)

EXPECT_CUDA = os.environ.get("FFN_KERNELS_EXPECT_CUDA") == "1"

# ---------------------------------------------------------------------------------------------
# Choosing a backend, reporting it, and which kernels a call reaches
# ---------------------------------------------------------------------------------------------


def test_bad_backend_variable_fails_at_first_use_not_at_import():
    code = ("import torch, ffn_kernels\n"
            "from ffn_kernels import ops, FrameLayout\n"
            "try:\n"
            "    ops.shift_alter(torch.randn(2, 8, 2, 2), FrameLayout.single(1, 2))\n"
            "except ValueError as e:\n"
            "    print('ERR', e)\n")
    env = dict(os.environ, FFN_KERNELS_BACKEND="bogus")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ERR FFN_KERNELS_BACKEND must be one of" in out.stdout and "'bogus'" in out.stdout
    info = subprocess.run([sys.executable, "-m", "ffn_kernels.info"], env=env, capture_output=True,
                          text=True)
    assert info.returncode == 0 and "FFN_KERNELS_BACKEND" in info.stdout and "bogus" in info.stdout


def test_info_has_help_and_reports_the_environment(capsys):
    from ffn_kernels import info
    with pytest.raises(SystemExit) as exit_:
        info.main(["--help"])
    assert exit_.value.code == 0 and "bug reports" in capsys.readouterr().out
    info.main([])
    out = capsys.readouterr().out
    for label in ("Python", "OS", "CPU", "ISA", "extension built with", "backends usable here"):
        assert label in out
    if ffn_kernels.backend.extension_loaded():
        assert f"torch {torch.__version__}" in out  # what the extension was built against


@pytest.mark.cuda
def test_info_reports_kernels_and_backends(capsys):
    from ffn_kernels import info
    info.main()
    out = capsys.readouterr().out
    for label in ("torch", "triton", "extension ffn_kernels._C", "CPU kernels", "CUDA kernels",
                  "backend for cpu tensors", "backend for cuda tensors"):
        assert label in out
    lines = {line.split(" : ")[0].strip(): line.split(" : ", 1)[1] for line in out.splitlines()}
    assert lines["backend for cuda tensors"] == backends.backend_name("cuda")
    assert lines["backend for cpu tensors"] == backends.backend_name("cpu")


@pytest.mark.cuda
def test_every_raw_op_has_a_cuda_kernel():
    if not backends.extension_loaded():
        if EXPECT_CUDA:
            pytest.fail(f"ffn_kernels._C did not load: {backends._extension_error}")
        pytest.skip("ffn_kernels._C is not built; nothing to query")
    has = {op: torch._C._dispatch_has_kernel_for_dispatch_key(f"ffn_kernels::{op}", "CUDA")
           for op in backends.RAW_OPS}
    if not any(has.values()) and not EXPECT_CUDA:
        pytest.skip("ffn_kernels._C was built without CUDA kernels (CPU-only build); "
                    "set FFN_KERNELS_EXPECT_CUDA=1 to require them")
    assert all(has.values()), f"ops without a CUDA kernel: {[op for op, ok in has.items() if not ok]}"
    assert backends.extension_has_cuda()


@pytest.mark.skipif(ffn_kernels.get_backend() == "reference",
                    reason="FFN_KERNELS_BACKEND=reference chosen explicitly")
def test_auto_runs_cpu_tensors_on_the_compiled_kernels():
    assert backends.extension_loaded(), (
        "ffn_kernels._C is not built: install with `pip install --no-build-isolation .`")
    assert ffn_kernels.backend_name("cpu") == "cpu"


def _ran_kernels(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@cases()
def test_ops_run_the_chosen_backend(backend, monkeypatch):
    """Forward and backward of the public ops reach every raw op ``ffn_kernels::<raw>``,
    and its kernel is the chosen backend's: the compiled one for cpu and cuda (the Python
    kernels, which run :func:`kernels_for`, never run), the Python one, running Triton or the
    reference, otherwise."""
    layout = TWO_SEGMENTS
    p = {k: on(backend, v).requires_grad_() for k, v in make_params(2, 16).items()}
    x = on(backend, make_input(layout, 16, (3, 3))).requires_grad_()
    taps = on(backend, make_params(3, 16)["weight"].t().contiguous()).requires_grad_()  # [C, 3]
    assert ffn_kernels.backend_name(x.device) == backend
    expected = {"reference": "ffn_kernels.reference", "triton": "ffn_kernels.triton"}
    assert getattr(backends.kernels_for(x), "__name__", "compiled") == expected.get(backend,
                                                                                    "compiled")
    in_python = []
    kernels_for = backends.kernels_for

    def spy(t):
        module = kernels_for(t)
        return type("Spy", (), {n: (lambda *a, _n=n: in_python.append(_n) or getattr(module, _n)(*a))
                                for n in backends.RAW_OPS})

    monkeypatch.setattr(backends, "kernels_for", spy)

    def step():
        h = ops.freq_batch_norm(ops.shift_alter(x, layout, p["alter"]), layout, p["weight"],
                                p["bias"], activation="relu")
        out, nxt = ops.bn_add_relu_shift_alter(h, x, layout, p["weight"], p["bias"],
                                               alter_next=p["alter"])
        out = ops.temporal_conv(out, layout, taps)
        out, _ = ops.freq_layer_norm(out.permute(0, 2, 3, 1), layout, p["weight"], p["bias"],
                                     residual=nxt.permute(0, 2, 3, 1))  # pixels as tokens
        out.sum().backward()

    names = _ran_kernels(step)
    for raw in backends.RAW_OPS:
        assert f"ffn_kernels::{raw}" in names, f"{raw} did not run"
        if backend in ("cpu", "cuda"):
            assert raw not in in_python, f"{raw} ran through the Python kernels"
        else:
            assert raw in in_python, f"{raw} did not run through the Python kernels"


# ---------------------------------------------------------------------------------------------
# The Triton launch code (ffn_kernels/triton/common.py)
# ---------------------------------------------------------------------------------------------

TRITON_DEVICE = DEVICE["triton"]


def _triton_params(channels, rows=3):
    return {k: v.to(TRITON_DEVICE) for k, v in make_params(rows, channels).items()}


def _triton_input(layout, channels, channels_last=False, seed=0):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return make_input(layout, channels, (3, 5), memory_format=fmt, seed=seed).to(TRITON_DEVICE)


@only("triton")
def test_triton_refuses_float64():
    import ffn_kernels.triton as tk
    x = torch.zeros(4, 8, 2, 2, dtype=torch.float64, device=TRITON_DEVICE)
    with pytest.raises(TypeError, match="float64"):
        tk.shift_alter_fwd(x, 1, [4], [0], None, 8)


@only("triton")
@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="the traffic meter runs the Triton interpreter")
def test_triton_traffic_meter():
    import ffn_kernels.triton as tk
    traffic = load_script("bench/triton_traffic.py")  # the benchmark's traffic meter
    layout = LAYOUTS[0]
    x = _triton_input(layout, 16)
    with traffic.meter() as m:
        y = tk.shift_alter_fwd(x, *flat(layout), None, 8)
    # the shift scatters: every element of x is read once and every element of y written once;
    # the rest of the reads is the small int32 layout table
    assert m.written == y.numel() * y.element_size()
    assert 0 < m.read - x.numel() * x.element_size() < 0.01 * x.numel() * x.element_size()
    table = traffic.report(clips=1, frames=(2, 3), channels=16, hw=(3, 4))
    assert {row["op"] for row in table} == {"shift_alter", "freq_batch_norm", "bn_add_relu_shift_alter",
                                            "temporal_conv", "freq_layer_norm"}
    for row in table:
        assert row["measured"] >= row["minimum"] * 0.9


@pytest.mark.skipif(not backends.extension_loaded(), reason="needs ffn_kernels._C")
def test_bench_op_passes_run_on_the_compiled_kernels():
    """The roofline section's passes (bench/op_passes.py) call the compiled raw ops as the traffic
    meter calls Triton's: every op, both passes, training and eval, in both memory formats."""
    op_passes = load_script("bench/op_passes.py").op_passes
    for channels_last in (False, True):
        passes = op_passes(backends._compiled(), 1, [2, 3], (5, 16, 3, 4), channels_last=channels_last)
        assert len({(p.op, p.pass_, p.mode) for p in passes}) == len(passes) == 14
        for p in passes:
            outs = p()
            first = outs[0] if isinstance(outs, (tuple, list)) else outs
            assert first.shape == p.args[0].shape and torch.isfinite(first).all()


# what a tensor built from host data (torch.tensor, as_tensor of a list, .to(device) of a fresh
# CPU tensor) or a read back to the host (.item(), .tolist()) dispatches to
_HOST_OPS = ("aten.lift_fresh", "aten.lift_fresh_copy", "aten.scalar_tensor", "aten._to_copy",
             "aten._local_scalar_dense")


def _triton_training_step(layout, x, dy, p, momentum):
    """Training forward and backward of the three ops through the raw Triton API."""
    import ffn_kernels.triton as tk
    layout = flat(layout)
    w, b, rm, rv, alter = (p[k] for k in ("weight", "bias", "running_mean", "running_var", "alter"))
    tk.shift_alter_fwd(x, *layout, alter, 8)
    tk.shift_alter_bwd(dy, x, *layout, alter, 8, True)
    y, mean, invstd, *_ = tk.freq_batch_norm_fwd(x, *layout, w, b, rm, rv, True, momentum, 1e-5,
                                                 True, dy)
    tk.freq_batch_norm_bwd(dy, x, y, *layout, w, mean, invstd, True, True, True)
    out, _, mean, invstd, *_ = tk.bn_add_relu_shift_alter_fwd(x, dy, *layout, w, b, rm, rv, True,
                                                              momentum, 1e-5, alter, 8)
    tk.bn_add_relu_shift_alter_bwd(dy, dy, x, out, *layout, w, mean, invstd, True, alter, 8)


@only("triton")
def test_triton_no_host_data_per_call():
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
    x = _triton_input(layout, 16)
    dy = _triton_input(layout, 16, seed=2)
    p = _triton_params(16)
    _triton_training_step(layout, x, dy, p, [0.1, 0.2])
    if TRITON_DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        with Spy() as spy:
            _triton_training_step(layout, x, dy, p, [0.5, 0.25])
    finally:
        if TRITON_DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert spy.seen == []


@only("triton")
def test_triton_device_guard(monkeypatch):
    """Every entry point launches with its input's device current. CPU tensors take no guard in
    production; here CPU is declared a guarded device type and the guard records the device and
    whether each kernel launch happens inside it."""
    import contextlib

    from ffn_kernels.triton import common
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

    monkeypatch.setattr(common, "_GUARDED", (torch.device(TRITON_DEVICE).type,))
    monkeypatch.setattr(common, "_device_guard", guard)
    for name in ("_stats_kernel", "_stats_combine_kernel", "_fwd_kernel", "_bwd_kernel",
                 "_sum_combine_kernel"):
        monkeypatch.setattr(K, name, Launch(getattr(K, name)))
    layout = LAYOUTS[2]
    x = _triton_input(layout, 16, channels_last=True)
    _triton_training_step(layout, x, x.clone(), _triton_params(16), [0.1, 0.2])
    assert entered == [x.device, None] * 6  # one guard per entry point, with x's device
    assert launches and all(launches)


@only("triton")
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_triton_second_gpu():
    """Inputs on ``cuda:1`` while ``cuda:0`` is current: same results as the reference there."""
    import ffn_kernels.triton as tk
    from ffn_kernels import reference as ref
    layout = LAYOUTS[0]
    with torch.cuda.device(0):
        x = _triton_input(layout, 20, channels_last=True).to("cuda:1")
        res = _triton_input(layout, 20, channels_last=True, seed=3).to("cuda:1")
        p = {k: v.to("cuda:1") for k, v in _triton_params(20).items()}
        args = (*flat(layout), p["weight"], p["bias"], p["running_mean"], p["running_var"], True,
                [0.1, 0.3, 0.05], 1e-5, p["alter"], 8)
        check_outputs(tk.bn_add_relu_shift_alter_fwd(x, res, *args),
                      ref.bn_add_relu_shift_alter_fwd(x, res, *args), torch.float32, "triton",
                      param_outputs=(2, 3, 4, 5))


# ---------------------------------------------------------------------------------------------
# The conventions every backend keeps (csrc/conventions.h, ffn_kernels/validation.py)
# ---------------------------------------------------------------------------------------------

ALL_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
              "float64": torch.float64}


def _unused_outputs(kernels, x, acc):
    """The outputs that a call of each raw op does not produce, with the dtype each has when it
    is produced: ``[(what, tensor, dtype)]``."""
    layout = TWO_SEGMENTS
    p = {k: v.to(device=x.device, dtype=acc) for k, v in make_params(2, x.shape[1]).items()}
    w, b = p["weight"], p["bias"]
    _, dalter = kernels.shift_alter_bwd(x, x, *flat(layout), None, FOLD_DIV, False)
    _, dalter_frozen = kernels.shift_alter_bwd(x, x, *flat(layout), p["alter"], FOLD_DIV, False)
    y, mean, invstd, rm, rv = kernels.freq_batch_norm_fwd(
        x, *flat(layout), w, b, None, None, True, [0.1, 0.1], 1e-5, False, None)
    dres = kernels.freq_batch_norm_bwd(x, x, y, *flat(layout), w, mean, invstd, True, False,
                                       False)[3]
    out, _, mean, invstd, _, _ = kernels.bn_add_relu_shift_alter_fwd(
        x, x, *flat(layout), w, b, None, None, True, [0.1, 0.1], 1e-5, None, FOLD_DIV)
    dalter_next = kernels.bn_add_relu_shift_alter_bwd(x, x, x, out, *flat(layout), w, mean,
                                                      invstd, True, None, FOLD_DIV)[4]
    return [("shift_alter_bwd d alter without alter", dalter, acc),
            ("shift_alter_bwd d alter with alter_grad=False", dalter_frozen, acc),
            ("freq_batch_norm_fwd new_running_mean", rm, acc),
            ("freq_batch_norm_fwd new_running_var", rv, acc),
            ("freq_batch_norm_bwd dresidual", dres, x.dtype),
            ("bn_add_relu_shift_alter_bwd d alter_next", dalter_next, acc)]


@cases(dtype=ALL_DTYPES, keep=lambda backend, dtype: not (backend == "triton"
                                                         and dtype == torch.float64))
def test_an_unused_output_is_empty_in_the_dtype_it_has_when_produced(backend, dtype):
    """docs/design.md §3.4: per-row outputs (d alter, running statistics) in the acc dtype,
    activations (dresidual) in the input's dtype, on every backend."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = on(backend, make_input(TWO_SEGMENTS, 16, (3, 3), dtype))
    for what, t, want in _unused_outputs(backends.kernels_for(x), x, acc):
        assert t.numel() == 0 and t.dtype == want, f"{backend} {what}: {t.dtype}{tuple(t.shape)}"


@pytest.mark.skipif(not backends.extension_loaded(), reason="needs ffn_kernels._C")
@pytest.mark.parametrize("dtype", ALL_DTYPES.values(), ids=ALL_DTYPES.keys())
def test_meta_kernels_give_unused_outputs_the_same_dtype(dtype):
    """The Meta kernels of the public forward and backward ops (what torch.compile traces)
    follow the same rule."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    public = SimpleNamespace(**{raw: getattr(torch.ops.ffn_kernels, raw.replace(
        "_fwd", "").replace("_bwd", "_backward")) for raw in backends.RAW_OPS})
    x = make_input(TWO_SEGMENTS, 16, (3, 3), dtype).to("meta")
    for what, t, want in _unused_outputs(public, x, acc):
        assert t.numel() == 0 and t.dtype == want, f"meta {what}: {t.dtype}{tuple(t.shape)}"
