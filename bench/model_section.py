"""Benchmark section: TSM-ResNet FFN (``--arch resnet --depth D``), TEA-FFN (``--arch tea50``) or
UniFormer-S FFN (``--arch uniformer_s``), the fused model vs its eager twin (the official
branch-by-branch structure), each in NCHW and channels_last, vs ``torch.compile`` of the twin: one
three-branch training step (forward, distillation loss, backward), selected-branch inference and
the folded single branch (``export_branch``, TSM only) as the inference floor. Every ratio is taken against
the best eager configuration measured in this run; rows carry min/median/max."""

from __future__ import annotations

import time

import torch

from ffn import EagerFFNResNet, FFNResNet
from ffn.tea import EagerFFNTEA, FFNTEA
from ffn.uniformer import EagerFFNUniFormer, FFNUniFormer
from ffn.export import export_branch
from ffn.losses import temporal_distillation_loss
from timing import measure, peak_memory, saved_tensor_bytes

FRAMES = (4, 8, 16)
EVAL_FRAMES = 8
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _formats(args) -> dict:
    """The memory formats compared; a 3D model's channels-last is ``channels_last_3d``."""
    if getattr(args, "arch", "resnet") == "uniformer_s":
        return {"nchw": torch.contiguous_format, "channels_last": torch.channels_last_3d}
    return FORMATS


def _arch(args):
    """(packed model class, its keyword arguments, the eager twin's class) of ``--arch``."""
    if getattr(args, "arch", "resnet") == "tea50":
        return FFNTEA, dict(frames=FRAMES, num_classes=args.classes, width=args.width), EagerFFNTEA
    if getattr(args, "arch", "resnet") == "uniformer_s":
        return (FFNUniFormer, dict(frames=FRAMES, num_classes=args.classes, width=args.width),
                EagerFFNUniFormer)
    return (FFNResNet, dict(depth=args.depth, frames=FRAMES, num_classes=args.classes,
                            width=getattr(args, "width", 64)), EagerFFNResNet)


def _title(args) -> str:
    width = "" if getattr(args, "width", 64) == 64 else f" width {args.width}"
    if getattr(args, "arch", "resnet") == "tea50":
        return f"TEA-FFN (Res2Net-50 26w x 4s, ME + MTA){width}"
    if getattr(args, "arch", "resnet") == "uniformer_s":
        return f"UniFormer-S FFN (video){width}"
    return f"TSM-ResNet-{args.depth} FFN{width}"


def _models(args, device) -> dict:
    cls, kw, twin = _arch(args)
    torch.manual_seed(0)
    base = cls(**kw).to(device)
    models = {}
    for name, fmt in _formats(args).items():
        fused = cls(**kw).to(device)
        fused.load_state_dict(base.state_dict())
        models[f"fused {name}"] = fused.to(memory_format=fmt)
        models[f"eager {name}"] = twin.twin(base).to(memory_format=fmt)
    return models


def autocast(args, device):
    """The run's mixed-precision context (a no-op in float32)."""
    return torch.autocast(device.type, dtype=getattr(torch, args.dtype),
                          enabled=args.dtype != "float32")


def training_step(args, device, model, clips, target):
    """One three-branch step of ``model`` (forward, distillation loss, backward) as a callable."""
    module = getattr(model, "_orig_mod", model).train()

    def step():
        module.zero_grad(set_to_none=True)
        with autocast(args, device):
            loss = temporal_distillation_loss(model(clips), target).total
        loss.backward()

    return step


def train_steps(args, device, clips, target, models: dict, report, task: str,
                memory: bool = True) -> None:
    """Time (and measure the memory of) one training step of every model; add the rows."""
    for name, model in models.items():
        step = training_step(args, device, model, clips, target)
        compile_s = None
        if name.startswith("compile"):  # compile once, untimed, and report how long it took
            t0 = time.perf_counter()
            step()
            compile_s = time.perf_counter() - t0
        t = measure(step, device, args.repeats)
        row = {"task": task, "impl": name, "ms": t.ms, "min_ms": t.min_ms, "max_ms": t.max_ms,
               "clips_per_s": args.clips / t.median_s, "compile_s": compile_s}
        if memory:
            row["peak_MB"] = peak_memory(step, device) / 2**20
            with autocast(args, device):
                row["saved_MB"] = saved_tensor_bytes(lambda: model(clips))[0] / 2**20
        report.add("model", row)


def inference(args, device, test_clip, models: dict, report) -> None:
    task = f"inference {EVAL_FRAMES} frames"
    row = models["fused nchw"].branch_for(EVAL_FRAMES)
    runs = dict(models)
    for name, fmt in _formats(args).items():  # the folded branch: plain convs, the floor for a branch
        if isinstance(models["fused nchw"], FFNResNet):  # TEA has no folded export (yet)
            runs[f"folded {name}"] = export_branch(models["fused nchw"], row).to(memory_format=fmt)
    for name, model in runs.items():
        getattr(model, "_orig_mod", model).eval()

        def infer(model=model):
            with torch.no_grad(), autocast(args, device):
                model(test_clip)

        if name.startswith("compile"):
            infer()
        t = measure(infer, device, args.repeats)
        report.add("model", {"task": task, "impl": name, "ms": t.ms, "min_ms": t.min_ms,
                             "max_ms": t.max_ms, "clips_per_s": args.clips / t.median_s})


def _best(rows, task: str, prefix: str):
    cands = [r for r in rows if r["task"] == task and r["impl"].startswith(prefix)]
    return min(cands, key=lambda r: r["ms"]) if cands else None


def add_ratios(rows: list[dict]) -> None:
    """``best_eager/ms`` (> 1: faster than the best eager configuration of the same task),
    ``peak/best_eager`` and, for inference, ``ms/folded`` (the best folded branch)."""
    for r in rows:
        eager = _best(rows, r["task"], "eager")
        if eager is not None:
            r["best_eager/ms"] = eager["ms"] / r["ms"]
            if r.get("peak_MB") and eager.get("peak_MB"):
                r["peak/best_eager"] = r["peak_MB"] / eager["peak_MB"]
        folded = _best(rows, r["task"], "folded")
        if folded is not None:
            r["ms/folded"] = r["ms"] / folded["ms"]


def inputs(args, device):
    size = 64 if args.quick else args.size
    g = torch.Generator().manual_seed(0)
    clips = [torch.randn(args.clips, t, 3, size, size, generator=g).to(device) for t in FRAMES]
    target = torch.randint(args.classes, (args.clips,), generator=g).to(device)
    test_clip = torch.randn(args.clips, EVAL_FRAMES, 3, size, size, generator=g).to(device)
    return size, clips, target, test_clip


def model_section(args, report) -> None:
    from allocator_compare import system_allocator_rows
    from profile_table import profile_training_step

    device = torch.device(args.device)
    size, clips, target, test_clip = inputs(args, device)
    models = _models(args, device)
    task = f"train step {'+'.join(map(str, FRAMES))}"
    train_steps(args, device, clips, target, models, report, task, memory=not args.train_only)
    if args.train_only:  # the allocator comparison's child process
        return
    if args.compile_model:
        # the twin compiled in the format a user would pick: the faster eager one
        fmt = _formats(args)[_best(report.sections["model"], task, "eager")["impl"].split(" ", 1)[1]]
        twin = _arch(args)[2].twin(models["fused nchw"]).to(memory_format=fmt)
        compiled = {"compile eager": torch.compile(twin)}
        train_steps(args, device, clips, target, compiled, report, task)
        models.update(compiled)
    inference(args, device, test_clip, models, report)
    if device.type == "cpu":
        report.sections["model"] += system_allocator_rows(args, task, report.key())
    rows = report.sections["model"]
    add_ratios(rows)
    report.print_section(
        "model",
        f"{_title(args)}, {args.clips} clips x {FRAMES} frames, {size}x{size}, "
        f"allocator {report.meta['allocator']}: median, min, max of {args.repeats} runs; "
        "best_eager/ms > 1 means faster than the best eager configuration of the same task",
        ["task", "impl", "ms", "min_ms", "max_ms", "clips_per_s", "best_eager/ms", "ms/folded",
         "peak_MB", "peak/best_eager", "saved_MB", "compile_s"])
    best = _best(rows, task, "fused")["impl"]
    profile_training_step(device, training_step(args, device, models[best], clips, target),
                          report, f"{best} training step")
