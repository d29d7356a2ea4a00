"""Frame Flexible Network (FFN) TSM-ResNets on the packed multi-branch layout of ``ffn_kernels``.

* :mod:`ffn.models` — :class:`FFNResNet`, the packed model (one conv call for all branches);
* :mod:`ffn.tea` — :class:`FFNTEA` (TEA-FFN: Res2Net-50 with ME and MTA) and its eager twin;
* :mod:`ffn.slowfast` — :class:`FFNSlowFast` (SlowFast-R50 FFN, 3D convs) and its eager twin;
* :mod:`ffn.uniformer` — :class:`FFNUniFormer` (UniFormer-S FFN, video) and its eager twin;
* :mod:`ffn.ffnify` — :func:`ffnify`: a torchvision ResNet, MobileNetV2 or other 2D CNN as an FFN;
* :mod:`ffn.eager` — :class:`EagerFFNResNet`, its branch-by-branch twin with the same ``state_dict``;
* :mod:`ffn.losses` — the temporal distillation loss;
* :mod:`ffn.convert` — loaders for official FFN, PySlowFast and ImageNet checkpoints;
* :mod:`ffn.export` — one branch folded into plain convolutions for deployment.

The public names below are imported on first use (PEP 562), so ``import ffn`` and the ``ffn``
command's ``--help`` and argument errors do not import torch.
"""

import importlib
import importlib.util
import sys
import types

# public name -> the submodule defining it
_EXPORTS = {
    "FFNResNet": ".models", "EagerFFNResNet": ".eager", "FFNVideo": ".ffnify", "FrameFlexible": ".models",
    "ffnify": ".ffnify", "nearest_branch": ".models", "pack_clips": ".models",
    "FFNTEA": ".tea", "EagerFFNTEA": ".tea", "FFNSlowFast": ".slowfast", "EagerFFNSlowFast": ".slowfast",
    "FFNUniFormer": ".uniformer", "EagerFFNUniFormer": ".uniformer",
}

__all__ = ["FFNResNet", "EagerFFNResNet", "FFNVideo", "FrameFlexible", "ffnify", "nearest_branch",
           "pack_clips", "FFNTEA", "EagerFFNTEA", "FFNSlowFast", "EagerFFNSlowFast", "FFNUniFormer",
           "EagerFFNUniFormer"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # later look-ups do not come here
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)  # ffn.models etc., as after an eager import
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The import system binds a submodule, once loaded, as an attribute of its package. ``ffn.ffnify``
    must stay the function (as it was when this file imported it eagerly), not the submodule of the
    same name: such a binding of a public name is dropped, and the name resolves via ``__getattr__``."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
