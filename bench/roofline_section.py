"""Benchmark section: every kernel pass of the fused ops at the ResNet-50 layer1 shape against this
machine's memory bandwidth (docs/design.md §6).

The ops are memory-bound, so their limit is the bytes they must move over the bandwidth the
machine gives. For each pass (``op_passes.py``; forward and backward, training and eval, both
memory formats) the section prints the bytes at the floor (each big input read once, each big
output written once), the bytes the fused design moves (the traffic meter's count for the Triton
kernels, where the traffic section ran), the time of the compiled kernel, its effective bandwidth
(floor bytes / time) and that as a fraction of a copy measured in the same run, with the same
allocator and threads: into a fresh output (``clone``, which pays the allocation's page faults as a
fresh op output does) and into a preallocated one (``copy_``)."""

from __future__ import annotations

import torch

import ffn_kernels
from ffn_kernels import backend
from op_cases import STAGES
from op_passes import op_passes
from timing import measure

FRAMES = [4, 8, 16]
COPY_REPEATS = 15
# memory bandwidth by the GPU's spec sheet (bytes/s), printed beside the measured copy
GPU_PEAK = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def raw_api(device: torch.device):
    """The raw ops ``ffn_kernels.ops`` run on ``device``'s tensors: the compiled kernels, or Triton
    on a GPU without the CUDA extension."""
    if device.type == "cuda" and not backend.extension_has_cuda():
        import ffn_kernels.triton as api
        return api
    return backend._compiled()


def copy_gbs(x: torch.Tensor, device: torch.device, repeats: int) -> tuple[float, float]:
    """GB/s of copying ``x`` (read + write) into a fresh tensor and into a preallocated one."""
    moved = 2 * x.numel() * x.element_size()
    out = torch.empty_like(x)
    fresh = measure(lambda: x.clone(), device, repeats)
    pre = measure(lambda: out.copy_(x), device, repeats)
    return moved / fresh.median_s / 1e9, moved / pre.median_s / 1e9


def roofline_section(args, report) -> None:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    _, channels, size = STAGES[0]
    shape = (args.clips * sum(FRAMES), channels, size, size)
    elements, item = torch.Size(shape).numel(), torch.empty((), dtype=dtype).element_size()
    metered = {(r["op"], r["pass"], r["mode"]): r["fused_B/elem"] for r in report.sections["traffic"]}
    api = raw_api(device)
    copies = {}
    for fmt, channels_last in (("nchw", False), ("channels_last", True)):
        passes = op_passes(api, args.clips, FRAMES, shape, dtype, device, channels_last)
        # every fraction divides by the copy: it gets more runs (3 left it 27-33 GB/s run to run)
        copies[fmt] = copy_gbs(passes[0].args[0], device, max(args.repeats, COPY_REPEATS))
        for p in passes:
            if channels_last and p.op == "freq_layer_norm":
                continue  # tokens [F, H*W, C]: one layout, measured with nchw
            t = measure(p, device, args.repeats)
            floor = p.floor * elements * item
            gbs = floor / t.median_s / 1e9
            moved = metered.get((p.op, p.pass_, p.mode))
            report.add("roofline", {
                "format": "tokens" if p.op == "freq_layer_norm" else fmt, "op": p.op, "pass": p.pass_,
                "mode": p.mode, "floor_MB": floor / 2**20,
                "moved_MB": None if moved is None else moved * elements / 2**20,
                "ms": t.ms, "min_ms": t.min_ms, "max_ms": t.max_ms, "GB/s": gbs,
                "of_fresh_copy": gbs / copies[fmt][0], "of_prealloc_copy": gbs / copies[fmt][1],
                # the metered bytes over the time: how near the copy the bytes this design moves go
                "moved_of_fresh_copy": None if moved is None else
                moved * elements / t.median_s / 1e9 / copies[fmt][0]})
        del passes
    peak = next((bw for name, bw in GPU_PEAK.items()
                 if device.type == "cuda" and name in torch.cuda.get_device_name(device)), None)
    copy_line = "; ".join(f"{fmt}: fresh output {fresh:.1f} GB/s, preallocated {pre:.1f} GB/s"
                          for fmt, (fresh, pre) in copies.items())
    report.print_section(
        "roofline",
        f"Roofline: each fused pass at the layer1 shape {list(shape)} ({args.dtype}, "
        f"{ffn_kernels.backend_name(device)} kernels) against this run's copy bandwidth ({copy_line}"
        + (f"; spec peak {peak / 1e12:.2f} TB/s" if peak else "") + "). GB/s = floor bytes / time; "
        "moved_MB = the Triton kernels' metered traffic (the CPU kernels follow the same passes)",
        ["format", "op", "pass", "mode", "floor_MB", "moved_MB", "ms", "min_ms", "max_ms", "GB/s",
         "of_fresh_copy", "of_prealloc_copy", "moved_of_fresh_copy"])
    report.meta["copy_GBps"] = {fmt: {"fresh": f, "preallocated": p} for fmt, (f, p) in copies.items()}
