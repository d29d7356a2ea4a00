"""The ``ffn`` command: ``ffn train``, ``ffn eval``, ``ffn diagnose``, ``ffn demo``."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import traceback
from pathlib import Path

# stdlib only: no torch before the work starts
from .config import MAX_FRAMES, Config, UserError, check_checkpoint_file, load_config
from .engine import rundir


def parse_frames(text: str) -> list[int]:
    """``"2..20"`` (inclusive range), ``"4,8,16"`` or a mix such as ``"1..4,8,16"``; counts in
    1..:data:`MAX_FRAMES`."""
    frames: set[int] = set()
    try:
        for part in text.split(","):
            lo, sep, hi = part.partition("..")
            lo, hi = int(lo), int(hi) if sep else int(lo)
            if lo < 1 or hi > MAX_FRAMES or lo > hi:
                raise argparse.ArgumentTypeError(
                    f"frames {text!r}: {part!r} is not counts in 1..{MAX_FRAMES} (low..high)")
            frames.update(range(lo, hi + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"frames {text!r}: expected e.g. 2..20 or 4,8,16") from None
    return sorted(frames)


def main(argv: list[str] | None = None) -> int:
    """Run the command; ``argv=None`` means this process is the command line, which then gets the
    job allocator (:mod:`ffn.allocator`: the process re-executes itself with mimalloc) once the
    arguments and config are found good. ``--help``, argument errors and config errors answer before
    that, without importing torch: the re-executed process parses and checks them again (cheaply)."""
    parser, subparsers = build_parser()
    # positionals may follow options (ffn eval a.pt --frames 2..8 data.val_list=v.txt): collect them
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        getattr(args, "items" if args.command in ("eval", "diagnose") else "overrides").extend(extra)
    if args.command == "train" and args.resume and args.overwrite:
        subparsers["train"].error("--resume and --overwrite exclude each other")
    try:
        CHECKS[args.command](args)  # torch-free
        if argv is None:
            from .allocator import use_mimalloc

            use_mimalloc()
        return {"train": _train, "eval": _eval, "diagnose": _diagnose, "demo": _demo}[args.command](args)
    except KeyboardInterrupt as e:  # Ctrl-C: what to do next, not where Python was
        _tear_down(e)
        if os.environ.get("RANK", "0") == "0":
            print(f"ffn {args.command}: interrupted{_resume_hint(args)}", file=sys.stderr)
        return 130
    except Exception as e:
        if not isinstance(e, _user_errors()):
            raise
        # the user's input is wrong: one line naming it, no traceback (tracebacks are for bugs)
        print(f"ffn {args.command}: error: {_one_line(e)}", file=sys.stderr)
        if not isinstance(e, UserError):
            print("(--skip-bad skips and counts unreadable videos)", file=sys.stderr)
        return 2


def _tear_down(interrupt: KeyboardInterrupt) -> None:
    """Free what Ctrl-C cut short (the frames it left) without the reports of their clean-up: a
    DataLoader iterator interrupted as it started its workers fails in its ``__del__``."""
    hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
    try:
        traceback.clear_frames(interrupt.__traceback__)
    finally:
        sys.unraisablehook = hook


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``ffn`` parser and its subcommands' parsers by name."""
    parser = argparse.ArgumentParser(prog="ffn", description="Frame Flexible Network: train, evaluate, demo")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train an FFN (or single-frame-count TSM) model")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="config overrides, e.g. optim.lr=0.02 model.frames=[4,8,16]")
    train.add_argument("--config", help="TOML or YAML config file")
    train.add_argument("--out", help="output folder (train.out)")
    train.add_argument("--epochs", type=int, help="train.epochs")
    train.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                       help="continue from a checkpoint (default: OUT/last.pt; a new run where OUT has none)")
    train.add_argument("--overwrite", action="store_true",
                       help="start over in an OUT that holds a run (its checkpoints and log are removed)")
    train.add_argument("--skip-bad", action="store_true", help="skip and count unreadable videos")

    ev = sub.add_parser("eval", help="accuracy at many frame counts, table and plot")
    ev.add_argument("items", nargs="+", metavar="CKPT|KEY=VALUE",
                    help="checkpoints of `ffn train` to compare, and config overrides (e.g. data.val_list=...)")
    ev.add_argument("--labels", nargs="+", help="one name per checkpoint (default: its folder's name)")
    ev.add_argument("--frames", type=parse_frames, default=parse_frames("2..20"), help="default 2..20")
    ev.add_argument("--out", default="runs/eval", help="folder for results.{json,csv,md} and accuracy.png")
    ev.add_argument("--twice", action="store_true", help="add a second temporal view (segment starts)")
    ev.add_argument("--crops", type=int, choices=(1, 3), default=1, help="spatial views")
    ev.add_argument("--skip-bad", action="store_true", help="skip and count unreadable videos")

    diag = sub.add_parser(
        "diagnose", help="BatchNorm statistics shift vs frame count, with accuracy: table and plots",
        description="For each checkpoint and frame count, the shift of every BatchNorm layer's input "
                    "statistics on the validation data from the running statistics of the branch that "
                    "serves that count (docs/training.md, 'Normalization shift'); writes shift.csv, "
                    "diagnose.md and diagnose.png into --out.")
    diag.add_argument("items", nargs="+", metavar="CKPT|KEY=VALUE",
                      help="checkpoints of `ffn train`, and config overrides (e.g. data.val_list=...)")
    diag.add_argument("--labels", nargs="+", help="one name per checkpoint (default: its folder's name)")
    diag.add_argument("--frames", type=parse_frames, default=parse_frames("2..20"), help="default 2..20")
    diag.add_argument("--out", default="runs/diagnose",
                      help="folder for shift.csv, diagnose.md and diagnose.png")
    diag.add_argument("--skip-bad", action="store_true", help="skip and count unreadable videos")

    demo = sub.add_parser(
        "demo", help="FFN vs Separated Training vs a 16-frame TSM, at small scale on CPU",
        description="Train a TSM on 16 frames, TSMs on 4 and on 8 frames alone (Separated Training) and "
                    "an FFN on 4/8/16 frames (narrow ResNet-18, synthetic speed classes), evaluate them "
                    "at 2..20 frames and write report.md (accuracy, parameters, training time, compute "
                    "per clip), results.* and accuracy.png into --out (about 10 minutes a seed on 2 CPU "
                    "cores).")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--seeds", type=int, default=1,
                      help="repeat over seeds 0..K-1 and report mean and min..max per cell (default 1)")
    demo.add_argument("--resume", action="store_true",
                      help="reuse the models of an interrupted demo in --out that finished with the same "
                           "settings")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for every model")
    return parser, {"train": train, "eval": ev, "diagnose": diag, "demo": demo}


def _user_errors() -> tuple[type, ...]:
    """The errors that are the user's input's fault. ``BadSampleError`` lives with the data code,
    which imports torch: it can only have been raised where that is loaded."""
    records = sys.modules.get("ffn.data.records")
    return (UserError,) if records is None else (UserError, records.BadSampleError)


# --- checks before the work (and before torch): arguments, config, files named ---------------------

def _train_overrides(args) -> tuple[list[str], str | None]:
    """``(overrides, resume)`` of ``ffn train``: the config overrides its options amount to, and
    ``--resume``'s checkpoint (``"auto"``: OUT/last.pt; None: a new run)."""
    overrides, resume = list(args.overrides), args.resume
    if resume and "=" in resume and not Path(resume).exists():
        overrides.append(resume)  # `--resume optim.lr=0.5`: an override after a bare --resume
        resume = "auto"
    if args.out is not None:
        overrides.append(f"train.out={args.out}")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.skip_bad:
        overrides.append("data.skip_bad=true")
    return overrides, resume


def _resume_path(args, overrides: list[str], resume: str) -> Path:
    """The checkpoint ``--resume`` names (``"auto"``: OUT/last.pt, with OUT from the config). The
    checkpoint's config will be the base: keys, types and choices are checked without it."""
    if resume != "auto":
        return Path(resume)
    return Path(load_config(args.config, overrides, ranges=False).train.out) / "last.pt"


def _new_run_config(args, overrides: list[str], resume: str | None) -> Config:
    """The config of a new run: ``--config`` and the overrides. With ``--resume`` (where OUT has no
    last.pt: killed in its first epoch), over the config that run was started with (OUT/config.yaml),
    which stands in for ``--config``: without either, the run is refused, never given the defaults."""
    if not resume:
        return load_config(args.config, overrides)
    out = load_config(args.config, overrides, ranges=False).train.out
    saved = rundir.saved_config(out)
    if saved is None and args.config is None:
        raise UserError(f"--resume: {out} holds neither last.pt nor {rundir.CONFIG_FILE} (the config of a run "
                        f"started there); give --config to start a new run")
    return load_config(args.config, overrides, base=saved)


def _check_train(args) -> None:
    overrides, resume = _train_overrides(args)
    path = _resume_path(args, overrides, resume) if resume else None
    if path is None or (resume == "auto" and not path.exists()):
        cfg = _new_run_config(args, overrides, resume)  # a new run, of this config alone
        if cfg.model.pretrained:
            try:
                check_checkpoint_file(cfg.model.pretrained)
            except UserError as e:
                raise UserError(f"config model.pretrained: {e}") from None
    else:
        cfg = load_config(args.config, overrides, ranges=False)
        check_checkpoint_file(path)
    rundir.check_out_folder(cfg.train.out, "train.out (--out)")


def _check_checkpoints(args) -> None:
    """``ffn eval`` / ``ffn diagnose``: labels, checkpoint files, overrides (for each checkpoint's
    config), the output folder."""
    _, checkpoints, overrides = _checkpoints(args)
    load_config(overrides=overrides, ranges=False)
    for path in checkpoints:
        check_checkpoint_file(Path(path))
    rundir.check_out_folder(args.out, "--out")


def _check_demo(args) -> None:
    if not 1 <= args.seeds <= 100:
        raise UserError(f"--seeds must be 1..100, got {args.seeds}")
    load_config(overrides=args.overrides, ranges=False)  # applied over the demo's own settings
    rundir.check_out_folder(args.out, "--out")


CHECKS = {"train": _check_train, "eval": _check_checkpoints, "diagnose": _check_checkpoints,
          "demo": _check_demo}


# --- the commands -----------------------------------------------------------------------------------

def _one_line(e: Exception) -> str:
    """The message of ``e`` on one line; for an error re-raised from a DataLoader worker (its message
    holds the worker's traceback), the original error's message."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if "Original Traceback" in str(e) and lines:
        head, sep, message = lines[-1].partition(": ")
        return message if sep and head.endswith("Error") else lines[-1]
    return " ".join(lines)


def _train(args) -> int:
    from .engine import checkpoint
    from .engine.trainer import fit

    overrides, resume = _train_overrides(args)
    path = _resume_path(args, overrides, resume) if resume else None
    if path is None or (resume == "auto" and not path.exists()):
        cfg = _new_run_config(args, overrides, resume)
        if resume:  # anything there is from a first epoch that was never completed
            print(f"no {path} to resume: starting the run again", file=sys.stderr)
        args.run_out = cfg.train.out
        fit(cfg, overwrite=args.overwrite or bool(resume))
        return 0
    # the checkpoint's config is the base: --config and overrides given again must agree with it
    state = checkpoint.load_run(path, resume=True)
    cfg = load_config(args.config, overrides, base=state["config"])
    del state
    args.run_out = cfg.train.out
    fit(cfg, path)
    return 0


def _resume_hint(args) -> str:
    """How to continue an interrupted ``ffn train`` (nothing for a run that saved nothing yet)."""
    out = getattr(args, "run_out", None)
    if out is None or not (Path(out, "last.pt").is_file() or Path(out, rundir.CONFIG_FILE).is_file()):
        return ""
    return f"; continue with: ffn train --out {shlex.quote(str(out))} --resume"


def _checkpoints(args) -> tuple[list[str], list[str], list[str]]:
    """``(labels, checkpoints, overrides)`` of ``ffn eval`` / ``ffn diagnose``."""
    overrides = [i for i in args.items if "=" in i] + (["data.skip_bad=true"] if args.skip_bad else [])
    checkpoints = [i for i in args.items if "=" not in i]
    if not checkpoints:
        raise UserError("give at least one checkpoint")
    labels = args.labels or [Path(c).resolve().parent.name for c in checkpoints]
    if len(labels) != len(checkpoints):
        raise UserError(f"{len(checkpoints)} checkpoints but {len(labels)} --labels")
    if len(set(labels)) != len(labels):
        raise UserError(f"--labels: two checkpoints would share a label in {labels}; give --labels")
    return labels, checkpoints, overrides


def _check_frames(model, frames: list[int], path: str) -> None:
    """``--frames`` the model can take: SlowFast needs at least ``alpha`` frames per clip."""
    if frames[0] < model.min_frames:
        least = model.min_frames
        raise UserError(f"--frames: the model in {path} takes at least {least} frames per clip (its "
                        f"slow pathway samples one of every {least}), got {frames[0]}; ask for e.g. "
                        f"--frames {least}..{max(frames[-1], 2 * least)}")


def _eval(args) -> int:
    import torch

    from .data import num_classes
    from .engine import distributed
    from .engine.evaluate import accuracy_by_frames
    from .engine.factory import load_trained
    from .engine.progress import Progress
    from .engine.trainer import AMP_DTYPES
    from .report import markdown_table, write_results

    labels, checkpoints, overrides = _checkpoints(args)
    results = {}
    d, device = distributed.setup()
    try:
        for label, path in zip(labels, checkpoints):
            model, cfg = load_trained(path, overrides)
            _check_frames(model, args.frames, path)
            model.to(device)
            # a bar on a terminal, else a line per frame count (on stderr: stdout is the table)
            with torch.no_grad(), Progress(len(args.frames), f"eval {label}", unit="frame count", every=1,
                                           enabled=d.main, file=sys.stderr) as progress:
                results[label] = accuracy_by_frames(model, cfg.data, args.frames, device, d, args.twice,
                                                    args.crops, AMP_DTYPES[cfg.optim.amp], progress=progress)
    finally:
        distributed.teardown()
    if d.main:
        paths = write_results(results, args.out, chance=100 / num_classes(cfg.data))
        print(markdown_table(results))
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _diagnose(args) -> int:
    import torch

    from .data import num_classes
    from .diagnose import diagnose, write_diagnosis
    from .engine.factory import load_trained
    from .engine.trainer import AMP_DTYPES

    labels, checkpoints, overrides = _checkpoints(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as `ffn eval` picks it
    results = {}
    for label, path in zip(labels, checkpoints):
        model, cfg = load_trained(path, overrides)
        _check_frames(model, args.frames, path)
        results[label] = diagnose(model.to(device), cfg.data, args.frames, device, AMP_DTYPES[cfg.optim.amp],
                                  cfg.train.progress, desc=label)
    paths = write_diagnosis(results, args.out, chance=100 / num_classes(cfg.data))
    print(paths["md"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), args.overrides, args.seeds, args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
