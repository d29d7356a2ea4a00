"""Triton backend: the raw API of :mod:`ffn_kernels.reference` on fused Triton kernels, one module
per op (``shift_alter``, ``freq_batch_norm``, ``bn_add_relu_shift_alter``, ``temporal_conv``,
``freq_layer_norm``) over the shared launch code of :mod:`.common` and the JIT kernels of
:mod:`.kernels` (``temporal_conv`` and ``freq_layer_norm`` keep their own kernels in their modules).

Runs CUDA (or ROCm) tensors; CPU tensors run under the Triton interpreter when
``TRITON_INTERPRET=1`` was set before Triton was first imported (how CI tests these kernels).
"""

from .bn_add_relu_shift_alter import bn_add_relu_shift_alter_bwd, bn_add_relu_shift_alter_fwd
from .freq_batch_norm import freq_batch_norm_bwd, freq_batch_norm_fwd
from .freq_layer_norm import freq_layer_norm_bwd, freq_layer_norm_fwd
from .shift_alter import shift_alter_bwd, shift_alter_fwd
from .temporal_conv import temporal_conv_bwd, temporal_conv_fwd

name = "triton"

__all__ = [
    "shift_alter_fwd", "shift_alter_bwd", "freq_batch_norm_fwd", "freq_batch_norm_bwd",
    "bn_add_relu_shift_alter_fwd", "bn_add_relu_shift_alter_bwd", "temporal_conv_fwd",
    "temporal_conv_bwd", "freq_layer_norm_fwd", "freq_layer_norm_bwd",
]
