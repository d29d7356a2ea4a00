"""Per-call cost of the ops at a tiny shape, where the host-side path (dispatch, checks, autograd)
and not the kernel sets the time: each fused op against the eager composition it replaces, on one
thread. Target (docs/design.md §6): fused fwd+bwd <= 0.7x eager."""

from __future__ import annotations

import statistics
import time

import torch

from op_cases import OPS, make_case

SHAPE = dict(channels=16, size=2, clips=1)  # [28, 16, 2, 2]: 1 clip x (4+8+16) frames
TARGET = 0.7


def _per_call_us(fn, device, calls: int, rounds: int) -> list[float]:
    """Microseconds per call of ``fn`` in each of ``rounds`` rounds of ``calls`` calls."""
    for _ in range(max(10, calls // 10)):
        fn()
    samples = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return samples


def overhead_section(args, report) -> None:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    calls, rounds = (50, 3) if args.quick else (300, 7)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for op in OPS:
            case = make_case(op, "overhead", device=device, dtype=dtype,
                             channels_last=args.channels_last, **SHAPE)
            for mode in ("forward", "fwd+bwd"):
                us = {}
                for impl, fn in (("fused", case.fused), ("eager", case.eager)):
                    outs = fn()
                    outs = outs if isinstance(outs, tuple) else (outs,)
                    cotangents = [torch.ones_like(o) for o in outs]

                    def step(fn=fn, cotangents=cotangents):
                        outs = fn()
                        if mode == "fwd+bwd":
                            outs = outs if isinstance(outs, tuple) else (outs,)
                            torch.autograd.backward(outs, cotangents)

                    us[impl] = _per_call_us(step, device, calls, rounds)
                fused, eager = statistics.median(us["fused"]), statistics.median(us["eager"])
                report.add("overhead", {
                    "op": op, "mode": mode, "shape": "x".join(map(str, case.shape)),
                    "fused_us": fused, "fused_min": min(us["fused"]), "fused_max": max(us["fused"]),
                    "eager_us": eager, "eager_min": min(us["eager"]), "eager_max": max(us["eager"]),
                    "fused/eager": fused / eager,
                    "target": f"<= {TARGET}" if mode == "fwd+bwd" else "",
                })
    finally:
        torch.set_num_threads(threads)
    report.print_section(
        "overhead",
        f"Per-call overhead: us per call at {SHAPE['clips']} clip x (4+8+16) frames, "
        f"C={SHAPE['channels']}, {SHAPE['size']}x{SHAPE['size']}, 1 thread "
        "(median of rounds, min..max; fused/eager < 1 means fused is cheaper)",
        ["op", "mode", "shape", "fused_us", "fused_min", "fused_max", "eager_us", "eager_min",
         "eager_max", "fused/eager", "target"],
    )
