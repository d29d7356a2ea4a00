"""What the tests share: the backends and how a test runs on each, the packed layouts and shapes,
inputs, tolerances, the comparisons against the reference, and the official FFN structure.

Every op has its module, ``tests/test_<op>.py``, whose tests take the backend as a parameter
(:func:`cases`): ids ``reference``, ``cpu``, ``triton``, ``cuda``, then the shape, dtype
(``float32`` ...), memory format (``contiguous`` / ``channels_last``) and the op's own axes, so
``-k "bn_add_relu_shift_alter and channels_last"`` selects that case on every backend. Each backend
param carries a mark of its name (``-m cuda``, ``-m triton``: how ``.ci/gpu_check.py`` and
``.ci/cuda_build.sh`` select them) and skips, saying why, where it cannot run: ``cpu`` without the
compiled extension, ``cuda`` without a GPU or without CUDA kernels in the extension, ``triton``
when Triton does not import.

Without a GPU the Triton kernels run on CPU tensors under the Triton interpreter:
``TRITON_INTERPRET=1`` is set below, before anything imports Triton (Triton reads it when the
kernels are defined), so any selection of the suite runs them. The interpreter is slow: Triton
cases use the small shapes and fewer dtype combinations (each test's ``keep``).
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import signal
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import ffn_kernels  # noqa: E402
from ffn_kernels import FrameLayout, reference  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def load_script(path: str):
    """The module of one of the repository's scripts (``bench/*.py``, ``.ci/*.py``: run as
    scripts, not installed), loaded from its file as ``sys.modules[<file stem>]`` (dataclasses
    look their module up there), with its folder on ``sys.path`` while it loads, as when it runs
    (so it imports its siblings)."""
    file = ROOT / path
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[file.stem] = module
    sys.path.insert(0, str(file.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(file.parent))
    return module


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------

BACKENDS = ("reference", "cpu", "triton", "cuda")
RAW_BACKENDS = ("cpu", "triton", "cuda")  # the reference's raw ops are the oracle itself
FLOAT64_BACKENDS = ("reference", "cpu", "cuda")  # Triton refuses float64
# opcheck tests the op's registration (schema, Meta kernel, autograd); Triton takes the route the
# reference takes (the Python twins, docs/design.md §4.1), where the interpreter only adds minutes
OPCHECK_BACKENDS = ("reference", "cpu", "cuda")
HAS_GPU = torch.cuda.is_available()
# where each backend's tensors live
DEVICE = {"reference": "cpu", "cpu": "cpu", "triton": "cuda" if HAS_GPU else "cpu", "cuda": "cuda"}
INTERPRETED = DEVICE["triton"] == "cpu"  # the Triton kernels run under the interpreter


def _triton_problem():
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton does not import ({exc})"
    return None


def _skip_reasons():
    ext = ffn_kernels.backend.extension_loaded()
    return {
        "reference": None,
        "cpu": None if ext else "ffn_kernels._C is not built (the compiled CPU kernels)",
        "triton": _triton_problem(),
        "cuda": None if HAS_GPU and ffn_kernels.backend.extension_has_cuda() else (
            "needs a CUDA device and an extension built with CUDA kernels (cuda available: "
            f"{HAS_GPU}, CUDA kernels: {ffn_kernels.backend.extension_has_cuda()})"),
    }


SKIP_REASON = _skip_reasons()


def backend_marks(name):
    reason = SKIP_REASON[name]
    return [getattr(pytest.mark, name)] + ([pytest.mark.skip(reason=reason)] if reason else [])


def only(name):
    """Decorator of a test about one backend: its mark, and its skip where it cannot run."""
    def apply(fn):
        for mark in backend_marks(name):
            fn = mark(fn)
        return fn
    return apply


@pytest.fixture
def backend(request):
    """The backend of a :func:`cases` parameter, chosen for the test and restored afterwards."""
    previous = ffn_kernels.get_backend()
    ffn_kernels.set_backend(request.param)
    yield request.param
    ffn_kernels.set_backend(previous)


def cases(backends=BACKENDS, keep=None, **axes):
    """``pytest.mark.parametrize`` over ``backends`` x the product of ``axes`` (each a dict
    ``id -> value``), keeping the combinations where ``keep(backend, **values)`` is true. Ids are
    ``<backend>-<axis id>-...``; the backend reaches the test through the ``backend`` fixture.
    Interpreted Triton cases get their :class:`Shape` values ``interpreted()``."""
    names = list(axes)
    params = []
    for name in backends:
        for combo in itertools.product(*(list(axis.items()) for axis in axes.values())):
            values = [value for _, value in combo]
            if keep is None or keep(name, **dict(zip(names, values))):
                if name == "triton" and INTERPRETED:
                    values = [v.interpreted() if isinstance(v, Shape) else v for v in values]
                ids = "-".join([name, *(i for i, _ in combo)])
                params.append(pytest.param(name, *values, id=ids, marks=backend_marks(name)))
    return pytest.mark.parametrize(["backend", *names], params, indirect=["backend"])


def on(backend, tensor):
    """``tensor`` on the backend's device (memory format kept), ``None`` and non-tensors as is."""
    return tensor.to(DEVICE[backend]) if isinstance(tensor, torch.Tensor) else tensor


# ---------------------------------------------------------------------------------------------
# Layouts, shapes, axes
# ---------------------------------------------------------------------------------------------

# one clip, unequal segments, frame counts 1..20, permuted rows, one segment on a high row (eval of
# an unseen frame count)
LAYOUTS = [
    FrameLayout(clips=2, frames=(4, 8, 16), rows=(0, 1, 2)),
    FrameLayout(clips=1, frames=(1, 3, 20), rows=(2, 0, 1)),
    FrameLayout(clips=3, frames=(2, 5), rows=(1, 0)),
    FrameLayout.single(clips=2, frames=12, row=2),
]
LAYOUT_IDS = ["4-8-16", "1-3-20", "2-5", "12"]


class Shape(NamedTuple):
    layout: FrameLayout
    channels: int
    hw: tuple

    def interpreted(self):
        """This shape under the Triton interpreter: at most 20 channels. Its cost grows with the
        channel blocks, and the GPU vectors that larger C aligns do not exist there."""
        return self._replace(channels=min(self.channels, 20))


# The LAYOUTS with channel counts and planes that exercise the kernels: vectors spanning channels
# (odd planes) and shift folds (C=16), no vectorisation (C*H*W = 54; C < 8, so FOLD_DIV leaves no
# channel shifting in the raw kernels), fold-aligned vectors (C=64), one segment on a high row, and
# a shape whose GPU reductions split every segment into several chunks (one of them partial).
# The Triton interpreter runs them with at most 20 channels (Shape.interpreted).
SHAPES = {
    "unequal3": Shape(LAYOUTS[0], 16, (3, 5)),
    "odd": Shape(LAYOUTS[1], 6, (3, 3)),
    "fold-aligned": Shape(LAYOUTS[2], 64, (4, 4)),
    "single-high-row": Shape(LAYOUTS[3], 24, (5, 5)),
    "multi-chunk": Shape(FrameLayout(clips=4, frames=(4, 8, 16), rows=(2, 0, 1)), 32, (28, 28)),
}
SMALL_SHAPES = {k: v for k, v in SHAPES.items() if k != "multi-chunk"}


def raw_grid(backend, shape, dtype, **_):
    """Which raw-op cases of an op without modes run: cuda every shape and dtype; cpu the small
    shapes in float32 and float64 (the public op's tests cover its half types); triton
    (interpreted) the small shapes in float32 and bfloat16."""
    if backend == "cuda":
        return True
    if backend == "cpu":
        return shape in SMALL_SHAPES.values() and dtype in (torch.float32, torch.float64)
    return shape in SMALL_SHAPES.values() and dtype in (torch.float32, torch.bfloat16)


def public_grid(backend, shape, dtype, **_):
    """Which public-op cases of an op without modes run: cpu and cuda the whole grid; the
    reference (which computes the oracle itself) float32, for its plumbing (checks, formats,
    autograd); triton (interpreted) one shape in float32."""
    if backend in ("cpu", "cuda"):
        return True
    if backend == "reference":
        return dtype == torch.float32
    return dtype == torch.float32 and shape == SHAPES["single-high-row"]


# two segments for the argument checks and the module tests; three tiny ones for gradcheck/opcheck
TWO_SEGMENTS = FrameLayout(clips=2, frames=(2, 3), rows=(0, 1))
TINY = FrameLayout(clips=2, frames=(1, 2, 3), rows=(1, 2, 0))
ROWS = 4  # parameter rows of the SHAPES' per-branch tensors (row 3 unused by every layout)
FOLD_DIV = 8


def fold_div_for(channels):
    """FOLD_DIV where the public ops accept it (fold_div <= C), else C."""
    return min(FOLD_DIV, channels)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
HALF = (torch.bfloat16, torch.float16)
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
TRAINING = {"train": True, "eval": False}


def pick(table, *ids):
    return {i: table[i] for i in ids}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def make_params(rows: int, channels: int, dtype=torch.float32, scale=0.5, seed=0):
    """Per-branch BN params and running stats (distinct per row) plus a WA weight."""
    g = torch.Generator().manual_seed(seed)
    weight = 1 + scale * torch.randn(rows, channels, generator=g, dtype=dtype)
    bias = scale * torch.randn(rows, channels, generator=g, dtype=dtype)
    running_mean = 0.1 * torch.randn(rows, channels, generator=g, dtype=dtype)
    running_var = 0.5 + torch.rand(rows, channels, generator=g, dtype=dtype)
    alter = 0.3 * torch.randn(rows, channels, generator=g, dtype=dtype)
    return dict(weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
                alter=alter)


def make_input(layout: FrameLayout, channels: int, hw=(7, 5), dtype=torch.float32,
               memory_format=torch.contiguous_format, seed=1, scale=2.0, shift=0.5):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(layout.total_frames, channels, *hw, generator=g) * scale + shift).to(dtype)
    return x.contiguous(memory_format=memory_format)


def flat(layout: FrameLayout):
    """The layout as the raw ops take it: ``clips, frames, rows``."""
    return layout.clips, list(layout.frames), list(layout.rows)


# ---------------------------------------------------------------------------------------------
# Tolerances and comparisons
# ---------------------------------------------------------------------------------------------

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-9),
       torch.bfloat16: dict(rtol=2e-2, atol=3e-2), torch.float16: dict(rtol=2e-3, atol=3e-3)}
# parameter gradients and statistics sum N*T*H*W products (of low-precision intermediates in the
# reference): compare them loosely
PARAM_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-8, atol=1e-8),
             torch.bfloat16: dict(rtol=3e-2, atol=0.5), torch.float16: dict(rtol=1e-2, atol=5e-2)}
# running statistics written back by the public ops
STATS_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-9),
             torch.bfloat16: dict(rtol=1e-5, atol=1e-3), torch.float16: dict(rtol=1e-5, atol=1e-3)}
# the Triton kernels round half-precision intermediates (BN input, the block-boundary gradient
# sum) where the reference's order of operations does not: an ulp more in a few values
TRITON_TOL = {**TOL, torch.bfloat16: dict(rtol=2e-2, atol=5e-2),
              torch.float16: dict(rtol=2e-3, atol=5e-3)}
ACTIVATIONS = ("x", "z", "identity", "residual")  # the other gradients are parameter gradients


def tolerance(backend, dtype, param=False):
    if param:
        return PARAM_TOL[dtype]
    return (TRITON_TOL if backend == "triton" else TOL)[dtype]


def check_outputs(got, want, dtype, backend, param_outputs=(), what=""):
    """Outputs of a backend's raw op against the reference's: device, dtype, shape, memory format
    and values (``param_outputs``: indices of [P, C] / [S, C] statistics and parameter gradients,
    compared with PARAM_TOL)."""
    device = DEVICE[backend]
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want), what
    for i, (g, r) in enumerate(zip(got, want)):
        label = f"{what} output {i}"
        assert g.device.type == torch.device(device).type, f"{label}: on {g.device}"
        assert g.dtype == r.dtype and g.shape == r.shape, (
            f"{label}: {g.dtype}{tuple(g.shape)} vs {r.dtype}{tuple(r.shape)}")
        assert g.is_contiguous() == r.is_contiguous(), f"{label}: memory format"
        assert g.is_contiguous(memory_format=torch.channels_last) == r.is_contiguous(
            memory_format=torch.channels_last), f"{label}: memory format"
        tol = tolerance(backend, dtype, param=i in param_outputs)
        torch.testing.assert_close(g.cpu(), r.cpu(), **tol, msg=lambda m: f"{label}: {m}")


def run_raw(backend, name, *args):
    """Raw op ``name`` (``<op>_fwd`` / ``<op>_bwd``) of ``backend`` on its device, and the
    reference's on the CPU inputs: ``(got, want)``."""
    moved = [on(backend, a) for a in args]
    got = getattr(ffn_kernels.backend.kernels_for(moved[0]), name)(*moved)
    return got, getattr(reference, name)(*args)


def compare_autograd(op_fn, ref_fn, tensors, dtype, backend):
    """Run ``op_fn`` on leaf copies of ``tensors`` on the backend's device and ``ref_fn`` on CPU
    ones, backprop the same random cotangent per output through both, and compare outputs (dtype,
    shape, memory format, values) and every gradient. Returns the op's outputs."""
    device = DEVICE[backend]
    results = []
    for fn, dev in ((op_fn, device), (ref_fn, "cpu")):
        leaves = {k: (v.detach().to(dev).clone().requires_grad_(v.is_floating_point())
                      if v is not None else None) for k, v in tensors.items()}
        outs = fn(**leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        g = torch.Generator().manual_seed(5)
        cot = [torch.randn(o.shape, generator=g).to(o.dtype).to(dev) for o in outs]
        torch.autograd.backward(outs, cot)
        grads = {k: v.grad for k, v in leaves.items() if v is not None and v.grad is not None}
        results.append((outs, grads))
    (outs, grads), (ref_outs, ref_grads) = results
    for o, r in zip(outs, ref_outs):
        assert o.device.type == torch.device(device).type
        assert o.dtype == r.dtype and o.shape == r.shape
        assert o.is_contiguous(memory_format=torch.channels_last) == r.is_contiguous(
            memory_format=torch.channels_last)
        torch.testing.assert_close(o.detach().cpu(), r.detach(), **tolerance(backend, dtype))
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        tol = tolerance(backend, dtype, param=k not in ACTIVATIONS)
        torch.testing.assert_close(grads[k].cpu(), ref_grads[k], **tol,
                                   msg=lambda m: f"grad of {k}: {m}")
    return outs


def check_differentiable_once(op, call, x):
    """``call()`` runs public op ``op`` on leaf ``x`` (float64): first-order reverse mode works;
    double backward (``create_graph=True``) and forward mode raise naming the op, never a silent
    zero (docs/design.md §3.4)."""
    with pytest.raises(RuntimeError, match=f"ffn_kernels::{op} is differentiable once"):
        torch.autograd.grad(call().pow(2).sum(), x, create_graph=True)
    (g,) = torch.autograd.grad(call().pow(2).sum(), x)  # first order still works
    assert g.abs().sum() > 0
    with pytest.raises(RuntimeError):
        torch.func.jvp(lambda t: call() * t, (x.detach(),), (torch.ones_like(x),))


def gradcheck(fn, inputs):
    """float64 gradcheck; fast_mode checks random vector-Jacobian products: the same formulas at
    a fraction of the time."""
    return torch.autograd.gradcheck(fn, inputs, fast_mode=True)


# ---------------------------------------------------------------------------------------------
# The official FFN structure, spelled independently of the reference
# ---------------------------------------------------------------------------------------------


def official_shift(x, n_segment, fold_div):
    """Frame-by-frame TSM shift: an independent spelling of the TSM paper's slicing."""
    nt, c, h, w = x.shape
    fold = c // fold_div
    out = torch.zeros_like(x)
    for clip in range(nt // n_segment):
        for t in range(n_segment):
            f = clip * n_segment + t
            if t + 1 < n_segment:
                out[f, :fold] = x[f + 1, :fold]
            if t >= 1:
                out[f, fold : 2 * fold] = x[f - 1, fold : 2 * fold]
            out[f, 2 * fold :] = x[f, 2 * fold :]
    return out


def official_wa(alter_row):
    """FFN's Weight Alteration: y = x + conv(x) with a depthwise 1x1 convolution."""
    c = alter_row.numel()
    conv = nn.Conv2d(c, c, 1, groups=c, bias=False).to(alter_row.dtype)
    conv.weight.data.copy_(alter_row.view(c, 1, 1, 1))
    return lambda x: x + conv(x)


def official_bns(p):
    """One nn.BatchNorm2d per parameter row of ``p`` (make_params)."""
    rows, c = p["weight"].shape
    bns = [nn.BatchNorm2d(c) for _ in range(rows)]
    for r, bn in enumerate(bns):
        bn.weight.data.copy_(p["weight"][r])
        bn.bias.data.copy_(p["bias"][r])
        bn.running_mean.copy_(p["running_mean"][r])
        bn.running_var.copy_(p["running_var"][r])
    return bns


def pytest_report_header(config):
    return (f"ffn_kernels backend for cpu: {ffn_kernels.backend_name('cpu')} "
            f"(FFN_KERNELS_BACKEND={os.environ.get('FFN_KERNELS_BACKEND', 'auto')}); "
            f"skipped backends: {({k: v for k, v in SKIP_REASON.items() if v}) or 'none'}")


# ---------------------------------------------------------------------------------------------
# Shared by the CLI and bad-input tests
# ---------------------------------------------------------------------------------------------

# `ffn train` overrides for a ResNet-18 of width 8 on 8x8 crops, one step per epoch: a run takes a
# second or two
TINY_RUN = [
    "data.synthetic.train_videos=4", "data.synthetic.val_videos=2", "data.synthetic.num_frames=4",
    "data.synthetic.frame_size=16", "data.size=8", "data.scale_size=8", "data.batch_size=2",
    "data.workers=0", "model.frames=[1,2]", "model.width=8", "model.dropout=0", "train.epochs=1",
    "train.max_steps=1", "train.progress=false",
]


# --- checkpoints in an official naming, with random weights, and clips for the model tests ------

def rel(a, b) -> float:
    """``|a - b| / |b|``."""
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


def clips_of(frames, n=2, hw=32, seed=0, dtype=torch.float64) -> list:
    """One random ``[n, t, 3, hw, hw]`` clip batch per frame count ``t``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, t, 3, hw, hw, generator=g).to(dtype) for t in frames]


class RandomWeights:
    """The state dict of an official checkpoint being written by a test: float64 tensors drawn from
    one seeded generator."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.sd: dict = {}

    def rnd(self, *shape, scale=None):
        """Normal, scaled by ``1/sqrt(fan_in)`` (or ``scale``)."""
        fan = math.prod(shape[1:]) if len(shape) > 1 else 1
        return torch.randn(*shape, generator=self.g, dtype=torch.float64) * (scale or fan ** -0.5)

    def bn(self, key: str, c: int) -> None:
        """A BatchNorm's affine parameters, running statistics and counter at ``key``."""
        self.sd[f"{key}.weight"] = 1 + 0.2 * self.rnd(c, scale=1)
        self.sd[f"{key}.bias"] = 0.2 * self.rnd(c, scale=1)
        self.sd[f"{key}.running_mean"] = 0.2 * self.rnd(c, scale=1)
        self.sd[f"{key}.running_var"] = 0.5 + torch.rand(c, generator=self.g, dtype=torch.float64)
        self.sd[f"{key}.num_batches_tracked"] = torch.tensor(7)


def train_eval_diagnose(tmp_path, overrides, eval_frames: str, diagnose_frames: str):
    """`ffn train` a run of TINY_RUN + ``overrides`` into ``tmp_path/run``, then `ffn eval` it at
    ``eval_frames`` and `ffn diagnose` it at ``diagnose_frames``: (its results by frame count, as
    results.json holds them, and diagnose's shift.csv)."""
    import json

    from ffn.cli import main

    run = tmp_path / "run"
    assert main(["train", *TINY_RUN, *overrides, f"train.out={run}"]) == 0
    out = tmp_path / "eval"
    assert main(["eval", str(run / "last.pt"), "--frames", eval_frames, "--out", str(out)]) == 0
    assert main(["diagnose", str(run / "last.pt"), "--frames", diagnose_frames, "--out",
                 str(tmp_path / "diag")]) == 0
    return (json.loads((out / "results.json").read_text())["run"],
            (tmp_path / "diag" / "shift.csv").read_text())


@pytest.fixture
def no_hang():
    """A read that blocks (a FIFO opened) fails the test instead of hanging the suite."""
    def hung(*_):
        raise TimeoutError("hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
