"""Triton kernels of ``bn_add_relu_shift_alter`` (docs/design.md §3.3): statistics pass, then the
generic forward writing both ``out = relu(BN(z) + identity)`` and its shifted copy for the next
block; the backward is the generic BN backward with the shift terms (``dnext``, ``alter``).
"""

import torch

from ..validation import unused_acc
from .common import Plan, backward, forward, on_device, stats, zeros


@on_device
def bn_add_relu_shift_alter_fwd(z, identity, clips, frames, rows, weight, bias, running_mean,
                                running_var, training, momentum, eps, alter_next, fold_div):
    plan = Plan(z, clips, frames, rows, fold_div)
    mean, invstd, new_rm, new_rv = stats(plan, z, running_mean, running_var, training, momentum,
                                         eps)
    out, next_in = torch.empty_like(z), torch.empty_like(z)
    forward(plan, z, res=identity, y=out, nxt=next_in, mean=mean, invstd=invstd, weight=weight,
            bias=bias, alter=alter_next, relu=True)
    return out, next_in, mean, invstd, new_rm, new_rv


@on_device
def bn_add_relu_shift_alter_bwd(dout, dnext, z, out, clips, frames, rows, weight, mean, invstd,
                                training, alter_next, fold_div):
    plan = Plan(z, clips, frames, rows, fold_div)
    dz, didentity = torch.empty_like(z), torch.empty_like(z)
    grads = [zeros(weight), zeros(weight)] + ([] if alter_next is None else [zeros(alter_next)])
    backward(plan, dz, grads, dy=dout, dnext=dnext, x=z, y=out, dres=didentity, weight=weight,
             mean=mean, invstd=invstd, training=training, relu=True, alter=alter_next)
    dalter = unused_acc(z) if alter_next is None else grads[2]
    return dz, didentity, grads[0], grads[1], dalter
