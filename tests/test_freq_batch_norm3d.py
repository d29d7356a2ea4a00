"""``FreqBatchNorm3d`` (3D CNNs: one row of ``nn.BatchNorm3d`` per branch, on the fused
``freq_batch_norm`` op) against ``nn.BatchNorm3d`` itself on every backend: outputs, gradients and
running statistics, in training and eval, NCTHW and channels_last_3d, with the fused residual +
ReLU, and two branches that share T in one tensor."""

import pytest
import torch
from torch import nn

from ffn_kernels import FreqBatchNorm3d
from conftest import DEVICE, cases, on

FORMATS = {"ncthw": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
ROWS = {"one-branch": (2,), "two-branches": (0, 2)}


def official(fbn, row):
    """The ``nn.BatchNorm3d`` that row ``row`` of ``fbn`` stands for."""
    bn = nn.BatchNorm3d(fbn.num_features, fbn.eps, fbn.momentum)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, name).copy_(getattr(fbn, name)[row])
    return bn


@cases(memory_format=FORMATS, rows=ROWS, fused={"plain": False, "res-relu": True},
       training={"train": True, "eval": False})
def test_matches_batchnorm3d(backend, memory_format, rows, fused, training):
    g = torch.Generator().manual_seed(0)
    fbn = FreqBatchNorm3d(6, num_branches=3)
    with torch.no_grad():  # distinct rows, so a wrong row shows
        for name in ("weight", "bias", "running_mean"):
            getattr(fbn, name).copy_(torch.randn(3, 6, generator=g))
        fbn.running_var.copy_(torch.rand(3, 6, generator=g) + 0.5)
    refs = [official(fbn, r) for r in rows]
    fbn.train(training)
    for bn in refs:
        bn.train(training)
    x = (torch.randn(2 * len(rows), 6, 3, 4, 5, generator=g) * 2 + 0.5)
    res = torch.randn(x.shape, generator=g) if fused else None
    dy = torch.randn(x.shape, generator=g)

    xo = on(backend, x.clone()).contiguous(memory_format=memory_format).requires_grad_()
    fbn = fbn.to(DEVICE[backend])
    y = fbn(xo, rows if len(rows) > 1 else rows[0], on(backend, res),
            "relu" if fused else None)
    y.backward(on(backend, dy))
    assert y.is_contiguous(memory_format=memory_format)

    xr = x.clone().requires_grad_()
    outs = []
    for part, bn, res_part in zip(xr.chunk(len(rows)), refs,
                                  res.chunk(len(rows)) if fused else [None] * len(rows)):
        out = bn(part)
        outs.append(torch.relu(out + res_part) if fused else out)
    ref = torch.cat(outs)
    ref.backward(dy)
    torch.testing.assert_close(y.detach().cpu(), ref.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xo.grad.cpu(), xr.grad, rtol=1e-4, atol=1e-4)
    for r, bn in zip(rows, refs):
        torch.testing.assert_close(fbn.weight.grad[r].cpu(), bn.weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fbn.running_mean[r].cpu(), bn.running_mean)
        torch.testing.assert_close(fbn.running_var[r].cpu(), bn.running_var)
    assert fbn.num_batches_tracked.tolist() == [int(training and r in rows) for r in range(3)]


def test_views_without_copy_and_loads_a_batchnorm3d():
    fbn = FreqBatchNorm3d(4, num_branches=2)
    bn = nn.BatchNorm3d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
    fbn.load_state_dict(bn.state_dict())  # every row from it
    assert torch.equal(fbn.weight, bn.weight.detach().expand(2, 4))
    x = torch.randn(2, 4, 3, 2, 2)
    torch.testing.assert_close(fbn(x, rows=1), bn(x))


@pytest.mark.parametrize("call,match", [
    (lambda bn: bn(torch.randn(2, 4, 3, 3), rows=0), "x must be 5-D"),
    (lambda bn: bn(torch.randn(3, 4, 2, 3, 3), rows=(0, 1)), "must split the batch of 3"),
    (lambda bn: bn(torch.randn(2, 4, 2, 3, 3), rows=0, residual=torch.randn(2, 4, 2, 3, 4)),
     "residual has shape"),
])
def test_bad_input_raises_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(FreqBatchNorm3d(4, num_branches=2))
