"""The argument checks every op shares (docs/design.md §3.5): the layout. A FrameLayout refuses bad
clips/frames/rows with a clear TypeError/ValueError naming the field, and every op refuses a
layout that is not a FrameLayout. Each op's own checks: tests/test_<op>.py."""

import pytest
import torch

from ffn_kernels import FrameLayout, ops
from conftest import TWO_SEGMENTS, make_input

X = make_input(TWO_SEGMENTS, 4)
W, B = torch.ones(2, 4), torch.zeros(2, 4)


@pytest.mark.parametrize("call", [
    lambda layout: ops.shift_alter(X, layout),
    lambda layout: ops.freq_batch_norm(X, layout, W, B),
    lambda layout: ops.bn_add_relu_shift_alter(X, X, layout, W, B),
], ids=["shift_alter", "freq_batch_norm", "bn_add_relu_shift_alter"])
def test_every_op_refuses_a_layout_that_is_not_a_frame_layout(call):
    with pytest.raises(TypeError, match="layout must be a ffn_kernels.FrameLayout"):
        call((2, (2, 3)))


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
