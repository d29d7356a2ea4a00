"""``ffnify``: any ImageNet 2D CNN as a Frame Flexible TSN/TSM video model (docs/design.md §5.7).

:func:`ffnify` converts the 2D model in place:

* every ``nn.BatchNorm2d`` becomes a :class:`~ffn_kernels.FreqBatchNorm2d` whose branch rows all
  start from that BN (private normalisation per branch, shared convolutions), and every
  ``nn.LayerNorm`` with parameters a :class:`~ffn_kernels.FreqLayerNorm` (ConvNeXt's
  ``LayerNorm2d``: :class:`~ffn_kernels.FreqLayerNorm2d`) in the same way, as UniFormer-FFN makes
  its LayerNorms private;
* each residual block's first conv gets the temporal shift (TSM's residual-branch placement:
  ``make_temporal_shift`` shifts the block input on its way into conv1 only, fold_div 8) followed
  by Weight Alteration (the official FFN code's placement), as one fused ``shift_alter``.

It returns an :class:`FFNVideo` holding the model, with :class:`~ffn.models.FFNResNet`'s forward
contract (§5.3): the model runs once on all packed frames inside ``ffn_kernels.frame_layout``, so
its modules, called ``bn(x)`` by the model's own forward, find the layout, and per-frame logits
are averaged per clip (TSN's consensus).

Which modules are blocks, and which of their submodules is the first conv, is a rule: a callable
``blocks(name, module) -> str | None`` asked for every submodule (pre-order, with its dotted name;
a block's own submodules are not asked), returning the dotted path inside ``module`` of the
submodule whose input gets the shift and WA (``""``: ``module`` itself), or None where ``module`` is
not a block. The default,
:func:`torchvision_blocks`, knows torchvision's ResNets (and ResNeXts, Wide ResNets) and
MobileNetV2, where TSM shifts, and ConvNeXt's blocks.

ffnify is never silently wrong about normalisation: a ``BatchNorm2d`` or ``LayerNorm`` subclass
whose forward does more than its base is converted with that behaviour kept (timm's
``BatchNormAct2d``: :class:`~ffn_kernels.FreqBatchNormAct2d`; ConvNeXt's ``LayerNorm2d``) or
refused naming the module and its class; a model whose only normalisation layers are others
(GroupNorm, RMSNorm, ...) is refused; others next to BatchNorm or LayerNorm stay shared across
branches, with a warning. What was converted is ``video.conversion``
(:class:`Conversion`).
"""

from __future__ import annotations

import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ffn_kernels import (FrameLayout, FreqBatchNorm2d, FreqBatchNormAct2d, FreqLayerNorm,
                         FreqLayerNorm2d, ShiftAlter, frame_layout, resolve_layout)

from .models import ConvOfShifted, FrameFlexible, clip_means

BlockRule = Callable[[str, nn.Module], Optional[str]]

# The op schemas defined by import_torchvision's workaround, kept for the life of the process
_torchvision_schemas: Optional[torch.library.Library] = None


def import_torchvision():
    """``import torchvision``, also where its compiled ops do not load next to this torch.

    The PyPI torchvision wheel is a CUDA build. Next to the CPU torch its compiled ops do not load,
    and its ``__init__`` then fails registering fake kernels for two of them (``RuntimeError:
    operator torchvision::nms does not exist``). The model zoo (and timm, which imports torchvision)
    is plain Python and never calls those ops, so on exactly that error the half-imported modules
    are dropped and the import is retried with the two schemas (``torchvision::nms``, ``qnms``)
    defined, without kernels (calling them raises). Any other error is raised as is, and where
    torchvision loads nothing is defined. ``ImportError`` where it is not installed.
    """
    global _torchvision_schemas
    try:
        import torchvision
    except RuntimeError as e:
        if "operator torchvision::nms does not exist" not in str(e) or _torchvision_schemas is not None:
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        schemas = torch.library.Library("torchvision", "DEF")
        schemas.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        schemas.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        _torchvision_schemas = schemas
        import torchvision
    return torchvision


def first_conv(module: nn.Module) -> str:
    """Dotted path of the first ``nn.Conv2d`` inside ``module``, in registration order (for a rule
    whose blocks register their first conv first, as torchvision's do)."""
    for name, m in module.named_modules():
        if name and isinstance(m, nn.Conv2d):
            return name
    raise ValueError(f"{type(module).__name__} holds no nn.Conv2d")


def torchvision_blocks(name: str, module: nn.Module) -> Optional[str]:
    """The default rule: TSM's shift positions in torchvision models.

    * ResNet ``BasicBlock`` / ``Bottleneck``: ``"conv1"`` (every block, as ``FFNResNet``);
    * MobileNetV2 ``InvertedResidual`` with a residual connection: its first conv (``"conv.0.0"``,
      TSM's ``m.conv[0]``); blocks without one are not shifted;
    * ConvNeXt ``CNBlock``: its depthwise 7x7 conv (``"block.0"``), the first layer of its residual
      branch, as TSM's residual placement.
    """
    # torchvision is optional: a model of its classes has imported their modules
    resnet = sys.modules.get("torchvision.models.resnet")
    if resnet is not None and isinstance(module, (resnet.BasicBlock, resnet.Bottleneck)):
        return "conv1"
    mobilenet = sys.modules.get("torchvision.models.mobilenetv2")
    if mobilenet is not None and isinstance(module, mobilenet.InvertedResidual):
        return first_conv(module) if module.use_res_connect else None
    convnext = sys.modules.get("torchvision.models.convnext")
    if convnext is not None and isinstance(module, convnext.CNBlock):
        return "block.0"
    return None


class ShiftedConv(nn.Module):
    """``conv(alter(x))``: a block's first conv (or the module holding it) behind the block's
    temporal shift and Weight Alteration."""

    def __init__(self, alter: ShiftAlter, conv: nn.Module) -> None:
        super().__init__()
        self.alter, self.conv = alter, conv

    def forward(self, x: Tensor, layout: Optional[FrameLayout] = None) -> Tensor:
        layout = resolve_layout(layout, "ShiftedConv")
        x_in = self.alter(x, layout)
        if torch.is_grad_enabled() and self._recomputes():
            # FFNResNet's memory saving (§5.2): x, not x_in, is kept for backward
            return ConvOfShifted.apply(x_in, x, self.conv.weight, self.alter.weight, layout,
                                       self.alter.fold_div, self.conv)
        return self.conv(x_in)

    def _recomputes(self) -> bool:
        """Whether ``ConvOfShifted`` can run the conv: it recomputes the fused shift in backward,
        then calls aten's ``convolution_backward``, so a plain bias-free, zero-padded Conv2d."""
        conv = self.conv
        return (self.alter.shift and type(conv) is nn.Conv2d and conv.bias is None
                and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


@dataclass(frozen=True)
class Conversion:
    """What :func:`ffnify` converted, as ``video.conversion``; ``str()`` is a one-line summary.

    ffnify does not print it (a library does not print); ``ffn train`` prints it at model build.
    """

    model: str  # the 2D model's class name
    frames: tuple[int, ...]  # frame counts of the branches
    per_branch_norms: int  # BatchNorm2d (and subclasses) made FreqBatchNorm2d
    with_activation: int  # of them, timm BatchNormAct2d -> FreqBatchNormAct2d (act and drop kept)
    shifted_convs: int  # first convs of blocks behind the temporal shift
    weight_alterations: int  # per-branch Weight Alteration modules (ShiftAlter with weights)
    shared_norms: dict[str, int] = field(default_factory=dict)  # left shared by all branches, by class
    layer_norms: int = 0  # LayerNorms (and ConvNeXt's LayerNorm2d) made FreqLayerNorm(2d)

    def __str__(self) -> str:
        act = f" ({self.with_activation} with timm's activation kept)" if self.with_activation else ""
        ln = f"{self.layer_norms} per-branch LayerNorm, " if self.layer_norms else ""
        text = (f"ffnify {self.model}: {self.per_branch_norms} per-branch BatchNorm2d{act}, {ln}"
                f"{self.shifted_convs} shifted convs, {self.weight_alterations} Weight Alteration "
                f"modules; branches of {', '.join(map(str, self.frames))} frames")
        if self.shared_norms:
            text += (f"; {sum(self.shared_norms.values())} other normalisation layers shared by all "
                     f"branches ({_by_class(self.shared_norms)})")
        return text


class FFNVideo(FrameFlexible):
    """A 2D CNN converted by :func:`ffnify`: ``backbone`` maps packed frames ``[F, 3, H, W]`` to
    per-frame logits ``[F, classes]``; ``forward`` is :class:`~ffn.models.FrameFlexible`'s.
    ``conversion`` (a :class:`Conversion`) says what ffnify converted."""

    def __init__(self, backbone: nn.Module, frames: Sequence[int]) -> None:
        super().__init__(frames)
        self.backbone = backbone
        self.conversion: Optional[Conversion] = None

    def branch_logits(self, x: Tensor, layout: FrameLayout) -> tuple[Tensor, ...]:
        with frame_layout(layout):
            logits = self.backbone(x)
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"the 2D model must map [F, 3, H, W] frames to [F, classes] logits; "
                             f"for {tuple(x.shape)} it returned {got}")
        return tuple(clip_means(logits, layout))  # TSN's consensus: the average over each clip


def ffnify(model: nn.Module, frames: Sequence[int] = (4, 8, 16), weight_alteration: bool = True,
           shift: bool = True, fold_div: int = 8,
           blocks: BlockRule = torchvision_blocks) -> FFNVideo:
    """``model`` (a 2D CNN: ``[B, 3, H, W]`` images -> ``[B, classes]`` logits, ImageNet weights
    loaded beforehand) as a Frame Flexible video model with branches for ``frames``.

    ``model`` is converted in place and becomes the result's ``backbone``. ``shift=False`` gives a
    TSN (no temporal shift); ``weight_alteration=False`` drops WA. ``blocks`` is the rule of the
    module docstring. An argument or model that is refused (``ValueError``: an unknown
    ``BatchNorm2d`` or ``LayerNorm`` subclass with its own forward, normalisation layers but no
    ``BatchNorm2d`` or ``LayerNorm``, no block found) leaves ``model`` unchanged. Other
    normalisation layers next to them stay shared by all branches, with a warning. The result's ``conversion`` says what
    was converted (``print(video.conversion)``).

    Example: ``ffnify(torchvision.models.mobilenet_v2(num_classes=10))`` takes clips
    ``[N, T, 3, H, W]``, a list of one batch per branch in training.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"ffnify: model must be an nn.Module, got {type(model).__name__}")
    shifted = next((n for n, m in model.named_modules() if isinstance(m, ShiftedConv)), None)
    if shifted is not None:
        raise ValueError(f"ffnify: the model was ffnified already ({shifted} is a ShiftedConv)")
    video = FFNVideo(model, frames)  # checks frames
    norms, shared = _plan_norms(model)
    if shared and not norms:
        raise ValueError(
            f"ffnify: {type(model).__name__} normalises with {_by_class(shared)} and has no "
            f"nn.BatchNorm2d or nn.LayerNorm. ffnify makes those per-branch (FFN's private "
            f"normalisation); there is no frequency-indexed {', '.join(sorted(shared))} yet, so "
            f"every branch would share all of its normalisation and it would be no Frame Flexible "
            f"Network. Use a model with BatchNorm2d or LayerNorm (a ResNet, MobileNet, ConvNeXt, "
            f"ViT...)")
    targets = _find_blocks(model, blocks) if shift or weight_alteration else {}
    if (shift or weight_alteration) and not targets:
        raise ValueError(
            f"ffnify found no residual block in {type(model).__name__} for the shift and Weight "
            f"Alteration: the default rule knows torchvision's ResNets and MobileNetV2; for another "
            f"model pass blocks=(name, module) -> path of the block's first conv, or None, or "
            f"shift=False, weight_alteration=False (per-branch BatchNorm alone, a TSN)")
    alters = {}
    for path, conv in targets.items():
        channels = next(m for m in conv.modules() if isinstance(m, nn.Conv2d)).in_channels
        like = next(conv.parameters())
        alters[path] = ShiftAlter(channels, video.num_branches, fold_div, alter=weight_alteration,
                                  shift=shift, device=like.device, dtype=like.dtype)
    for path, alter in alters.items():  # all checked: now change the model
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent), leaf, ShiftedConv(alter, targets[path]))
    # by parent module, not by path: a block's first conv (and what it holds) moved into a ShiftedConv
    for parent, name, cls in norms:
        old = getattr(parent, name)
        setattr(parent, name, cls.from_layer_norm(old, video.num_branches)
                if issubclass(cls, FreqLayerNorm) else cls.from_batch_norm(old, video.num_branches))
    layer_norms = sum(issubclass(cls, FreqLayerNorm) for _, _, cls in norms)
    video.conversion = Conversion(
        model=type(model).__name__, frames=video.frames,
        per_branch_norms=len(norms) - layer_norms,
        with_activation=sum(cls is FreqBatchNormAct2d for _, _, cls in norms),
        shifted_convs=len(alters) if shift else 0,
        weight_alterations=len(alters) if weight_alteration else 0, shared_norms=dict(shared),
        layer_norms=layer_norms)
    if shared:
        warnings.warn(
            f"ffnify: {sum(shared.values())} normalisation layers of {type(model).__name__} are "
            f"neither BatchNorm2d nor LayerNorm and stay shared by all branches "
            f"({_by_class(shared)}): there is no frequency-indexed one of them yet",
            stacklevel=2)
    return video


def _find_blocks(model: nn.Module, rule: BlockRule) -> dict[str, nn.Module]:
    """``{path in model: first conv}`` of every block ``rule`` names."""
    found = {}

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            block = f"{prefix}{name}"
            path = rule(block, child)
            if path is None:
                visit(block + ".", child)
                continue
            if not isinstance(path, str):
                raise TypeError(f"ffnify: blocks must return a str (the first conv's path inside the "
                                f"block, '' for the block itself) or None; got {path!r} for {block}")
            target = f"{block}.{path}" if path else block
            try:
                conv = model.get_submodule(target)
            except AttributeError:
                raise ValueError(f"ffnify: blocks named {path!r} as the first conv of {block} "
                                 f"({type(child).__name__}), which has no such submodule") from None
            if not any(isinstance(m, nn.Conv2d) for m in conv.modules()):
                raise ValueError(f"ffnify: blocks named {target} ({type(conv).__name__}) as a "
                                 f"first conv, but it is no nn.Conv2d and holds none")
            found[target] = conv

    visit("", model)
    return found


# Normalisation layers of torch other than BatchNorm2d: _NormBase holds BatchNorm1d/3d,
# SyncBatchNorm and the InstanceNorms
_TORCH_NORMS = tuple(c for c in (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                                 getattr(nn, "RMSNorm", None)) if c is not None)


def _is_other_norm(m: nn.Module) -> bool:
    """Whether ``m`` is a normalisation layer that ffnify does not make per-branch and that has
    something to share (parameters or statistics of its own; an affine-free LayerNorm or
    InstanceNorm computes the same for any branch). Layers of other libraries count by their class
    name (timm's LayerNorm2d subclasses LayerNorm, but its RmsNorm2d and EvoNorm2d, or torchvision's
    FrozenBatchNorm2d, subclass no torch norm): a ``...Norm...`` class, not ``Normalize``, that
    holds no conv or linear layer (which a head or block named so, as timm's NormMlpClassifierHead,
    does; its own norm counts)."""
    if not (isinstance(m, _TORCH_NORMS) or (
            re.search(r"Norm(?!alize)", type(m).__name__)
            and not any(isinstance(c, (nn.modules.conv._ConvNd, nn.Linear)) for c in m.modules()))):
        return False
    return (next(m.parameters(recurse=False), None) is not None
            or any(b is not None for b in m.buffers(recurse=False)))


def _plan_norms(model: nn.Module) -> tuple[list[tuple[nn.Module, str, type]], Counter]:
    """``[(parent, name, per-branch class)]`` for every ``nn.BatchNorm2d`` and every ``nn.LayerNorm``
    with parameters under ``model``, and the classes of the other normalisation layers
    (:func:`_is_other_norm`) with their counts. An unknown subclass of either whose forward is its
    own raises ``ValueError``."""
    norms, shared = [], Counter()

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, nn.BatchNorm2d):
                norms.append((module, name, _freq_class(path, child)))
            elif isinstance(child, nn.LayerNorm) and child.elementwise_affine:
                norms.append((module, name, _freq_layer_norm_class(path, child)))
            elif _is_other_norm(child):
                shared[type(child).__name__] += 1
            else:
                visit(path + ".", child)

    visit("", model)
    return norms, shared


def _freq_class(path: str, bn: nn.BatchNorm2d) -> type:
    """The per-branch class for ``bn``: a BatchNorm2d (or a subclass keeping its forward) becomes a
    FreqBatchNorm2d, timm's BatchNormAct2d a FreqBatchNormAct2d; a subclass whose forward does
    something else would lose it: refused."""
    cls = type(bn)
    if cls.forward is nn.BatchNorm2d.forward:
        return FreqBatchNorm2d
    # timm is optional: a model of its classes has imported their module
    norm_act = sys.modules.get("timm.layers.norm_act")
    if norm_act is not None and isinstance(bn, norm_act.BatchNormAct2d) \
            and cls.forward is norm_act.BatchNormAct2d.forward:
        return FreqBatchNormAct2d
    raise ValueError(
        f"ffnify: module {path!r} ({cls.__module__}.{cls.__qualname__}) is a BatchNorm2d "
        f"subclass with a forward of its own, which ffnify does not know: a FreqBatchNorm2d in its "
        f"place would drop whatever that forward does beyond BatchNorm. ffnify converts "
        f"nn.BatchNorm2d, subclasses that keep its forward, and timm's BatchNormAct2d; replace "
        f"{path!r} by an nn.BatchNorm2d followed by what its forward adds before calling ffnify")


# LayerNorm subclasses whose forward is known: (module, class, per-branch class); torchvision and
# timm are optional, and a model of their classes has imported their modules
_KNOWN_LAYER_NORMS = (("torchvision.models.convnext", "LayerNorm2d", FreqLayerNorm2d),
                      ("timm.layers.norm", "LayerNorm2d", FreqLayerNorm2d),
                      ("timm.layers.norm", "LayerNorm", FreqLayerNorm))


def _freq_layer_norm_class(path: str, ln: nn.LayerNorm) -> type:
    """The per-branch class for ``ln``: an nn.LayerNorm (or a subclass keeping its forward) becomes
    a FreqLayerNorm, ConvNeXt's LayerNorm2d (channels of NCHW maps) a FreqLayerNorm2d; any other
    subclass with a forward of its own is refused."""
    cls = type(ln)
    if cls.forward is nn.LayerNorm.forward:
        return FreqLayerNorm
    for module, name, freq in _KNOWN_LAYER_NORMS:
        known = getattr(sys.modules.get(module), name, None)
        if known is not None and isinstance(ln, known) and cls.forward is known.forward:
            return freq
    raise ValueError(
        f"ffnify: module {path!r} ({cls.__module__}.{cls.__qualname__}) is a LayerNorm subclass "
        f"with a forward of its own, which ffnify does not know: a FreqLayerNorm in its place would "
        f"drop whatever that forward does beyond LayerNorm. ffnify converts nn.LayerNorm, "
        f"subclasses that keep its forward, timm's LayerNorm and ConvNeXt's LayerNorm2d")


def _by_class(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} x{n}" for name, n in sorted(counts.items()))
