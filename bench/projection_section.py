"""Benchmark section: a GPU step-time PROJECTION of the model section's training step, fused vs
eager, from what one step computes and moves, counted on this machine. Nothing here runs on a GPU.

Per side, with the GPU's spec-sheet peaks (``GPUS``) and stated efficiencies:

    device_ms = conv_FLOPs / (ETA_FLOPS * peak_FLOPs) + other_bytes / (ETA_BYTES * bandwidth)
    host_ms   = ops * LAUNCH_S     (a floor for the host: one kernel launch per op, no CUDA graphs)

- ``conv_FLOPs``: the convolutions' and the head's FLOPs of one step, forward and backward
  (``torch.utils.flop_counter``'s formulas): the same work on both sides.
- ``other_bytes``: everything else. Eager: every aten op's inputs + outputs (``traffic.py``, a
  lower bound; WA's depthwise conv counts here, as the memory-bound op it is). Fused: each fused
  kernel call's elements times the bytes per element the traffic meter counted for that pass
  (the Triton kernels' own loads and stores, the traffic section), plus the remaining aten ops'
  inputs + outputs.
- Both terms are summed (no overlap of convolutions with memory-bound work), which favours
  neither side; the fused ops' share of the projected step is their bytes' term over the whole.

It shows what the CPU numbers cannot: how much of a GPU step is left to the ops this project
fuses, where convolutions run on tensor cores."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import flop_registry

from model_section import _arch, autocast, inputs, training_step
from traffic import EagerTraffic

# spec-sheet peaks: dense tensor-core FLOP/s for float32 convs (TF32, cuDNN's default for
# convolutions) and for bfloat16/float16, and HBM bandwidth (bytes/s)
GPUS = {"H100 SXM": {"float32": 494.7e12, "half": 989.4e12, "bandwidth": 3.35e12}}
ETA_FLOPS = 0.5  # cuDNN convolutions at ResNet-50 shapes: about half of the tensor-core peak
ETA_BYTES = 0.8  # memory-bound kernels: about 0.8 of the HBM peak
LAUNCH_S = 5e-6  # host time per launched op of eager PyTorch
_CONVS = ("convolution", "convolution_backward")
_MATMULS = ("mm", "addmm")  # the head
_BN_OPS = ("freq_batch_norm", "bn_add_relu_shift_alter")


def _depthwise(name: str, args) -> bool:
    """A convolution whose weight is ``[C, 1, 1, 1]`` (WA's eager conv)."""
    weight = args[2] if name == "convolution_backward" else args[1]  # (dy, x, w) / (x, w)
    return tuple(weight.shape[1:]) == (1, 1, 1) and weight.shape[0] > 1


class StepCounter(EagerTraffic):
    """FLOPs of the convolutions and the head; bytes of every other op (the fused kernels' from
    the metered bytes per element); and the number of ops that launch a kernel."""

    def __init__(self, metered: dict) -> None:
        super().__init__()
        self.metered = metered
        self.count = 0
        self.flops = 0
        self.fused = 0  # bytes of the fused kernels

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace == "ffn_kernels":  # the public ops: op and op_backward
            out = func(*args, **(kwargs or {}))
            op, pass_ = (name[:-9], "bwd") if name.endswith("_backward") else (name, "fwd")
            training = next((a for a in args if isinstance(a, bool)), False)  # the BN ops' first
            mode = ("train" if training else "eval") if op in _BN_OPS else "-"
            moved = self.metered[(op, pass_, mode)] * args[0].numel()
            self.fused += moved
            self.read += moved
            self.count += 1
            return out
        if name in _MATMULS or (name in _CONVS and not _depthwise(name, args)):
            out = func(*args, **(kwargs or {}))
            # PyTorch's own FLOP formulas (FlopCounterMode's); WA's depthwise conv is left out, as
            # their backward formula ignores groups (it counts C times the grouped conv's FLOPs)
            self.flops += flop_registry[func.overloadpacket](*args, **(kwargs or {}), out_val=out)
            self.count += 1
            return out
        before = self.total
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.count += self.total > before  # ops that move nothing launch nothing
        return out


def count_step(args, device, model, clips, target, metered: dict) -> dict:
    """FLOPs of the convolutions, bytes of the rest and ops of one training step of ``model``."""
    step = training_step(args, device, model, clips, target)
    step()  # warm-up: lazy buffers, first-call caches
    with StepCounter(metered) as counter:
        step()
    return {"GFLOP": counter.flops / 1e9, "MB": counter.total / 2**20,
            "fused_MB": counter.fused / 2**20, "ops": counter.count}


def projection_section(args, report, metered: dict) -> None:
    """``metered``: the traffic section's fused bytes per element, keyed (op, pass, mode)."""
    if getattr(args, "arch", "resnet") != "resnet":
        return  # the metered passes are the TSM ops'; the other archs' projection is not built
    device = torch.device("cpu")  # counts, not times: the CPU gives the same numbers
    cls, kw, twin = _arch(args)
    torch.manual_seed(0)
    fused = cls(**kw)
    sides = {"fused": fused, "eager": twin.twin(fused)}
    size, clips, target, _ = inputs(args, device)
    precision = "float32" if args.dtype == "float32" else "half"
    for gpu, spec in GPUS.items():
        for side, model in sides.items():
            c = count_step(args, device, model, clips, target, metered)
            conv_ms = c["GFLOP"] * 1e9 / (ETA_FLOPS * spec[precision]) * 1e3
            bytes_ms = c["MB"] * 2**20 / (ETA_BYTES * spec["bandwidth"]) * 1e3
            fused_ms = c["fused_MB"] * 2**20 / (ETA_BYTES * spec["bandwidth"]) * 1e3
            report.add("projection", {
                "gpu": gpu, "side": side, "conv_GFLOP": c["GFLOP"], "other_MB": c["MB"],
                "ops": c["ops"], "conv_ms": conv_ms, "other_ms": bytes_ms,
                "device_ms": conv_ms + bytes_ms, "host_ms": c["ops"] * LAUNCH_S * 1e3,
                "fused_ops_share": fused_ms / (conv_ms + bytes_ms) if side == "fused" else None})
    rows = report.sections["projection"]
    for r in rows:
        eager = next(e for e in rows if e["gpu"] == r["gpu"] and e["side"] == "eager")
        r["eager/device_ms"] = eager["device_ms"] / r["device_ms"]
    report.print_section(
        "projection",
        f"GPU PROJECTION (not a measurement) of one training step, {args.clips} clips x "
        f"{'+'.join(map(str, kw['frames']))} frames, {size}x{size}, {args.dtype}: device_ms = "
        f"conv FLOPs / ({ETA_FLOPS} x tensor-core peak) + other bytes / ({ETA_BYTES} x HBM peak); "
        f"host_ms = ops x {LAUNCH_S * 1e6:.0f} us; fused bytes from the traffic meter",
        ["gpu", "side", "conv_GFLOP", "other_MB", "ops", "conv_ms", "other_ms", "device_ms",
         "eager/device_ms", "host_ms", "fused_ops_share"])
