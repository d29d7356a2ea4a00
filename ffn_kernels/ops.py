"""The fused ops (docs/design.md §3), Python side.

Public functions (take a :class:`~ffn_kernels.FrameLayout`):

* :func:`shift_alter` — temporal shift + Weight Alteration, ``y = (1 + alter[p]) * x[src]``;
* :func:`freq_batch_norm` — frequency-indexed BatchNorm (+ residual, + ReLU);
* :func:`bn_add_relu_shift_alter` — the residual-block boundary, ``out = relu(BN(z) + identity)``
  and ``next_in = shift_alter(out)`` in one pass;
* :func:`temporal_conv` — TEA's 3-tap temporal depthwise conv, ``y[t] = w0·x[t-1] + w1·x[t] +
  w2·x[t+1]`` inside each clip;
* :func:`freq_layer_norm` — frequency-indexed LayerNorm of tokens (+ residual, whose sum it
  returns).

Each is ``torch.ops.ffn_kernels.<name>``, defined in C++ with its schemas, argument checks, Meta
(fake) kernel, autograd formula (backward op ``<name>_backward``) and backend dispatch in
``csrc/ops/<name>.cpp`` (signatures in ``csrc/ops/<name>.h``), so a call costs one dispatcher trip, not a Python autograd path;
``torch.compile`` traces them and ``torch.library.opcheck`` passes. These wrappers only unpack the
layout, spell out defaults and, for the BatchNorm ops, write the updated running statistics back
in place (the ops themselves are functional), as ``nn.BatchNorm2d`` does.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import backend
from .layout import FrameLayout
from .validation import boolean, integer, momenta, real, tensor, writable

if backend.extension_loaded():
    _shift_alter = torch.ops.ffn_kernels.shift_alter.default
    _freq_batch_norm = torch.ops.ffn_kernels.freq_batch_norm.default
    _bn_add_relu_shift_alter = torch.ops.ffn_kernels.bn_add_relu_shift_alter.default
    _temporal_conv = torch.ops.ffn_kernels.temporal_conv.default
    _freq_layer_norm = torch.ops.ffn_kernels.freq_layer_norm.default
else:
    _shift_alter = _freq_batch_norm = _bn_add_relu_shift_alter = _temporal_conv = (
        _freq_layer_norm) = backend.missing_extension


def _check_layout(layout) -> None:
    if type(layout) is not FrameLayout:
        raise TypeError(f"layout must be a ffn_kernels.FrameLayout, got {type(layout).__name__}")


def _norm_args(weight, bias, running_mean, running_var, training, eps) -> tuple:
    """The BN ops' per-row tensors, ``training`` and ``eps``, checked for type (one-line errors
    naming the argument); running statistics that training would write back must be writable."""
    weight, bias = tensor("weight", weight), tensor("bias", bias)
    running_mean = tensor("running_mean", running_mean, optional=True)
    running_var = tensor("running_var", running_var, optional=True)
    training = boolean("training", training)
    if training:
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is not None:
                writable(name, t)
    return weight, bias, running_mean, running_var, training, real("eps", eps)


def _write_back(training, running_mean, running_var, new_rm, new_rv) -> None:
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new_rm)
            running_var.copy_(new_rv)


def shift_alter(
    x: Tensor, layout: FrameLayout, alter: Optional[Tensor] = None, fold_div: int = 8
) -> Tensor:
    """Temporal shift of every segment's clips plus Weight Alteration.

    ``y[f, c] = (1 + alter[p_s, c]) * x[src(f, c)]`` where ``src`` moves channels ``[0, fold)`` one
    frame back in time (frame t reads t+1), channels ``[fold, 2*fold)`` one frame forward, leaves
    the rest, and gives zeros outside the clip (``fold = C // fold_div``).

    Args:
        x: ``[F, C, H, W]`` activations in ``layout`` (``F = layout.total_frames``), NCHW or
            channels_last, float16/bfloat16/float32/float64.
        layout: the packed layout of ``x``.
        alter: ``[P, C]`` Weight Alteration, one row per branch, or ``None`` for a pure shift.
        fold_div: the shifted fraction of channels per direction is ``1 / fold_div``.

    Returns:
        ``[F, C, H, W]`` in the memory format of ``x``.
    """
    _check_layout(layout)
    return _shift_alter(tensor("x", x), layout.clips, layout.frames, layout.rows,
                        tensor("alter", alter, optional=True), integer("fold_div", fold_div))


def freq_batch_norm(
    x: Tensor,
    layout: FrameLayout,
    weight: Tensor,
    bias: Tensor,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    training: bool = True,
    momentum: float | Sequence[float] = 0.1,
    eps: float = 1e-5,
    activation: Optional[str] = None,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """Frequency-indexed BatchNorm: segment ``s`` is normalised with parameter row ``p_s``.

    ``y = act(weight[p]·(x - μ)·rsqrt(σ² + eps) + bias[p] + residual)``. In training μ and the
    biased σ² come from the segment's frames × H × W and row ``p``'s running statistics are updated
    in place like ``nn.BatchNorm2d``; in eval the running statistics are used.

    Args:
        x: ``[F, C, H, W]`` activations in ``layout``, NCHW or channels_last.
        layout: the packed layout of ``x``.
        weight, bias: ``[P, C]`` affine parameters, one row per branch.
        running_mean, running_var: ``[P, C]`` running statistics (both or neither; required when
            ``training=False``), updated in place in training.
        training: normalise with batch statistics (True) or the running ones (False).
        momentum: running-statistics momentum, one float or one per segment.
        eps: added to the variance.
        activation: ``None`` or ``"relu"``.
        residual: optional ``[F, C, H, W]`` tensor added before the activation.

    Returns:
        ``[F, C, H, W]`` in the memory format of ``x``.
    """
    _check_layout(layout)
    if activation not in (None, "relu"):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    weight, bias, running_mean, running_var, training, eps = _norm_args(
        weight, bias, running_mean, running_var, training, eps)
    y, _, _, new_rm, new_rv = _freq_batch_norm(
        tensor("x", x), layout.clips, layout.frames, layout.rows, weight, bias, running_mean,
        running_var, training, momenta(momentum, layout), eps, activation == "relu",
        tensor("residual", residual, optional=True),
    )
    _write_back(training, running_mean, running_var, new_rm, new_rv)
    return y


def bn_add_relu_shift_alter(
    z: Tensor,
    identity: Tensor,
    layout: FrameLayout,
    weight: Tensor,
    bias: Tensor,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    training: bool = True,
    momentum: float | Sequence[float] = 0.1,
    eps: float = 1e-5,
    alter_next: Optional[Tensor] = None,
    fold_div: int = 8,
) -> tuple[Tensor, Tensor]:
    """Residual-block boundary in one pass.

    ``out = relu(freq_batch_norm(z) + identity)`` (the block output, the next block's identity)
    and ``next_in = shift_alter(out, layout, alter_next, fold_div)`` (the next block's conv1 input).

    Args:
        z: ``[F, C, H, W]`` output of the block's last convolution, in ``layout``.
        identity: ``[F, C, H, W]`` the block's shortcut, same dtype and device as ``z``.
        layout, weight, bias, running_mean, running_var, training, momentum, eps: as in
            :func:`freq_batch_norm`.
        alter_next: ``[P, C]`` Weight Alteration of the next block, or ``None``.
        fold_div: as in :func:`shift_alter`.

    Returns:
        ``(out, next_in)``, both ``[F, C, H, W]`` in the memory format of ``z``.
    """
    _check_layout(layout)
    weight, bias, running_mean, running_var, training, eps = _norm_args(
        weight, bias, running_mean, running_var, training, eps)
    out, next_in, _, _, new_rm, new_rv = _bn_add_relu_shift_alter(
        tensor("z", z), tensor("identity", identity), layout.clips, layout.frames, layout.rows,
        weight, bias, running_mean, running_var, training, momenta(momentum, layout), eps,
        tensor("alter_next", alter_next, optional=True), integer("fold_div", fold_div),
    )
    _write_back(training, running_mean, running_var, new_rm, new_rv)
    return out, next_in


def temporal_conv(x: Tensor, layout: FrameLayout, weight: Tensor) -> Tensor:
    """Temporal depthwise convolution with 3 taps per channel inside every clip (TEA's multiple
    temporal aggregation, a learnable generalisation of the TSM shift).

    ``y[t, c] = w[c, 0]·x[t-1, c] + w[c, 1]·x[t, c] + w[c, 2]·x[t+1, c]``, where a frame outside
    the clip counts as zero: ``nn.Conv1d(C, C, 3, padding=1, groups=C, bias=False)`` over each
    clip's frames, for every pixel, without the two permute copies.

    Args:
        x: ``[F, C, H, W]`` activations in ``layout``, NCHW or channels_last,
            float16/bfloat16/float32/float64.
        layout: the packed layout of ``x`` (its rows are not read: all branches share the taps).
        weight: ``[C, 3]`` taps, or ``nn.Conv1d``'s ``[C, 1, 3]`` depthwise weight.

    Returns:
        ``[F, C, H, W]`` in the memory format of ``x``.
    """
    _check_layout(layout)
    if weight.dim() == 3 and weight.shape[1] == 1:  # nn.Conv1d's depthwise weight
        weight = weight.squeeze(1)
    return _temporal_conv(x, layout.clips, layout.frames, weight)


def freq_layer_norm(
    x: Tensor,
    layout: FrameLayout,
    weight: Tensor,
    bias: Tensor,
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
):
    """Frequency-indexed LayerNorm: the tokens of segment ``s`` are normalised over their last
    dimension with parameter row ``p_s``.

    ``y = (s - μ)·rsqrt(σ² + eps)·weight[p] + bias[p]`` per token, with ``s = x + residual`` (or
    ``x``) and μ, σ² its mean and biased variance over the ``C`` channels (float32 for half
    inputs). With a residual, the sum ``s`` is returned too, as fused add + LayerNorm kernels do,
    so that a pre-norm block reads its input once: ``(y, s)``.

    Args:
        x: ``[F, ..., C]`` tokens: dim 0 holds the layout's frames, every other element of a frame
            but the last dim is one more token of it; float16/bfloat16/float32/float64.
        layout: the packed layout of dim 0.
        weight, bias: ``[P, C]`` affine parameters, one row per branch.
        eps: added to the variance.
        residual: optional tensor shaped like ``x``, added first.

    Returns:
        ``y`` (contiguous, ``x``'s shape), or ``(y, x + residual)`` with a residual.
    """
    _check_layout(layout)
    y, s, _, _ = _freq_layer_norm(x, layout.clips, layout.frames, layout.rows, weight, bias,
                                  float(eps), residual)
    return y if residual is None else (y, s)
