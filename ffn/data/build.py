"""Datasets from a :class:`~ffn.config.DataConfig`."""

from __future__ import annotations

from ..config import DataConfig
from .dataset import EvalClips, Source, TrainClips
from .frames import FrameFolderSource
from .synthetic import SyntheticMotion
from .transforms import EvalTransform, TrainTransform
from .video import VideoFileSource

# Fixed generator seeds of the synthetic splits: the data never depends on the training seed.
SYNTHETIC_SEEDS = {"train": 1, "val": 2}


def build_source(cfg: DataConfig, split: str) -> Source:
    """The videos of ``split`` ("train" or "val")."""
    if cfg.kind == "synthetic":
        s = cfg.synthetic
        count = s.train_videos if split == "train" else s.val_videos
        return SyntheticMotion(count, s.num_classes, s.num_frames, s.frame_size, s.travel, s.noise,
                               seed=SYNTHETIC_SEEDS[split], task=s.task, movers=s.movers)
    list_file = cfg.train_list if split == "train" else cfg.val_list
    if not list_file:
        raise ValueError(f"data.{split}_list is required for data.kind={cfg.kind!r}")
    if cfg.kind == "frames":
        return FrameFolderSource(list_file, cfg.root, cfg.template, cfg.start_index)
    if cfg.kind == "video":
        return VideoFileSource(list_file, cfg.root, cfg.frames_column)
    raise ValueError(f"unknown data.kind {cfg.kind!r}")


def num_classes(cfg: DataConfig) -> int:
    if cfg.kind == "synthetic":
        return cfg.synthetic.num_classes
    if cfg.num_classes < 2:
        raise ValueError(f"data.num_classes must be set (>= 2) for data.kind={cfg.kind!r}")
    return cfg.num_classes


def train_dataset(cfg: DataConfig, frames: list[int], seed: int) -> TrainClips:
    transform = TrainTransform(cfg.size, flip=cfg.flip)
    return TrainClips(build_source(cfg, "train"), frames, transform, cfg.nested, seed, cfg.skip_bad)


def eval_dataset(cfg: DataConfig, frames: int, twice: bool = False, crops: int = 1,
                 source: Source | None = None) -> EvalClips:
    """Validation clips of ``frames`` frames; pass ``source`` to reuse one across frame counts."""
    transform = EvalTransform(cfg.size, cfg.test_scale, crops)
    return EvalClips(source or build_source(cfg, "val"), frames, transform, twice, cfg.skip_bad)
