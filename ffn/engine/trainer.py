"""``ffn train``: the training loop (single process or torchrun + DDP)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ..config import Config
from ..data import collate, num_classes, train_dataset
from ..losses import temporal_distillation_loss
from ..sync_bn import convert_sync_freq_batchnorm
from . import checkpoint, distributed
from .distributed import Dist
from .evaluate import accuracy_by_frames
from .factory import build_model
from .logs import RunLog
from .optim import build_optimizer, build_scheduler

AMP_DTYPES = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def fit(cfg: Config, resume: Optional[str | Path] = None) -> Path:
    """Train as ``cfg`` says (resuming from checkpoint ``resume``); return the last checkpoint's path."""
    d, device = distributed.setup(cfg.train.device)
    try:
        return Trainer(cfg, d, device).run(resume)
    finally:
        distributed.teardown()


class Trainer:
    def __init__(self, cfg: Config, d: Dist, device: torch.device) -> None:
        self.cfg, self.d, self.device = cfg, d, device
        self.out = Path(cfg.train.out)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        self.model = build_model(cfg.model, num_classes(cfg.data)).to(device)
        if cfg.train.sync_bn and cfg.model.impl != "fused":
            raise ValueError("train.sync_bn needs model.impl=fused")
        if cfg.train.sync_bn and d.enabled:
            convert_sync_freq_batchnorm(self.model)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.dataset = train_dataset(cfg.data, cfg.model.frames, cfg.train.seed)
        # one sampler for any world size: every run draws the same permutation per epoch
        self.sampler = DistributedSampler(self.dataset, d.world, d.rank, shuffle=True,
                                          seed=cfg.train.seed, drop_last=True)
        self.loader = DataLoader(self.dataset, cfg.data.batch_size, sampler=self.sampler,
                                 num_workers=cfg.data.workers, collate_fn=collate, drop_last=True,
                                 pin_memory=device.type == "cuda")
        self.steps = min(len(self.loader), cfg.train.max_steps or len(self.loader))
        if self.steps == 0:
            raise ValueError(f"{len(self.dataset)} training videos make no batch of "
                             f"{cfg.data.batch_size} clips on each of {d.world} processes")
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.epochs, self.steps)
        self.amp_dtype = AMP_DTYPES[cfg.optim.amp]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype is torch.float16)
        self.completed, self.best = 0, float("-inf")

    def run(self, resume: Optional[str | Path]) -> Path:
        if resume:
            self.restore(checkpoint.load(resume))
        net = self.model
        if self.d.enabled:
            net = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        log = RunLog(self.out, self.completed) if self.d.main else None
        for epoch in range(self.completed, self.cfg.train.epochs):
            self.dataset.set_epoch(epoch)
            self.sampler.set_epoch(epoch)
            row = {"epoch": epoch + 1, **self.train_epoch(net, epoch)}
            distributed.broadcast_buffers(self.model, self.d)
            val = accuracy_by_frames(self.model, self.cfg.data, self.cfg.model.frames, self.device, self.d,
                                     self.cfg.train.val_twice, self.cfg.train.val_crops, self.amp_dtype)
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
                checkpoint.save_atomic(state, self.out / "last.pt")
                if improved:
                    checkpoint.save_atomic(state, self.out / "best.pt")
                log.write(row)
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)
        return self.out / "last.pt"

    def train_epoch(self, net: torch.nn.Module, epoch: int) -> dict:
        from tqdm import tqdm

        cfg, d, frames = self.cfg, self.d, self.cfg.model.frames
        net.train()
        sums = {"loss": 0.0, "ce": 0.0, "kl": 0.0, **{f"train_top1@{t}": 0.0 for t in frames}}
        clips = skipped = 0
        bar = tqdm(total=self.steps, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", unit="step",
                   disable=not (cfg.train.progress and d.main), dynamic_ncols=True, leave=False)
        start = time.perf_counter()
        for _, batch in zip(range(self.steps), self.loader):
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
            bar.update()
            bar.set_postfix(loss=f"{float(loss.total.detach()):.3f}",
                            clips_s=f"{clips * d.world / (time.perf_counter() - start):.1f}")
        bar.close()
        elapsed = time.perf_counter() - start
        *values, clips, skipped = distributed.all_sum([*sums.values(), clips, skipped], d, self.device)
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

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.completed, self.best = state["epoch"], state["best"]
        rng = state["rng"]
        checkpoint.set_rng_state(rng[self.d.rank] if len(rng) == self.d.world else rng[0], self.device)
