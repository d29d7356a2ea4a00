"""Triton backend: the raw API of :mod:`ffn_kernels.reference` on fused Triton kernels.

Runs CUDA (or ROCm) tensors; CPU tensors run under the Triton interpreter when
``TRITON_INTERPRET=1`` was set before Triton was first imported (how CI tests these kernels).
"""

from .api import bn_bwd, bn_fwd, bnrs_bwd, bnrs_fwd, shift_alter_bwd, shift_alter_fwd

name = "triton"

__all__ = ["shift_alter_fwd", "shift_alter_bwd", "bn_fwd", "bn_bwd", "bnrs_fwd", "bnrs_bwd"]
