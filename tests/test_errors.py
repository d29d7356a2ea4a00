"""Every bad input of docs/design.md §3.5 raises a clear TypeError/ValueError naming the argument."""

import pytest
import torch

import ffn_kernels
from ffn_kernels import FrameLayout, ShiftAlter, ops
from conftest import make_input, make_params

LAYOUT = FrameLayout(clips=2, frames=(2, 3), rows=(0, 1))


def bn(x, layout=LAYOUT, **kw):
    p = make_params(2, 4)
    args = dict(weight=p["weight"], bias=p["bias"], running_mean=p["running_mean"],
                running_var=p["running_var"], training=True)
    args.update(kw)
    return ops.freq_batch_norm(x, layout, **args)


X = make_input(LAYOUT, 4)


@pytest.mark.parametrize("call,error,match", [
    (lambda: ops.shift_alter(X[0], LAYOUT), ValueError, "x must be 4-D"),
    (lambda: ops.shift_alter(X.int(), LAYOUT), TypeError, "x must be float16"),
    # empty channels or frames crashed the interpreter (division by zero in the CPU kernels)
    (lambda: ops.shift_alter(X[:, :0], LAYOUT), ValueError, "x must have at least one channel"),
    (lambda: ops.shift_alter(X[:, :, :0], LAYOUT), ValueError, "x must have at least one channel"),
    (lambda: bn(X[:, :0], weight=torch.ones(2, 0), bias=torch.ones(2, 0), running_mean=None,
                running_var=None), ValueError, "x must have at least one channel"),
    (lambda: ops.bn_add_relu_shift_alter(X[:, :0], X[:, :0], LAYOUT, torch.ones(2, 0),
                                         torch.zeros(2, 0)), ValueError, "z must have at least one"),
    (lambda: ShiftAlter(0, 2), ValueError, "num_channels and num_branches must be >= 1"),
    (lambda: ops.shift_alter(X[:-1], LAYOUT), ValueError, r"x.shape\[0\] is 9 but the layout holds 10"),
    (lambda: ops.shift_alter(X, (2, (2, 3))), TypeError, "layout must be a ffn_kernels.FrameLayout"),
    (lambda: ops.shift_alter(X, LAYOUT, torch.zeros(2, 5)), ValueError, r"alter must have shape \[rows, C=4\]"),
    (lambda: ops.shift_alter(X, LAYOUT, torch.zeros(4)), ValueError, "alter must have shape"),
    (lambda: ops.shift_alter(X, LAYOUT, torch.zeros(1, 4)), ValueError, "index row 1 of alter, which has only 1 rows"),
    (lambda: ops.shift_alter(X, LAYOUT, None, fold_div=1), ValueError, "fold_div must be an int >= 2"),
    (lambda: ops.shift_alter(X, LAYOUT, torch.zeros(2, 4, device="meta")), ValueError, "mixed devices"),
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
    (lambda: ops.shift_alter(X, LAYOUT, None, fold_div=5), ValueError, "fold_div=5 exceeds the 4 channels"),
    (lambda: bn(make_input(FrameLayout(2, (2, 3), (1, 1)), 4), FrameLayout(2, (2, 3), (1, 1))),
     ValueError, "repeat a row"),
    (lambda: bn(torch.randn(1, 4, 1, 1), FrameLayout.single(1, 1)), ValueError,
     "more than 1 value per channel"),
    (lambda: ops.bn_add_relu_shift_alter(X, X[:-2], LAYOUT, torch.ones(2, 4), torch.zeros(2, 4)),
     ValueError, "identity has shape"),
    (lambda: ops.bn_add_relu_shift_alter(X, X, LAYOUT, torch.ones(2, 4), torch.zeros(2, 4),
                                         alter_next=torch.zeros(2, 8)), ValueError, "alter_next must have shape"),
])
def test_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(clips=0, frames=(4,)), ValueError, "clips must be a positive int"),
    (dict(clips=2, frames=()), ValueError, "at least one segment"),
    (dict(clips=2, frames=(4, 0)), ValueError, "every frame count must be >= 1"),
    (dict(clips=2, frames=(4, 8), rows=(0,)), ValueError, "rows has 1 entries but frames has 2"),
    (dict(clips=2, frames=(4,), rows=(-1,)), ValueError, "rows must be >= 0"),
    (dict(clips=2, frames=(4.0,)), TypeError, "frames must hold ints"),
    (dict(clips=2, frames=4), TypeError, "frames must be a sequence of ints"),
])
def test_bad_layout_raises(kwargs, error, match):
    with pytest.raises(error, match=match):
        FrameLayout(**kwargs)


def test_layout_offsets_and_defaults():
    layout = FrameLayout(clips=2, frames=(4, 8, 16))
    assert layout.rows == (0, 1, 2)
    assert layout.offsets == (0, 8, 24, 56) and layout.total_frames == 56
    assert [s.start for s in layout.segments()] == [0, 8, 24]


def test_raw_cpu_kernels_refuse_empty_planes_instead_of_crashing():
    import ffn_kernels.backend as backend
    if not backend.extension_loaded():
        pytest.skip("needs the compiled CPU kernels")
    x = torch.randn(10, 0, 4, 4)
    with pytest.raises(ValueError, match="at least one channel"):
        torch.ops.ffn_kernels_C.shift_alter_bwd(x, x, 2, [2, 3], [0, 1], None, 8, False)


def test_bad_backend_variable_fails_at_first_use_not_at_import():
    import subprocess
    import sys
    code = ("import torch, ffn_kernels\n"
            "from ffn_kernels import ops, FrameLayout\n"
            "try:\n"
            "    ops.shift_alter(torch.randn(2, 8, 2, 2), FrameLayout.single(1, 2))\n"
            "except ValueError as e:\n"
            "    print('ERR', e)\n")
    env = dict(__import__("os").environ, FFN_KERNELS_BACKEND="bogus")
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
