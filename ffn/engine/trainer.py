"""``ffn train``: the training loop (single process or torchrun + DDP)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ffn_kernels import convert_sync_freq_batchnorm

from ..config import Config, UserError, check_config
from ..data import build_source, collate, num_classes, train_dataset
from ..losses import temporal_distillation_loss
from . import checkpoint, distributed, rundir
from .distributed import Dist
from .evaluate import accuracy_by_frames
from .factory import build_model
from .logs import RunLog
from .optim import build_optimizer, build_scheduler
from .progress import Progress

AMP_DTYPES = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}


# Files of a run in train.out; a new run (no --resume) into a folder holding one needs overwrite=True
RUN_FILES = ("last.pt", "best.pt", "log.jsonl", "log.csv", "log.png")

# Config keys a resumed run may change (applied and printed); any other change is refused, since the
# restored model, optimizer, schedule and generators would not follow it
RESUME_MAY_CHANGE = frozenset({
    "train.epochs", "train.out", "train.device", "train.progress", "train.log_every", "train.val_twice",
    "train.val_crops",
    "data.root", "data.train_list", "data.val_list", "data.workers", "data.skip_bad", "data.decode_timeout",
    "train.dist_timeout",
    "model.impl", "model.pretrained", "model.pretrained_format",
})


def fit(cfg: Config, resume: Optional[str | Path] = None, overwrite: bool = False) -> Path:
    """Train as ``cfg`` says (resuming from checkpoint ``resume``); return the last checkpoint's path.

    ``cfg`` is checked as a config file would be (:func:`~ffn.config.check_config`). The main process
    holds ``train.out``'s lock (:func:`~ffn.engine.rundir.locked`) throughout: a second training into
    the folder is refused. Without ``resume``, a ``train.out`` that already holds a run raises
    :class:`~ffn.config.UserError` unless ``overwrite`` is set (then the old run's checkpoints and log
    are removed first)."""
    cfg = check_config(cfg)
    out, main = Path(cfg.train.out), int(os.environ.get("RANK", 0)) == 0  # torchrun's rank, before setup
    with rundir.locked(out) if main else contextlib.nullcontext(), _Sigint() as sigint:
        if resume is None:
            found = existing_run(out)
            if found and not overwrite:
                raise UserError(f"train.out {out} already holds a run ({', '.join(found)}): continue it with "
                                f"--resume, or start over with --overwrite")
            if found and main:  # before any rank can write (setup waits for all)
                for name in RUN_FILES:
                    (out / name).unlink(missing_ok=True)
        d, device = distributed.setup(cfg.train.device, cfg.train.dist_timeout)
        try:
            return Trainer(cfg, d, device, sigint).run(resume)
        finally:
            distributed.teardown()


class _Sigint:
    """Ctrl-C (SIGINT) while training: a ``KeyboardInterrupt`` at once and, where Python swallowed
    that one (it ignores exceptions raised in some callbacks, such as the after-fork hooks that
    run as each epoch forks its DataLoader workers), again at the next step (:meth:`check`)."""

    def __init__(self) -> None:
        self.seen, self.previous, self.hook = False, None, None

    def __enter__(self) -> "_Sigint":
        if threading.current_thread() is threading.main_thread():
            self.previous, self.hook = signal.signal(signal.SIGINT, self._handle), sys.unraisablehook
            sys.unraisablehook = self._unraisable
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            sys.unraisablehook = self.hook

    def _handle(self, signum, frame) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def _unraisable(self, unraisable) -> None:
        if unraisable.exc_type is not KeyboardInterrupt:  # a swallowed Ctrl-C is raised again: no report
            self.hook(unraisable)

    def check(self) -> None:
        if self.seen:
            raise KeyboardInterrupt


def existing_run(out: Path) -> list[str]:
    """The files of an earlier run in ``out`` (an empty log does not count)."""
    return [name for name in RUN_FILES
            if (out / name).is_file() and (name.endswith(".pt") or (out / name).stat().st_size > 0)]


def resume_changes(saved: dict, cfg: Config, path) -> list[str]:
    """``key: old -> new`` for every config value ``cfg`` changes from the checkpoint's config
    ``saved``; raises :class:`~ffn.config.UserError` on a change outside :data:`RESUME_MAY_CHANGE`."""
    old, new = _flatten(saved), _flatten(cfg.to_dict())
    changes, refused = [], []
    for key, value in new.items():
        if key not in old or old[key] == value:
            continue
        (changes if key in RESUME_MAY_CHANGE else refused).append(f"{key}: {old[key]!r} -> {value!r}")
    if refused:
        raise UserError(
            f"--resume {path}: {'; '.join(refused)} would not be honoured (the checkpoint's model, optimizer, "
            f"schedule and data order are restored as trained); drop the override, or start a new run "
            f"with --overwrite")
    return changes


def _count(n: int, one: str, many: str = "") -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return flat


class Trainer:
    def __init__(self, cfg: Config, d: Dist, device: torch.device, sigint: Optional[_Sigint] = None) -> None:
        self.cfg, self.d, self.device, self.sigint = cfg, d, device, sigint or _Sigint()
        self.out = Path(cfg.train.out)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        self.model = build_model(cfg.model, num_classes(cfg.data)).to(device)
        if cfg.train.sync_bn and cfg.model.impl != "fused":
            raise UserError("config train.sync_bn=true needs model.impl=fused")
        if cfg.train.sync_bn and d.enabled:
            convert_sync_freq_batchnorm(self.model)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        # both lists are read (and every line checked) before the first step
        self.dataset = train_dataset(cfg.data, cfg.model.frames, cfg.train.seed)
        self.val_source = build_source(cfg.data, "val")
        # one sampler for any world size: every run draws the same permutation per epoch
        self.sampler = DistributedSampler(self.dataset, d.world, d.rank, shuffle=True,
                                          seed=cfg.train.seed, drop_last=True)
        self.loader = DataLoader(self.dataset, cfg.data.batch_size, sampler=self.sampler,
                                 num_workers=cfg.data.workers, collate_fn=collate, drop_last=True,
                                 pin_memory=device.type == "cuda")
        self.steps = min(len(self.loader), cfg.train.max_steps or len(self.loader))
        if self.steps == 0:
            raise UserError(f"{len(self.dataset)} training videos make no batch of data.batch_size="
                            f"{cfg.data.batch_size} clips on each of {d.world} processes")
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.epochs, self.steps)
        self.amp_dtype = AMP_DTYPES[cfg.optim.amp]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype is torch.float16)
        self.completed, self.best = 0, float("-inf")

    def run(self, resume: Optional[str | Path]) -> Path:
        """Train the remaining epochs. Each epoch ends, on the main process, with its log row, then
        ``best.pt`` (where it improved), then ``last.pt``, each written whole or not at all: a kill at
        any moment leaves the checkpoints and log of the last completed epoch, plus at most a log row
        and a ``best.pt`` of the epoch being saved, which a resume drops or rewrites as it redoes it."""
        out = self.out
        if resume:
            self.restore(checkpoint.load_run(resume, resume=True), resume)
        if self.d.main:
            for name in (*RUN_FILES, rundir.CONFIG_FILE):  # temporary files of a killed save
                (out / (name + ".tmp")).unlink(missing_ok=True)
            rundir.write_config(out, self.cfg.to_dict())  # what `--resume` restarts a first epoch with
        if self.completed == self.cfg.train.epochs and self.d.main:
            print(f"{resume} has completed all {self.completed} epochs (train.epochs): nothing to do; "
                  f"raise --epochs to train longer", file=sys.stderr)
        net = self.model
        if self.d.enabled:
            net = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.d.main:
            with rundir.writing(out / "log.jsonl"):
                log = RunLog(out, self.completed)
        if self.d.main:
            print(self.banner(), flush=True)
        for epoch in range(self.completed, self.cfg.train.epochs):
            self.dataset.set_epoch(epoch)
            self.sampler.set_epoch(epoch)
            row = {"epoch": epoch + 1, **self.train_epoch(net, epoch)}
            distributed.broadcast_buffers(self.model, self.d)
            with self.progress(len(self.cfg.model.frames), f"epoch {epoch + 1}/{self.cfg.train.epochs} "
                               "validation", "branch", every=1) as bar:
                val = accuracy_by_frames(self.model, self.cfg.data, self.cfg.model.frames, self.device, self.d,
                                         self.cfg.train.val_twice, self.cfg.train.val_crops, self.amp_dtype,
                                         self.val_source, bar)
            for n, acc in val.items():
                row[f"val_top1@{n}"], row[f"val_top5@{n}"] = acc["top1"], acc["top5"]
            row["val_skipped"] = max(acc["skipped"] for acc in val.values())
            self.completed = epoch + 1
            score = sum(acc["top1"] for acc in val.values()) / len(val)  # mean over branches
            improved = score > self.best
            self.best = max(self.best, score)
            rng = distributed.gather(checkpoint.rng_state(self.device), self.d)
            if self.d.main:
                state = self.state(rng)
                point = f"epoch{epoch + 1}"
                with rundir.writing(out / "log.jsonl"):
                    log.write(row)
                checkpoint.kill_point(f"{point}:log.jsonl")
                try:
                    log.plot()
                except Exception as e:  # noqa: BLE001 - a plot is not worth a run
                    print(f"could not write {out / 'log.png'}: {type(e).__name__}: {e}", file=sys.stderr)
                for name in ("best.pt", "last.pt") if improved else ("last.pt",):
                    # best.pt first: a last.pt never records a best that best.pt lacks
                    with rundir.writing(out / name):
                        checkpoint.save_atomic(state, out / name, point)
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)
        return out / "last.pt"

    def progress(self, total: int, desc: str, unit: str = "step", every: int = 0) -> Progress:
        """A bar on a terminal (unless ``train.progress=false``), else a plain line every
        ``train.log_every`` (or ``every``) steps or 30 s; on the main process only."""
        return Progress(total, desc, unit=unit, every=every or self.cfg.train.log_every,
                        bar=None if self.cfg.train.progress else False, enabled=self.d.main)

    def banner(self) -> str:
        """What this run is: printed once, before the first step."""
        from ..allocator import active

        cfg, d = self.cfg, self.d
        params = sum(p.numel() for p in self.model.parameters())
        epochs = (f"epochs {self.completed + 1}..{cfg.train.epochs} of {cfg.train.epochs}" if self.completed
                  else _count(cfg.train.epochs, "epoch"))
        return (f"ffn train: out {self.out}, device {self.device}, {_count(torch.get_num_threads(), 'thread')}, "
                f"allocator {active()}, {_count(d.world, 'process', 'processes')}\n"
                f"ffn train: {cfg.model.arch} {params:,} parameters, frames per branch "
                f"{'/'.join(map(str, cfg.model.frames))}, {len(self.dataset)} training / "
                f"{len(self.val_source)} validation videos, {epochs}, batch size {cfg.data.batch_size}"
                f"{f' x {d.world}' if d.enabled else ''}, {_count(self.steps, 'step')} per epoch")

    def train_epoch(self, net: torch.nn.Module, epoch: int) -> dict:
        cfg, d, frames = self.cfg, self.d, self.cfg.model.frames
        net.train()
        sums = {"loss": 0.0, "ce": 0.0, "kl": 0.0, **{f"train_top1@{t}": 0.0 for t in frames}}
        clips = skipped = 0
        bar = self.progress(self.steps, f"epoch {epoch + 1}/{cfg.train.epochs}")
        start = time.perf_counter()
        for _, batch in zip(range(self.steps), self.loader):
            self.sigint.check()
            for bad in batch.skipped:
                print(f"skipped video {bad.index}: {bad.reason}", file=sys.stderr)
            skipped += len(batch.skipped)
            # an empty batch anywhere skips the step everywhere (DDP needs every rank in it)
            if cfg.data.skip_bad and distributed.all_min(len(batch), d, self.device) == 0:
                continue
            batch = batch.to(self.device, non_blocking=True)
            logits, loss = self.step(net, batch)
            n = len(batch)
            clips += n
            sums["loss"] += float(loss.total.detach()) * n
            sums["ce"] += float(loss.ce.detach()) * n
            sums["kl"] += float(sum(loss.kl, torch.zeros(())).detach()) * n
            for t, lg in zip(frames, logits):
                sums[f"train_top1@{t}"] += float((lg.argmax(1) == batch.labels).sum())
            bar.update(**{"loss": f"{sums['loss'] / clips:.4f}",  # the epoch's mean so far
                          "clips/s": f"{clips * d.world / (time.perf_counter() - start):.1f}"})
        bar.close()
        elapsed = time.perf_counter() - start
        *values, clips, skipped = distributed.all_sum([*sums.values(), clips, skipped], d, self.device)
        if clips == 0:  # every video unreadable and skipped: refuse to save an untrained model
            raise UserError(f"epoch {epoch + 1}: no readable training video in {self.steps} batches "
                            f"({int(skipped)} skipped with --skip-bad); nothing to train on")
        stats = {k: v / max(clips, 1) * (100 if k.startswith("train_top1") else 1) for k, v in zip(sums, values)}
        return {"lr": self.optimizer.param_groups[0]["lr"], **stats, "clips_per_s": clips / elapsed,
                "epoch_s": elapsed, "skipped": int(skipped)}

    def step(self, net: torch.nn.Module, batch):
        optim = self.cfg.optim
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            logits = net(batch.clips)
            loss = temporal_distillation_loss(logits, batch.labels, self.cfg.model.distill_weight)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss.total).backward()
        if optim.clip_grad > 0:
            # clip the true gradients: unscale first (under AMP the official code never clipped)
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return logits, loss

    def state(self, rng: list) -> dict:
        return {
            "epoch": self.completed, "best": self.best, "config": self.cfg.to_dict(),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng,
        }

    def restore(self, state: dict, path) -> None:
        """Load a checkpoint of this run (:func:`~ffn.engine.checkpoint.load_run`): its config must
        match ``self.cfg`` except for the keys of :data:`RESUME_MAY_CHANGE` (those are printed), and
        every state must fit this run's (checked before any is loaded)."""
        changes = resume_changes(state["config"], self.cfg, path)
        if state["epoch"] > self.cfg.train.epochs:
            raise UserError(f"train.epochs (--epochs) is {self.cfg.train.epochs} but {path} has already "
                            f"completed {state['epoch']} epochs")
        checkpoint.check_weights(state["model"], self.model, path)
        checkpoint.check_training_state(state, path, self.optimizer, self.scheduler, self.scaler, self.device)
        if changes and self.d.main:
            print(f"resuming {path} with {'; '.join(changes)}", flush=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.completed, self.best = state["epoch"], state["best"]
        rng = state["rng"]
        checkpoint.set_rng_state(rng[self.d.rank] if len(rng) == self.d.world else rng[0], self.device)
