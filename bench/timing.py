"""Side-by-side timing and memory measurement for the benchmark (docs/design.md §6)."""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    samples: list[float]  # seconds per run

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples)

    @property
    def ms(self) -> float:
        return self.median_s * 1e3

    @property
    def min_ms(self) -> float:
        return min(self.samples) * 1e3

    @property
    def max_ms(self) -> float:
        return max(self.samples) * 1e3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Untimed training steps before a model's step is timed or profiled. A step's memory settles over
# the first three: on the 2-core Xeon the fused TSM-R50 step (112 px, channels_last) took 3,954,
# 1,570, 1,464 and then 1,390-1,410 ms, its second and third steps paying 33 and 17 faults of
# transparent huge pages (4-5 ms each, direct compaction) as the allocator grew to the step's peak;
# after one warm-up step the timed median mixed those in.
SETTLE_STEPS = 3


def measure(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1,
            setup: Callable[[], object] | None = None) -> Timing:
    """Median wall time of ``fn()`` over ``repeats`` runs; ``setup()`` runs untimed before each.

    On CUDA the interval is taken with CUDA events, on CPU with ``perf_counter``."""
    samples = []
    for i in range(warmup + repeats):
        state = setup() if setup is not None else None
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn() if state is None else fn(state)
            end.record()
            torch.cuda.synchronize(device)
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn() if state is None else fn(state)
            elapsed = time.perf_counter() - t0
        if i >= warmup:
            samples.append(elapsed)
        del state
    return Timing(samples)


def saved_tensor_bytes(fn: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """Bytes autograd keeps for backward while ``fn()`` runs (distinct storages counted once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by ``fn()`` above what was live before it.

    CUDA: the caching allocator's peak. CPU: the profiler's memory events (allocations minus frees,
    running maximum), which sees every tensor torch allocates."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    # allocations show as an op's self memory, frees outside any op as "[memory]" records
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage),
                    key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak
