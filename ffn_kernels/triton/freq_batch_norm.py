"""Triton kernels of ``freq_batch_norm`` (docs/design.md §3.2): statistics pass, then the generic
forward with BN (``mean``/``invstd``/``weight``/``bias``), optional residual and ReLU; the backward
is the generic BN backward without the shift terms.
"""

import torch

from ..validation import unused_activation
from .common import Plan, backward, forward, on_device, stats, zeros


@on_device
def freq_batch_norm_fwd(x, clips, frames, rows, weight, bias, running_mean, running_var, training,
                        momentum, eps, relu, residual):
    plan = Plan(x, clips, frames, rows)
    mean, invstd, new_rm, new_rv = stats(plan, x, running_mean, running_var, training, momentum,
                                         eps)
    y = torch.empty_like(x)
    forward(plan, x, res=residual, y=y, mean=mean, invstd=invstd, weight=weight, bias=bias,
            relu=relu)
    return y, mean, invstd, new_rm, new_rv


@on_device
def freq_batch_norm_bwd(dy, x, y, clips, frames, rows, weight, mean, invstd, training, relu,
                        has_residual, bias=None):
    plan = Plan(x, clips, frames, rows)
    dx = torch.empty_like(x)
    dres = torch.empty_like(x) if has_residual else None
    grads = [zeros(weight), zeros(weight)]
    backward(plan, dx, grads, dy=dy, x=x, y=y if relu and bias is None else None, dres=dres,
             weight=weight, bias=bias, mean=mean, invstd=invstd, training=training, relu=relu)
    return dx, grads[0], grads[1], unused_activation(x) if dres is None else dres
