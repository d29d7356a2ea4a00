"""Frame Flexible Network (FFN) TSM-ResNets on the packed multi-branch layout of ``ffn_kernels``.

* :mod:`ffn.models` — :class:`FFNResNet`, the packed model (one conv call for all branches);
* :mod:`ffn.ffnify` — :func:`ffnify`: a torchvision ResNet, MobileNetV2 or other 2D CNN as an FFN;
* :mod:`ffn.eager` — :class:`EagerFFNResNet`, its branch-by-branch twin with the same ``state_dict``;
* :mod:`ffn.losses` — the temporal distillation loss;
* :mod:`ffn.convert` — loaders for official FFN and torchvision ImageNet checkpoints;
* :mod:`ffn.export` — one branch folded into plain convolutions for deployment.
"""

from .eager import EagerFFNResNet
from .ffnify import FFNVideo, ffnify
from .models import FFNResNet, FrameFlexible, nearest_branch, pack_clips

__all__ = ["FFNResNet", "EagerFFNResNet", "FFNVideo", "FrameFlexible", "ffnify", "nearest_branch",
           "pack_clips"]
