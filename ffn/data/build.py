"""Datasets from a :class:`~ffn.config.DataConfig`."""

from __future__ import annotations

from ..config import DataConfig, UserError
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
        try:
            return SyntheticMotion(count, s.num_classes, s.num_frames, s.frame_size, s.travel, s.noise,
                                   seed=SYNTHETIC_SEEDS[split], task=s.task, movers=s.movers)
        except ValueError as e:  # e.g. a travel too long for the frame size
            raise UserError(f"config data.synthetic: {e}") from None
    key = f"data.{split}_list"
    list_file = cfg.train_list if split == "train" else cfg.val_list
    if not list_file:
        raise UserError(f"config {key} is required for data.kind={cfg.kind!r}")
    classes = num_classes(cfg)  # labels are checked against it as the list is read
    try:
        if cfg.kind == "frames":
            return FrameFolderSource(list_file, cfg.root, cfg.template, cfg.start_index, classes)
        if cfg.kind == "video":
            return VideoFileSource(list_file, cfg.root, cfg.frames_column, classes)
    except UserError as e:
        raise UserError(f"{key}: {e}") from None
    raise UserError(f"config data.kind: unknown {cfg.kind!r}")


def num_classes(cfg: DataConfig) -> int:
    if cfg.kind == "synthetic":
        return cfg.synthetic.num_classes
    if cfg.num_classes < 2:
        raise UserError(f"config data.num_classes must be set (>= 2) for data.kind={cfg.kind!r}")
    return cfg.num_classes


def num_classes_key(cfg: DataConfig) -> str:
    """The config key :func:`num_classes` reads."""
    return "data.synthetic.num_classes" if cfg.kind == "synthetic" else "data.num_classes"


def train_dataset(cfg: DataConfig, frames: list[int], seed: int) -> TrainClips:
    transform = TrainTransform(cfg.size, flip=cfg.flip)
    return TrainClips(build_source(cfg, "train"), frames, transform, cfg.nested, seed, cfg.skip_bad,
                      cfg.decode_timeout)


def eval_dataset(cfg: DataConfig, frames: int, twice: bool = False, crops: int = 1,
                 source: Source | None = None) -> EvalClips:
    """Validation clips of ``frames`` frames; pass ``source`` to reuse one across frame counts."""
    transform = EvalTransform(cfg.size, cfg.test_scale, crops)
    return EvalClips(source or build_source(cfg, "val"), frames, transform, twice, cfg.skip_bad,
                     cfg.decode_timeout)
