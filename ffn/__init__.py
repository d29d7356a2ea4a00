"""Frame Flexible Network (FFN) TSM-ResNets on the packed multi-branch layout of ``ffn_kernels``.

* :mod:`ffn.models` — :class:`FFNResNet`, the packed model (one conv call for all branches);
* :mod:`ffn.eager` — :class:`EagerFFNResNet`, its branch-by-branch twin with the same ``state_dict``;
* :mod:`ffn.losses` — the temporal distillation loss;
* :mod:`ffn.convert` — loaders for official FFN and torchvision ImageNet checkpoints;
* :mod:`ffn.export` — one branch folded into plain convolutions for deployment.
"""

from .eager import EagerFFNResNet
from .models import FFNResNet, nearest_branch, pack_clips

__all__ = ["FFNResNet", "EagerFFNResNet", "nearest_branch", "pack_clips"]
