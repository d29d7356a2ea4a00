"""Where the TEA-FFN training step's per-branch time goes: every call of the per-branch passes in one
three-branch step is recorded with its inputs, then replayed alone, forward and backward, and
timed; the rest of the step is the shared convolutions and glue. The temporal conv's calls are also
replayed through the official permute + conv1d (``reference.temporal_conv``, what the eager twin
runs), so the fused op's gain at the model's own shapes is printed beside its share.

    python bench/tea_profile.py [--width 16] [--size 32] [--clips 2] [--repeats 5]

Passes: ``bn`` (every FreqBatchNorm2d call: the fused op, with ReLU and the residual where
fused), ``temporal conv`` (MTA's 3-tap conv1d over time, the fused op), ``me difference`` (ME's pooling and
temporal difference) and ``me gate`` (sigmoid and ``x + x*y``). CPU timings on a shared machine
are noisy: the shares, not the milliseconds, are the result."""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

import ffn.tea as tea
from ffn.losses import temporal_distillation_loss
from ffn_kernels import FreqBatchNorm2d, reference

FRAMES = (4, 8, 16)


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--clips", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = tea.FFNTEA(FRAMES, num_classes=10, width=args.width).train()
    clips = [torch.randn(args.clips, t, 3, args.size, args.size) for t in FRAMES]
    target = torch.randint(10, (args.clips,))

    def step():
        model.zero_grad(set_to_none=True)
        temporal_distillation_loss(model(clips), target).total.backward()

    calls = {"bn": [], "temporal conv": [], "me difference": [], "me gate": []}
    originals = (FreqBatchNorm2d.forward, tea.FUSED, tea.motion_pool, tea.excite)

    def record(kind, fn):
        def wrapper(*a, **kw):
            calls[kind].append((fn, a, kw))
            return fn(*a, **kw)
        return wrapper

    FreqBatchNorm2d.forward = record("bn", originals[0])
    tea.FUSED = dataclasses.replace(
        originals[1], temporal_conv=record("temporal conv", originals[1].temporal_conv))
    tea.motion_pool = record("me difference", originals[2])
    tea.excite = record("me gate", originals[3])
    try:
        step()
    finally:
        FreqBatchNorm2d.forward, tea.FUSED, tea.motion_pool, tea.excite = originals
    total = timed(step, args.repeats)

    def replay(fn, a, kw):
        a = [x.detach().requires_grad_(x.is_floating_point()) if torch.is_tensor(x) else x for x in a]
        kw = {k: v.detach().requires_grad_() if torch.is_tensor(v) else v for k, v in kw.items()}
        out = fn(*a, **kw)
        cot = torch.randn_like(out)
        state = {k: v.clone() for k, v in getattr(a[0], "_buffers", {}).items() if v is not None}

        def run():
            fn(*a, **kw).backward(cot)
            for k, v in state.items():  # keep BN running statistics as they were
                a[0]._buffers[k].copy_(v)
        return run

    print(f"TEA-FFN training step, width {args.width}, {args.clips} clips x {FRAMES} frames, "
          f"{args.size}x{args.size}, {torch.get_num_threads()} threads: {total * 1e3:.0f} ms "
          f"(median of {args.repeats})")
    print("| pass | calls | fwd+bwd ms | share of step |")
    print("|---|---|---|---|")
    rest = total
    for kind, recorded in calls.items():
        ms = sum(timed(replay(*c), max(1, args.repeats // 2)) for c in recorded)
        rest -= ms
        print(f"| {kind} | {len(recorded)} | {ms * 1e3:.1f} | {ms / total:.1%} |")
    print(f"| rest (shared convs, pooling, split/cat, loss) | | {rest * 1e3:.1f} | {rest / total:.1%} |")
    recorded = calls["temporal conv"]
    fused = sum(timed(replay(*c), args.repeats) for c in recorded)
    eager = sum(timed(replay(reference.temporal_conv, *c[1:]), args.repeats) for c in recorded)
    print(f"temporal conv, the same {len(recorded)} calls fwd+bwd: fused {fused * 1e3:.1f} ms, "
          f"official permute + conv1d {eager * 1e3:.1f} ms ({eager / fused:.2f}x)")


if __name__ == "__main__":
    main()
