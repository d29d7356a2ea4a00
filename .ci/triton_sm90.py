#!/usr/bin/env python
"""CI gate: the Triton kernels compile for sm_90 (H100) within 128 registers and without stack.

No GPU needed. A fake active Triton driver reports ``GPUTarget("cuda", 90, 32)`` and every
``JITFunction.run`` is turned into ``warmup=True`` (compile, launch nothing); the real entry
points of :mod:`ffn_kernels.triton` (one module per op) are then called with CPU tensors
(``torch.empty``, never read) at the ResNet-50 stage shapes x float16/float32 x
NCHW/channels_last (``temporal_conv`` also at TEA's Res2Net split shapes; ``freq_layer_norm`` at
UniFormer-S's token shapes), for the forward and
backward of each op in training and eval, with and without alter / ReLU / residual / d weight.
That compiles exactly
the variants a GPU run would. ``cuobjdump --dump-resource-usage`` (shipped in the Triton wheel)
on each cubin gives registers and stack; ``metadata.shared`` gives shared memory.

Prints one row per (kernel, shape, dtype, format) with the maximum over that row's variants,
then every variant over the limits, and exits 1 if any uses more than ``--max-regs`` registers
or any stack. Compiled kernels are cached by Triton (``~/.triton/cache`` or
``TRITON_CACHE_DIR``), so a second run takes seconds.

    python .ci/triton_sm90.py [--max-regs 128] [--quick]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

os.environ.pop("TRITON_INTERPRET", None)  # compile for real: the interpreter compiles nothing

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime import driver, jit  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
# ResNet-50 stages: (channels, H = W) of the BN / block-boundary tensors
SHAPES = [(64, 56), (256, 56), (512, 28), (1024, 14), (2048, 7)]
# TEA's Res2Net-50 splits (26w x 4s): the temporal conv's tensors, which only it runs on
TEA_SPLITS = [(26, 56), (52, 28), (104, 14), (208, 7)]
# UniFormer-S stages (channels, tokens per side): the LayerNorm's token tensors
TOKEN_STAGES = [(64, 56), (128, 28), (320, 14), (512, 7)]
CLIPS, FRAMES, ROWS = 1, [4, 8, 16], [0, 1, 2]
P = len(ROWS)
FOLD_DIV = 8
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


class FakeDriver(DriverBase):
    """Just enough of a driver for ``JITFunction.run(warmup=True)`` and ``triton.compile``."""

    @classmethod
    def is_active(cls):
        return True

    def map_python_to_cpp_type(self, ty):
        raise NotImplementedError("the sm_90 check launches nothing")

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError("the sm_90 check launches nothing")

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


class Recorder:
    """Patches ``JITFunction.run``: compile only, and note which case compiled which kernel."""

    def __init__(self):
        self.case = None
        self.kernels = {}  # id(CompiledKernel) -> CompiledKernel
        self.uses = defaultdict(set)  # id(CompiledKernel) -> {(case, flags)}
        self._orig = jit.JITFunction.run

    def __enter__(self):
        rec = self

        def run(fn, *args, grid, warmup, **kwargs):
            kernel = rec._orig(fn, *args, grid=grid, warmup=True, **kwargs)
            rec.kernels[id(kernel)] = kernel
            flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}"
                             for k, v in sorted(kwargs.items()) if k not in ("debug",
                                                                            "instrumentation_mode"))
            rec.uses[id(kernel)].add((rec.case, flags))
            return kernel

        jit.JITFunction.run = run
        return self

    def __exit__(self, *exc):
        jit.JITFunction.run = self._orig


def resource_usage(kernel, tmp):
    """``(registers, stack bytes)`` of a compiled kernel from cuobjdump."""
    path = os.path.join(tmp, f"{kernel.hash}.cubin")
    with open(path, "wb") as f:
        f.write(kernel.asm["cubin"])
    out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", path], check=True,
                         capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"no resource usage for {kernel.name} in:\n{out}")
    return int(m.group(1)), int(m.group(2))


def activations(C, hw, dtype, channels_last, count):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [torch.empty(CLIPS * sum(FRAMES), C, hw, hw, dtype=dtype, memory_format=fmt)
            for _ in range(count)]


def run_temporal_conv(api, C, hw, dtype, channels_last, rec, label):
    x, dy = activations(C, hw, dtype, channels_last, 2)
    taps = torch.empty(C, 3, dtype=torch.float32)
    rec.case = (label, "temporal_conv fwd")
    api.temporal_conv_fwd(x, CLIPS, FRAMES, taps)
    for grad in (False, True):
        rec.case = (label, "temporal_conv bwd" + (" dweight" if grad else ""))
        api.temporal_conv_bwd(dy, x, CLIPS, FRAMES, taps, grad)


def run_layer_norm(api, C, hw, dtype, channels_last, rec, label):
    """freq_layer_norm on [frames, hw*hw tokens, C] (its tokens have one layout: channels last)."""
    if channels_last:
        return
    x, res, dy = (torch.empty(CLIPS * sum(FRAMES), hw * hw, C, dtype=dtype) for _ in range(3))
    w, b = torch.empty(P, C), torch.empty(P, C)
    mean = torch.empty(x.numel() // C)
    for r in (None, res):
        rec.case = (label, "freq_layer_norm fwd" + (" res" if r is not None else ""))
        api.freq_layer_norm_fwd(x, CLIPS, FRAMES, ROWS, w, b, 1e-5, r)
        rec.case = (label, "freq_layer_norm bwd" + (" dsum" if r is not None else ""))
        api.freq_layer_norm_bwd(dy, r, x, CLIPS, FRAMES, ROWS, w, mean, mean)


def run_ops(api, C, hw, dtype, channels_last, rec, label):
    """Forward and backward of the ops as the autograd layer calls them."""

    def param():
        return torch.empty(P, C, dtype=torch.float32)

    x, dy, y, other = activations(C, hw, dtype, channels_last, 4)
    w, b, rm, rv, alter = param(), param(), param(), param(), param()
    mean, invstd = torch.empty(len(FRAMES), C), torch.empty(len(FRAMES), C)
    layout = (CLIPS, FRAMES, ROWS)
    mom = [0.1] * len(FRAMES)

    for a in (None, alter):
        rec.case = (label, "shift_alter fwd" + (" alter" if a is not None else ""))
        api.shift_alter_fwd(x, *layout, a, FOLD_DIV)
        for grad in ([False, True] if a is not None else [False]):
            rec.case = (label, "shift_alter bwd" + (" alter" if a is not None else "")
                        + (" dalter" if grad else ""))
            api.shift_alter_bwd(dy, x, *layout, a, FOLD_DIV, grad)
    for training in (True, False):
        mode = "train" if training else "eval"
        for relu in (False, True):
            for res in (None, other):
                tag = (f"freq_batch_norm {mode}" + (" relu" if relu else "")
                       + (" res" if res is not None else ""))
                rec.case = (label, tag + " fwd")
                api.freq_batch_norm_fwd(x, *layout, w, b, rm, rv, training, mom, 1e-5, relu, res)
                rec.case = (label, tag + " bwd")
                api.freq_batch_norm_bwd(dy, x, y, *layout, w, mean, invstd, training, relu,
                                        res is not None)
                if relu and res is None:  # the ReLU mask recomputed from x
                    rec.case = (label, tag + " bwd mask-from-x")
                    api.freq_batch_norm_bwd(dy, x, y, *layout, w, mean, invstd, training, relu,
                                            False, b)
        rec.case = (label, f"freq_batch_norm {mode} no-running-stats fwd")
        api.freq_batch_norm_fwd(x, *layout, w, b, None, None, training, mom, 1e-5, False, None)
        for a in (None, alter):
            tag = f"bn_add_relu_shift_alter {mode}" + (" alter" if a is not None else "")
            rec.case = (label, tag + " fwd")
            api.bn_add_relu_shift_alter_fwd(x, other, *layout, w, b, rm, rv, training, mom, 1e-5, a,
                                            FOLD_DIV)
            rec.case = (label, tag + " bwd")
            api.bn_add_relu_shift_alter_bwd(dy, other, x, y, *layout, w, mean, invstd, training, a,
                                            FOLD_DIV)
    run_temporal_conv(api, C, hw, dtype, channels_last, rec, label)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-regs", type=int, default=128)
    parser.add_argument("--quick", action="store_true",
                        help="float32 only, first and last stage (a smoke run)")
    parser.add_argument("--shape", action="append", help="only these stages, e.g. 2048/7")
    parser.add_argument("--dtype", action="append", choices=["float16", "float32"])
    parser.add_argument("--format", action="append", choices=["nchw", "channels_last"])
    args = parser.parse_args(argv)
    if not os.path.exists(CUOBJDUMP):
        sys.exit(f"cuobjdump not found at {CUOBJDUMP} (it ships with the Triton wheel)")

    driver.set_active(FakeDriver())
    assert not knobs.runtime.interpret
    import ffn_kernels.triton as api

    shapes = SHAPES[::len(SHAPES) - 1] if args.quick else SHAPES
    if args.shape:
        shapes = [s for s in shapes if f"{s[0]}/{s[1]}" in args.shape]
    dtypes = [torch.float32] if args.quick else [torch.float16, torch.float32]
    if args.dtype:
        dtypes = [getattr(torch, d) for d in args.dtype]
    formats = [f == "channels_last" for f in (args.format or ["nchw", "channels_last"])]
    t0 = time.perf_counter()
    rows = {}  # (kernel, shape, dtype, format) -> set of kernel ids
    labels = []
    extra = [] if args.quick or args.shape else (
        [(s, run_temporal_conv) for s in TEA_SPLITS] + [(s, run_layer_norm) for s in TOKEN_STAGES])
    with Recorder() as rec:
        for (C, hw), run in [(s, run_ops) for s in shapes] + extra:
            for dtype in dtypes:
                for channels_last in formats:
                    label = (f"{C}/{hw}x{hw}", str(dtype).removeprefix("torch."),
                             "channels_last" if channels_last else "nchw")
                    labels.append(label)
                    t = time.perf_counter()
                    before = len(rec.kernels)
                    run(api, C, hw, dtype, channels_last, rec, label)
                    print(f"  {' '.join(label):<32} {len(rec.kernels) - before:3d} new variants "
                          f"{time.perf_counter() - t:6.1f} s", flush=True)
    t_compile = time.perf_counter() - t0

    usage = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kid, kernel in rec.kernels.items():
            usage[kid] = (*resource_usage(kernel, tmp), kernel.metadata.shared)
    for kid, kernel in rec.kernels.items():
        for (label, _), _flags in rec.uses[kid]:
            rows.setdefault((kernel.name, *label), set()).add(kid)

    ok = lambda u: u[0] <= args.max_regs and u[1] == 0  # noqa: E731
    head = f"{'kernel':<22} {'shape':<10} {'dtype':<8} {'format':<13} {'vars':>4} " \
           f"{'regs':>4} {'stack':>5} {'smem':>6}"
    print("\nmaximum over each row's variants (registers, stack bytes, shared memory bytes)")
    print(head)
    print("-" * len(head))
    order = {label: i for i, label in enumerate(labels)}
    for key in sorted(rows, key=lambda k: (k[0], order[k[1:]])):
        us = [usage[kid] for kid in rows[key]]
        regs, stack, smem = (max(u[i] for u in us) for i in range(3))
        flag = "" if all(ok(u) for u in us) else "  FAIL"
        print(f"{key[0]:<22} {key[1]:<10} {key[2]:<8} {key[3]:<13} {len(us):>4} "
              f"{regs:>4} {stack:>5} {smem:>6}{flag}")

    bad = [kid for kid in rec.kernels if not ok(usage[kid])]
    for kid in bad:
        kernel = rec.kernels[kid]
        regs, stack, _ = usage[kid]
        print(f"\nFAIL {kernel.name}: {regs} registers, {stack} bytes of stack; used by:")
        for (label, case), flags in sorted(rec.uses[kid]):
            print(f"  {' '.join(label)}: {case} [{flags}]")
    print(f"\n{len(rec.kernels)} variants compiled for sm_90 in {t_compile:.1f} s "
          f"(Triton cache: {knobs.cache.dir}); {len(bad)} over {args.max_regs} registers or "
          "with stack")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
