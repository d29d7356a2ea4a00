"""The benchmark's accounting (bench/): what its profile and GPU projection put in each category.
They are measuring tools, so these tests check the counts on a tiny model, not any timing."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ffn_kernels import backend
from conftest import load_script

pytestmark = pytest.mark.skipif(not backend.extension_loaded(), reason="needs ffn_kernels._C")

ARGS = SimpleNamespace(arch="resnet", depth=18, classes=5, width=8, size=32, clips=1, quick=False,
                       dtype="float32")


def _steps():
    model_section = load_script("bench/model_section.py")
    size, clips, target, _ = model_section.inputs(ARGS, torch.device("cpu"))
    models = model_section._models(ARGS, torch.device("cpu"))
    return model_section, {side: models[f"{side} nchw"] for side in ("fused", "eager")}, clips, target


def test_projection_counts_the_same_convolutions_on_both_sides():
    """Both sides run the same convolutions; the eager twin's WA depthwise conv is bytes, not conv
    FLOPs (PyTorch's backward formula ignores groups: FlopCounterMode counts the eager step's conv
    FLOPs far above the fused step's)."""
    projection = load_script("bench/projection_section.py")
    model_section, models, clips, target = _steps()
    metered = defaultdict(lambda: 8.0)  # bytes per element of every fused pass
    counts = {side: projection.count_step(ARGS, torch.device("cpu"), m, clips, target, metered)
              for side, m in models.items()}
    with FlopCounterMode(display=False) as reference:  # the fused side has no grouped conv
        model_section.training_step(ARGS, torch.device("cpu"), models["fused"], clips, target)()
    assert counts["fused"]["GFLOP"] == pytest.approx(reference.get_total_flops() / 1e9, rel=1e-9)
    assert counts["eager"]["GFLOP"] == pytest.approx(counts["fused"]["GFLOP"], rel=1e-9)
    assert counts["fused"]["fused_MB"] > 0 and counts["eager"]["fused_MB"] == 0
    # the eager twin moves more bytes, in more ops, than the fused kernels' 8 B per element
    assert counts["eager"]["MB"] > counts["fused"]["MB"]
    assert counts["eager"]["ops"] > 2 * counts["fused"]["ops"]


def test_profile_puts_wa_depthwise_conv_with_the_ffn_ops():
    """The profile splits each side into the same convolutions and the FFN ops (fused kernels,
    or the eager ops they replace: BN, ReLU, add, shift copies, WA's depthwise conv)."""
    profile_table = load_script("bench/profile_table.py")
    model_section, models, clips, target = _steps()
    seen = {}
    for side, model in models.items():
        step = model_section.training_step(ARGS, torch.device("cpu"), model, clips, target)
        step()
        with torch.profiler.profile(record_shapes=True) as prof:
            step()
        for e in prof.events():
            seen.setdefault(side, defaultdict(set))[profile_table.category(e)].add(e.name)
    assert any(n.startswith("ffn_kernels") for n in seen["fused"]["FFN ops"])
    assert "aten::native_batch_norm" in seen["eager"]["FFN ops"]
    # aten::convolution (and its backward) on both sides of the split: WA's [C, 1, 1, 1] weight
    # with the FFN ops, the network's convolutions with the convolutions
    for name in ("aten::convolution", "aten::convolution_backward"):
        assert name in seen["eager"]["FFN ops"] and name in seen["eager"]["convolutions"]
        assert name not in seen["fused"]["FFN ops"]
    assert not any(n.startswith("ffn_kernels") or "batch_norm" in n
                   for side in seen for n in seen[side]["convolutions"])
