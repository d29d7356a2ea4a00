"""Where a training step's time goes, fused and eager side by side: one step of each under
``torch.profiler``, every op's self time put into one of three categories, so that a model-level
ratio splits into the same convolutions and the part the fused ops replace:

- ``convolutions``: the network's convolutions, forward and backward (the same on both sides);
- ``FFN ops``: the fused kernels (``ffn_kernels::*``), or in the eager twin the ops they replace:
  BatchNorm, ReLU, the residual add, the TSM shift's copies and fills, and WA's depthwise 1x1
  conv (every op under a convolution whose weight is ``[C, 1, 1, 1]``, or ``[C, 1, 1, 1, 1]`` in
  3D). Adds, copies and fills anywhere in the step count here, on both sides;
- ``other``: pooling, the head, the loss, autograd and optimizer glue."""

from __future__ import annotations

import torch

from timing import SETTLE_STEPS

CATEGORIES = ("convolutions", "FFN ops", "other")
# the eager ops the fused kernels replace, and the copies, fills and adds of any step
_EQUIVALENTS = (
    "aten::native_batch_norm", "aten::native_batch_norm_backward", "aten::_batch_norm_with_update",
    "aten::batch_norm_backward", "aten::relu", "aten::relu_", "aten::clamp_min",
    "aten::threshold_backward", "aten::add", "aten::add_", "aten::mul", "aten::copy_", "aten::cat",
    "aten::clone", "aten::fill_", "aten::zero_", "aten::zeros_like",
)


def _is_conv(name: str) -> bool:
    return "convolution" in name or name.startswith("aten::slow_conv") or "conv2d" in name


def _depthwise_1x1(event) -> bool:
    """A convolution (forward or backward) whose weight is ``[C, 1, 1, 1]`` (``[C, 1, 1, 1, 1]`` in
    3D): WA's eager conv."""
    shapes = getattr(event, "input_shapes", None) or []
    index = 2 if event.name == "aten::convolution_backward" else 1  # (dy, x, weight) / (x, weight)
    weight = list(shapes[index]) if len(shapes) > index else []
    return len(weight) >= 4 and weight[0] > 1 and all(d == 1 for d in weight[1:])


def category(event) -> str:
    """The category of ``event``'s self time (its name, and the convolution it runs under)."""
    parent = event
    while parent is not None:  # WA's depthwise conv runs ATen's grouped loop: copies and slices
        if _is_conv(parent.name) and _depthwise_1x1(parent):
            return "FFN ops"
        parent = parent.cpu_parent
    if _is_conv(event.name):
        return "convolutions"
    if event.name.startswith("ffn_kernels") or event.name in _EQUIVALENTS:
        return "FFN ops"
    return "other"


def profile(device, step) -> tuple[dict, dict]:
    """Profile one call of ``step`` after ``SETTLE_STEPS`` untimed ones: (ms per category, ms per
    "other" op). A step profiled after one warm-up had single block-op calls at 45-80 ms instead
    of 15: the huge-page faults of a step whose memory has not settled (timing.py)."""
    for _ in range(SETTLE_STEPS):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    totals = dict.fromkeys(CATEGORIES, 0.0)
    other: dict[str, float] = {}
    for e in prof.events():
        ms = (e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total) / 1e3
        cat = category(e)
        totals[cat] += ms
        if cat == "other":
            other[e.name] = other.get(e.name, 0.0) + ms
    return totals, other


def profile_training_steps(device, steps: dict, report) -> None:
    """Profile each named training step and add one row per (step, category)."""
    for name, step in steps.items():
        totals, other = profile(device, step)
        whole = sum(totals.values()) or 1.0
        top = sorted(other.items(), key=lambda kv: -kv[1])[:3]
        largest = ", ".join(f"{k} {v:.0f} ms" for k, v in top)
        for cat in CATEGORIES:
            report.add("profile", {"step": name, "category": cat, "ms": totals[cat],
                                   "share": totals[cat] / whole,
                                   "largest": largest if cat == "other" else ""})
    report.print_section(
        "profile", "Profile of one training step per side "
        f"({'device' if device.type == 'cuda' else 'CPU'} self time per op, summed by category; "
        "FFN ops = the fused kernels, or the eager ops they replace; the profiler adds some "
        "overhead)",
        ["step", "category", "ms", "share", "largest"])
