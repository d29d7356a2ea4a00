"""``torch.compile`` of a model's eval for clips of any batch size and frame count
(docs/design.md §5).

A plain ``torch.compile(model, dynamic=True)`` traces the frame count ``T`` symbolically, but the
batch size ``N`` still costs extra graphs: PyTorch specialises sizes equal to 1, and on CPU the
convolutions guard on ``N*T >= 16`` (NNPACK's batch heuristic). :func:`compile_eval` marks ``N``
unbacked (no specialisation, no guard) and ``T`` dynamic, so the only guards left are the branch
boundaries that :func:`~ffn.models.nearest_branch` compares ``T`` with: one graph per branch and
grad mode.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor, nn


def compile_eval(model: nn.Module, **options) -> Callable[[Tensor], Tensor]:
    """``torch.compile(model, fullgraph=True, **options)`` for ``[N, T, 3, H, W]`` clips: one
    graph per branch (and grad mode), whatever ``N`` and ``T``.

    >>> fast = compile_eval(model.eval())           # doctest: +SKIP
    >>> logits = fast(torch.randn(3, 7, 3, 224, 224))  # any N, any T  # doctest: +SKIP

    Each call marks the batch dimension unbacked and the frame dimension dynamic on an alias of
    the input (the caller's tensor keeps no marks). Other inputs (a list of clips for training, a
    packed tensor with its layout) go to the compiled model unmarked.

    With the Inductor backend (the default), PyTorch 2.13's Inductor and an unbacked batch size
    disagree on the strides of a convolution's output when the convolution runs channels_last (a
    runtime assert fails). :func:`compile_eval` therefore turns Inductor's layout optimisation off
    (unless ``options`` says otherwise) and, for a model with channels_last weights, marks ``N``
    dynamic instead of unbacked: correct, at the cost of the extra graphs described above."""
    inductor = options.get("backend", "inductor") == "inductor"
    if inductor:
        options["options"] = {"layout_optimization": False, **options.get("options", {})}
    unbacked = not (inductor and any(_channels_last(p) for p in model.parameters()))
    compiled = torch.compile(model, fullgraph=True, **options)

    @functools.wraps(model.forward)
    def run(x, *args, **kwargs):
        if isinstance(x, Tensor) and x.dim() == 5:
            x = x.view(x.shape)
            if unbacked:
                torch._dynamo.decorators.mark_unbacked(x, 0)
            elif x.shape[0] > 1:  # a size-1 dimension cannot be dynamic
                torch._dynamo.mark_dynamic(x, 0)
            if x.shape[1] > 1:
                torch._dynamo.mark_dynamic(x, 1)
        return compiled(x, *args, **kwargs)

    return run


def _channels_last(p: Tensor) -> bool:
    return p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(
        memory_format=torch.channels_last)
