"""``ffn.ffnify``: a 2D CNN as a Frame Flexible video model (docs/design.md §5.7). A torchvision
ResNet-18 made so equals ``FFNResNet(18)`` with the same weights; a MobileNetV2 trains and evaluates
at any frame count; ``ffn train model.arch=torchvision:...`` runs, in this process and from a shell;
any module tree converts by a rule; timm's ResNet, EfficientNet and MobileNetV3 (activation-fused
BN) equal the 2D model frame by frame; what would be silently wrong is refused (unknown BN
subclasses, GroupNorm-only models) or warned about, and ``video.conversion`` says what was
converted. The torchvision and timm tests skip where they are absent."""

import copy
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from ffn import FFNResNet, FFNVideo, ffnify
from ffn.cli import main
from ffn.config import UserError, load_config
from ffn.convert import load_torchvision
from ffn.engine.checkpoint import load as load_checkpoint
from ffn.engine.factory import build_model, load_trained
from ffn.ffnify import ShiftedConv, first_conv, import_torchvision
from ffn.losses import temporal_distillation_loss
from ffn_kernels import (FrameLayout, FreqBatchNorm2d, FreqBatchNormAct2d, FreqLayerNorm, FreqLayerNorm2d,
                         ShiftAlter)

FRAMES = (2, 4, 8)


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def torchvision():
    """torchvision's model zoo, through the library's import (ffn.ffnify.import_torchvision: the
    PyPI wheel's compiled ops do not load next to the CPU torch; the models do)."""
    try:
        return import_torchvision()
    except ImportError:
        pytest.skip("torchvision is not installed (pip install 'ffn-kernels[torchvision]')")


@pytest.fixture(scope="module")
def timm(torchvision):
    """timm (which imports torchvision: after the fixture above)."""
    try:
        import timm
    except ImportError:
        pytest.skip("timm is not installed (pip install -r requirements-test.txt)")
    return timm


def clips(frames, n=2, hw=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, t, 3, hw, hw, generator=g).to(dtype) for t in frames]


def randomize(model: nn.Module, std=0.2) -> None:
    """Per-branch rows that differ (BN parameters and statistics, WA), so branches are told apart."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FreqBatchNorm2d)):
                m.weight.normal_(1, std), m.bias.normal_(0, std)
                m.running_mean.normal_(0, std), m.running_var.uniform_(0.5, 1.5)
            elif isinstance(m, ShiftAlter) and m.weight is not None:
                m.weight.normal_(0, std)


def video_key(key: str) -> str:
    """An FFNResNet state_dict key -> the ffnified torchvision ResNet's."""
    key = re.sub(r"^(layer\d\.\d+)\.conv1\.weight$", r"\1.conv1.conv.weight", key)
    key = re.sub(r"^(layer\d\.\d+)\.alter\.", r"\1.conv1.alter.", key)
    return "backbone." + key.replace("downsample.conv.", "downsample.0.").replace("downsample.bn.", "downsample.1.")


# --- torchvision models ------------------------------------------------------------------------------

def test_ffnified_resnet18_equals_ffnresnet18(torchvision):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=5)
    ref = FFNResNet(18, FRAMES, num_classes=5, dropout=0.0)
    load_torchvision(ref, tv.state_dict())  # convs, and every branch row from the same BN
    ref.fc.load_state_dict(tv.fc.state_dict())
    randomize(ref)
    video = ffnify(tv, FRAMES)
    # the same modules under other names: a strict load checks that none is missing or extra
    video.load_state_dict({video_key(k): v for k, v in ref.state_dict().items()})
    ref, video = ref.double(), video.double()  # float64 convolutions are slow: 24 px still reach 1x1

    ref.eval(), video.eval()
    with torch.no_grad():
        for n in (3, 8):  # a tie (3 -> the 4-frame branch) and a branch's own count
            (x,) = clips((n,), hw=24, dtype=torch.float64, seed=n)
            torch.testing.assert_close(video(x), ref(x), rtol=1e-9, atol=1e-12)

    ref.train(), video.train()
    inputs = clips(FRAMES, hw=24, dtype=torch.float64)
    outs = [video(inputs), ref(inputs)]
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    g = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs[1]]
    for o in outs:
        torch.autograd.backward(o, cotangents)
    grads = {video_key(k): p.grad for k, p in ref.named_parameters()}
    for name, p in video.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-7, atol=1e-10, msg=name)
    buffers = {video_key(k): b for k, b in ref.named_buffers()}
    for name, b in video.named_buffers():  # running statistics, updated per branch row
        torch.testing.assert_close(b, buffers[name], rtol=1e-9, atol=1e-12, msg=name)


def test_ffnified_mobilenet_v2_trains_and_evaluates_at_any_frame_count(torchvision):
    from torchvision.models.mobilenetv2 import InvertedResidual

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=4)
    residual = {n for n, m in model.named_modules() if isinstance(m, InvertedResidual) and m.use_res_connect}
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    video = ffnify(model, FRAMES)
    assert video.backbone is model and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, FreqBatchNorm2d) and m.num_branches == 3 for m in model.modules()) == bns
    # TSM's place: the first conv of every block with a residual connection, and no other
    assert {n.removesuffix(".conv.0.0") for n, m in model.named_modules() if isinstance(m, ShiftedConv)} == residual

    inputs, labels = clips(FRAMES, hw=16), torch.tensor([1, 3])
    # lr 0.05 oscillated: whether the third loss fell below the first hung on float rounding in
    # the BN statistics (1.35 -> 0.77 -> 0.90, and 1.35 -> 0.85 -> 1.40 with a float64 merge)
    optimizer = torch.optim.SGD(video.parameters(), lr=0.02, momentum=0.9)
    losses = []
    for _ in range(3):
        loss = temporal_distillation_loss(video(inputs), labels)
        optimizer.zero_grad()
        loss.total.backward()
        optimizer.step()
        losses.append(loss.total.item())
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0], losses
    alter = next(m.alter for m in model.modules() if isinstance(m, ShiftedConv))
    assert (alter.weight.grad.abs().sum(1) > 0).all()  # every branch's WA row learns
    stats = model.features[0][1].running_mean  # the stem's BN: one row per branch
    assert not torch.equal(stats[0], stats[1]) and not torch.equal(stats[1], stats[2])

    video.eval()
    with torch.no_grad():
        for n in range(2, 21):
            (x,) = clips((n,), hw=16, seed=n)
            logits = video(x)
            assert logits.shape == (2, 4) and torch.isfinite(logits).all(), n
            if n == 6:  # a tie between the 4- and 8-frame branches: the 8-frame one, over 6 frames
                (packed,) = video(x.flatten(0, 1), FrameLayout.single(2, 6, row=2))
                assert torch.equal(logits, packed)


SMALL = [
    "data.synthetic.train_videos=4", "data.synthetic.val_videos=2", "data.synthetic.num_frames=4",
    "data.synthetic.frame_size=16", "data.size=16", "data.scale_size=16", "data.batch_size=2",
    "data.workers=0", "model.frames=[1,2]", "train.epochs=1", "train.max_steps=1", "train.progress=false",
    "model.arch=torchvision:mobilenet_v2",
]


def test_ffn_train_and_eval_a_torchvision_arch(tmp_path, torchvision, capsys):
    run = tmp_path / "mobilenet"
    assert main(["train", *SMALL, "--out", str(run)]) == 0
    assert main(["eval", str(run / "last.pt"), "--frames", "1..3", "--out", str(tmp_path / "eval")]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert list(results["mobilenet"]) == ["1", "2", "3"]
    assert all(v["videos"] == 2 for v in results["mobilenet"].values())
    model, cfg = load_trained(run / "last.pt")  # rebuilt from the checkpoint's config
    assert isinstance(model, FFNVideo) and cfg.model.arch == "torchvision:mobilenet_v2"
    saved = load_checkpoint(run / "last.pt")["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert model.backbone.classifier[0].p == 0.5  # model.dropout, in front of the classifier
    out = capsys.readouterr().out  # what ffnify converted, printed once, at the model's build
    line = ("ffnify MobileNetV2: 52 per-branch BatchNorm2d, 10 shifted convs, 10 Weight Alteration "
            "modules; branches of 1, 2 frames")
    assert out.count(line) == 1, out
    assert str(model.conversion) == line


def test_ffn_train_a_torchvision_arch_from_a_shell(tmp_path, torchvision):
    """A fresh process imports torchvision through ffn.ffnify.import_torchvision, as the tests do."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "ffn", "train", *SMALL, "--out", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ffnify MobileNetV2: 52 per-branch BatchNorm2d" in proc.stdout
    assert (tmp_path / "run" / "last.pt").is_file()


# --- any module tree, by a rule ------------------------------------------------------------------------

class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.body(x))


def tiny_cnn(classes: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         Residual(8), Residual(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))


def residual_blocks(name, module):
    return first_conv(module) if isinstance(module, Residual) else None


def test_any_module_tree_converts_by_a_rule():
    model = tiny_cnn()
    bn = model[1].state_dict()
    video = ffnify(model, FRAMES, blocks=residual_blocks)
    assert [n for n, m in model.named_modules() if isinstance(m, ShiftedConv)] == ["3.body.0", "4.body.0"]
    for key, value in model[1].state_dict().items():  # every branch row starts from the BN
        assert torch.equal(value, bn[key].expand_as(value)), key
    outs = video(clips(FRAMES, hw=16))
    assert [o.shape for o in outs] == [(2, 3)] * 3
    temporal_distillation_loss(outs, torch.tensor([0, 2])).total.backward()
    assert model[3].body[0].alter.weight.grad is not None
    video.eval()
    with torch.no_grad():
        assert video(clips((5,), hw=16)[0]).shape == (2, 3)


def test_the_shift_goes_on_the_residual_branch_only():
    """The block receives the unshifted input (its identity) and its first conv the shifted one,
    with TSM's edge rules (TSM's residual placement)."""
    video = ffnify(tiny_cnn(), (4,), weight_alteration=False, blocks=residual_blocks)
    seen = {}
    block = video.backbone[3]
    block.register_forward_pre_hook(lambda m, args: seen.update(block_in=args[0]))
    block.body[0].conv.register_forward_pre_hook(lambda m, args: seen.update(conv_in=args[0]))
    video.eval()
    with torch.no_grad():
        video(clips((4,), n=1, hw=16)[0])
    x, x_in = seen["block_in"], seen["conv_in"]
    fold = 8 // 8
    assert torch.equal(x_in[:-1, :fold], x[1:, :fold]) and not x_in[-1, :fold].any()  # from t+1
    assert torch.equal(x_in[1:, fold:2 * fold], x[:-1, fold:2 * fold]) and not x_in[0, fold:2 * fold].any()
    assert torch.equal(x_in[:, 2 * fold:], x[:, 2 * fold:])


def test_shift_false_is_tsn_with_weight_alteration():
    video = ffnify(tiny_cnn(), FRAMES, shift=False, blocks=residual_blocks)
    alter = video.backbone[3].body[0].alter
    assert not alter.shift and alter.weight is not None
    layout = FrameLayout(clips=2, frames=(1, 2), rows=(2, 0))
    with torch.no_grad():
        alter.weight.normal_(0, 0.5)
    x = torch.randn(layout.total_frames, 8, 3, 3)
    rows = [2, 2, 0, 0, 0, 0]  # frame -> row: 2 clips x 1 frame, then 2 clips x 2 frames
    expected = x * (1 + alter.weight[rows])[:, :, None, None]
    torch.testing.assert_close(alter(x, layout), expected)
    plain = ffnify(tiny_cnn(), FRAMES, shift=False, weight_alteration=False, blocks=residual_blocks)
    assert not any(isinstance(m, ShiftedConv) for m in plain.modules())  # per-branch BN only


def test_refused_arguments_leave_the_model_unchanged():
    model = tiny_cnn()
    before = repr(model)
    with pytest.raises(ValueError, match=r"found no residual block in Sequential.*blocks="):
        ffnify(model, FRAMES)  # the default rule knows torchvision's blocks only
    with pytest.raises(ValueError, match=r"blocks named 'conv9' as the first conv of 3 \(Residual\)"):
        ffnify(model, FRAMES, blocks=lambda n, m: "conv9" if isinstance(m, Residual) else None)
    with pytest.raises(ValueError, match=r"3.body.1 \(BatchNorm2d\) as a first conv, but it is no nn.Conv2d"):
        ffnify(model, FRAMES, blocks=lambda n, m: "body.1" if isinstance(m, Residual) else None)
    with pytest.raises(TypeError, match="blocks must return a str.*got True for 3"):
        ffnify(model, FRAMES, blocks=lambda n, m: isinstance(m, Residual) or None)
    with pytest.raises(ValueError, match="frames must be positive and strictly increasing"):
        ffnify(model, (8, 4), blocks=residual_blocks)
    with pytest.raises(ValueError, match="fold_div must be >= 2"):
        ffnify(model, FRAMES, fold_div=1, blocks=residual_blocks)
    with pytest.raises(TypeError, match="model must be an nn.Module, got function"):
        ffnify(tiny_cnn, FRAMES)
    assert repr(model) == before
    ffnify(model, FRAMES, blocks=residual_blocks)
    with pytest.raises(ValueError, match=r"ffnified already \(3.body.0 is a ShiftedConv\)"):
        ffnify(model, FRAMES, blocks=residual_blocks)


def test_a_model_that_does_not_return_logits_is_refused():
    video = ffnify(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), FRAMES, shift=False,
                   weight_alteration=False)
    with pytest.raises(ValueError, match=r"must map \[F, 3, H, W\] frames to \[F, classes\] logits"):
        video(clips(FRAMES, hw=4))


# --- the CLI's config ----------------------------------------------------------------------------------

@pytest.mark.parametrize("override,match", [
    ("model.arch=torchvision:resnet-18", "model.arch: must name a torchvision model"),
    ("model.impl=eager", "model.impl: must be 'fused' with model.arch=torchvision:mobilenet_v2"),
    ("model.width=16", "model.width: must stay 64"),
    ("model.pretrained=w.pth", "model.pretrained: is not supported with model.arch=torchvision"),
])
def test_config_refuses_what_a_torchvision_arch_cannot_do(override, match):
    with pytest.raises(UserError, match=match):
        load_config(overrides=["model.arch=torchvision:mobilenet_v2", override])


def test_a_torchvision_arch_without_torchvision_names_the_key(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    cfg = load_config(overrides=["model.arch=torchvision:resnet18"])
    with pytest.raises(UserError, match=r"model.arch=torchvision:resnet18 needs torchvision"):
        build_model(cfg.model, 4)


def test_model_dropout_goes_right_before_the_classifier(torchvision):
    for arch, head in (("resnet18", "fc"), ("mobilenet_v2", "classifier")):
        cfg = load_config(overrides=[f"model.arch=torchvision:{arch}", "model.dropout=0.3"]).model
        dropout, linear = getattr(build_model(cfg, 4).backbone, head)  # added (ResNet) or set
        assert isinstance(dropout, nn.Dropout) and dropout.p == 0.3 and linear.out_features == 4


def test_an_unknown_or_unsupported_torchvision_model_names_the_key(torchvision):
    for arch, match in (("torchvision:resnet7", "torchvision cannot build 'resnet7'"),
                        ("torchvision:mobilenet_v3_small", "ffnify found no residual block in MobileNetV3")):
        with pytest.raises(UserError, match=f"config model.arch={arch}: {match}"):
            build_model(load_config(overrides=[f"model.arch={arch}"]).model, 4)


def test_compiled_fullgraph_ffnified_model_equals_eager():
    """The context is entered inside the compiled forward (FFNVideo.branch_logits)."""
    eager = ffnify(tiny_cnn(), FRAMES, blocks=residual_blocks)
    twin = ffnify(tiny_cnn(), FRAMES, blocks=residual_blocks)
    twin.load_state_dict(eager.state_dict())
    compiled = torch.compile(twin, fullgraph=True)
    inputs, labels = clips(FRAMES, hw=16), torch.tensor([0, 2])
    outs = [eager(inputs), compiled(inputs)]
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for o in outs:
        temporal_distillation_loss(o, labels).total.backward()
    for (name, p), q in zip(eager.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    eager.eval(), twin.eval()
    with torch.no_grad():
        (x,) = clips((7,), hw=16)
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)


# --- timm models, normalisation rules, the conversion report -------------------------------------------

@pytest.mark.parametrize("name,act_bns", [("resnet18", 0), ("efficientnet_b0", 49), ("mobilenetv3_small_100", 34)])
def test_timm_models_equal_the_2d_model_frame_by_frame(timm, name, act_bns):
    """Without shift and WA, in eval, every branch row is the 2D model's BN: the video model's logits
    are the 2D model's per-frame logits averaged over each clip's frames (FFNVideo's consensus)."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3)
    randomize(model)  # statistics that are not the identity (BatchNormAct2d is a BatchNorm2d)
    model.eval()
    image = copy.deepcopy(model)
    video = ffnify(model, (2, 4), weight_alteration=False, shift=False).eval()
    c = video.conversion
    assert (c.with_activation, c.shifted_convs, c.weight_alterations, c.shared_norms) == (act_bns, 0, 0, {})
    assert c.per_branch_norms == sum(isinstance(m, nn.BatchNorm2d) for m in image.modules()) > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # timm's activation and drop are kept, under the timm model's state_dict keys
    assert sum(isinstance(m, FreqBatchNormAct2d) for m in model.modules()) == act_bns
    assert [k.removeprefix("backbone.") for k in video.state_dict()] == list(image.state_dict())
    with torch.no_grad():
        for t in (2, 3, 4):  # 3: the nearest branch, 4 frames, over 3
            (x,) = clips((t,), hw=32, seed=t)
            frames = image(x.flatten(0, 1)).view(2, t, -1).mean(1)
            torch.testing.assert_close(video(x), frames, rtol=1e-5, atol=1e-5)
        if act_bns:  # a timm checkpoint (BatchNorm2d's [C] entries) loads into every branch row
            video.backbone.load_state_dict(image.state_dict())
    if act_bns:  # and it trains, timm's in-place activations after the per-branch BN included
        video.train()
        temporal_distillation_loss(video(clips((2, 4), hw=32)), torch.tensor([0, 2])).total.backward()
        bn = next(m for m in model.modules() if isinstance(m, FreqBatchNormAct2d))
        assert bn.weight.grad is not None and not isinstance(bn.act, nn.Identity)


class ScaledLayerNorm(nn.LayerNorm):  # does more than LayerNorm: refused
    def forward(self, x):
        return 2 * super().forward(x)


def group_norm_cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.GroupNorm(2, 8), nn.GELU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def test_a_model_normalised_by_other_norms_than_batch_or_layer_norm_is_refused():
    model = group_norm_cnn()
    before = repr(model)
    with pytest.raises(ValueError, match=r"Sequential normalises with GroupNorm x1 and has no "
                                          r"nn.BatchNorm2d or nn.LayerNorm.*no frequency-indexed GroupNorm yet"):
        ffnify(model, FRAMES, shift=False, weight_alteration=False)
    assert repr(model) == before
    model.insert(2, ScaledLayerNorm(8))
    with pytest.raises(ValueError, match=r"module '2' \(test_ffnify.ScaledLayerNorm\) is a LayerNorm "
                                         r"subclass with a forward of its own"):
        ffnify(model, FRAMES, shift=False, weight_alteration=False)


@pytest.mark.parametrize("name,kwargs", [("convnext_atto", {}),
                                         ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8))])
def test_timm_layer_norm_models_get_a_private_layer_norm_per_branch(timm, name, kwargs):
    """ConvNeXt (LayerNorm2d and LayerNorm) and ViT (LayerNorm): every LayerNorm becomes per-branch,
    rows starting from it, so in eval the video model is the 2D model frame by frame; a change to
    one branch's rows changes that branch's logits only."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, **kwargs).eval()
    image = copy.deepcopy(model)
    norms = sum(isinstance(m, nn.LayerNorm) for m in image.modules())
    video = ffnify(model, (2, 4), weight_alteration=False, shift=False).eval()
    assert video.conversion.layer_norms == norms > 0 and video.conversion.shared_norms == {}
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert [k.removeprefix("backbone.") for k in video.state_dict()] == list(image.state_dict())
    with torch.no_grad():
        (x,) = clips((2,), hw=32, seed=2)
        frames = image(x.flatten(0, 1)).view(2, 2, -1).mean(1)
        torch.testing.assert_close(video(x), frames, rtol=1e-5, atol=1e-5)
        for m in model.modules():  # the 4-frame branch's rows only
            if isinstance(m, FreqLayerNorm):
                m.bias[1].add_(0.5)
        torch.testing.assert_close(video(x), frames, rtol=1e-5, atol=1e-5)
        (x4,) = clips((4,), hw=32, seed=4)
        assert not torch.allclose(video(x4), image(x4.flatten(0, 1)).view(2, 4, -1).mean(1))


def test_torchvision_convnext_shifts_every_block_and_trains(torchvision):
    model = torchvision.models.convnext_tiny(num_classes=3)
    video = ffnify(model, (2, 4))
    c = video.conversion
    blocks = sum(type(m).__name__ == "CNBlock" for m in model.modules())
    assert (c.shifted_convs, c.weight_alterations, c.per_branch_norms) == (blocks, blocks, 0)
    assert c.layer_norms == blocks + 5  # + the stem's, 3 downsamplings' and the head's LayerNorm2d
    assert isinstance(model.features[0][1], FreqLayerNorm2d)
    video.train()
    temporal_distillation_loss(video(clips((2, 4), hw=32)), torch.tensor([0, 2])).total.backward()
    ln = model.features[1][0].block[2]
    assert isinstance(ln, FreqLayerNorm) and (ln.weight.grad != 0).any(dim=1).all()


def test_other_norms_next_to_batch_norm_stay_shared_with_a_warning():
    model = tiny_cnn()
    model[3].body.append(nn.GroupNorm(2, 8))
    model.insert(5, nn.LayerNorm([8, 8, 8], elementwise_affine=False))  # nothing to share: not counted
    with pytest.warns(UserWarning, match=r"1 normalisation layers of Sequential are neither BatchNorm2d nor "
                                         r"LayerNorm and stay shared by all branches \(GroupNorm x1\)"):
        video = ffnify(model, FRAMES, blocks=residual_blocks)
    assert str(video.conversion) == (
        "ffnify Sequential: 5 per-branch BatchNorm2d, 2 shifted convs, 2 Weight Alteration modules; "
        "branches of 2, 4, 8 frames; 1 other normalisation layers shared by all branches (GroupNorm x1)")
    assert isinstance(model[3].body[5], nn.GroupNorm)


class ScaledBatchNorm2d(nn.BatchNorm2d):  # does more than BatchNorm: refused
    def forward(self, x):
        return 2 * super().forward(x)


class NamedBatchNorm2d(nn.BatchNorm2d):  # BatchNorm's own forward: converted
    pass


def test_batch_norm_subclasses_convert_when_they_keep_its_forward_and_are_refused_otherwise():
    model = tiny_cnn()
    model[3].body[1] = NamedBatchNorm2d(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: nothing is left shared
        video = ffnify(model, FRAMES, shift=False, weight_alteration=False)
    assert type(model[3].body[1]) is FreqBatchNorm2d and video.conversion.per_branch_norms == 5
    model = tiny_cnn()
    model[4].body[4] = ScaledBatchNorm2d(8)
    before = repr(model)
    with pytest.raises(ValueError, match=r"module '4.body.4' \(test_ffnify.ScaledBatchNorm2d\) is a BatchNorm2d "
                                         r"subclass with a forward of its own"):
        ffnify(model, FRAMES, blocks=residual_blocks)
    assert repr(model) == before
