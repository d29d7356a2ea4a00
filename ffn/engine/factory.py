"""Models from a config or a training checkpoint."""

from __future__ import annotations

from pathlib import Path

from ..config import Config, ModelConfig, load_config
from ..convert import load_official, load_torchvision
from ..data import num_classes
from ..eager import EagerFFNResNet
from ..models import DEPTHS, FFNResNet
from . import checkpoint


def depth_of(arch: str) -> int:
    depth = arch.lower().removeprefix("resnet")
    if not depth.isdigit() or int(depth) not in DEPTHS:
        raise ValueError(f"model.arch must be one of {[f'resnet{d}' for d in DEPTHS]}, got {arch!r}")
    return int(depth)


def build_model(cfg: ModelConfig, classes: int, pretrained: bool = True) -> FFNResNet:
    """The FFN (several frame counts) or single-frame-count TSM described by ``cfg``."""
    cls = FFNResNet if cfg.impl == "fused" else EagerFFNResNet
    model = cls(depth_of(cfg.arch), cfg.frames, classes, dropout=cfg.dropout,
                weight_alteration=cfg.weight_alteration, width=cfg.width)
    if pretrained and cfg.pretrained:
        load = load_torchvision if cfg.pretrained_format == "torchvision" else load_official
        load(model, cfg.pretrained)
    return model


def load_trained(path: str | Path, overrides: list[str] = ()) -> tuple[FFNResNet, Config]:
    """The model saved by ``ffn train`` at ``path`` and its config (``overrides`` applied, e.g. to
    point at other validation data)."""
    state = checkpoint.load(path)
    if "model" not in state or "config" not in state:
        raise ValueError(f"{path} is not a checkpoint written by `ffn train` (no model/config)")
    cfg = load_config(overrides=overrides, base=state["config"])
    model = build_model(cfg.model, num_classes(cfg.data), pretrained=False)
    model.load_state_dict(state["model"])
    return model, cfg
