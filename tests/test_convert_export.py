"""Checkpoint converters (official FFN, torchvision ImageNet) and single-branch export. The
checkpoints are built here with the exact key layouts, random weights; nothing is downloaded."""

import pytest
import torch

from ffn import FFNResNet
from ffn.convert import load_official, load_torchvision
from ffn.export import export_branch
from ffn_kernels import FreqBatchNorm2d, ShiftAlter

SUFFIXES = ("4", "8", "16")


def randomized(depth=18, classes=5, seed=0):
    torch.manual_seed(seed)
    model = FFNResNet(depth, num_classes=classes, dropout=0.0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else torch.randn_like(t) * 0.1)
    return model


def own_tensors(model):
    """(module path, module, leaf name, tensor) for every parameter and buffer."""
    for path, module in model.named_modules():
        for leaf, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            yield path, module, leaf, t


def official_checkpoint(model):
    """The official FFN layout: ``module.base_model.*``, ``bn1_4/8/16``, ``adaconv_*`` [C,1,1,1],
    ``downsample_conv``/``downsample_bn_*``, ``module.new_fc.*``."""
    sd = {}
    for path, module, leaf, t in own_tensors(model):
        name = path.replace("downsample.conv", "downsample_conv").replace(
            "downsample.bn", "downsample_bn").replace("alter", "adaconv")
        if path == "fc":
            sd[f"module.new_fc.{leaf}"] = t.clone()
        elif isinstance(module, (FreqBatchNorm2d, ShiftAlter)):
            for row, s in enumerate(SUFFIXES):
                v = t[row].clone()
                sd[f"module.base_model.{name}_{s}.{leaf}"] = v.view(-1, 1, 1, 1) if isinstance(module, ShiftAlter) else v
        else:
            sd[f"module.base_model.{name}.{leaf}"] = t.clone()
    return {"state_dict": sd, "epoch": 3}


def test_official_checkpoint_loads_every_tensor(tmp_path):
    source = randomized()
    path = tmp_path / "ffn_official.pth.tar"
    torch.save(official_checkpoint(source), path)
    target = load_official(FFNResNet(18, num_classes=5, dropout=0.0), path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_official_checkpoint_shape_mismatch_names_the_key():
    ckpt = official_checkpoint(randomized())
    ckpt["state_dict"]["module.new_fc.weight"] = torch.zeros(7, 512)
    with pytest.raises(ValueError, match="'new_fc.weight' has shape \\[7, 512\\]"):
        load_official(FFNResNet(18, num_classes=5), ckpt)
    del ckpt["state_dict"]["module.base_model.layer1.0.bn1_8.weight"]
    with pytest.raises(ValueError, match="layer1.0.bn1_8.weight"):
        load_official(FFNResNet(18, num_classes=5), ckpt)


def test_torchvision_checkpoint_initialises_every_branch_from_one_bn(tmp_path):
    source = randomized(depth=50)
    sd = {}
    for path, module, leaf, t in own_tensors(source):
        name = path.replace("downsample.conv", "downsample.0").replace("downsample.bn", "downsample.1")
        if isinstance(module, ShiftAlter):
            continue
        sd[f"{name}.{leaf}"] = t[0].clone() if isinstance(module, FreqBatchNorm2d) else t.clone()
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)  # ImageNet head
    torch.save(sd, tmp_path / "resnet50.pth")
    fresh = FFNResNet(50, num_classes=5)
    head = fresh.fc.weight.clone()
    model = load_torchvision(fresh, tmp_path / "resnet50.pth")
    assert torch.equal(model.layer2[0].downsample.conv.weight, source.layer2[0].downsample.conv.weight)
    for bn in (model.bn1, model.layer3[5].bn3, model.layer4[0].downsample.bn):
        for name in ("weight", "bias", "running_mean", "running_var"):
            rows = getattr(bn, name)
            assert torch.equal(rows[0], rows[1]) and torch.equal(rows[0], rows[2])
    assert torch.equal(model.fc.weight, head)  # a new head, not ImageNet's


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("frames,row", [(4, 0), (16, 2), (6, 1)])
def test_exported_branch_matches_model_in_eval(depth, frames, row):
    model = randomized(depth).eval()
    folded = export_branch(model, row)
    assert not any(isinstance(m, (FreqBatchNorm2d, ShiftAlter)) for m in folded.modules())
    clips = torch.randn(2, frames, 3, 32, 32)
    assert model.branch_for(frames) == row
    with torch.no_grad():
        torch.testing.assert_close(folded(clips), model(clips), rtol=1e-4, atol=1e-4)
