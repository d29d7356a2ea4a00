"""Triton kernels of ``shift_alter`` (docs/design.md §3.1): the forward is the generic forward
launch writing only the shifted copy (``nxt``); the backward is the generic backward with the
reverse shift (``dnext``) and, for ``d alter``, the input ``x`` as ``y``.
"""

import torch

from ..validation import unused_acc
from .common import Plan, backward, forward, on_device, zeros


@on_device
def shift_alter_fwd(x, clips, frames, rows, alter, fold_div):
    plan = Plan(x, clips, frames, rows, fold_div)
    y = torch.empty_like(x)
    forward(plan, x, nxt=y, alter=alter)
    return y


@on_device
def shift_alter_bwd(dy, x, clips, frames, rows, alter, fold_div, alter_grad):
    plan = Plan(x, clips, frames, rows, fold_div)
    dx = torch.empty_like(x)
    grads = [zeros(alter)] if alter_grad else []
    backward(plan, dx, grads, dnext=dy, y=x if alter_grad else None, alter=alter)
    return dx, grads[0] if alter_grad else unused_acc(x)
