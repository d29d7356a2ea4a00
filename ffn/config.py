"""Run configuration: nested dataclasses filled from a TOML/YAML file and ``key.sub=value`` overrides.

Unknown keys, ill-typed values and values out of range raise :class:`UserError` (a ``ValueError``)
naming the key, so a typo never trains with a default silently.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import re
import reprlib
import stat
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class UserError(ValueError):
    """A bad input of the user's (config value, list file, checkpoint, run folder): the ``ffn`` command
    prints its one-line message and exits with status 2, without a traceback."""


class ConfigError(UserError):
    """A config value refused, ``config KEY: message``; ``source`` is the key whose line in a config
    file the message gets (:func:`load_config`), by default ``key``."""

    def __init__(self, key: str, message: str, source: str = "") -> None:
        super().__init__(f"config {key}: {message}")
        self.source = re.split(r"[ \[]", source or key)[0]  # model.frames[1] -> model.frames


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
    workers: int = 2  # at most max_workers(): 4 per CPU this process may use, at least 8
    decode_timeout: float = 60.0  # seconds to read one video; longer raises BadSampleError (0 = no limit)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    @property
    def test_scale(self) -> int:
        return self.scale_size or round(self.size * 256 / 224)


# model.arch "torchvision:NAME": torchvision.models.get_model(NAME) made frame-flexible by ffn.ffnify
TORCHVISION_ARCH = "torchvision:"
SLOWFAST_ARCH = "slowfast_r50"  # ffn.slowfast.FFNSlowFast: model.frames are the fast pathway's
SLOWFAST_ALPHA = 4  # its slow pathway takes one of every 4 frames (the official config's ALPHA)
UNIFORMER_ARCH = "uniformer_s"  # ffn.uniformer.FFNUniFormer: UniFormer-S FFN (video)


@dataclass
class ModelConfig:
    arch: str = "resnet18"  # resnet18/34/50/101 (FFNResNet) | tea50 (FFNTEA) | slowfast_r50 (FFNSlowFast) | uniformer_s (FFNUniFormer) | torchvision:NAME (a ResNet or mobilenet_v2)
    width: int = 64  # first-stage channels (64 = standard ResNet, UniFormer-S; smaller for quick CPU runs); resnetN, tea50, slowfast_r50 (its slow stem; a multiple of 8), uniformer_s
    impl: str = "fused"  # fused: FFNResNet on the ffn_kernels ops | eager: EagerFFNResNet (same weights)
    frames: list[int] = field(default_factory=lambda: [4, 8, 16])  # one entry = single-frame-count model
    weight_alteration: bool = True  # False with one frame count = a plain TSM baseline
    dropout: float = 0.5  # before the classifier (torchvision:NAME: the dropout before its last Linear)
    pretrained: str = ""  # initial weights, loaded via ffn.convert
    pretrained_format: str = "torchvision"  # torchvision (ImageNet ResNet; tea50: timm's res2net50_26w_4s; uniformer_s: plain UniFormer-S, ImageNet or Kinetics) | official (FFN-pytorch; tea50: TEA-FFN or plain TEA; slowfast_r50: SlowFast-FFN; uniformer_s: UniFormer-FFN) | pyslowfast (slowfast_r50: a plain PySlowFast SlowFast-R50)
    distill_weight: float = 1.0  # lambda of the temporal distillation loss
    drop_path: float = 0.0  # uniformer_s: stochastic depth rate of the last block (official 0.1), 0 at the first


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
    progress: bool = True  # a tqdm bar where stdout and stderr are terminals; false: plain lines always
    log_every: int = 50  # steps between plain progress lines (also one at least every 30 s)
    max_steps: int = 0  # cap on steps per epoch (smoke tests); 0 = whole epoch
    val_twice: bool = False
    val_crops: int = 1
    dist_timeout: float = 10.0  # minutes a process waits for the others (joining, collectives)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def torchvision_arch(arch: str) -> str | None:
    """``NAME`` of a ``model.arch`` of ``torchvision:NAME``, else None."""
    return arch[len(TORCHVISION_ARCH):] if arch.startswith(TORCHVISION_ARCH) else None


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a regular file to read ("does not exist", "is a FIFO, not a regular
    file", ...), else None. Every file of the user's is checked so, with ``os.stat``, before it is
    opened: opening a FIFO waits for a writer forever, and a device such as /dev/zero never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        return f"cannot be read ({getattr(e, 'strerror', None) or e})"
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return f"is {next((k for test, k in kinds if test(mode)), 'a special file')}, not a regular file"


def read_user_text(path: str | Path, what: str) -> str:
    """A user's UTF-8 text file (a BOM is dropped: it is not part of the first line); a file that
    is missing, a folder, not UTF-8 or unreadable raises :class:`UserError` naming ``what`` and
    the path."""
    problem = file_problem(path)
    if problem:
        raise UserError(f"{what} {path} {problem}")
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path}: not a UTF-8 text file (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise UserError(f"{what} {path}: {e.strerror or e}") from None


def check_checkpoint_file(path: str | Path) -> Path:
    """``path`` as a checkpoint file to read: missing, not a file, or empty raises :class:`UserError`
    naming it (torch-free, so the ``ffn`` command checks its arguments before importing torch)."""
    path = Path(path)
    problem = file_problem(path)
    if problem:
        raise UserError(f"checkpoint {path} {problem}")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes): not a checkpoint")
    return path


# The recipes shipped with the package (ffn/configs/*.toml): `--config NAME` finds them from anywhere
SHIPPED = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> list[str]:
    """Names of the shipped recipes, for ``--config NAME``."""
    return sorted(p.stem for p in SHIPPED.glob("*.toml"))


def config_path(name: str | Path) -> Path:
    """The file of ``--config name``: a path, or else the name of a shipped recipe (``demo``,
    ``ssv2_tsm_ffn``: :func:`shipped_configs`); neither raises :class:`UserError` listing both."""
    path = Path(name)
    if path.exists():
        return path
    recipe = SHIPPED / f"{name}.toml"
    if not path.suffix and path.name == str(name) and recipe.is_file():
        return recipe
    raise UserError(f"config file {name} does not exist (a path, or one of the shipped configs: "
                    f"{', '.join(shipped_configs())})")


def read_config_file(path: str | Path, lines: dict | None = None) -> dict:
    """A TOML (``.toml``) or YAML (``.yaml``/``.yml``) file, or a shipped recipe by name
    (:func:`config_path`), as a dict; a file that is missing, unreadable, malformed or not a table
    at its top level raises :class:`UserError` naming it. ``lines`` gets ``file:line`` of each
    dotted key found (for TOML, those of ``key = value`` lines under ``[table]`` headers)."""
    path = config_path(path)
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise UserError(f"config file {path}: use .toml, .yaml or .yml")
    text = read_user_text(path, "config file")
    if path.suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            import tomli as tomllib
        try:
            tree = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"config file {path}: {e}") from None
        except RecursionError:
            raise UserError(f"config file {path}: nested too deeply") from None
        table = ""
        for n, line in enumerate(text.splitlines(), 1):
            header, key = re.match(r"\s*\[\s*([\w.-]+)\s*\]", line), re.match(r"\s*([\w.-]+)\s*=", line)
            if header:
                table = header.group(1) + "."
            elif key and lines is not None:
                lines.setdefault(table + key.group(1), f"{path}:{n}")
    else:
        import yaml

        loader = strict_yaml_loader()(text)
        try:
            node = loader.get_single_node()
            tree = {} if node is None else loader.construct_document(node)
        except yaml.YAMLError as e:
            raise UserError(f"config file {_yaml_where(path, e)}") from None
        finally:
            loader.dispose()
        if lines is not None and node is not None:
            _yaml_lines(node, "", path, lines)
    if not isinstance(tree, dict):
        raise UserError(f"config file {path}: the top level must be a table of keys, got a "
                        f"{type(tree).__name__}")
    return tree


# Deeper than any config (3 levels) by far, and far from Python's recursion limit in PyYAML's composer
MAX_YAML_DEPTH = 32


@functools.lru_cache(maxsize=None)
def strict_yaml_loader() -> type:
    """A ``yaml.SafeLoader`` for configs: a duplicate key (PyYAML's "last wins" would silently reset a
    table), a key that is not a string, a value JSON cannot hold (dates, sets, binary, ordered pairs)
    or nesting deeper than :data:`MAX_YAML_DEPTH` raises a ``yaml.YAMLError`` at its line."""
    import yaml
    from yaml.constructor import ConstructorError

    class StrictLoader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
            self.depth += 1
            try:
                if self.depth > MAX_YAML_DEPTH:
                    raise yaml.composer.ComposerError(
                        None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", self.peek_event().start_mark)
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                if key_node.tag != "tag:yaml.org,2002:str":
                    raise ConstructorError(None, None, f"key {key_node.value!r} is not a string (quote it)",
                                           key_node.start_mark)
                if key_node.value in seen:
                    raise ConstructorError(None, None, f"duplicate key {key_node.value!r}", key_node.start_mark)
                seen.add(key_node.value)
            return super().construct_mapping(node, deep)

    def refuse(loader, node):
        what = node.tag.rsplit(":", 1)[-1]
        raise ConstructorError(None, None, f"a {what} is not a config value (quote it to make it a string)",
                               node.start_mark)

    for tag in ("timestamp", "set", "binary", "omap", "pairs"):
        StrictLoader.add_constructor(f"tag:yaml.org,2002:{tag}", refuse)
    return StrictLoader


def _yaml_where(path, e) -> str:
    """``path:line: problem`` of a ``yaml.YAMLError``."""
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
    return f"{where}: {getattr(e, 'problem', None) or str(e).splitlines()[0]}"


def _yaml_lines(node, prefix: str, path, lines: dict) -> None:
    import yaml

    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                lines.setdefault(prefix + key.value, f"{path}:{key.start_mark.line + 1}")
                _yaml_lines(value, f"{prefix}{key.value}.", path, lines)


def field_type(keys: list[str]):
    """The annotated type of config key ``keys`` (``['optim', 'lr']`` -> float), None where unknown."""
    kind = Config
    for k in keys:
        if not dataclasses.is_dataclass(kind):
            return None
        kind = typing.get_type_hints(kind).get(k)
    return kind


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'optim.lr=0.1'`` -> ``(['optim', 'lr'], 0.1)``. The value of a string key (paths, names) is
    taken as written (``train.out=runs/exp #2``, ``--out null``, ``--out 2024``); any other value is
    read as YAML (lists, numbers, bools; :func:`strict_yaml_loader`), or kept as a string where it is
    not YAML, for the type check to name."""
    import yaml

    key, sep, value = item.partition("=")
    keys = key.strip().split(".")
    if not sep or not key.strip() or any(not k for k in keys):
        raise UserError(f"override {_show(item)}: expected key.sub=value")
    if field_type(keys) is str:
        return keys, value
    try:
        parsed = yaml.load(value, strict_yaml_loader())
    except yaml.YAMLError:
        parsed = value
    return keys, parsed


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None,
                ranges: bool = True) -> Config:
    """Defaults, then ``base`` (e.g. a checkpoint's config), then the file, then the overrides,
    checked by :func:`check_config`. ``ranges=False`` skips :func:`check_ranges`, whose checks relate
    keys to each other: it checks keys, types and choices of overrides meant for a base not read yet
    (a checkpoint's config)."""
    tree: dict = {}
    where: dict[str, str] = {}  # file:line of the keys whose value comes from the file
    for layer in (base or {}, read_config_file(path, where) if path else {}):
        _merge(tree, layer)
    for item in overrides:
        keys, value = parse_override(item)
        dotted = ".".join(keys)
        for key in [k for k in where if k == dotted or k.startswith(dotted + ".")]:
            del where[key]
        node = tree
        for i, k in enumerate(keys[:-1]):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise UserError(f"override {_show(item)}: config {'.'.join(keys[:i + 1])} is not a table")
        node[keys[-1]] = value
    try:
        return _checked(tree, ranges)
    except ConfigError as e:
        if e.source not in where:
            raise
        raise UserError(f"{where[e.source]}: {e}") from None


def check_config(config: Config, ranges: bool = True) -> Config:
    """``config`` (built in Python, say) through the checks of :func:`load_config`, as a new
    :class:`Config` whose values have the annotated types (a numpy integer becomes an ``int``, a
    tuple a ``list``)."""
    return _checked(config.to_dict(), ranges)


# The choices of string keys
CHOICES = {
    "data.kind": ("synthetic", "frames", "video"),
    "data.synthetic.task": ("direction", "speed"),
    "model.impl": ("fused", "eager"),
    "model.pretrained_format": ("torchvision", "official", "pyslowfast"),
    "optim.schedule": ("cosine", "step"),
    "optim.amp": ("off", "fp16", "bf16"),
    "train.device": ("auto", "cpu", "cuda"),
}


def _checked(tree: dict, ranges: bool) -> Config:
    config = _build(Config, tree, "")
    for key, allowed in CHOICES.items():
        value = functools.reduce(getattr, key.split("."), config)
        if value not in allowed:
            raise ConfigError(key, f"{_show(value)} is not one of {allowed}")
    if ranges:
        check_ranges(config)
    return config


# Bounds of sizes and counts, so that what a config asks for can be allocated: every integer fits a
# C int (and a seed of every generator); the rest are far beyond any real run of a video model.
INT_MAX = 2**31 - 1
MAX_FRAMES = 1024  # frames of a branch's clip (and of `ffn eval --frames`)
MAX_WIDTH = 1024  # model.width: 16x ResNet's; the weights grow as its square
MAX_SIZE = 4096  # pixels of a side (crops, resizes, synthetic frames)
MAX_VIDEOS = 10**7  # synthetic videos: the sampler draws a permutation of them every epoch
MAX_CLASSES = 10**5  # rows of the classifier
MAX_MOVERS = 64  # moving shapes drawn into every synthetic frame
MAX_STEP_VALUES = INT_MAX  # values of one step's input batch (clips x frames x 3 x size^2)
MAX_LR = 10.0  # any larger step diverges at once


def max_workers() -> int:
    """The most ``data.workers``: far more processes than CPUs only slow loading, and a huge count
    never gets its processes started."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(8, 4 * cpus)


def check_ranges(config: Config) -> None:
    """Values a run cannot use (a NaN or negative lr, zero epochs, a crop of 0 pixels, a width that
    cannot be allocated, a frame file template without a frame number...) raise :class:`UserError`
    naming the key and the bound."""
    d, m, o, t = config.data, config.model, config.optim, config.train

    def need(ok: bool, key: str, value, what: str) -> None:
        if not ok:
            raise ConfigError(key, f"{what}, got {_show(value)}")

    def finite(key: str, value: float, lo: float, lo_open: bool = False, hi: float = math.inf) -> None:
        ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi
        bounds = f"{'>' if lo_open else '>='} {lo:g}" + (f" and <= {hi:g}" if hi < math.inf else "")
        need(ok, key, value, f"must be a finite number {bounds}")

    def count(key: str, value: int, lo: int, hi: int = INT_MAX, what: str = "") -> None:
        need(lo <= value <= hi, key, value, f"must be {lo}..{hi}{what}")

    finite("optim.lr", o.lr, 0, lo_open=True, hi=MAX_LR)
    finite("optim.momentum", o.momentum, 0, hi=1)
    finite("optim.weight_decay", o.weight_decay, 0, hi=1)
    finite("optim.fc_lr_mult", o.fc_lr_mult, 0, lo_open=True, hi=1000)
    finite("optim.gamma", o.gamma, 0, lo_open=True, hi=1)
    finite("optim.warmup_epochs", o.warmup_epochs, 0, hi=INT_MAX)
    finite("optim.clip_grad", o.clip_grad, 0)
    need(all(e >= 1 for e in o.milestones) and o.milestones == sorted(set(o.milestones)), "optim.milestones",
         o.milestones, "must be increasing epochs >= 1")
    finite("model.dropout", m.dropout, 0, hi=0.999)
    finite("model.distill_weight", m.distill_weight, 0, hi=1000)
    finite("model.drop_path", m.drop_path, 0, hi=0.999)
    count("model.width", m.width, 1, MAX_WIDTH, " (first-stage channels; its weights grow as its square)")
    tv = torchvision_arch(m.arch)
    if tv is not None:  # ffn.ffnify of a torchvision model: what only FFNResNet has is refused
        need(tv.isidentifier(), "model.arch", m.arch, "must name a torchvision model after "
             "'torchvision:', such as torchvision:mobilenet_v2 or torchvision:resnet50")
        need(m.impl == "fused", "model.impl", m.impl, f"must be 'fused' with model.arch={m.arch} "
             "(the eager twin is FFNResNet's)")
        need(m.width == 64, "model.width", m.width, f"must stay 64 with model.arch={m.arch}: it sets "
             "the resnetN archs' width; a torchvision model has its own")
        need(not m.pretrained, "model.pretrained", m.pretrained, f"is not supported with model.arch="
             f"{m.arch} yet: load the ImageNet weights into the torchvision model, then call "
             "ffn.ffnify in Python")
    need(m.drop_path == 0 or m.arch.lower() == UNIFORMER_ARCH, "model.drop_path", m.drop_path,
         f"must be 0 with model.arch={m.arch} (stochastic depth is {UNIFORMER_ARCH}'s)")
    if m.arch.lower() == UNIFORMER_ARCH:  # ffn.uniformer.MIN_SIZE: four patch embeddings, 32x
        need(d.size >= 32, "data.size", d.size, f"must be >= 32 pixels with model.arch={m.arch} (its "
             "patch embeddings reduce each side 32-fold)")
    need(bool(m.frames) and m.frames[0] >= 1 and m.frames[-1] <= MAX_FRAMES
         and all(a < b for a, b in zip(m.frames, m.frames[1:])),
         "model.frames", m.frames, f"must be frame counts in 1..{MAX_FRAMES} in increasing order")
    if m.arch.lower() in (SLOWFAST_ARCH, UNIFORMER_ARCH):
        need(not t.sync_bn, "train.sync_bn", t.sync_bn, f"is not supported with model.arch={m.arch} "
             "yet: FreqBatchNorm3d has no synchronised counterpart")
    slowfast = m.arch.lower() == SLOWFAST_ARCH
    if slowfast:
        need(all(t % SLOWFAST_ALPHA == 0 for t in m.frames), "model.frames", m.frames,
             f"must be multiples of {SLOWFAST_ALPHA} with model.arch={m.arch} (the fast pathway's "
             f"counts: the slow pathway takes one of every {SLOWFAST_ALPHA}, e.g. [16,32,64])")
        need(m.width % 8 == 0, "model.width", m.width, f"must be a multiple of 8 with model.arch="
             f"{m.arch} (the fast pathway has width / 8 channels)")
        need(m.weight_alteration, "model.weight_alteration", m.weight_alteration,
             f"must stay true with model.arch={m.arch}: SlowFast-FFN's blocks always have it")
        need(not m.pretrained or m.pretrained_format in ("official", "pyslowfast"),
             "model.pretrained_format", m.pretrained_format, f"must be official (a SlowFast-FFN "
             f"checkpoint) or pyslowfast (a plain PySlowFast SlowFast-R50) with model.arch={m.arch}")
    else:
        need(m.pretrained_format != "pyslowfast", "model.pretrained_format", m.pretrained_format,
             f"pyslowfast is for model.arch={SLOWFAST_ARCH} only")
    count("train.epochs (--epochs)", t.epochs, 1)
    count("train.seed", t.seed, 0)
    count("train.max_steps", t.max_steps, 0, what=" (0 = whole epoch)")
    count("train.log_every", t.log_every, 1, what=" steps")
    finite("train.dist_timeout", t.dist_timeout, 0, lo_open=True, hi=24 * 60)
    need(t.val_crops in (1, 3), "train.val_crops", t.val_crops, "must be 1 or 3")
    need(bool(t.out), "train.out (--out)", t.out, "must name a folder")
    count("data.size", d.size, 1, MAX_SIZE, " pixels")
    need(d.scale_size == 0 or d.size <= d.scale_size <= MAX_SIZE, "data.scale_size", d.scale_size,
         f"must be 0 (automatic) or data.size ({d.size})..{MAX_SIZE}")
    count("data.batch_size", d.batch_size, 1)
    values = d.batch_size * sum(m.frames) * 3 * d.size ** 2
    need(values <= MAX_STEP_VALUES, "data.batch_size", d.batch_size, f"a step's input of data.batch_size x "
         f"sum(model.frames) x 3 x data.size^2 = {values:,} values is more than {MAX_STEP_VALUES:,}")
    count("data.workers", d.workers, 0, max_workers(), " (4 per CPU this process may use, at least 8)")
    finite("data.decode_timeout", d.decode_timeout, 0, hi=INT_MAX)
    count("data.start_index", d.start_index, 0)
    need(d.num_classes == 0 or 2 <= d.num_classes <= MAX_CLASSES, "data.num_classes", d.num_classes,
         f"must be 2..{MAX_CLASSES} (0 = unset)")
    if d.kind == "frames":
        try:
            names = {d.template.format(i) for i in (d.start_index, d.start_index + 1)}
        except (ValueError, IndexError, KeyError, AttributeError, TypeError) as e:
            raise ConfigError("data.template", f"{d.template!r} is not a format string of the frame number "
                              f"such as 'img_{{:05d}}.jpg' ({type(e).__name__}: {e})") from None
        need(len(names) == 2, "data.template", d.template,
             "must contain a field for the frame number, such as 'img_{:05d}.jpg'")
    if d.kind == "synthetic":
        s = d.synthetic
        count("data.synthetic.train_videos", s.train_videos, 1, MAX_VIDEOS)
        count("data.synthetic.val_videos", s.val_videos, 1, MAX_VIDEOS)
        count("data.synthetic.num_classes", s.num_classes, 2, MAX_CLASSES)
        count("data.synthetic.num_frames", s.num_frames, 2)
        count("data.synthetic.frame_size", s.frame_size, 8, MAX_SIZE, " pixels")
        count("data.synthetic.movers", s.movers, 1, MAX_MOVERS)
        finite("data.synthetic.travel", s.travel, 0, lo_open=True)
        finite("data.synthetic.noise", s.noise, 0)


def _show(value) -> str:
    """``repr(value)``, shortened: a message stays one readable line."""
    return _SHORT.repr(value)


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlevel = 3


def _merge(into: dict, new: dict) -> None:
    """Merges ``new`` into ``into``, copying its tables: overrides later set into ``into`` must not
    reach the caller's ``base`` (a checkpoint's config)."""
    for k, v in new.items():
        if isinstance(v, dict):
            if not isinstance(into.get(k), dict):
                into[k] = {}
            _merge(into[k], v)
        else:
            into[k] = v


def _build(cls, tree: Any, prefix: str):
    if not isinstance(tree, dict):
        raise ConfigError(prefix.rstrip('.') or 'root', f"expected a table, got {_show(tree)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(tree) - names
    if unknown:
        raise ConfigError(prefix.rstrip('.') or 'root', f"unknown key(s) {_show(sorted(unknown, key=str))}; "
                          f"known: {sorted(names)}", source=f"{prefix}{sorted(unknown, key=str)[0]}")
    kwargs = {}
    for name, value in tree.items():
        kind, key = hints[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, value, key + ".")
        else:
            kwargs[name] = _coerce(kind, value, key)
    return cls(**kwargs)


def _coerce(kind, value, key: str):
    """``value`` as the annotated type ``kind`` of ``key``: any integral number for an int (numpy's
    too) within :data:`INT_MAX`, any real number for a float, a tuple for a list, None for an empty
    string; else :class:`UserError` naming the key."""
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, (numbers.Real, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {_show(value)}")
        if len(value) > MAX_FRAMES:
            raise ConfigError(key, f"at most {MAX_FRAMES} values, got {len(value)}")
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if kind is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if not -INT_MAX - 1 <= value <= INT_MAX:
            raise ConfigError(key, f"{_show(value)} is beyond the integers a config takes "
                            f"(-{INT_MAX + 1}..{INT_MAX})")
        return int(value)
    if kind is float and (isinstance(value, (numbers.Real, str)) and not isinstance(value, bool)):
        try:  # a string: YAML 1.1 reads 1e-3 (no dot) as one
            return float(value)
        except (ValueError, OverflowError):
            pass
    if kind is str and value is None:
        return ""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(key, f"expected {kind.__name__}, got {_show(value)}")
    return value
