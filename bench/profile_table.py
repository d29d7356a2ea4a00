"""Where a training step's time goes: one step under ``torch.profiler``, each op's self time put
into convolutions / fused ops / copies and fills / other (pooling, head, loss, autograd glue)."""

from __future__ import annotations

import torch

CATEGORIES = ("convolutions", "fused ops", "copies and fills", "other")
_COPIES = ("aten::copy_", "aten::cat", "aten::clone", "aten::_to_copy", "aten::fill_", "aten::zero_")


def category(op: str) -> str:
    if "convolution" in op or op.startswith("aten::slow_conv"):  # ATen's fallback conv3d kernels
        return "convolutions"
    if op.startswith("ffn_kernels"):
        return "fused ops"
    if op in _COPIES:
        return "copies and fills"
    return "other"


def profile_training_step(device, step, report, title: str) -> None:
    """Profile one call of ``step`` (after a warm-up call) and add the category rows."""
    step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    totals = dict.fromkeys(CATEGORIES, 0.0)
    top: dict[str, float] = {}
    for e in prof.key_averages():
        us = e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
        cat = category(e.key)
        totals[cat] += us
        if cat == "other":
            top[e.key] = us
    whole = sum(totals.values()) or 1.0
    largest = ", ".join(f"{k} {v / 1e3:.0f} ms" for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:4])
    for cat in CATEGORIES:
        report.add("profile", {"step": title, "category": cat, "ms": totals[cat] / 1e3,
                               "share": totals[cat] / whole,
                               "largest": largest if cat == "other" else ""})
    report.print_section(
        "profile", f"Profile of one {title} ({'device' if device.type == 'cuda' else 'CPU'} self "
        "time per op, summed by category; the profiler adds some overhead)",
        ["category", "ms", "share", "largest"])
