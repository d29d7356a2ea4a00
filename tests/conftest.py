"""Shared fixtures: small random packed inputs in every layout the ops must handle."""

import os

import pytest
import torch

import ffn_kernels
from ffn_kernels import FrameLayout

# Backends that run CPU tensors in this process: the compiled kernels (when built) and the reference.
CPU_BACKENDS = ["cpu", "reference"] if ffn_kernels.backend.extension_loaded() else ["reference"]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    """Run the test once per CPU backend, restoring the previous choice afterwards."""
    previous = ffn_kernels.get_backend()
    ffn_kernels.set_backend(request.param)
    yield request.param
    ffn_kernels.set_backend(previous)


def make_params(rows: int, channels: int, dtype=torch.float32, scale=0.5, seed=0):
    """Per-branch BN params and running stats (distinct per row) plus a WA weight."""
    g = torch.Generator().manual_seed(seed)
    weight = 1 + scale * torch.randn(rows, channels, generator=g, dtype=dtype)
    bias = scale * torch.randn(rows, channels, generator=g, dtype=dtype)
    running_mean = 0.1 * torch.randn(rows, channels, generator=g, dtype=dtype)
    running_var = 0.5 + torch.rand(rows, channels, generator=g, dtype=dtype)
    alter = 0.3 * torch.randn(rows, channels, generator=g, dtype=dtype)
    return dict(weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
                alter=alter)


def make_input(layout: FrameLayout, channels: int, hw=(7, 5), dtype=torch.float32,
               channels_last=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(layout.total_frames, channels, *hw, generator=g) * 2 + 0.5).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# Layouts covering: one clip, unequal segments, frame counts 1..20, permuted rows, one segment on a
# high row (eval of an unseen frame count).
LAYOUTS = [
    FrameLayout(clips=2, frames=(4, 8, 16), rows=(0, 1, 2)),
    FrameLayout(clips=1, frames=(1, 3, 20), rows=(2, 0, 1)),
    FrameLayout(clips=3, frames=(2, 5), rows=(1, 0)),
    FrameLayout.single(clips=2, frames=12, row=2),
]


def pytest_report_header(config):
    return (f"ffn_kernels backend for cpu: {ffn_kernels.backend_name('cpu')} "
            f"(FFN_KERNELS_BACKEND={os.environ.get('FFN_KERNELS_BACKEND', 'auto')})")
