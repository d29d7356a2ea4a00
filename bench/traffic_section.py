"""Benchmark section: memory traffic per op, fused (counted from the Triton kernels' own loads and
stores under the interpreter) vs eager (every aten op's inputs + outputs), with the time each
would take at a stated memory bandwidth — a projection, not a measurement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from ffn_kernels import FrameLayout, reference
from traffic import eager_traffic

# bandwidth used for the projection: H100 SXM HBM3 peak (bytes/s)
BANDWIDTH = 3.35e12
BANDWIDTH_LABEL = "3.35 TB/s (H100 SXM HBM3 peak)"
# traffic per element does not depend on the size: count on a small packed input
CLIPS, FRAMES, CHANNELS, HW = 2, (4, 8, 16), 32, (8, 8)
# the ResNet-50 layer1 activation the projection is scaled to (elements of x)
LAYER1_ELEMENTS = 2 * sum(FRAMES) * 256 * 56 * 56


def fused_rows(dtype: str) -> list[dict]:
    """Run the traffic meter's ``report`` (``bench/triton_traffic.py``) in a child process with
    ``TRITON_INTERPRET=1`` (the variable must be set before triton is imported)."""
    meter = Path(__file__).with_name("triton_traffic.py")
    cmd = [sys.executable, str(meter), "--json", dtype, "--clips", str(CLIPS),
           "--frames", ",".join(map(str, FRAMES)), "--channels", str(CHANNELS),
           "--hw", ",".join(map(str, HW))]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def eager_bytes_per_element(op: str, pass_: str, training: bool, dtype: torch.dtype) -> float:
    layout = FrameLayout(CLIPS, FRAMES)
    g = torch.Generator().manual_seed(0)

    def big():
        return torch.randn(layout.total_frames, CHANNELS, *HW, generator=g).to(dtype).requires_grad_()

    def param(v=None):
        t = torch.rand(3, CHANNELS, generator=g) + 0.5 if v is None else torch.full((3, CHANNELS), v)
        return t.requires_grad_()

    x, x2 = big(), big()
    w, b, alter = param(), param(), param()
    rm, rv = torch.zeros(3, CHANNELS), torch.ones(3, CHANNELS)
    if op == "shift_alter":
        fn = lambda: reference.shift_alter(x, layout, alter)  # noqa: E731
    elif op == "freq_batch_norm":
        fn = lambda: reference.freq_batch_norm(x, layout, w, b, rm, rv, training)  # noqa: E731
    elif op == "bn_add_relu_shift_alter":
        fn = lambda: reference.bn_add_relu_shift_alter(x, x2, layout, w, b, rm, rv, training,  # noqa: E731
                                                       alter_next=alter)
    elif op == "temporal_conv":
        taps = torch.randn(CHANNELS, 3, generator=g).requires_grad_()
        fn = lambda: reference.temporal_conv(x, layout, taps)  # noqa: E731
    elif op == "freq_layer_norm":  # each pixel's channels as a token, as the meter counts it
        tokens, res = (t.detach().permute(0, 2, 3, 1).contiguous().requires_grad_() for t in (x, x2))
        fn = lambda: reference.freq_layer_norm(tokens, layout, w, b, 1e-5, res)  # noqa: E731
    else:
        raise ValueError(f"no eager traffic for op {op!r}")
    if pass_ == "fwd":
        meter = eager_traffic(fn)
    else:
        outs = fn()
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = [torch.randn_like(o) for o in outs]
        meter = eager_traffic(lambda: torch.autograd.backward(outs, grads))
    return meter.total / x.numel()


def _meter_dtype(args) -> str:
    return "bfloat16" if args.dtype == "bfloat16" else "float16" if args.dtype == "float16" else "float32"


def metered_bytes(args, report) -> dict:
    """The fused bytes per element of every pass, keyed (op, pass, mode): this run's traffic
    section's, or the meter's own when the section did not run."""
    rows = report.sections["traffic"] or [
        {"op": r["op"], "pass": r["pass"], "mode": r["mode"], "fused_B/elem": r["measured"]}
        for r in fused_rows(_meter_dtype(args))]
    return {(r["op"], r["pass"], r["mode"]): r["fused_B/elem"] for r in rows}


def traffic_section(args, report) -> None:
    dtype = _meter_dtype(args)
    try:
        fused = fused_rows(dtype)
    except (subprocess.CalledProcessError, ImportError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        print(f"\n## Traffic: skipped, the Triton traffic meter failed: {detail.strip()[-500:]}")
        return
    for r in fused:
        eager = eager_bytes_per_element(r["op"], r["pass"], r["mode"] != "eval", getattr(torch, dtype))
        report.add("traffic", {
            "op": r["op"], "pass": r["pass"], "mode": r["mode"],
            "fused_B/elem": r["measured"], "eager_B/elem": eager, "minimum_B/elem": r["minimum"],
            "fused/eager": r["measured"] / eager,
            "layer1_fused_us@bw": r["measured"] * LAYER1_ELEMENTS / BANDWIDTH * 1e6,
            "layer1_eager_us@bw": eager * LAYER1_ELEMENTS / BANDWIDTH * 1e6,
        })
    rows = report.sections["traffic"]
    region = [r for r in rows if r["op"] == "bn_add_relu_shift_alter" and r["mode"] == "train"]
    fused_total = sum(r["fused_B/elem"] for r in region)
    eager_total = sum(r["eager_B/elem"] for r in region)
    report.print_section(
        "traffic",
        f"Traffic: bytes per element of x (fused counted from Triton loads/stores; eager = aten "
        f"inputs+outputs, a lower bound). PROJECTED time at the layer1 shape at {BANDWIDTH_LABEL}",
        ["op", "pass", "mode", "fused_B/elem", "eager_B/elem", "minimum_B/elem", "fused/eager",
         "layer1_fused_us@bw", "layer1_eager_us@bw"])
    print(f"BN+add+ReLU+shift+WA region, training fwd+bwd: fused {fused_total:.1f} B/elem vs eager "
          f"{eager_total:.1f} B/elem = {fused_total / eager_total:.2f}x")
