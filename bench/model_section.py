"""Benchmark section: TSM-ResNet-50 FFN, packed fused model vs its eager twin (the official
branch-by-branch structure) vs ``torch.compile`` of the twin: one three-branch training step
(forward, distillation loss, backward) and selected-branch inference."""

from __future__ import annotations

import time

import torch

from ffn import EagerFFNResNet, FFNResNet
from ffn.losses import temporal_distillation_loss
from timing import measure, peak_memory, saved_tensor_bytes

FRAMES = (4, 8, 16)
EVAL_FRAMES = 8


def _models(args, device):
    torch.manual_seed(0)
    fused = FFNResNet(depth=args.depth, frames=FRAMES, num_classes=args.classes).to(device)
    eager = EagerFFNResNet.twin(fused)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    return {"fused": fused.to(memory_format=fmt), "eager": eager.to(memory_format=fmt)}


def model_section(args, report) -> None:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    size = 64 if args.quick else args.size
    clips = [torch.randn(args.clips, t, 3, size, size, device=device) for t in FRAMES]
    target = torch.randint(args.classes, (args.clips,), device=device)
    test_clip = torch.randn(args.clips, EVAL_FRAMES, 3, size, size, device=device)
    models = _models(args, device)
    if args.compile_model:
        twin = EagerFFNResNet.twin(models["fused"])
        models["compile"] = torch.compile(twin)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    for name, model in models.items():
        module = getattr(model, "_orig_mod", model)

        def step(model=model, module=module):
            module.zero_grad(set_to_none=True)
            with autocast:
                loss = temporal_distillation_loss(model(clips), target).total
            loss.backward()

        def infer(model=model):
            with torch.no_grad(), autocast:
                model(test_clip)

        compile_s = None
        if name == "compile":  # compile once, untimed, and report how long it took
            t0 = time.perf_counter()
            module.train()
            step()
            module.eval()
            infer()
            compile_s = time.perf_counter() - t0
        module.train()
        train = measure(step, device, args.repeats)
        peak = peak_memory(step, device)
        with autocast:
            saved, _ = saved_tensor_bytes(lambda: model(clips))
        module.eval()
        test = measure(infer, device, args.repeats)
        n_clips = args.clips
        report.add("model", {"task": "train step 4+8+16", "impl": name, "ms": train.ms,
                             "clips_per_s": n_clips / train.median_s, "peak_MB": peak / 2**20,
                             "saved_MB": saved / 2**20, "compile_s": compile_s})
        report.add("model", {"task": f"inference {EVAL_FRAMES} frames", "impl": name,
                             "ms": test.ms, "clips_per_s": n_clips / test.median_s})
    rows = report.sections["model"]
    base = {(r["task"]): r for r in rows if r["impl"] == "fused"}
    for r in rows:
        ref = base[r["task"]]
        r["time/fused"] = r["ms"] / ref["ms"]
        if "peak_MB" in r:
            r["peak/fused"] = r["peak_MB"] / ref["peak_MB"]
    report.print_section(
        "model",
        f"TSM-ResNet-{args.depth} FFN, {args.clips} clips x {FRAMES} frames, {size}x{size}: "
        "time/fused > 1 means fused is faster; peak/fused > 1 means fused uses less memory",
        ["task", "impl", "ms", "clips_per_s", "time/fused", "peak_MB", "peak/fused", "saved_MB",
         "compile_s"])
