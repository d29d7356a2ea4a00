"""Benchmark section: TSM-ResNet FFN (``--arch resnet --depth D``), TEA-FFN (``--arch tea50``) or
SlowFast-R50 FFN (``--arch slowfast_r50``) or UniFormer-S FFN (``--arch uniformer_s``), the fused
model vs its eager twin (the official branch-by-branch structure), each in NCHW and channels_last
(NCTHW and channels_last_3d for the 3D models), vs ``torch.compile`` of the twin: one
three-branch training step (forward, distillation loss, backward), selected-branch inference and
the folded single branch (``export_branch``, TSM only) as the inference floor. Every ratio is taken against
the best eager configuration measured in this run; rows carry min/median/max."""

from __future__ import annotations

import time

import torch

from ffn import EagerFFNResNet, FFNResNet
from ffn.slowfast import EagerFFNSlowFast, FFNSlowFast
from ffn.tea import EagerFFNTEA, FFNTEA
from ffn.uniformer import EagerFFNUniFormer, FFNUniFormer
from ffn.export import export_branch
from ffn.losses import temporal_distillation_loss
from timing import SETTLE_STEPS, measure, peak_memory, saved_tensor_bytes

FRAMES = (4, 8, 16)
# SlowFast's counts are the fast pathway's, multiples of its alpha (4): the official 16/32/64
SLOWFAST_FRAMES = (16, 32, 64)
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
FORMATS_3D = {"ncthw": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}


def _slowfast(args) -> bool:
    return getattr(args, "arch", "resnet") == "slowfast_r50"


def frames(args) -> tuple[int, ...]:
    """The branches' frame counts of the training step."""
    return SLOWFAST_FRAMES if _slowfast(args) else FRAMES


def eval_frames(args) -> int:
    """The inference clip's frame count: the middle branch's."""
    return frames(args)[1]


def formats(args) -> dict:
    """The memory formats compared; a 3D model's channels-last is ``channels_last_3d``."""
    return FORMATS_3D if getattr(args, "arch", "resnet") in ("slowfast_r50", "uniformer_s") else FORMATS


def contiguous_fused(args) -> str:
    """The name of the fused model in the contiguous format ("fused nchw")."""
    return f"fused {next(iter(formats(args)))}"


def _arch(args):
    """(packed model class, its keyword arguments, the eager twin's class) of ``--arch``."""
    if getattr(args, "arch", "resnet") == "tea50":
        return FFNTEA, dict(frames=FRAMES, num_classes=args.classes, width=args.width), EagerFFNTEA
    if _slowfast(args):
        return (FFNSlowFast, dict(frames=SLOWFAST_FRAMES, num_classes=args.classes, width=args.width),
                EagerFFNSlowFast)
    if getattr(args, "arch", "resnet") == "uniformer_s":
        return (FFNUniFormer, dict(frames=FRAMES, num_classes=args.classes, width=args.width),
                EagerFFNUniFormer)
    return (FFNResNet, dict(depth=args.depth, frames=FRAMES, num_classes=args.classes,
                            width=getattr(args, "width", 64)), EagerFFNResNet)


def _title(args) -> str:
    width = "" if getattr(args, "width", 64) == 64 else f" width {args.width}"
    if getattr(args, "arch", "resnet") == "tea50":
        return f"TEA-FFN (Res2Net-50 26w x 4s, ME + MTA){width}"
    if _slowfast(args):
        return f"SlowFast-R50 FFN (alpha 4, fast pathway 1/8 of the channels){width}"
    if getattr(args, "arch", "resnet") == "uniformer_s":
        return f"UniFormer-S FFN (video){width}"
    return f"TSM-ResNet-{args.depth} FFN{width}"


def _models(args, device) -> dict:
    cls, kw, twin = _arch(args)
    torch.manual_seed(0)
    base = cls(**kw).to(device)
    models = {}
    for name, fmt in formats(args).items():
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
        t = measure(step, device, args.repeats, warmup=SETTLE_STEPS)
        row = {"task": task, "impl": name, "ms": t.ms, "min_ms": t.min_ms, "max_ms": t.max_ms,
               "clips_per_s": args.clips / t.median_s, "compile_s": compile_s}
        if memory:
            row["peak_MB"] = peak_memory(step, device) / 2**20
            with autocast(args, device):
                row["saved_MB"] = saved_tensor_bytes(lambda: model(clips))[0] / 2**20
        report.add("model", row)


def inference(args, device, test_clip, models: dict, report) -> None:
    task = f"inference {eval_frames(args)} frames"
    runs = dict(models)
    packed = models[contiguous_fused(args)]
    for name, fmt in formats(args).items():  # the folded branch: plain convs, the floor for a branch
        if isinstance(packed, FFNResNet):  # TEA and SlowFast have no folded export (yet)
            row = packed.branch_for(eval_frames(args))
            runs[f"folded {name}"] = export_branch(packed, row).to(memory_format=fmt)
    for name, model in runs.items():
        getattr(model, "_orig_mod", model).eval()

        def infer(model=model):
            with torch.no_grad(), autocast(args, device):
                model(test_clip)

        compile_s = None
        if name.startswith("compile"):  # eval and no_grad: a graph of its own, compiled here
            t0 = time.perf_counter()
            infer()
            compile_s = time.perf_counter() - t0
        t = measure(infer, device, args.repeats)
        report.add("model", {"task": task, "impl": name, "ms": t.ms, "min_ms": t.min_ms,
                             "max_ms": t.max_ms, "clips_per_s": args.clips / t.median_s,
                             "compile_s": compile_s})


def _best(rows, task: str, prefix: str):
    cands = [r for r in rows if r["task"] == task and r["impl"].startswith(prefix)]
    return min(cands, key=lambda r: r["ms"]) if cands else None


def add_ratios(rows: list[dict]) -> None:
    """``best_eager/ms`` (> 1: faster than the best eager configuration of the same task),
    ``compiled_eager/ms`` (the same against the best ``torch.compile`` of the eager twin),
    ``peak/best_eager`` and, for inference, ``ms/folded`` (the best folded branch)."""
    for r in rows:
        eager = _best(rows, r["task"], "eager")
        compiled = _best(rows, r["task"], "compile eager")
        if compiled is not None:
            r["compiled_eager/ms"] = compiled["ms"] / r["ms"]
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
    clips = [torch.randn(args.clips, t, 3, size, size, generator=g).to(device) for t in frames(args)]
    target = torch.randint(args.classes, (args.clips,), generator=g).to(device)
    test_clip = torch.randn(args.clips, eval_frames(args), 3, size, size, generator=g).to(device)
    return size, clips, target, test_clip


def compiled_models(args, models: dict, rows: list[dict], task: str) -> dict:
    """``torch.compile`` of the eager twin in every format (the strongest baseline a user would
    run) and of the fused model in its faster format (per the training rows in ``rows``), each on
    its own copy of the weights."""
    cls, kw, twin = _arch(args)
    base = models[contiguous_fused(args)]
    compiled = {f"compile eager {name}": torch.compile(twin.twin(base).to(memory_format=fmt))
                for name, fmt in formats(args).items()}
    name = _best(rows, task, "fused")["impl"].split(" ", 1)[1]
    fused = cls(**kw).to(next(base.parameters()).device)
    fused.load_state_dict(base.state_dict())
    compiled[f"compile fused {name}"] = torch.compile(fused.to(memory_format=formats(args)[name]))
    return compiled


def model_section(args, report) -> None:
    from allocator_compare import system_allocator_rows
    from profile_table import profile_training_steps

    device = torch.device(args.device)
    size, clips, target, test_clip = inputs(args, device)
    models = _models(args, device)
    task = f"train step {'+'.join(map(str, frames(args)))}"
    train_steps(args, device, clips, target, models, report, task, memory=not args.train_only)
    if args.train_only:  # the allocator comparison's child process
        return
    if args.compile_model:
        compiled = compiled_models(args, models, report.sections["model"], task)
        train_steps(args, device, clips, target, compiled, report, task)
        models.update(compiled)
    inference(args, device, test_clip, models, report)
    if device.type == "cpu":
        report.sections["model"] += system_allocator_rows(args, task, report.key())
    rows = report.sections["model"]
    add_ratios(rows)
    report.print_section(
        "model",
        f"{_title(args)}, {args.clips} clips x {frames(args)} frames, {size}x{size}, "
        f"allocator {report.meta['allocator']}: median, min, max of {args.repeats} runs; "
        "best_eager/ms > 1 means faster than the best eager configuration of the same task",
        ["task", "impl", "ms", "min_ms", "max_ms", "clips_per_s", "best_eager/ms",
         "compiled_eager/ms", "ms/folded", "peak_MB", "peak/best_eager", "saved_MB", "compile_s"])
    # both sides' best configuration, so that the ratio splits into the same convolutions and the
    # rest (the fused ops vs the eager ops they replace)
    profiled = {side: _best(rows, task, side)["impl"] for side in ("fused", "eager")}
    profile_training_steps(
        device, {name: training_step(args, device, models[name], clips, target)
                 for name in profiled.values()}, report)
