"""Temporal distillation loss: CE on the teacher (most frames) + λ·KL(teacher ‖ student) per
student, KLDivLoss(batchmean) on log_softmax, no gradient into the teacher through the KL terms."""

import pytest
import torch
from torch import nn

from ffn.losses import temporal_distillation_loss


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_matches_the_formula(lam):
    g = torch.Generator().manual_seed(0)
    p_l, p_m, p_h = (torch.randn(4, 7, generator=g) for _ in range(3))
    y = torch.tensor([0, 3, 6, 2])
    out = temporal_distillation_loss([p_l, p_m, p_h], y, lam=lam)
    kl = nn.KLDivLoss(reduction="batchmean")
    teacher = torch.softmax(p_h, 1)
    expected_kl = [kl(torch.log_softmax(p, 1), teacher) for p in (p_l, p_m)]
    torch.testing.assert_close(out.ce, nn.functional.cross_entropy(p_h, y))
    for got, want in zip(out.kl, expected_kl, strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(out.total, out.ce + lam * sum(expected_kl))


def test_teacher_gets_gradient_only_from_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(3, 5, generator=g, requires_grad=True) for _ in range(4)]  # 4 branches
    y = torch.tensor([1, 2, 4])
    temporal_distillation_loss(logits, y).total.backward()
    teacher = logits[-1].detach().requires_grad_()
    nn.functional.cross_entropy(teacher, y).backward()
    torch.testing.assert_close(logits[-1].grad, teacher.grad)
    assert all(p.grad.abs().sum() > 0 for p in logits[:-1])
