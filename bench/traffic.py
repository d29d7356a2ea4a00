"""Memory traffic of eager code: the bytes of every aten op's tensor inputs and outputs.

This is a lower bound of what eager PyTorch moves (each op reads its inputs and writes its outputs
at least once); views move nothing and are skipped. The fused side is counted from the Triton
kernels' own loads and stores (the traffic meter, ``bench/triton_traffic.py``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# ops that only reinterpret or describe memory
_FREE = {"view", "_unsafe_view", "as_strided", "expand", "reshape", "slice", "select", "t",
         "transpose", "permute", "unsqueeze", "squeeze", "alias", "detach", "split", "chunk",
         "unbind", "empty", "empty_like", "empty_strided", "lift_fresh"}

# in-place ops that overwrite their first argument without reading it
_OVERWRITE = {"copy_", "fill_", "zero_", "normal_", "uniform_"}


class EagerTraffic(TorchDispatchMode):
    """Counts bytes read (tensor inputs) and written (tensor outputs) per aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.read = self.written = 0
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in _FREE:
            return out
        ins = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if name in _OVERWRITE:  # the destination is written, not read
            ins = ins[1:]
        read = sum(t.numel() * t.element_size() for t in ins)
        written = sum(t.numel() * t.element_size() for t in outs)
        self.read += read
        self.written += written
        self.ops[name] = self.ops.get(name, 0) + read + written
        return out

    @property
    def total(self) -> int:
        return self.read + self.written


def eager_traffic(fn: Callable[[], object]) -> EagerTraffic:
    with EagerTraffic() as meter:
        fn()
    return meter
