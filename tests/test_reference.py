"""The reference equals the official FFN structure: per-branch nn.BatchNorm2d, the TSM paper's
slicing shift with each branch's own frame count, nn.Conv2d(groups=C) Weight Alteration."""

import pytest
import torch
from torch import nn

from ffn_kernels import FrameLayout, reference
from conftest import LAYOUTS, make_input, make_params


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
    conv = nn.Conv2d(c, c, 1, groups=c, bias=False)
    conv.weight.data.copy_(alter_row.view(c, 1, 1, 1))
    return lambda x: x + conv(x)


def official_bns(p):
    rows, c = p["weight"].shape
    bns = [nn.BatchNorm2d(c) for _ in range(rows)]
    for r, bn in enumerate(bns):
        bn.weight.data.copy_(p["weight"][r])
        bn.bias.data.copy_(p["bias"][r])
        bn.running_mean.copy_(p["running_mean"][r])
        bn.running_var.copy_(p["running_var"][r])
    return bns


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fold_div", [8, 3])
def test_shift_alter_is_official_shift_then_depthwise_conv(layout, fold_div):
    x = make_input(layout, 16)
    p = make_params(3, 16)
    y = reference.shift_alter(x, layout, p["alter"], fold_div)
    expected = torch.cat([
        official_wa(p["alter"][seg.row])(official_shift(xs, seg.frames, fold_div))
        for seg, xs in zip(layout.segments(), layout.split(x))
    ])
    torch.testing.assert_close(y, expected.detach())
    pure = reference.shift_alter(x, layout, None, fold_div)
    torch.testing.assert_close(pure, torch.cat([
        official_shift(xs, seg.frames, fold_div)
        for seg, xs in zip(layout.segments(), layout.split(x))
    ]))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_freq_batch_norm_is_per_branch_batchnorm2d(layout, training):
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


def test_block_boundary_composes_bn_add_relu_and_shift_alter():
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


def test_shift_never_crosses_clip_boundaries():
    layout = FrameLayout(clips=3, frames=(4,))
    x = torch.arange(12.0).view(12, 1, 1, 1).expand(12, 8, 1, 1).contiguous()
    y = reference.shift_alter(x, layout, None, fold_div=8)[:, 0, 0, 0]
    # channel 0 takes frame t+1 of the same clip; the last frame of each clip gets zero
    assert y.tolist() == [1, 2, 3, 0, 5, 6, 7, 0, 9, 10, 11, 0]
