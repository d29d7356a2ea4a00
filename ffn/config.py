"""Run configuration: nested dataclasses filled from a TOML/YAML file and ``key.sub=value`` overrides.

Unknown keys and ill-typed values raise ``ValueError`` naming the key, so a typo never trains with
a default silently.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class SyntheticConfig:
    task: str = "direction"  # the class is the direction of motion | its speed (see ffn.data.synthetic)
    train_videos: int = 2000
    val_videos: int = 400
    num_classes: int = 4
    num_frames: int = 48
    frame_size: int = 40
    travel: float = 0.5
    noise: float = 12.0
    movers: int = 1  # moving shapes per video (all of the class's direction or speed)


@dataclass
class DataConfig:
    kind: str = "synthetic"  # synthetic | frames | video
    root: str = ""
    train_list: str = ""
    val_list: str = ""
    num_classes: int = 0  # required for frames / video (synthetic: synthetic.num_classes)
    template: str = "img_{:05d}.jpg"  # frame file name, formatted with the 1-based frame number
    start_index: int = 1
    frames_column: bool = False  # video lists hold 'path num_frames label' instead of 'path label'
    size: int = 32  # training / test crop
    scale_size: int = 0  # test resize of the short side; 0 = size * 256 / 224
    flip: bool = False  # horizontal flip; wrong where the label depends on left/right motion
    nested: bool = False  # smaller branches take subsets of the largest branch's frames
    skip_bad: bool = False  # drop and count unreadable videos instead of raising
    batch_size: int = 16  # clips per process and step
    workers: int = 2
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    @property
    def test_scale(self) -> int:
        return self.scale_size or round(self.size * 256 / 224)


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    width: int = 64  # first-stage channels (64 = standard ResNet; smaller for quick CPU runs)
    impl: str = "fused"  # fused: FFNResNet on the ffn_kernels ops | eager: EagerFFNResNet (same weights)
    frames: list[int] = field(default_factory=lambda: [4, 8, 16])  # one entry = single-frame-count model
    weight_alteration: bool = True  # False with one frame count = a plain TSM baseline
    dropout: float = 0.5
    pretrained: str = ""  # initial weights, loaded via ffn.convert
    pretrained_format: str = "torchvision"  # torchvision (ImageNet ResNet) | official (FFN-pytorch)
    distill_weight: float = 1.0  # lambda of the temporal distillation loss


@dataclass
class OptimConfig:
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    fc_lr_mult: float = 5.0  # classifier weight lr multiplier (its bias: 2x that, no decay)
    schedule: str = "cosine"  # cosine | step
    milestones: list[int] = field(default_factory=lambda: [20, 40])  # epochs, for step
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    clip_grad: float = 20.0  # max gradient norm, 0 = off
    amp: str = "off"  # off | fp16 | bf16


@dataclass
class TrainConfig:
    epochs: int = 10
    seed: int = 0
    out: str = "runs/ffn"
    device: str = "auto"  # auto | cpu | cuda
    sync_bn: bool = False  # frequency-indexed BN statistics all-reduced across processes
    progress: bool = True
    max_steps: int = 0  # cap on steps per epoch (smoke tests); 0 = whole epoch
    val_twice: bool = False
    val_crops: int = 1


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_config_file(path: str | Path) -> dict:
    """A TOML (``.toml``) or YAML (``.yaml``/``.yml``) file as a dict."""
    path = Path(path)
    if path.suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            import tomli as tomllib
        return tomllib.loads(path.read_text())
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(path.read_text()) or {}
    raise ValueError(f"config file {path}: use .toml, .yaml or .yml")


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'optim.lr=0.1'`` -> ``(['optim', 'lr'], 0.1)``; the value is read as YAML (lists, bools),
    or kept as a string where it is not YAML (``data.template={:05d}.jpg``)."""
    import yaml

    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r}: expected key.sub=value")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Defaults, then ``base`` (e.g. a checkpoint's config), then the file, then the overrides."""
    tree: dict = {}
    for layer in (base or {}, read_config_file(path) if path else {}):
        _merge(tree, layer)
    for item in overrides:
        keys, value = parse_override(item)
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    config = _build(Config, tree, "")
    for key, value, allowed in (
        ("data.kind", config.data.kind, ("synthetic", "frames", "video")),
        ("data.synthetic.task", config.data.synthetic.task, ("direction", "speed")),
        ("model.impl", config.model.impl, ("fused", "eager")),
        ("model.pretrained_format", config.model.pretrained_format, ("torchvision", "official")),
        ("optim.schedule", config.optim.schedule, ("cosine", "step")),
        ("optim.amp", config.optim.amp, ("off", "fp16", "bf16")),
        ("train.device", config.train.device, ("auto", "cpu", "cuda")),
    ):
        if value not in allowed:
            raise ValueError(f"config {key}: {value!r} is not one of {allowed}")
    return config


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _build(cls, tree: Any, prefix: str):
    if not isinstance(tree, dict):
        raise ValueError(f"config {prefix.rstrip('.') or 'root'}: expected a table, got {tree!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(tree) - names
    if unknown:
        raise ValueError(
            f"config {prefix.rstrip('.') or 'root'}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}"
        )
    kwargs = {}
    for name, value in tree.items():
        kind, key = hints[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, value, key + ".")
        else:
            kwargs[name] = _coerce(kind, value, key)
    return cls(**kwargs)


def _coerce(kind, value, key: str):
    origin = typing.get_origin(kind)
    if origin is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config {key}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{key}[]") for v in value]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is str and value is None:
        return ""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"config {key}: expected {kind.__name__}, got {value!r}")
    return value
