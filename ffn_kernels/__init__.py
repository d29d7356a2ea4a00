"""ffn-kernels: fused PyTorch ops for Frame Flexible Network (FFN) video recognition.

``ffn_kernels.ops`` holds the fused ops (:func:`~ffn_kernels.ops.shift_alter`,
:func:`~ffn_kernels.ops.freq_batch_norm`, :func:`~ffn_kernels.ops.bn_add_relu_shift_alter`,
:func:`~ffn_kernels.ops.temporal_conv`, :func:`~ffn_kernels.ops.freq_layer_norm`) on the packed
multi-branch layout described by :class:`FrameLayout`; :class:`FreqBatchNorm2d`
(:class:`FreqBatchNorm3d` for 3D CNNs), :class:`FreqLayerNorm`, :class:`ShiftAlter` and
:class:`TemporalConv` own their parameters (:class:`FreqBatchNormAct2d` with an
activation after the BN; :class:`SyncFreqBatchNorm2d` with statistics of the whole distributed
batch, :func:`convert_sync_freq_batchnorm`); called without a layout, they take the one of the
enclosing ``with frame_layout(layout):`` block. :mod:`ffn_kernels.backend` chooses the kernels.
"""

from . import backend, ops, reference
from .backend import backend_name, get_backend, set_backend
from .layout import FrameLayout, Segment, current_layout, frame_layout, resolve_layout
from .modules import (FreqBatchNorm2d, FreqBatchNorm3d, FreqBatchNormAct2d, FreqLayerNorm,
                      FreqLayerNorm2d, ShiftAlter, TemporalConv)
from .sync_batchnorm import SyncFreqBatchNorm2d, SyncFreqBatchNormAct2d, convert_sync_freq_batchnorm

__version__ = "0.1.0"

__all__ = [
    "FrameLayout", "Segment", "frame_layout", "current_layout", "resolve_layout", "FreqBatchNorm2d",
    "FreqBatchNorm3d", "FreqLayerNorm", "FreqLayerNorm2d",
    "FreqBatchNormAct2d", "SyncFreqBatchNorm2d", "SyncFreqBatchNormAct2d", "convert_sync_freq_batchnorm",
    "ShiftAlter", "TemporalConv", "ops", "reference", "backend", "backend_name", "get_backend", "set_backend",
    "__version__",
]
