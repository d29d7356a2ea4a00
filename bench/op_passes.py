"""Every kernel pass of the fused ops as one raw-op call, for any backend's raw API
(``ffn_kernels.backend``: the compiled CPU/CUDA kernels, Triton), with its floor: the number of
activation-sized tensors it must read or write at least (each big input read once, each big
output written once; parameters, statistics and the layout are not counted). The traffic meter
(``triton_traffic.py``) counts the Triton passes' bytes against it; the roofline section
(``roofline_section.py``) times the compiled passes against it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Pass:
    op: str
    pass_: str  # fwd | bwd
    mode: str  # train | eval for the BN ops, res (with a residual) for the LayerNorm, else -
    floor: int  # activation-sized tensors read + written at least
    fn: Callable
    args: tuple

    def __call__(self):
        return self.fn(*self.args)


def op_passes(api, clips: int, frames: list[int], shape: tuple[int, ...], dtype=torch.float32,
              device="cpu", channels_last: bool = False, seed: int = 0) -> list[Pass]:
    """The passes of every op on random activations of ``shape`` ``[F, C, H, W]`` (``F`` the
    layout's frames; the LayerNorm reads each pixel's channels as a token, ``[F, H*W, C]``)."""
    rows, P, channels = list(range(len(frames))), len(frames), shape[1]
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def big():
        t = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
        return t.contiguous(memory_format=fmt)

    def small():
        return (torch.rand(P, channels, generator=g) + 0.5).to(device)

    x, x2, dy, dy2 = big(), big(), big(), big()
    w, b, rm, rv, alter = (small() for _ in range(5))
    mom, layout = [0.1] * P, (clips, frames, rows)
    out = [Pass("shift_alter", "fwd", "-", 2, api.shift_alter_fwd, (x, *layout, alter, 8)),
           Pass("shift_alter", "bwd", "-", 3, api.shift_alter_bwd, (dy, x, *layout, alter, 8, True))]
    for training, mode in ((True, "train"), (False, "eval")):
        y, mean, invstd, _, _ = api.freq_batch_norm_fwd(x, *layout, w, b, rm, rv, training, mom, 1e-5,
                                                        False, None)
        out += [Pass("freq_batch_norm", "fwd", mode, 2, api.freq_batch_norm_fwd,
                     (x, *layout, w, b, rm, rv, training, mom, 1e-5, False, None)),
                Pass("freq_batch_norm", "bwd", mode, 3, api.freq_batch_norm_bwd,
                     (dy, x, y, *layout, w, mean, invstd, training, False, False))]
    for training, mode in ((True, "train"), (False, "eval")):
        res, _, mean, invstd, _, _ = api.bn_add_relu_shift_alter_fwd(
            x, x2, *layout, w, b, rm, rv, training, mom, 1e-5, alter, 8)
        out += [Pass("bn_add_relu_shift_alter", "fwd", mode, 4, api.bn_add_relu_shift_alter_fwd,
                     (x, x2, *layout, w, b, rm, rv, training, mom, 1e-5, alter, 8)),
                Pass("bn_add_relu_shift_alter", "bwd", mode, 6, api.bn_add_relu_shift_alter_bwd,
                     (dy, dy2, x, res, *layout, w, mean, invstd, training, alter, 8))]
    taps = torch.randn(channels, 3, generator=g).to(device)
    out += [Pass("temporal_conv", "fwd", "-", 2, api.temporal_conv_fwd, (x, clips, frames, taps)),
            Pass("temporal_conv", "bwd", "-", 3, api.temporal_conv_bwd, (dy, x, clips, frames, taps, True))]
    tokens = [t.permute(0, 2, 3, 1).reshape(shape[0], -1, channels).contiguous() for t in (x, x2, dy, dy2)]
    _, s, mean, rstd = api.freq_layer_norm_fwd(tokens[0], *layout, w, b, 1e-5, tokens[1])
    out += [Pass("freq_layer_norm", "fwd", "res", 4, api.freq_layer_norm_fwd,
                 (tokens[0], *layout, w, b, 1e-5, tokens[1])),
            Pass("freq_layer_norm", "bwd", "res", 4, api.freq_layer_norm_bwd,
                 (tokens[2], tokens[3], s, *layout, w, mean, rstd))]
    return out
