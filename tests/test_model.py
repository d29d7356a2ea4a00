"""The packed FFN model equals its eager twin (the official structure, branch by branch), picks the
right branch at any frame count, keeps clips apart, runs each shared conv once per step, and has
the documented parameter counts."""

import pytest
import torch
from torch import nn

from ffn import EagerFFNResNet, FFNResNet, nearest_branch
from ffn_kernels import FrameLayout

DEPTHS = (18, 34, 50, 101)
FRAMES = (2, 4, 8)


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


def make_clips(frames, clips=2, hw=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(clips, t, 3, hw, hw, generator=g).to(dtype) for t in frames]


def make_pair(depth, frames=FRAMES, dtype=torch.float32, **kw):
    torch.manual_seed(depth)
    model = FFNResNet(depth, frames=frames, num_classes=5, dropout=0.0, **kw).to(dtype)
    return model, EagerFFNResNet.twin(model)


def step(model, inputs, seed=0):
    """Forward, then backward against fixed random cotangents; returns outputs and gradients."""
    model.zero_grad()
    outs = model(inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    torch.autograd.backward(outs, [torch.randn(o.shape, generator=g).to(o) for o in outs])
    return outs, {n: p.grad for n, p in model.named_parameters()}


def assert_twins_match(packed, eager, inputs, tol):
    outs_p, grads_p = step(packed, inputs)
    outs_e, grads_e = step(eager, inputs)
    for a, b in zip(outs_p, outs_e, strict=True):
        assert rel(a, b) <= tol
    for name, g in grads_e.items():
        assert rel(grads_p[name], g) <= tol, name
    buffers = dict(packed.named_buffers())
    for name, buf in eager.named_buffers():
        assert rel(buffers[name].double(), buf.double()) <= tol, name


# Gradients are compared in float64, where the two computations agree to 1e-12..1e-8. In fp32 they
# cannot agree to 1e-4 per tensor: at random init a deep BN network in training mode is chaotic
# (one fp32 ulp on the eager model's own input moves its ResNet-50 gradients by ~1e-2), and in eval
# one ReLU whose input rounds to either side of 0 (seen: 1.6e-6 vs 0 in layer4.0 of ResNet-50,
# 3072 activations) moves that layer's weight gradients by ~7e-3. fp32 outputs are compared below.
@pytest.mark.parametrize("depth", DEPTHS)
def test_matches_eager_twin_float64(depth):
    packed, eager = make_pair(depth, dtype=torch.float64)
    # float64 convolutions are slow on CPU: 24x24 frames still reach layer4 (1x1)
    assert_twins_match(packed, eager, make_clips(FRAMES, hw=24, dtype=torch.float64), tol=1e-6)
    assert packed.bn1.num_batches_tracked.tolist() == [1, 1, 1]
    packed.eval(), eager.eval()  # running statistics now differ per branch
    assert_twins_match(packed, eager, make_clips((3,), hw=24, dtype=torch.float64)[0], tol=1e-6)


@pytest.mark.parametrize("depth", DEPTHS)
@torch.no_grad()
def test_eval_outputs_match_eager_twin_fp32(depth):
    packed, eager = make_pair(depth)
    packed(make_clips(FRAMES, seed=1)), eager(make_clips(FRAMES, seed=1))
    packed.eval(), eager.eval()
    for n in (3, 8):  # a tie (3 -> the 4-frame branch) and a branch's own count
        x = make_clips((n,), seed=n)[0]
        assert rel(packed(x), eager(x)) <= 1e-4


def test_training_outputs_match_eager_twin_fp32():
    packed, eager = make_pair(50)
    clips = make_clips(FRAMES, hw=64)
    for a, b in zip(packed(clips), eager(clips)):
        assert rel(a, b) <= 1e-4


def test_four_branches_and_fold_div():
    packed, eager = make_pair(18, frames=(2, 3, 4, 6), dtype=torch.float64, fold_div=4)
    assert packed.bn1.weight.shape == (4, 64) and packed.layer1[0].alter.weight.shape == (4, 64)
    assert_twins_match(packed, eager, make_clips((2, 3, 4, 6), dtype=torch.float64), tol=1e-6)
    # a subset of the branches in any order trains just those rows
    outs = packed(make_clips((4, 2), dtype=torch.float64))
    assert [o.shape for o in outs] == [(2, 5), (2, 5)]
    assert packed.bn1.num_batches_tracked.tolist() == [2, 1, 2, 1]


@pytest.mark.parametrize("frames,n,row", [
    ((4, 8, 16), 6, 1), ((4, 8, 16), 12, 2), ((4, 8, 16), 1, 0), ((4, 8, 16), 5, 0),
    ((4, 8, 16), 10, 1), ((4, 8, 16), 64, 2), ((4, 8, 12, 16), 10, 2), ((4, 8, 12, 16), 14, 3),
])
def test_nearest_branch(frames, n, row):
    assert nearest_branch(frames, n) == row


def test_eval_uses_nearest_branch_and_shifts_over_n():
    packed, _ = make_pair(18)
    packed(make_clips(FRAMES))
    packed.eval()
    x = make_clips((6,))[0]
    expected = packed(x.flatten(0, 1), FrameLayout.single(2, 6, row=2))[0]  # 6 -> the 8-frame branch (a tie)
    torch.testing.assert_close(packed(x), expected)
    assert rel(packed(x.flatten(0, 1), FrameLayout.single(2, 6, row=1))[0], expected) > 1e-3


def test_shift_never_crosses_clips():
    packed, _ = make_pair(18)
    packed.eval()  # batch statistics would couple the clips; running statistics do not
    clips = make_clips(FRAMES)
    changed = [c.clone() for c in clips]
    for c in changed:
        c[1] = torch.randn_like(c[1])
    for a, b in zip(packed(clips), packed(changed)):
        torch.testing.assert_close(a[0], b[0])
        assert not torch.allclose(a[1], b[1])


def test_every_shared_conv_runs_once_per_step():
    packed, _ = make_pair(18)
    calls = []
    for m in packed.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    packed(make_clips(FRAMES))
    n_convs = sum(isinstance(m, nn.Conv2d) for m in packed.modules())
    assert calls == [2 * sum(FRAMES)] * n_convs


def test_channels_last():
    packed, _ = make_pair(18)
    packed(make_clips(FRAMES))
    packed.eval()
    x = make_clips((8,))[0]
    expected = packed(x)
    packed.to(memory_format=torch.channels_last)
    packed_in, layout = x.flatten(0, 1).contiguous(memory_format=torch.channels_last), \
        FrameLayout.single(2, 8, row=2)
    assert packed.features(packed_in, layout).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(packed(x), expected, rtol=1e-4, atol=1e-6)


def test_state_dict_keys_are_shared_with_the_twin():
    packed, eager = make_pair(50)
    shapes = {k: v.shape for k, v in packed.state_dict().items()}
    assert shapes == {k: v.shape for k, v in eager.state_dict().items()}
    assert shapes["layer2.0.alter.weight"] == (3, 256)
    assert shapes["layer2.0.bn3.running_var"] == (3, 512)
    assert shapes["layer2.0.downsample.conv.weight"] == (512, 256, 1, 1)
    assert shapes["layer2.0.downsample.bn.num_batches_tracked"] == (3,)
    assert shapes["fc.weight"] == (5, 2048)


def test_bad_input_is_refused():
    packed, _ = make_pair(18)
    with pytest.raises(ValueError, match="frame counts"):
        packed(make_clips((2, 5)))
    with pytest.raises(ValueError, match="frame counts"):
        packed(make_clips((2, 2)))
    with pytest.raises(ValueError, match="layout"):
        packed(torch.randn(4, 3, 32, 32))
    with pytest.raises(ValueError, match="increasing"):
        FFNResNet(18, frames=(8, 4))
    with pytest.raises(ValueError, match="width"):
        FFNResNet(18, width=12)


def test_narrow_model_matches_its_twin():
    packed, eager = make_pair(50, dtype=torch.float64, width=16)
    assert packed.conv1.weight.shape == (16, 3, 7, 7) and packed.fc.weight.shape == (5, 16 * 8 * 4)
    assert packed.layer4[0].conv1.weight.shape == (128, 256, 1, 1)
    assert_twins_match(packed, eager, make_clips(FRAMES, hw=24, dtype=torch.float64), tol=1e-6)


def param_count(**kw):
    with torch.device("meta"):  # shapes only: counting needs no memory or init time
        return sum(p.numel() for p in FFNResNet(**kw).parameters())


@pytest.mark.parametrize("depth,plain,ffn", [
    (18, 11_689_512, 11_713_128),
    (34, 21_797_672, 21_841_704),
    (50, 25_557_032, 25_702_632),
    (101, 44_549_160, 44_851_432),
])
def test_parameter_counts(depth, plain, ffn):
    # plain TSM (one branch, no WA) has torchvision's ResNet count; FFN adds two more rows of every
    # BN affine pair and three WA rows per block input
    assert param_count(depth=depth, frames=(8,), num_classes=1000, weight_alteration=False) == plain
    assert param_count(depth=depth, num_classes=1000) == ffn
