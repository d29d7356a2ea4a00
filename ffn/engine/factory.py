"""Models from a config or a training checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..config import (SLOWFAST_ALPHA, SLOWFAST_ARCH, UNIFORMER_ARCH, Config, ModelConfig, UserError,
                      load_config, torchvision_arch)
from ..convert import load_official, load_pyslowfast, load_res2net, load_torchvision, load_uniformer
from ..data import num_classes
from ..data.build import num_classes_key
from ..eager import EagerFFNResNet
from ..ffnify import FFNVideo, ffnify, import_torchvision
from ..models import DEPTHS, FFNResNet, FrameFlexible
from ..slowfast import EagerFFNSlowFast, FFNSlowFast
from ..tea import EagerFFNTEA, FFNTEA
from ..uniformer import EagerFFNUniFormer, FFNUniFormer
from . import checkpoint


def depth_of(arch: str) -> int:
    depth = arch.lower().removeprefix("resnet")
    if not depth.isdigit() or int(depth) not in DEPTHS:
        raise UserError(f"config model.arch must be one of {[f'resnet{d}' for d in DEPTHS]}, "
                        f"{TEA_ARCH}, {SLOWFAST_ARCH}, {UNIFORMER_ARCH} or torchvision:NAME (a torchvision ResNet "
                        f"or mobilenet_v2), got {arch!r}")
    return int(depth)


TEA_ARCH = "tea50"  # ffn.tea.FFNTEA: TEA-FFN (Res2Net-50 26w x 4s with ME and MTA)


def build_model(cfg: ModelConfig, classes: int, pretrained: bool = True, report: bool = True) -> FrameFlexible:
    """The FFN (several frame counts) or single-frame-count TSM described by ``cfg``. ``report``:
    a ``torchvision:NAME`` arch prints what ffnify converted (on the main process only)."""
    name = torchvision_arch(cfg.arch)
    if name is not None:
        video = build_torchvision(name, cfg, classes)
        if report and int(os.environ.get("RANK", 0)) == 0:  # torchrun's rank: one line per run
            print(video.conversion, flush=True)
        return video
    if cfg.arch.lower() == TEA_ARCH:
        cls = FFNTEA if cfg.impl == "fused" else EagerFFNTEA
        model = cls(cfg.frames, classes, dropout=cfg.dropout, width=cfg.width)
        imagenet = load_res2net  # model.pretrained_format=torchvision: timm's res2net50_26w_4s
    elif cfg.arch.lower() == SLOWFAST_ARCH:
        cls = FFNSlowFast if cfg.impl == "fused" else EagerFFNSlowFast
        model = cls(cfg.frames, classes, dropout=cfg.dropout, width=cfg.width, alpha=SLOWFAST_ALPHA)
        imagenet = None  # no ImageNet weights: the config allows official and pyslowfast only
    elif cfg.arch.lower() == UNIFORMER_ARCH:
        cls = FFNUniFormer if cfg.impl == "fused" else EagerFFNUniFormer
        model = cls(cfg.frames, classes, dropout=cfg.dropout, width=cfg.width,
                    weight_alteration=cfg.weight_alteration, drop_path=cfg.drop_path)
        imagenet = load_uniformer  # model.pretrained_format=torchvision: plain UniFormer-S
    else:
        cls = FFNResNet if cfg.impl == "fused" else EagerFFNResNet
        model = cls(depth_of(cfg.arch), cfg.frames, classes, dropout=cfg.dropout,
                    weight_alteration=cfg.weight_alteration, width=cfg.width)
        imagenet = load_torchvision
    if pretrained and cfg.pretrained:
        load = {"torchvision": imagenet, "official": load_official,
                "pyslowfast": load_pyslowfast}[cfg.pretrained_format]
        try:
            load(model, cfg.pretrained)
        except checkpoint.CheckpointError as e:
            raise UserError(f"config model.pretrained: {e}") from None
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"config model.pretrained: {cfg.pretrained} ({cfg.pretrained_format} format) does "
                            f"not fit model.arch={cfg.arch}: {str(e).splitlines()[0]}") from None
    return model


def build_torchvision(name: str, cfg: ModelConfig, classes: int) -> FFNVideo:
    """``torchvision.models.get_model(name)`` with ``classes`` outputs and TSM's head dropout,
    through :func:`ffn.ffnify` (config checks: :func:`ffn.config.check_ranges`)."""
    arch = f"model.arch={cfg.arch}"
    try:
        torchvision = import_torchvision()
    except Exception as e:  # noqa: BLE001 - not installed, or a build for another torch
        raise UserError(f"config {arch} needs torchvision, built for this torch (pip install "
                        f"'ffn-kernels[torchvision]'): {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    try:
        model = torchvision.models.get_model(name, num_classes=classes)
    except (ValueError, TypeError) as e:  # an unknown name, or a model without num_classes
        raise UserError(f"config {arch}: torchvision cannot build {name!r}: {e}") from None
    head_dropout(model, cfg.dropout)
    try:
        return ffnify(model, cfg.frames, weight_alteration=cfg.weight_alteration)
    except ValueError as e:
        raise UserError(f"config {arch}: {e}") from None


def head_dropout(model: nn.Module, p: float) -> None:
    """Dropout ``p`` right before the classifier (the last ``nn.Linear``), as TSM's head: the
    ``nn.Dropout`` already there is set (MobileNetV2), or one is put in front (ResNet's ``fc``
    becomes ``fc.0`` dropout, ``fc.1`` linear, whatever ``p``: the keys do not depend on it)."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"{type(model).__name__} has no nn.Linear classifier for model.dropout")
    parent_name, _, leaf = linears[-1].rpartition(".")
    parent = model.get_submodule(parent_name)
    before = (parent[int(leaf) - 1] if isinstance(parent, nn.Sequential) and leaf.isdigit()
              and int(leaf) > 0 else None)
    if isinstance(before, nn.Dropout):
        before.p = p
    else:
        setattr(parent, leaf, nn.Sequential(nn.Dropout(p), getattr(parent, leaf)))


# What the saved weights are: overrides of these that differ from the checkpoint are refused
MODEL_KEYS = ("arch", "width", "frames", "weight_alteration")


def load_trained(path: str | Path, overrides: list[str] = ()) -> tuple[FrameFlexible, Config]:
    """The model saved by ``ffn train`` at ``path`` and its config (``overrides`` applied, e.g. to
    point at other validation data). An override that contradicts the saved model (``model.frames``,
    ``model.arch``, ``model.width``, ``model.weight_alteration``, the number of classes) raises
    :class:`~ffn.config.UserError` naming the key and both values: the weights are those of the
    saved model, and e.g. other frame counts would map its branches to the wrong ones."""
    state = checkpoint.load_run(path)
    saved = load_config(base=state["config"])
    cfg = load_config(overrides=overrides, base=state["config"])
    for key in MODEL_KEYS:
        old, new = getattr(saved.model, key), getattr(cfg.model, key)
        if old != new:
            raise UserError(f"model.{key}={new} contradicts checkpoint {path}, which holds a model with "
                            f"model.{key}={old}; drop the override (the weights are that model's)")
    old, new = num_classes(saved.data), num_classes(cfg.data)
    if old != new:
        raise UserError(f"{num_classes_key(cfg.data)}={new} contradicts checkpoint {path}, whose classifier "
                        f"has {old} classes")
    model = build_model(cfg.model, new, pretrained=False, report=False)
    checkpoint.check_weights(state["model"], model, path)
    model.load_state_dict(state["model"])
    return model, cfg
