"""FFN's temporal distillation loss (docs/design.md §1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class DistillationLoss:
    """``total = ce + lam * sum(kl)``; ``kl`` holds one term per student, in branch order."""

    total: Tensor
    ce: Tensor
    kl: tuple[Tensor, ...]


def temporal_distillation_loss(logits: Sequence[Tensor], target: Tensor, lam: float = 1.0,
                               teacher: int = -1) -> DistillationLoss:
    """``CE(p_T, y) + lam * Σ_s KL(softmax(p_T).detach() ‖ p_s)`` over every student ``s``.

    ``logits`` are per branch (as :class:`ffn.FFNResNet` returns them, fewest frames first), so the
    teacher, the branch with the most frames, is the last one by default. Each KL term is
    ``KLDivLoss(reduction="batchmean")`` of the student's ``log_softmax``; no gradient reaches the
    teacher through it.
    """
    if len(logits) < 1:
        raise ValueError("temporal_distillation_loss needs the logits of at least one branch")
    teacher = range(len(logits))[teacher]
    target_probs = F.softmax(logits[teacher], dim=1).detach()
    ce = F.cross_entropy(logits[teacher], target)
    kl = tuple(F.kl_div(F.log_softmax(p, dim=1), target_probs, reduction="batchmean")
               for s, p in enumerate(logits) if s != teacher)
    return DistillationLoss(ce + lam * sum(kl), ce, kl)
