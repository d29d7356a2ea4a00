"""SGD with the parameter groups of TSM/FFN training, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ffn_kernels import FreqBatchNorm2d

from ..config import OptimConfig


def parameter_groups(model: nn.Module, fc_lr_mult: float = 5.0) -> list[dict]:
    """TSM's policy: classifier weight lr x ``fc_lr_mult``, classifier bias x ``2*fc_lr_mult`` without
    decay, other biases lr x2 without decay, BN affine parameters without decay, every other weight
    (convs, Weight Alteration) plain. ``lr_mult`` / ``decay_mult`` ride along in each group."""
    groups = {
        "weight": ([], 1.0, 1.0), "bias": ([], 2.0, 0.0), "bn": ([], 1.0, 0.0),
        "fc_weight": ([], fc_lr_mult, 1.0), "fc_bias": ([], 2 * fc_lr_mult, 0.0),
    }
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if isinstance(module, (FreqBatchNorm2d, _BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                key = "bn"
            elif isinstance(module, nn.Linear):
                key = "fc_weight" if name == "weight" else "fc_bias"
            else:
                key = "bias" if name == "bias" else "weight"
            groups[key][0].append(p)
    return [{"name": k, "params": ps, "lr_mult": lr, "decay_mult": wd}
            for k, (ps, lr, wd) in groups.items() if ps]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.SGD:
    groups = parameter_groups(model, cfg.fc_lr_mult)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_mult"]
        g["weight_decay"] = cfg.weight_decay * g["decay_mult"]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: OptimConfig, epochs: int, steps_per_epoch: int) -> float:
    """Factor on every group's lr at optimizer step ``step``: linear warmup, then cosine over the
    remaining steps, or x ``gamma`` at each milestone epoch."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "cosine":
        total = max(1, epochs * steps_per_epoch - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total) / total))
    epoch = step // steps_per_epoch
    return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, epochs, steps_per_epoch))
