"""``ffnify``: any ImageNet 2D CNN as a Frame Flexible TSN/TSM video model (docs/design.md §5.7).

:func:`ffnify` converts the 2D model in place:

* every ``nn.BatchNorm2d`` becomes a :class:`~ffn_kernels.FreqBatchNorm2d` whose branch rows all
  start from that BN (private normalisation per branch, shared convolutions);
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
MobileNetV2, where TSM shifts.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ffn_kernels import FrameLayout, FreqBatchNorm2d, ShiftAlter, frame_layout, resolve_layout

from .models import ConvOfShifted, FrameFlexible, clip_means

BlockRule = Callable[[str, nn.Module], Optional[str]]


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
      TSM's ``m.conv[0]``); blocks without one are not shifted.
    """
    # torchvision is optional: a model of its classes has imported their modules
    resnet = sys.modules.get("torchvision.models.resnet")
    if resnet is not None and isinstance(module, (resnet.BasicBlock, resnet.Bottleneck)):
        return "conv1"
    mobilenet = sys.modules.get("torchvision.models.mobilenetv2")
    if mobilenet is not None and isinstance(module, mobilenet.InvertedResidual):
        return first_conv(module) if module.use_res_connect else None
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


class FFNVideo(FrameFlexible):
    """A 2D CNN converted by :func:`ffnify`: ``backbone`` maps packed frames ``[F, 3, H, W]`` to
    per-frame logits ``[F, classes]``; ``forward`` is :class:`~ffn.models.FrameFlexible`'s."""

    def __init__(self, backbone: nn.Module, frames: Sequence[int]) -> None:
        super().__init__(frames)
        self.backbone = backbone

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
    module docstring. An argument that is refused leaves ``model`` unchanged.

    Example: ``ffnify(torchvision.models.mobilenet_v2(num_classes=10))`` takes clips
    ``[N, T, 3, H, W]``, a list of one batch per branch in training.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"ffnify: model must be an nn.Module, got {type(model).__name__}")
    shifted = next((n for n, m in model.named_modules() if isinstance(m, ShiftedConv)), None)
    if shifted is not None:
        raise ValueError(f"ffnify: the model was ffnified already ({shifted} is a ShiftedConv)")
    video = FFNVideo(model, frames)  # checks frames
    targets = _find_blocks(model, blocks) if shift or weight_alteration else {}
    if (shift or weight_alteration) and not targets:
        raise ValueError(
            f"ffnify found no residual block in {type(model).__name__} for the shift and Weight "
            f"Alteration: the default rule knows torchvision's ResNets and MobileNetV2; for another "
            f"model pass blocks=(name, module) -> path of the block's first conv, or None")
    alters = {}
    for path, conv in targets.items():
        channels = next(m for m in conv.modules() if isinstance(m, nn.Conv2d)).in_channels
        like = next(conv.parameters())
        alters[path] = ShiftAlter(channels, video.num_branches, fold_div, alter=weight_alteration,
                                  shift=shift, device=like.device, dtype=like.dtype)
    for path, alter in alters.items():  # all checked: now change the model
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent), leaf, ShiftedConv(alter, targets[path]))
    _freq_batch_norms(model, video.num_branches)
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


def _freq_batch_norms(module: nn.Module, branches: int) -> None:
    """Every ``nn.BatchNorm2d`` under ``module`` -> a ``FreqBatchNorm2d`` with ``branches`` rows."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FreqBatchNorm2d.from_batch_norm(child, branches))
        else:
            _freq_batch_norms(child, branches)
