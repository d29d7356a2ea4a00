"""FFN on UniFormer-S (model.arch=uniformer_s): the model equals a reference forward written from
the official UniFormer-FFN semantics on a checkpoint in the official key naming (float64, eval at
the branch counts and one in between, and the training step per branch), equals its eager twin
(outputs, gradients, running statistics), keeps clips apart, loads plain UniFormer weights (2D
ImageNet ones inflated), and trains, evaluates and diagnoses through the CLI."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import RandomWeights, rel, train_eval_diagnose
from ffn import nearest_branch
from ffn.convert import load_official, load_uniformer
from ffn.uniformer import EagerFFNUniFormer, FFNUniFormer

FRAMES = (4, 8, 16)
SUFFIXES = ("4", "8", "16")
WIDTH, CLASSES, HW = 8, 5, 32
HEADS = (1, 2, 5, 8)


def clips_of(frames, n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, t, 3, HW, HW, generator=g, dtype=torch.float64) for t in frames]


# --- a checkpoint in the official UniFormer-FFN naming, with random weights -------------------

def official_state(width=WIDTH, classes=CLASSES, seed=0, branches=SUFFIXES):
    """uniformer_FFN.py's state dict (depths 3, 4, 8, 3; stages width x 1, 2, 5, 8), every tensor
    random: norms' affine parameters and BN statistics, WA (adaconv) too."""
    weights = RandomWeights(seed)
    sd, rnd = weights.sd, weights.rnd

    def norm(name, c, bn):
        for s in branches:
            if bn:
                weights.bn(f"{name}_{s}", c)
            else:
                sd[f"{name}_{s}.weight"], sd[f"{name}_{s}.bias"] = 1 + rnd(c, scale=0.2), rnd(c, scale=0.2)

    def layer(name, *shape):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = rnd(*shape), rnd(shape[0], scale=0.1)

    dims = [width * d for d in (1, 2, 5, 8)]
    cin = 3
    for i, (dim, depth) in enumerate(zip(dims, (3, 4, 8, 3))):
        layer(f"patch_embed{i + 1}.proj", dim, cin, *((3, 4, 4) if i == 0 else (1, 2, 2)))
        norm(f"patch_embed{i + 1}.norm", dim, bn=False)
        cin = dim
        for j in range(depth):
            p = f"blocks{i + 1}.{j}"
            layer(f"{p}.pos_embed", dim, 1, 3, 3, 3)
            for s in branches:
                sd[f"{p}.adaconv_{s}.weight"] = rnd(dim, 1, 1, 1, 1, scale=0.1)
            norm(f"{p}.norm1", dim, bn=i < 2)
            norm(f"{p}.norm2", dim, bn=i < 2)
            if i < 2:  # CBlock
                layer(f"{p}.conv1", dim, dim, 1, 1, 1)
                layer(f"{p}.attn", dim, 1, 5, 5, 5)
                layer(f"{p}.conv2", dim, dim, 1, 1, 1)
                layer(f"{p}.mlp.fc1", 4 * dim, dim, 1, 1, 1)
                layer(f"{p}.mlp.fc2", dim, 4 * dim, 1, 1, 1)
            else:  # SABlock
                layer(f"{p}.attn.qkv", 3 * dim, dim)
                layer(f"{p}.attn.proj", dim, dim)
                layer(f"{p}.mlp.fc1", 4 * dim, dim)
                layer(f"{p}.mlp.fc2", dim, 4 * dim)
    norm("norm", dims[-1], bn=True)
    layer("head", classes, dims[-1])
    return sd


# --- the reference: the official module structure in plain torch.nn.functional ----------------

def ref_ln(sd, name, x, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def ref_bn(sd, name, x, training):
    return F.batch_norm(x, sd[f"{name}.running_mean"].clone(), sd[f"{name}.running_var"].clone(),
                        sd[f"{name}.weight"], sd[f"{name}.bias"], training, 0.1, 1e-5)


def conv(sd, name, x, **kw):
    return F.conv3d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], **kw)


def ref_patch_embed(sd, i, s, x):
    first = i == 1
    x = conv(sd, f"patch_embed{i}.proj", x, stride=(2, 4, 4) if first else (1, 2, 2),
             padding=(1, 0, 0) if first else 0)
    b, c, t, h, w = x.shape
    x = ref_ln(sd, f"patch_embed{i}.norm_{s}", x.flatten(2).transpose(1, 2), 1e-5)
    return x.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)


def ref_wa_pos(sd, p, s, x):
    c = x.shape[1]
    x = x + F.conv3d(x, sd[f"{p}.adaconv_{s}.weight"], groups=c)  # adaconv + identity
    return x + conv(sd, f"{p}.pos_embed", x, padding=1, groups=c)


def ref_cblock(sd, p, s, x, training):
    x = ref_wa_pos(sd, p, s, x)
    h = conv(sd, f"{p}.conv1", ref_bn(sd, f"{p}.norm1_{s}", x, training))
    h = conv(sd, f"{p}.conv2", conv(sd, f"{p}.attn", h, padding=2, groups=x.shape[1]))
    x = x + h
    h = conv(sd, f"{p}.mlp.fc1", ref_bn(sd, f"{p}.norm2_{s}", x, training))
    return x + conv(sd, f"{p}.mlp.fc2", F.gelu(h))


def linear(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def ref_sablock(sd, p, s, x, heads):
    x = ref_wa_pos(sd, p, s, x)
    shape = x.shape
    b, c = shape[:2]
    x = x.flatten(2).transpose(1, 2)
    n = x.shape[1]
    qkv = linear(sd, f"{p}.attn.qkv", ref_ln(sd, f"{p}.norm1_{s}", x, 1e-6))
    q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(-1)
    x = x + linear(sd, f"{p}.attn.proj", (attn @ v).transpose(1, 2).reshape(b, n, c))
    h = F.gelu(linear(sd, f"{p}.mlp.fc1", ref_ln(sd, f"{p}.norm2_{s}", x, 1e-6)))
    x = x + linear(sd, f"{p}.mlp.fc2", h)
    return x.transpose(1, 2).reshape(shape)


def reference_forward(sd, clip, s, training=False):
    """Logits of branch ``_{s}`` for ``clip`` ``[N, T, 3, H, W]`` (square frames), as
    Uniformer_FFN.forward computes them."""
    x = clip.transpose(1, 2)
    for i, depth in enumerate((3, 4, 8, 3), start=1):
        x = ref_patch_embed(sd, i, s, x)
        for j in range(depth):
            p = f"blocks{i}.{j}"
            x = ref_cblock(sd, p, s, x, training) if i < 3 else ref_sablock(sd, p, s, x, HEADS[i - 1])
    x = ref_bn(sd, f"norm_{s}", x, training)
    return linear(sd, "head", x.flatten(2).mean(-1))


def loaded_model(state, width=WIDTH, frames=FRAMES):
    model = FFNUniFormer(frames, CLASSES, width=width).double()
    return load_official(model, {"model_state": state, "epoch": 3, "cfg": "MODEL: ..."})


@pytest.fixture(scope="module")
def official():
    state = official_state()
    return state, loaded_model(state)


@pytest.mark.parametrize("n", [4, 8, 16, 6])
def test_eval_equals_the_official_reference_at_any_frame_count(official, n):
    state, model = official
    (clip,) = clips_of([n])
    s = SUFFIXES[nearest_branch(FRAMES, n)]
    with torch.no_grad():
        assert rel(model.eval()(clip), reference_forward(state, clip, s)) < 1e-5


def test_training_step_equals_the_official_reference_per_branch(official):
    state, _ = official
    model = loaded_model(state).train()
    clips = clips_of(FRAMES, seed=1)
    for logits, clip, s in zip(model(clips), clips, SUFFIXES):
        assert rel(logits, reference_forward(state, clip, s, training=True)) < 1e-5
    # every branch's BN row saw its own batch statistics: rows moved off the checkpoint's values
    bn = model.blocks1[0].norm1
    for row, s in enumerate(SUFFIXES):
        assert not torch.allclose(bn.running_mean[row], state[f"blocks1.0.norm1_{s}.running_mean"])
        assert int(bn.num_batches_tracked[row]) == 8  # the checkpoint's 7, + 1


def test_matches_eager_twin_outputs_gradients_and_running_stats():
    torch.manual_seed(0)
    model = FFNUniFormer((2, 4), CLASSES, width=WIDTH).double()
    with torch.no_grad():  # WA far from 0, so a WA mistake shows
        for m in model.modules():
            if hasattr(m, "alter") and m.alter.weight is not None:
                m.alter.weight.normal_(0, 0.3)
    eager = EagerFFNUniFormer.twin(model)
    clips = clips_of((2, 4), n=2)
    out, ref = model(clips), eager(clips)
    for a, b in zip(out, ref):
        assert rel(a, b) < 1e-10
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in out]
    sum((o * w).sum() for o, w in zip(out, weights)).backward()
    sum((o * w).sum() for o, w in zip(ref, weights)).backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        # atol: a bias right before a training-mode BN has a zero gradient, up to rounding
        assert torch.allclose(p.grad, q.grad, rtol=1e-8, atol=1e-12), name
    for (name, b), c in zip(model.named_buffers(), eager.buffers()):
        assert torch.allclose(b.double(), c.double(), rtol=1e-10, atol=1e-12), name


def test_no_clip_leaks_into_another_and_bad_sizes_are_refused():
    torch.manual_seed(0)
    model = FFNUniFormer((2, 4), CLASSES, width=WIDTH).eval()
    x = torch.randn(2, 3, 3, HW, HW)
    y = x.clone()
    y[1] += 1
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="at least 32x32"):
        model(torch.randn(1, 2, 3, 16, 32))


def test_stochastic_depth_drops_whole_clips_in_training_only():
    from ffn.uniformer import drop_path

    torch.manual_seed(0)
    # packed tokens of 2 clips x (1, 3) frames: each clip's rows are dropped (0) or kept (x 2) together
    out = torch.stack([drop_path(torch.ones(2 * (1 + 3), 5), 0.5, clips=2, frames=(1, 3))
                       for _ in range(300)])
    for rows in (out[:, 0:1], out[:, 1:2], out[:, 2:5], out[:, 5:8]):
        assert ((rows == 0).all(dim=(1, 2)) | (rows == 2).all(dim=(1, 2))).all()
    assert abs(out.mean().item() - 1) < 0.1
    model = FFNUniFormer((1, 2), CLASSES, width=WIDTH, drop_path=0.5)
    assert [b.drop for b in model.blocks1] == pytest.approx([0.0, 0.5 / 17, 1 / 17])
    plain = FFNUniFormer.twin(model)  # same weights, no stochastic depth
    for b in (b for _, blocks in plain.stages() for b in blocks):
        b.drop = 0.0
    x = torch.randn(2, 2, 3, HW, HW)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain.eval()(x))
    assert not torch.allclose(model.train()(x), plain.train()(x))


def test_official_checkpoint_of_another_width_names_the_key(official):
    state, _ = official
    with pytest.raises(ValueError, match="patch_embed1.proj.weight"):
        loaded_model(state, width=16)


def plain_state(width=WIDTH, classes=7, image=True):
    """The UniFormer repository's naming (one norm per layer, no WA): an ImageNet (2D) checkpoint
    is the FFN one's shared tensors with 2D convs (the centre time tap) and one norm per layer."""
    sd = {}
    for k, v in official_state(width, classes, seed=2).items():
        if "adaconv" in k or any(f"_{s}." in k for s in SUFFIXES[1:]):
            continue
        k = k.replace("_4.", ".")
        sd[k] = v[:, :, v.shape[2] // 2] if image and v.dim() == 5 else v
    return sd


def test_plain_uniformer_weights_initialise_every_branch():
    image = plain_state()
    model = FFNUniFormer(FRAMES, CLASSES, width=WIDTH).double()
    alter = model.blocks3[0].alter.weight.detach().clone()
    head = model.head.weight.detach().clone()
    load_uniformer(model, {"model": image})
    # 2D convs inflated as UniFormer does: repeated over the kernel's t taps and divided by t
    w2d = image["patch_embed1.proj.weight"]
    assert torch.equal(model.patch_embed1.proj.weight, w2d.unsqueeze(2).repeat(1, 1, 3, 1, 1) / 3)
    assert torch.equal(model.blocks1[0].mlp.fc1.weight[:, :, 0], image["blocks1.0.mlp.fc1.weight"])
    for row in range(3):  # every branch row starts from the one norm
        assert torch.equal(model.blocks1[1].norm2.running_var[row], image["blocks1.1.norm2.running_var"])
        assert torch.equal(model.blocks3[2].norm1.weight[row], image["blocks3.2.norm1.weight"])
        assert torch.equal(model.norm.bias[row], image["norm.bias"])
    assert torch.equal(model.blocks3[0].alter.weight, alter)  # WA keeps its initialisation
    assert torch.equal(model.head.weight, head)  # 7 classes: the head is dropped, as officially
    # a Kinetics (3D) checkpoint through load_official, head of the model's class count kept
    video = plain_state(classes=CLASSES, image=False)
    load_official(model, {"model": video})
    assert torch.equal(model.blocks2[0].attn.weight, video["blocks2.0.attn.weight"])
    assert torch.equal(model.head.weight, video["head.weight"])


def test_parameter_count_at_the_official_width():
    with torch.device("meta"):  # no memory, no init
        model = FFNUniFormer(FRAMES, 400)
    assert sum(p.numel() for p in model.parameters()) == 21_459_344  # README's table


def test_ffn_train_eval_and_diagnose_uniformer(tmp_path, capsys):
    results, rows = train_eval_diagnose(tmp_path, [
        "model.arch=uniformer_s", "model.drop_path=0.1", "data.synthetic.frame_size=32", "data.size=32",
        "data.scale_size=32"], "1,3", "2")
    assert "uniformer_s" in capsys.readouterr().out
    assert list(results) == ["1", "3"]
    assert "blocks1.0.norm1" in rows and "blocks2.3.norm2" in rows and "\nrun,norm," in rows


def test_config_refuses_what_uniformer_cannot_take():
    from ffn.config import UserError, load_config

    with pytest.raises(UserError, match="data.size"):
        load_config(overrides=["model.arch=uniformer_s", "data.size=16"])
    with pytest.raises(UserError, match="model.drop_path"):
        load_config(overrides=["model.arch=resnet18", "model.drop_path=0.1"])
