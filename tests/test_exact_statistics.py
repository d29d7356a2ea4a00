"""BatchNorm statistics are exact at any size (docs/design.md §3.2, "Counts"): a segment of more
than 2**24 values per channel (where a float32 count stops growing) on every backend that runs
here, and FreqBatchNorm2d against nn.BatchNorm2d where the two used to part: momentum switched
None -> 0.1 -> None, eps=1e-50, and layout rows beyond num_branches."""

import pytest
import torch
from torch import nn

from ffn_kernels import FrameLayout, FreqBatchNorm2d, ops
from conftest import DEVICE, cases, make_input, on, only

# ---------------------------------------------------------------------------------------------
# More than 2**24 values per channel and segment
# ---------------------------------------------------------------------------------------------

# One channel of 1x3 frames: 17,825,793 values (2**24 + 2**20 + 1). The CPU kernels make a chunk
# of each frame, so the segment is 5.9M partials of odd count: with a float32 count the merged
# count stops at 2**24 and the statistics drift (running_var was 0.9615, outputs +-1.0198).
BIG_FRAMES, BIG_HW = 5_941_931, (1, 3)
BIG_N = BIG_FRAMES * BIG_HW[0] * BIG_HW[1]


def alternating(n: int, shape) -> torch.Tensor:
    """+1, -1, +1, ... (odd n: one more +1): mean 1/n and biased variance 1 - 1/n**2, exactly."""
    return (1 - 2 * (torch.arange(n) % 2)).float().view(shape)


@cases(backends=("reference", "cpu"))
def test_statistics_of_a_segment_of_more_than_2_pow_24_values_per_channel_are_exact(backend):
    assert BIG_N > 2**24
    x = alternating(BIG_N, (BIG_FRAMES, 1, *BIG_HW))
    layout = FrameLayout.single(clips=BIG_FRAMES, frames=1)
    rm, rv = torch.zeros(1, 1), torch.ones(1, 1)
    eps = 1e-5
    y = ops.freq_batch_norm(x, layout, torch.ones(1, 1), torch.zeros(1, 1), rm, rv, momentum=1.0,
                            eps=eps)
    n = torch.tensor(float(BIG_N), dtype=torch.float64)
    mean, var = 1 / n, 1 - 1 / n**2
    torch.testing.assert_close(rm, mean.float().view(1, 1), rtol=1e-6, atol=0)
    torch.testing.assert_close(rv, (var * n / (n - 1)).float().view(1, 1), rtol=1e-6, atol=0)
    invstd = 1 / torch.sqrt(var + eps)
    want = (torch.tensor([1.0, -1], dtype=torch.float64) - mean) * invstd
    torch.testing.assert_close(y[:2].flatten(), want.float().repeat(3), rtol=1e-6, atol=0)
    torch.testing.assert_close(y[-1].flatten(), want.float()[[0, 1, 0]], rtol=1e-6, atol=0)


@only("triton")
def test_triton_statistics_combine_counts_past_2_pow_24_values_exactly():
    """The interpreter takes minutes per 2**24 elements (per-tile Python), so the segment is the
    statistics-combine kernel's: 17 chunk partials (mean, M2) of 2**20 + 1 values each, counts
    from the layout table (frames x H*W), merged as a GPU run merges them."""
    from ffn_kernels.triton import common, kernels

    hw, chunks = 2**20 + 1, 17
    table, nch = common._frame_layout_table(chunks, (1,), (0,), 1, torch.device(DEVICE["triton"]))
    g = torch.Generator().manual_seed(0)
    chunk_mean = torch.rand(chunks, generator=g) * 2 - 1
    chunk_m2 = (torch.rand(chunks, generator=g) + 0.5) * hw
    part = torch.stack([chunk_mean, chunk_m2])[:, :, None].contiguous()
    mean, invstd = torch.empty(1, 1), torch.empty(1, 1)
    rm, rv = torch.zeros(1, 1), torch.ones(1, 1)
    eps = 1e-5
    kernels._stats_combine_kernel[(1,)](
        *(on("triton", t) for t in (part, mean, invstd, rm, rv)), table, nch, 1, 1, hw, eps, 0, 1,
        1.0, *[0.0] * 7, BATCH=True, UPDATE=True, BLOCK_C=1)
    n = torch.full((chunks,), float(hw), dtype=torch.float64)
    total = n.sum()
    assert total > 2**24
    mu = (n * chunk_mean.double()).sum() / total
    var = (chunk_m2.double().sum() + (n * (chunk_mean.double() - mu) ** 2).sum()) / total
    want = [mu, 1 / torch.sqrt(var + eps), mu, var * total / (total - 1)]
    for got, expected in zip((mean, invstd, rm, rv), want):
        torch.testing.assert_close(got.cpu().view(()), expected.float(), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# FreqBatchNorm2d against nn.BatchNorm2d
# ---------------------------------------------------------------------------------------------

LAYOUT = FrameLayout(clips=2, frames=(2, 3), rows=(1, 0))


def per_branch(bns, layout, x):
    return torch.cat([bns[s.row](xs) for s, xs in zip(layout.segments(), layout.split(x))])


@cases()
def test_momentum_switched_none_then_01_then_none_follows_batchnorm2d(backend):
    """nn.BatchNorm2d counts every training batch in num_batches_tracked, whatever the momentum,
    and a later momentum=None averages over all of them."""
    fbn = FreqBatchNorm2d(4, num_branches=2, momentum=None).to(DEVICE[backend])
    bns = [nn.BatchNorm2d(4, momentum=None) for _ in range(2)]
    for step, momentum in enumerate([None, 0.1, 0.1, None, None]):
        fbn.momentum = momentum
        for bn in bns:
            bn.momentum = momentum
        x = make_input(LAYOUT, 4, hw=(3, 2), seed=step, scale=step + 1.0, shift=step)
        torch.testing.assert_close(fbn(on(backend, x), LAYOUT).cpu(),
                                   per_branch(bns, LAYOUT, x).detach())
    for r, bn in enumerate(bns):
        torch.testing.assert_close(fbn.running_mean[r].cpu(), bn.running_mean)
        torch.testing.assert_close(fbn.running_var[r].cpu(), bn.running_var)
        assert fbn.num_batches_tracked[r].item() == bn.num_batches_tracked.item() == 5


@cases()
def test_eps_1e_50_stays_finite_as_batchnorm2d(backend):
    """A constant channel has variance 0: in float32, eps=1e-50 is 0 and invstd inf (NaN outputs);
    ATen adds eps in float64, so its invstd is 1e25. nn.BatchNorm2d in float64 is the oracle of
    the other channels; the constant channel is finite (ATen's float32 output there is
    (x - mean) * 1e25 with mean's rounding error, which the reference backend inherits)."""
    x = make_input(LAYOUT, 3, hw=(3, 2))
    x[:, 1] = 0.75
    fbn = FreqBatchNorm2d(3, num_branches=2, eps=1e-50).to(DEVICE[backend])
    bns = [nn.BatchNorm2d(3, eps=1e-50).double() for _ in range(2)]
    for mode in ("train", "eval"):
        y = fbn(on(backend, x), LAYOUT).cpu()
        want = per_branch(bns, LAYOUT, x.double()).detach().float()
        assert torch.isfinite(y).all(), mode
        torch.testing.assert_close(y[:, [0, 2]], want[:, [0, 2]], msg=mode)
        for r, bn in enumerate(bns):
            torch.testing.assert_close(fbn.running_var[r].cpu(), bn.running_var.float(), msg=mode)
        fbn.eval(), [bn.eval() for bn in bns]


@cases(momentum={"momentum0.1": 0.1, "cumulative": None})
def test_rows_beyond_num_branches_are_refused_before_any_counter_moves(backend, momentum):
    """So is any call the op refuses (here x with 5 channels for 4)."""
    fbn = FreqBatchNorm2d(4, num_branches=2, momentum=momentum).to(DEVICE[backend])
    fbn(on(backend, make_input(LAYOUT, 4)), LAYOUT)  # warm: the host counter exists
    before = {k: v.clone() for k, v in fbn.state_dict().items()}
    bad = FrameLayout(clips=2, frames=(2, 3), rows=(0, 2))
    with pytest.raises(ValueError, match=r"layout rows \(0, 2\) index row 2, but FreqBatchNorm2d "
                                         r"has num_branches=2"):
        fbn(on(backend, make_input(bad, 4)), bad)
    with pytest.raises(ValueError, match=r"weight must have shape \[rows, C=5\]"):
        fbn(on(backend, make_input(LAYOUT, 5)), LAYOUT)
    for name, value in fbn.state_dict().items():
        assert torch.equal(value, before[name]), name
    # the counters go on from where they were: a cumulative average stays 1 / count
    bn = nn.BatchNorm2d(4, momentum=momentum)
    bn.load_state_dict({k: v[1].cpu() for k, v in before.items()})
    x = make_input(LAYOUT, 4, seed=5)
    fbn(on(backend, x), LAYOUT), bn(LAYOUT.split(x)[0])
    torch.testing.assert_close(fbn.running_var[1].cpu(), bn.running_var)
    assert fbn.num_batches_tracked.tolist() == [2, 2]
