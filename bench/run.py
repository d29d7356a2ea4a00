"""Fused vs eager vs torch.compile: throughput, memory and traffic of the ops and the whole model.

    python bench/run.py                 # everything at default sizes (< 10 min on a 2-core CPU)
    python bench/run.py --quick         # smaller, for a smoke run
    python bench/run.py --ops --device cuda --dtype bfloat16 --channels-last

Prints one table per section and writes ``results.json``, ``results.csv`` and ``results.png`` to
``--out`` (default ``bench/out``). Every ratio compares implementations measured side by side in this
run on this machine; projections from traffic are labelled as such.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import torch

import ffn_kernels
from ffn_kernels.info import cpu_model
from ffn import allocator

# bench/'s modules import each other by plain name: `python bench/run.py` puts bench/ first on
# sys.path (they are scripts and their helpers, not a package)
from op_cases import OPS, STAGES, make_case
from report import Report
from timing import measure


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--channels-last", action="store_true", help="channels_last activations")
    p.add_argument("--ops", action="store_true", help="run the op-level section")
    p.add_argument("--model", action="store_true", help="run the model-level section")
    p.add_argument("--traffic", action="store_true", help="run the memory-traffic section")
    p.add_argument("--roofline", action="store_true",
                   help="run the roofline section (each fused pass at layer1 vs this machine's copy bandwidth)")
    p.add_argument("--projection", action="store_true",
                   help="run the GPU step-time projection of the model's training step (counts, no GPU)")
    p.add_argument("--overhead", action="store_true",
                   help="run the per-call overhead section (tiny shape, 1 thread)")
    p.add_argument("--clips", type=int, default=None, help="clips per branch (default 2; 1 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    p.add_argument("--compile-stages", default="layer1",
                   help="comma-separated stages whose ops are also compiled (compiling is slow on CPU), or 'all'")
    p.add_argument("--depth", type=int, default=50, choices=[18, 34, 50, 101], help="model depth")
    p.add_argument("--arch", default="resnet", choices=["resnet", "tea50", "slowfast_r50", "uniformer_s"],
                   help="model section: TSM-ResNet (--depth), TEA-FFN (Res2Net-50 with ME and MTA), "
                        "SlowFast-R50 FFN (3D convs; 16/32/64 fast-pathway frames) or UniFormer-S FFN (video)")
    p.add_argument("--width", type=int, default=64, help="model section: stem channels (64 standard)")
    p.add_argument("--size", type=int, default=112, help="model input size (64 with --quick)")
    p.add_argument("--classes", type=int, default=400)
    p.add_argument("--compile-model", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile(eager twin) (default: on for CUDA; on CPU the "
                        "ResNet-50 compile alone takes minutes)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    p.add_argument("--train-only", action="store_true", help=argparse.SUPPRESS)  # allocator child
    args = p.parse_args(argv)
    sections = ("ops", "model", "traffic", "overhead", "roofline", "projection")
    if not any(getattr(args, s) for s in sections):
        for s in sections:
            setattr(args, s, True)
    if args.compile_model is None:
        args.compile_model = args.device.startswith("cuda")
    args.clips = args.clips or (1 if args.quick else 2)
    args.repeats = args.repeats or (2 if args.quick else 3)
    return args


def _run(fn):
    outs = fn()
    return outs if isinstance(outs, tuple) else (outs,)


def op_section(args, report: Report) -> None:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    stages = STAGES[::3] if args.quick else STAGES
    compiled_stages = {s for s, _, _ in STAGES} if args.compile_stages == "all" else \
        set(args.compile_stages.split(","))
    for stage, channels, size in stages:
        for op in OPS:
            case = make_case(op, stage, channels, size, clips=args.clips, device=device,
                             dtype=dtype, channels_last=args.channels_last)
            impls = {"fused": case.fused, "eager": case.eager}
            if not args.no_compile and stage in compiled_stages:
                impls["compile"] = torch.compile(case.eager)
            cotangents = [torch.randn_like(o) for o in _run(case.fused)]
            leaves = case.grad_leaves()

            def clear():
                for t in leaves:
                    t.grad = None

            row = {}
            for name, fn in impls.items():
                def forward(fn=fn):
                    clear()
                    return _run(fn)

                def backward(outs):
                    torch.autograd.backward(outs, cotangents)

                row[name] = {
                    "forward": measure(lambda: _run(fn), device, args.repeats, setup=None),
                    "backward": measure(backward, device, args.repeats, setup=forward),
                    "fwd+bwd": measure(lambda: backward(forward()), device, args.repeats),
                }
            for mode in ("forward", "backward", "fwd+bwd"):
                report.op_row(stage, op, mode, case.shape, {k: v[mode] for k, v in row.items()})
            del case, impls, cotangents, leaves
    report.print_ops()


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", category=UserWarning)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    report = Report(args.out, meta={
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "device_type": device.type, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "ffn_kernels": ffn_kernels.__version__,
        "backend": ffn_kernels.backend_name(device), "dtype": args.dtype,
        "channels_last": args.channels_last, "clips": args.clips, "repeats": args.repeats,
        "allocator": allocator.active(),
        "cpu_kernels": ffn_kernels.backend.cpu_isa() if device.type == "cpu" else None,
        "cpu_streaming_stores": (os.environ.get(ffn_kernels.backend.CPU_STREAM_ENV) or "auto")
        if device.type == "cpu" else None,
    })
    report.print_header()
    if args.overhead:
        from overhead_section import overhead_section
        overhead_section(args, report)
    if args.ops:
        op_section(args, report)
    if args.traffic:
        from traffic_section import traffic_section
        traffic_section(args, report)
    if args.roofline:  # after the traffic section, whose metered bytes it shows
        from roofline_section import roofline_section
        roofline_section(args, report)
    if args.model:
        from model_section import model_section
        model_section(args, report)
    if args.projection:  # after the traffic section, whose metered bytes it uses
        from projection_section import projection_section
        from traffic_section import metered_bytes
        projection_section(args, report, metered_bytes(args, report))
    report.save()


if __name__ == "__main__":
    allocator.use_mimalloc()  # the same process setting for every implementation measured
    main()
