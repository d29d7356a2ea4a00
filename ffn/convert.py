"""Checkpoint converters into :class:`ffn.FFNResNet`, :class:`ffn.FFNTEA` and
:class:`ffn.FFNSlowFast` (and their eager twins, which share their keys).

* :func:`load_official` — checkpoints of the official FFN code (BeSpontaneous/FFN-pytorch,
  ``2D_Network``): ``module.base_model.layer1.0.bn1_4.weight``, ``...adaconv_8.weight``
  (``[C, 1, 1, 1]`` depthwise WA conv), ``...downsample_conv.weight``, ``...downsample_bn_16.*``,
  ``module.new_fc.*`` (or ``base_model.fc.*`` when trained without dropout). Branch suffixes
  ``_4, _8, _16`` map to parameter rows 0, 1, 2.
  For :class:`ffn.tea.FFNTEA` it reads TEA-FFN checkpoints (``resnet_TEA_FFN.py``: ``bn1_4``,
  ``bns_8.0``, ``me.bn3_16``, ``shifts.0.conv.weight``, ...) and plain TEA ones (``resnet_TEA.py``,
  every branch row from its one BN).
  For :class:`ffn.slowfast.FFNSlowFast` it reads the SlowFast-FFN checkpoints of ``3D_Network``
  (PySlowFast's ``{"model_state": ...}``: ``s1.pathway0_stem.bn_4.*``, ``s1_fuse.bn_8.*``,
  ``s2.pathway0_res0.branch2.a_bn_16.*``, ``...branch2.adaconv_4.weight`` ``[C, 1, 1, 1, 1]``,
  ``...branch1_bn_4.*``, ``head.projection.*``).
* :func:`load_pyslowfast` — a plain PySlowFast SlowFast-R50 (one BN per layer), for
  :class:`ffn.slowfast.FFNSlowFast`: every branch row from its BN; WA and the head stay fresh.
  For :class:`ffn.uniformer.FFNUniFormer` it reads UniFormer-FFN checkpoints (``uniformer_FFN.py``,
  PySlowFast's ``{"model_state": ...}``: ``patch_embed1.norm_4``, ``blocks1.0.norm1_8``,
  ``blocks3.0.adaconv_16.weight`` ``[C, 1, 1, 1, 1]``, ``norm_4``, ``head``) and plain UniFormer
  ones (:func:`load_uniformer`).
* :func:`load_uniformer` — UniFormer-S in the UniFormer repository's naming (one norm per layer),
  Kinetics video weights or ImageNet 2D ones (2D convs inflated over time as UniFormer does): every
  branch row starts from the one norm; WA keeps its initialisation, the head too unless it has the
  model's class count.
* :func:`load_res2net` — ImageNet Res2Net-50 26w x 4s in timm's ``res2net50_26w_4s`` naming, for
  :class:`ffn.tea.FFNTEA` (ME and the temporal convs keep their initialisation).
* :func:`load_torchvision` — torchvision ImageNet ResNets: every branch's BN starts from the same
  ImageNet BN; WA and the classifier keep the model's fresh initialisation (a new head).

They read files through :func:`ffn.engine.checkpoint.load` (``weights_only=True``; a damaged or
foreign file raises its ``CheckpointError``) and check every tensor: a value that is no tensor or
not finite, a missing key, an unused key or a shape mismatch raises ``ValueError`` naming the key,
before the model is touched.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ffn_kernels import FreqBatchNorm2d, FreqLayerNorm, ShiftAlter

from .engine.checkpoint import check_tensors, load
from .models import FFNResNet
from .slowfast import FFNSlowFast
from .tea import FFNTEA, TemporalConv
from .uniformer import FFNUniFormer

Checkpoint = Union[str, os.PathLike, Mapping[str, Tensor]]
# checkpoint module path(s) for one of our modules: None keeps the model's own tensors, a string
# names a shared module, a list names one module per branch row
Source = Union[None, str, list[str]]


def read_state_dict(checkpoint: Checkpoint) -> dict[str, Tensor]:
    """A state dict from a path (:func:`ffn.engine.checkpoint.load`) or a mapping; unwraps
    ``{"state_dict": ...}`` (the official 2D training script's format) or ``{"model_state": ...}``
    (PySlowFast's, the official 3D one's) and a ``module.`` (DataParallel) prefix. Every value must
    be a dense tensor of finite values."""
    where = checkpoint if not isinstance(checkpoint, Mapping) else "state dict"
    if not isinstance(checkpoint, Mapping):
        checkpoint = load(checkpoint)
    for wrapper in ("state_dict", "model_state", "model"):  # official TSM/TEA, PySlowFast, UniFormer
        if isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]
            break
    check_tensors(checkpoint, where, "the state dict")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def load_official(model: FFNResNet | FFNTEA | FFNSlowFast, checkpoint: Checkpoint,
                  suffixes: Sequence[str] = ("4", "8", "16")) -> FFNResNet | FFNTEA | FFNSlowFast:
    """Load an official FFN checkpoint; branch row ``p`` reads the modules ending in
    ``_{suffixes[p]}``. For :class:`~ffn.tea.FFNTEA`: a TEA-FFN checkpoint
    (``resnet_TEA_FFN.py``), or a plain TEA one (``resnet_TEA.py``, one BN per layer: every branch
    row starts from it), told apart by its stem BN key (``bn1_4.weight`` or ``bn1.weight``).
    For :class:`~ffn.slowfast.FFNSlowFast`: a SlowFast-FFN checkpoint (``suffixes`` name the
    branches in order of frames, as the official ``bn_4/8/16`` do for fast 16/32/64). For
    :class:`~ffn.uniformer.FFNUniFormer`: a UniFormer-FFN checkpoint, or a plain UniFormer one
    (:func:`load_uniformer`), told apart by ``patch_embed1.norm.weight``."""
    if isinstance(model, FFNTEA):
        return _load_official_tea(model, checkpoint, suffixes)
    if isinstance(model, FFNSlowFast):
        return _load_official_slowfast(model, checkpoint, suffixes)
    if isinstance(model, FFNUniFormer):
        return _load_official_uniformer(model, checkpoint, suffixes)
    _check_suffixes(model, suffixes)
    sd, origin = _official_keys(checkpoint)  # origin: ours -> the checkpoint's, for messages

    def source(path: str, module: nn.Module) -> Source:
        # our names differ from the official ones only in these parts
        name = path.replace("downsample.conv", "downsample_conv").replace(
            "downsample.bn", "downsample_bn").replace("alter", "adaconv")
        if isinstance(module, (FreqBatchNorm2d, ShiftAlter)):
            return [f"{name}_{s}" for s in suffixes]
        return name

    return _load(model, sd, source, "official FFN", origin)


def _check_suffixes(model: nn.Module, suffixes: Sequence[str]) -> None:
    """One official branch suffix per branch row of ``model``."""
    if len(suffixes) != model.num_branches:
        raise ValueError(f"the model has {model.num_branches} branches but suffixes={tuple(suffixes)}")


def load_torchvision(model: FFNResNet, checkpoint: Checkpoint) -> FFNResNet:
    """Initialise from a torchvision ImageNet ResNet state dict of the same depth."""
    sd = {k: v for k, v in read_state_dict(checkpoint).items() if not k.startswith("fc.")}

    def source(path: str, module: nn.Module) -> Source:
        if isinstance(module, ShiftAlter) or path == "fc":
            return None
        name = path.replace("downsample.conv", "downsample.0").replace("downsample.bn", "downsample.1")
        return [name] * model.num_branches if isinstance(module, FreqBatchNorm2d) else name

    return _load(model, sd, source, "torchvision")


def _official_keys(checkpoint: Checkpoint) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The official state dict with ``base_model.`` dropped and ``new_fc`` as ``fc``, and each of
    our spellings' original key."""
    sd, origin = {}, {}
    for key, v in read_state_dict(checkpoint).items():
        k = key.removeprefix("base_model.")
        k = "fc." + k.removeprefix("new_fc.") if k.startswith("new_fc.") else k
        sd[k], origin[k] = v, key
    return sd, origin


def _load_official_tea(model: FFNTEA, checkpoint: Checkpoint, suffixes: Sequence[str]) -> FFNTEA:
    _check_suffixes(model, suffixes)
    sd, origin = _official_keys(checkpoint)
    if "bn1.weight" in sd:  # plain TEA (one branch): every row starts from its BN
        return _load(model, sd, _res2net_source(model, temporal=True, fc=True), "official TEA",
                     origin)

    def source(path: str, module: nn.Module) -> Source:
        # TEA-FFN's names: downsample_conv, downsample_bn_4, bns_4.0, bn1_4, me.bn3_4
        name = path.replace("downsample.conv", "downsample_conv")
        if isinstance(module, FreqBatchNorm2d):
            if re.search(r"(^|\.)bns\.\d+$", name):
                head, _, i = name.rpartition(".")
                return [f"{head}_{s}.{i}" for s in suffixes]
            name = name.replace("downsample.bn", "downsample_bn")
            return [f"{name}_{s}" for s in suffixes]
        return name

    return _load(model, sd, source, "official TEA-FFN", origin)


def _load_official_slowfast(model: FFNSlowFast, checkpoint: Checkpoint,
                            suffixes: Sequence[str]) -> FFNSlowFast:
    _check_suffixes(model, suffixes)
    sd = read_state_dict(checkpoint)
    if "s1.pathway0_stem.bn.weight" in sd:
        raise ValueError("this is a plain PySlowFast SlowFast checkpoint (one BN per layer, "
                         "'s1.pathway0_stem.bn.weight'), not a SlowFast-FFN one: load it with "
                         "model.pretrained_format=pyslowfast (ffn.convert.load_pyslowfast)")

    def source(path: str, module: nn.Module) -> Source:
        # our module names are the official ones; per-branch modules add the branch suffix
        if isinstance(module, (FreqBatchNorm2d, ShiftAlter)):  # FreqBatchNorm3d rows, WA
            return [f"{path}_{s}" for s in suffixes]
        return path

    return _load(model, sd, source, "official SlowFast-FFN", wa_dims=3)


def load_pyslowfast(model: FFNSlowFast, checkpoint: Checkpoint) -> FFNSlowFast:
    """Initialise :class:`~ffn.slowfast.FFNSlowFast` from a plain PySlowFast SlowFast-R50
    checkpoint of the same width (``{"model_state": ...}``, one BN per layer): every branch's BN
    starts from it; WA and the classifier keep the model's fresh initialisation (a new head, as the
    official FFN fine-tuning starts from a Kinetics model)."""
    sd = {k: v for k, v in read_state_dict(checkpoint).items() if not k.startswith("head.")}

    def source(path: str, module: nn.Module) -> Source:
        if isinstance(module, ShiftAlter) or path.startswith("head"):
            return None
        return [path] * model.num_branches if isinstance(module, FreqBatchNorm2d) else path

    return _load(model, sd, source, "PySlowFast SlowFast")


def _load_official_uniformer(model: FFNUniFormer, checkpoint: Checkpoint,
                             suffixes: Sequence[str]) -> FFNUniFormer:
    _check_suffixes(model, suffixes)
    sd = read_state_dict(checkpoint)
    if "patch_embed1.norm.weight" in sd:
        return load_uniformer(model, sd)

    def source(path: str, module: nn.Module) -> Source:
        # every per-branch module (norms, WA) is the official name + _4/_8/_16; WA is "adaconv"
        if isinstance(module, (FreqBatchNorm2d, FreqLayerNorm, ShiftAlter)):
            name = path.replace("alter", "adaconv")
            return [f"{name}_{s}" for s in suffixes]
        return path or None

    return _load(model, sd, source, "official UniFormer-FFN", wa_dims=3)


def load_uniformer(model: FFNUniFormer, checkpoint: Checkpoint) -> FFNUniFormer:
    """Initialise :class:`~ffn.uniformer.FFNUniFormer` from UniFormer-S weights in the UniFormer
    repository's naming (``{"model": ...}``; ``patch_embed1.norm``, ``blocks1.0.norm1``, ``norm``,
    ``head``): Kinetics video weights, or ImageNet 2D ones whose ``[O, I, k, k]`` convs are inflated
    to the model's ``[O, I, t, k, k]`` as UniFormer does (repeated over t and divided by t, so on a
    clip of identical frames a conv gives the image's output, away from the clip's ends). Every
    branch row starts from the one
    norm; WA keeps its initialisation; the head is read only if it has the model's class count (the
    official code drops it otherwise, e.g. Kinetics-400 weights for Something-Something)."""
    sd = read_state_dict(checkpoint)
    ours = model.state_dict()
    if sd.get("head.weight") is not None and sd["head.weight"].shape != ours["head.weight"].shape:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    for k, v in sd.items():
        if v.dim() == 4 and k in ours and ours[k].dim() == 5:
            t = ours[k].shape[2]
            sd[k] = v.unsqueeze(2).repeat(1, 1, t, 1, 1) / t

    def source(path: str, module: nn.Module) -> Source:
        if isinstance(module, ShiftAlter) or (path == "head" and "head.weight" not in sd):
            return None
        if isinstance(module, (FreqBatchNorm2d, FreqLayerNorm)):
            return [path] * model.num_branches
        return path or None

    return _load(model, sd, source, "UniFormer")


def _res2net_source(model: FFNTEA, temporal: bool, fc: bool) -> Callable[[str, nn.Module], Source]:
    """Res2Net naming (the official plain TEA, timm's ``res2net50_26w_4s``): ``downsample.0/1``,
    one BN per layer for every branch row. ``temporal``: ME and the temporal convs are in the
    checkpoint (else they keep the model's fresh initialisation, as a new head without ``fc``)."""

    def source(path: str, module: nn.Module) -> Source:
        if path == "fc" and not fc:
            return None
        if not temporal and (".me" in f".{path}" or isinstance(module, TemporalConv)
                             or ".shifts." in f".{path}."):
            return None
        name = path.replace("downsample.conv", "downsample.0").replace("downsample.bn", "downsample.1")
        return [name] * model.num_branches if isinstance(module, FreqBatchNorm2d) else name

    return source


def load_res2net(model: FFNTEA, checkpoint: Checkpoint) -> FFNTEA:
    """Initialise :class:`~ffn.tea.FFNTEA` from ImageNet Res2Net-50 26w x 4s weights in timm's
    ``res2net50_26w_4s`` naming (the original Res2Net code's too): every branch's BN starts from
    the same ImageNet BN; ME, the temporal convs and the classifier keep the model's fresh
    initialisation (the temporal convs start as TEA's shift/identity)."""
    sd = {k: v for k, v in read_state_dict(checkpoint).items() if not k.startswith("fc.")}
    return _load(model, sd, _res2net_source(model, temporal=False, fc=False), "Res2Net ImageNet")


def _load(model: nn.Module, sd: Mapping[str, Tensor], source: Callable[[str, nn.Module], Source],
          kind: str, origin: Optional[Mapping[str, str]] = None, wa_dims: int = 2) -> nn.Module:
    """``wa_dims``: the spatial dims of the official WA conv (2: ``[C, 1, 1, 1]``, 3: 3D)."""
    state = model.state_dict()
    used: set[str] = set()
    origin = origin or {}

    def take(key: str, shape: torch.Size, ours: str) -> Tensor:
        if key not in sd:
            raise ValueError(f"{kind} checkpoint has no {key!r} (needed for {ours!r})")
        if sd[key].shape != shape:
            raise ValueError(
                f"{kind} checkpoint: {origin.get(key, key)!r} has shape {list(sd[key].shape)} but {ours!r} needs "
                f"{list(shape)} (another depth, width or class count?)"
            )
        used.add(key)
        return sd[key]

    for path, module in model.named_modules():
        src = source(path, module)
        if src is None:
            continue
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for leaf, ours in tensors:
            name = f"{path}.{leaf}" if path else leaf
            keys = [f"{s}.{leaf}" for s in ([src] if isinstance(src, str) else src)]
            if leaf == "num_batches_tracked" and not any(k in sd for k in keys):
                continue  # ImageNet checkpoints from before torch 0.4.1 have no BN counters
            if isinstance(src, str):
                state[name] = take(keys[0], ours.shape, name)
                continue
            # one row per branch; the official WA conv weight is [C, 1, 1, 1] per branch
            row = (torch.Size((ours.shape[1], 1, *[1] * wa_dims)) if isinstance(module, ShiftAlter)
                   else ours.shape[1:])
            state[name] = torch.stack([take(k, row, name).reshape(ours.shape[1:]) for k in keys])
    unused = sorted(origin.get(k, k) for k in set(sd) - used)
    if unused:
        raise ValueError(f"{kind} checkpoint has {len(unused)} keys the model does not use, e.g. "
                         f"{unused[:5]}")
    model.load_state_dict(state)
    return model

