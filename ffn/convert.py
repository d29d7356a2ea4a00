"""Checkpoint converters into :class:`ffn.FFNResNet` (and its eager twin, which shares its keys).

* :func:`load_official` — checkpoints of the official FFN code (BeSpontaneous/FFN-pytorch,
  ``2D_Network``): ``module.base_model.layer1.0.bn1_4.weight``, ``...adaconv_8.weight``
  (``[C, 1, 1, 1]`` depthwise WA conv), ``...downsample_conv.weight``, ``...downsample_bn_16.*``,
  ``module.new_fc.*`` (or ``base_model.fc.*`` when trained without dropout). Branch suffixes
  ``_4, _8, _16`` map to parameter rows 0, 1, 2.
* :func:`load_torchvision` — torchvision ImageNet ResNets: every branch's BN starts from the same
  ImageNet BN; WA and the classifier keep the model's fresh initialisation (a new head).

Both read files with ``torch.load(weights_only=True)`` and check every tensor: a missing key, an
unused key or a shape mismatch raises ``ValueError`` naming the key, before the model is touched.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ffn_kernels import FreqBatchNorm2d, ShiftAlter

from .models import FFNResNet

Checkpoint = Union[str, os.PathLike, Mapping[str, Tensor]]
# checkpoint module path(s) for one of our modules: None keeps the model's own tensors, a string
# names a shared module, a list names one module per branch row
Source = Union[None, str, list[str]]


def read_state_dict(checkpoint: Checkpoint) -> dict[str, Tensor]:
    """A state dict from a path (``weights_only=True``) or a mapping; unwraps ``{"state_dict": ...}``
    (the official training script's format) and a ``module.`` (DataParallel) prefix."""
    if not isinstance(checkpoint, Mapping):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def load_official(model: FFNResNet, checkpoint: Checkpoint,
                  suffixes: Sequence[str] = ("4", "8", "16")) -> FFNResNet:
    """Load an official FFN checkpoint; branch row ``p`` reads the modules ending in
    ``_{suffixes[p]}``."""
    if len(suffixes) != model.num_branches:
        raise ValueError(f"the model has {model.num_branches} branches but suffixes={tuple(suffixes)}")
    sd, origin = {}, {}  # origin: our spelling of a key -> the checkpoint's, for error messages
    for key, v in read_state_dict(checkpoint).items():
        k = key.removeprefix("base_model.")
        k = "fc." + k.removeprefix("new_fc.") if k.startswith("new_fc.") else k
        sd[k], origin[k] = v, key

    def source(path: str, module: nn.Module) -> Source:
        # our names differ from the official ones only in these parts
        name = path.replace("downsample.conv", "downsample_conv").replace(
            "downsample.bn", "downsample_bn").replace("alter", "adaconv")
        if isinstance(module, (FreqBatchNorm2d, ShiftAlter)):
            return [f"{name}_{s}" for s in suffixes]
        return name

    return _load(model, sd, source, "official FFN", origin)


def load_torchvision(model: FFNResNet, checkpoint: Checkpoint) -> FFNResNet:
    """Initialise from a torchvision ImageNet ResNet state dict of the same depth."""
    sd = {k: v for k, v in read_state_dict(checkpoint).items() if not k.startswith("fc.")}

    def source(path: str, module: nn.Module) -> Source:
        if isinstance(module, ShiftAlter) or path == "fc":
            return None
        name = path.replace("downsample.conv", "downsample.0").replace("downsample.bn", "downsample.1")
        return [name] * model.num_branches if isinstance(module, FreqBatchNorm2d) else name

    return _load(model, sd, source, "torchvision")


def _load(model: nn.Module, sd: Mapping[str, Tensor], source: Callable[[str, nn.Module], Source],
          kind: str, origin: Optional[Mapping[str, str]] = None) -> nn.Module:
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
            row = _wa_shape(ours) if isinstance(module, ShiftAlter) else ours.shape[1:]
            state[name] = torch.stack([take(k, row, name).reshape(ours.shape[1:]) for k in keys])
    unused = sorted(origin.get(k, k) for k in set(sd) - used)
    if unused:
        raise ValueError(f"{kind} checkpoint has {len(unused)} keys the model does not use, e.g. "
                         f"{unused[:5]}")
    model.load_state_dict(state)
    return model


def _wa_shape(weight: Tensor) -> torch.Size:
    return torch.Size((weight.shape[1], 1, 1, 1))
