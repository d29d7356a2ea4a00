"""Hostile inputs to the ops' Python API and FrameLayout (docs/design.md §3.5): each is refused with
our one-line TypeError/ValueError naming the argument (never torch's schema message "Expected a
value of type ...", nor its in-place write error after the op ran), with no running statistic or
counter written; or it is accepted (numpy and 0-dim torch scalars, tuples, lists, arrays) and gives
the reference's result."""

import numpy as np
import pytest
import torch

from ffn_kernels import FrameLayout, FreqBatchNorm2d, ops, reference
from conftest import TWO_SEGMENTS, make_input, make_params, only

X = make_input(TWO_SEGMENTS, 8, hw=(3, 2))
P = make_params(2, 8)
RM, RV = P["running_mean"], P["running_var"]
SNAPSHOT = RM.clone(), RV.clone()
with torch.inference_mode():
    INFERENCE_STATS = torch.zeros(2, 8)


def shift_alter(x=X, layout=TWO_SEGMENTS, alter=P["alter"], fold_div=4):
    return ops.shift_alter(x, layout, alter, fold_div)


def bn(x=X, layout=TWO_SEGMENTS, weight=P["weight"], bias=P["bias"], running_mean=RM,
       running_var=RV, **kw):
    return ops.freq_batch_norm(x, layout, weight, bias, running_mean, running_var, **kw)


def block(z=X, identity=X, layout=TWO_SEGMENTS, running_mean=RM, running_var=RV, **kw):
    return ops.bn_add_relu_shift_alter(z, identity, layout, P["weight"], P["bias"], running_mean,
                                       running_var, **kw)


def module_with_expanded_running_var():
    fbn = FreqBatchNorm2d(8, num_branches=2)
    fbn.running_var = torch.ones(8).expand(2, 8)
    try:
        fbn(X, TWO_SEGMENTS)
    finally:
        assert fbn.num_batches_tracked.tolist() == [0, 0]  # refused before any counter moved


def raw_shift_alter(clips, frames, rows):
    return torch.ops.ffn_kernels.shift_alter(X[:4], clips, frames, rows, None, 4)


REFUSED = {
    # FrameLayout: sizes past what the kernels index, and non-integral values
    "layout-clips-int64-overflow": (lambda: FrameLayout(clips=2**62 + 1, frames=(4,)),
                                    ValueError, r"clips=4611686018427387905 x frames=\(4,\) is more "
                                                r"than 2\*\*63 - 1 frames \(int64 overflow\)"),
    "layout-total-int64-overflow": (lambda: FrameLayout(clips=2**40, frames=(2**23, 2**23)),
                                    ValueError, "int64 overflow"),
    "layout-frames-past-int32": (lambda: FrameLayout(clips=1, frames=(2**31,)), ValueError,
                                 r"frames must be < 2\*\*31 \(the kernels index them as int32\)"),
    "layout-rows-past-int32": (lambda: FrameLayout(clips=1, frames=(4,), rows=(2**31,)),
                               ValueError, r"rows must be < 2\*\*31"),
    "layout-clips-bool": (lambda: FrameLayout(clips=True, frames=(4,)), TypeError,
                          r"clips must be an int, got True \(bool\)"),
    "layout-clips-float": (lambda: FrameLayout(clips=2.0, frames=(4,)), TypeError,
                           "clips must be an int"),
    "layout-clips-numpy-float": (lambda: FrameLayout(clips=np.float64(2), frames=(4,)), TypeError,
                                 "clips must be an int"),
    "layout-clips-1d-tensor": (lambda: FrameLayout(clips=torch.tensor([2]), frames=(4,)),
                               TypeError, "clips must be an int"),
    "layout-clips-none": (lambda: FrameLayout(clips=None, frames=(4,)), TypeError,
                          "clips must be an int"),
    "layout-clips-str": (lambda: FrameLayout(clips="2", frames=(4,)), TypeError,
                         "clips must be an int"),
    "layout-frames-bool": (lambda: FrameLayout(clips=2, frames=(True,)), TypeError,
                           "frames must hold ints"),
    "layout-frames-numpy-float": (lambda: FrameLayout(clips=2, frames=(np.float32(4),)),
                                  TypeError, "frames must hold ints"),
    "layout-frames-float-tensor": (lambda: FrameLayout(clips=2, frames=torch.tensor([4.0])),
                                   TypeError, "frames must hold ints"),
    "layout-frames-nested": (lambda: FrameLayout(clips=2, frames=((4,),)), TypeError,
                             "frames must hold ints"),
    "layout-frames-str": (lambda: FrameLayout(clips=2, frames="4"), TypeError,
                          "frames must be a sequence of ints"),
    "layout-frames-none": (lambda: FrameLayout(clips=2, frames=None), TypeError,
                           "frames must be a sequence of ints"),
    "layout-rows-numpy-bool": (lambda: FrameLayout(clips=2, frames=(4,), rows=(np.bool_(0),)),
                               TypeError, "rows must hold ints"),
    "layout-rows-float": (lambda: FrameLayout(clips=2, frames=(4,), rows=(0.0,)), TypeError,
                          "rows must hold ints"),
    # the same sizes given to the registered op directly (its C++ checks)
    "raw-clips-int64-overflow": (lambda: raw_shift_alter(2**62 + 1, (4,), (0,)), ValueError,
                                 r"clips=4611686018427387905 x frames=\[4\] is more than 2\^63 - 1"),
    "raw-frames-past-int32": (lambda: raw_shift_alter(1, (2**31,), (0,)), ValueError,
                              r"frame counts and rows must be < 2\^31"),
    "raw-rows-past-int32": (lambda: raw_shift_alter(1, (4,), (2**31,)), ValueError,
                            r"frame counts and rows must be < 2\^31"),
    # shift_alter
    "shift_alter-x-numpy": (lambda: shift_alter(x=X.numpy()), TypeError,
                            "x must be a torch.Tensor, got ndarray"),
    "shift_alter-x-list": (lambda: shift_alter(x=X.tolist()), TypeError,
                           "x must be a torch.Tensor, got list"),
    "shift_alter-alter-list": (lambda: shift_alter(alter=P["alter"].tolist()), TypeError,
                               "alter must be a torch.Tensor or None, got list"),
    "shift_alter-fold_div-float": (lambda: shift_alter(fold_div=4.0), TypeError,
                                   r"fold_div must be an int, got 4.0 \(float\)"),
    "shift_alter-fold_div-numpy-float": (lambda: shift_alter(fold_div=np.float64(4)), TypeError,
                                         "fold_div must be an int"),
    "shift_alter-fold_div-bool": (lambda: shift_alter(fold_div=True), TypeError,
                                  "fold_div must be an int"),
    "shift_alter-fold_div-str": (lambda: shift_alter(fold_div="4"), TypeError,
                                 "fold_div must be an int"),
    "shift_alter-fold_div-past-int64": (lambda: shift_alter(fold_div=2**70), ValueError,
                                        "fold_div must fit in int64"),
    # freq_batch_norm
    "freq_batch_norm-x-numpy": (lambda: bn(x=X.numpy()), TypeError, "x must be a torch.Tensor"),
    "freq_batch_norm-weight-numpy": (lambda: bn(weight=P["weight"].numpy()), TypeError,
                                     "weight must be a torch.Tensor, got ndarray"),
    "freq_batch_norm-bias-none": (lambda: bn(bias=None), TypeError,
                                  "bias must be a torch.Tensor, got NoneType"),
    "freq_batch_norm-running_mean-list": (lambda: bn(running_mean=RM.tolist()), TypeError,
                                          "running_mean must be a torch.Tensor or None"),
    "freq_batch_norm-residual-list": (lambda: bn(residual=[1.0]), TypeError,
                                      "residual must be a torch.Tensor or None"),
    "freq_batch_norm-eps-str": (lambda: bn(eps="1e-5"), TypeError,
                                r"eps must be a float, got '1e-5' \(str\)"),
    "freq_batch_norm-eps-none": (lambda: bn(eps=None), TypeError, "eps must be a float"),
    "freq_batch_norm-eps-complex": (lambda: bn(eps=1e-5j), TypeError, "eps must be a float"),
    "freq_batch_norm-momentum-str": (lambda: bn(momentum="0.1"), TypeError,
                                     "momentum must be a float or a sequence of floats"),
    "freq_batch_norm-momentum-strs": (lambda: bn(momentum=["a", "b"]), TypeError,
                                      "momentum must be a float or a sequence of floats"),
    "freq_batch_norm-momentum-tensor": (lambda: bn(momentum=torch.tensor([0.1, 0.1])), TypeError,
                                        "momentum must be a float or a sequence of floats"),
    "freq_batch_norm-training-str": (lambda: bn(training="no"), TypeError,
                                     r"training must be a bool, got 'no' \(str\)"),
    "freq_batch_norm-training-none": (lambda: bn(training=None), TypeError,
                                      "training must be a bool"),
    "freq_batch_norm-training-int": (lambda: bn(training=1), TypeError, "training must be a bool"),
    "freq_batch_norm-running_mean-expanded": (
        lambda: bn(running_mean=torch.zeros(8).expand(2, 8)), ValueError,
        r"running_mean is an expanded view .* cannot be updated in place"),
    "freq_batch_norm-running_var-expanded": (
        lambda: bn(running_var=torch.ones(1, 8).expand(2, 8)), ValueError,
        "running_var is an expanded view"),
    "freq_batch_norm-running_mean-inference-tensor": (
        lambda: bn(running_mean=INFERENCE_STATS), ValueError,
        r"running_mean is an inference tensor and cannot be updated in place outside "
        r"torch.inference_mode\(\)"),
    "FreqBatchNorm2d-expanded-running_var": (module_with_expanded_running_var, ValueError,
                                             "running_var is an expanded view"),
    # bn_add_relu_shift_alter
    "bn_add_relu_shift_alter-z-numpy": (lambda: block(z=X.numpy()), TypeError,
                                        "z must be a torch.Tensor"),
    "bn_add_relu_shift_alter-identity-none": (lambda: block(identity=None), TypeError,
                                              "identity must be a torch.Tensor, got NoneType"),
    "bn_add_relu_shift_alter-alter_next-list": (lambda: block(alter_next=[0.0]), TypeError,
                                                "alter_next must be a torch.Tensor or None"),
    "bn_add_relu_shift_alter-fold_div-float": (lambda: block(fold_div=4.5), TypeError,
                                               "fold_div must be an int"),
    "bn_add_relu_shift_alter-running_var-expanded": (
        lambda: block(running_var=torch.ones(8).expand(2, 8)), ValueError,
        "running_var is an expanded view"),
    "bn_add_relu_shift_alter-training-str": (lambda: block(training="True"), TypeError,
                                             "training must be a bool"),
}


@pytest.mark.parametrize("call,error,match", REFUSED.values(), ids=REFUSED.keys())
def test_bad_input_is_refused_with_one_line_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match) as info:
        call()
    assert "\n" not in str(info.value) and "Expected a value of type" not in str(info.value)
    assert torch.equal(RM, SNAPSHOT[0]) and torch.equal(RV, SNAPSHOT[1])  # nothing written back


# ---------------------------------------------------------------------------------------------
# Accepted: any integral / real scalar type, any sequence, with the reference's result
# ---------------------------------------------------------------------------------------------

LAYOUTS = {
    "numpy-scalars": dict(clips=np.int64(2), frames=(np.int32(2), np.int16(3)),
                          rows=[np.uint8(0), 1]),
    "lists": dict(clips=2, frames=[2, 3], rows=[0, 1]),
    "numpy-arrays": dict(clips=2, frames=np.array([2, 3]), rows=np.array([0, 1])),
    "torch-tensors": dict(clips=torch.tensor(2), frames=torch.tensor([2, 3]),
                          rows=torch.tensor([0, 1])),
    "range": dict(clips=2, frames=range(2, 4)),
}


@pytest.mark.parametrize("kwargs", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_layout_takes_any_integral_type_as_plain_ints(kwargs):
    layout = FrameLayout(**kwargs)
    assert layout == TWO_SEGMENTS
    assert all(type(v) is int for v in (layout.clips, *layout.frames, *layout.rows))
    torch.testing.assert_close(ops.shift_alter(X, layout, P["alter"], 4),
                               reference.shift_alter(X, TWO_SEGMENTS, P["alter"], 4))


SCALARS = {
    "fold_div-numpy-int": dict(fold_div=np.int64(4)),
    "eps-momentum-numpy-float32": dict(eps=np.float32(1e-3), momentum=np.float32(0.3)),
    "momentum-tuple-of-numpy": dict(momentum=(np.float64(0.1), 0.2)),
    "training-numpy-bool": dict(training=np.bool_(True)),
    "eps-0d-tensor": dict(eps=torch.tensor(1e-3, dtype=torch.float64)),
}


@pytest.mark.parametrize("kwargs", SCALARS.values(), ids=SCALARS.keys())
def test_numpy_and_0d_tensor_scalars_give_the_reference_result(kwargs):
    rm, rv, rm_ref, rv_ref = RM.clone(), RV.clone(), RM.clone(), RV.clone()
    out = ops.bn_add_relu_shift_alter(X, X.flip(0), TWO_SEGMENTS, P["weight"], P["bias"], rm, rv,
                                      alter_next=P["alter"], **kwargs)
    plain = {k: (float(v) if k == "eps" else bool(v) if k == "training" else
                 int(v) if k == "fold_div" else v) for k, v in kwargs.items()}
    plain.setdefault("fold_div", 8)
    want = reference.bn_add_relu_shift_alter(
        X, X.flip(0), TWO_SEGMENTS, P["weight"], P["bias"], rm_ref, rv_ref,
        plain.pop("training", True), alter_next=P["alter"], **plain)
    for got, ref in zip((*out, rm, rv), (*want, rm_ref, rv_ref)):
        torch.testing.assert_close(got, ref)


@only("triton")
def test_triton_refuses_more_frames_than_its_int32_layout_table_indexes():
    from ffn_kernels.triton.common import Plan

    x = torch.empty(2**31, 1, 1, 1, device="meta")  # a size check only: nothing is allocated
    with pytest.raises(ValueError, match=r"x has 2147483648 frames; the Triton kernels take fewer "
                                         r"than 2\*\*31"):
        Plan(x, 2**31, (1,), (0,))
