"""The op-level benchmark cases: each fused op and the eager composition of the same math
(``ffn_kernels.reference``: per-branch BatchNorm, slicing shift, multiply by ``1 + alter``, the
official permute + conv1d of TEA's temporal conv, per-branch ``x + residual`` then LayerNorm), at
the ResNet-50 activation shape of every stage on the packed 4/8/16-frame layout
(``temporal_conv``: TEA's Res2Net split of that stage, 26 of every 256 channels, the tensors it
runs on; ``freq_layer_norm``: the stage's pixels as tokens, ``[frames, H*W, C]``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ffn_kernels import FrameLayout, ops, reference

# ResNet-50 block outputs at a 224x224 input: (stage, channels, spatial size)
STAGES = [("layer1", 256, 56), ("layer2", 512, 28), ("layer3", 1024, 14), ("layer4", 2048, 7)]
OPS = ("shift_alter", "freq_batch_norm", "bn_add_relu_shift_alter", "temporal_conv",
       "freq_layer_norm")


def res2net_split(channels: int) -> int:
    """The split width of TEA's Res2Net-50 (26w x 4s) block whose output has ``channels``."""
    return channels // 4 * 26 // 64


@dataclass
class OpCase:
    op: str
    stage: str
    shape: tuple[int, ...]
    layout: FrameLayout
    inputs: dict
    fused: Callable
    eager: Callable

    def grad_leaves(self) -> list[torch.Tensor]:
        return [t for t in self.inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]


def make_case(op: str, stage: str, channels: int, size: int, frames=(4, 8, 16), clips=2,
              device="cpu", dtype=torch.float32, channels_last=False) -> OpCase:
    layout = FrameLayout(clips=clips, frames=tuple(frames), rows=tuple(range(len(frames))))
    rows = len(frames)
    if op == "temporal_conv":
        channels = res2net_split(channels)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def act():
        if op == "freq_layer_norm":  # tokens: one memory format
            return torch.randn(layout.total_frames, size * size, channels, device=device,
                               dtype=dtype).requires_grad_()
        t = torch.randn(layout.total_frames, channels, size, size, device=device, dtype=dtype)
        return t.contiguous(memory_format=fmt).requires_grad_()

    def param(fill=None):
        t = torch.randn(rows, channels, device=device) * 0.1 if fill is None else \
            torch.full((rows, channels), fill, device=device)
        return t.requires_grad_()

    bn = dict(weight=param(1.0), bias=param(), running_mean=torch.zeros(rows, channels, device=device),
              running_var=torch.ones(rows, channels, device=device))
    if op == "shift_alter":
        inputs = dict(x=act(), alter=param())

        def call(impl):
            return lambda: impl.shift_alter(inputs["x"], layout, inputs["alter"], 8)
    elif op == "freq_batch_norm":
        inputs = dict(x=act(), **bn)

        def call(impl):
            return lambda: impl.freq_batch_norm(
                inputs["x"], layout, inputs["weight"], inputs["bias"], inputs["running_mean"],
                inputs["running_var"], True, 0.1, 1e-5, "relu")
    elif op == "bn_add_relu_shift_alter":
        inputs = dict(z=act(), identity=act(), alter=param(), **bn)

        def call(impl):
            return lambda: impl.bn_add_relu_shift_alter(
                inputs["z"], inputs["identity"], layout, inputs["weight"], inputs["bias"],
                inputs["running_mean"], inputs["running_var"], True, 0.1, 1e-5, inputs["alter"], 8)
    elif op == "temporal_conv":
        inputs = dict(x=act(), weight=(torch.randn(channels, 3, device=device) * 0.5).requires_grad_())

        def call(impl):
            return lambda: impl.temporal_conv(inputs["x"], layout, inputs["weight"])
    elif op == "freq_layer_norm":
        inputs = dict(x=act(), residual=act(), weight=param(1.0), bias=param())

        def call(impl):
            return lambda: impl.freq_layer_norm(inputs["x"], layout, inputs["weight"],
                                                inputs["bias"], 1e-5, inputs["residual"])
    else:
        raise ValueError(f"unknown op {op!r}; choose from {OPS}")
    shape = tuple(inputs[next(iter(inputs))].shape)
    return OpCase(op, stage, shape, layout, inputs, call(ops), call(reference))
