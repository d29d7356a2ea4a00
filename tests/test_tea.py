"""FFN on TEA (model.arch=tea50): the packed model equals a reference forward written from the
official TEA-FFN semantics on a checkpoint in the official key naming (float64, at 4/8/16 and 6/12
frames), equals its eager twin (outputs, gradients, running statistics), keeps clips apart, runs
each shared conv once per step, and loads plain-TEA and timm Res2Net weights."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import RandomWeights, clips_of, rel, train_eval_diagnose
from ffn import nearest_branch
from ffn.convert import load_official, load_res2net
from ffn.tea import EagerFFNTEA, FFNTEA

FRAMES = (4, 8, 16)
SUFFIXES = ("4", "8", "16")


# --- a checkpoint in the official TEA-FFN naming, with random weights -------------------------

def official_checkpoint(width=16, classes=5, seed=0, branches=SUFFIXES):
    """``{"state_dict": {"module.base_model.*", "module.new_fc.*"}}`` as resnet_TEA_FFN.py's TSN
    saves it, every tensor random (BN statistics too; the temporal taps too)."""
    weights = RandomWeights(seed)
    sd, rnd = weights.sd, weights.rnd

    def conv(name, cout, cin, k=1):
        sd[f"{name}.weight"] = rnd(cout, cin, k, k)

    def bn(name, c):  # bn1_4.weight
        for s in branches:
            weights.bn(f"{name}_{s}", c)

    def bns(name, i, c):  # bns_4.0.weight
        for s in branches:
            weights.bn(f"{name}.bns_{s}.{i}", c)

    conv("conv1", width, 3, 7)
    bn("bn1", width)
    inplanes = width
    for i, count in enumerate((3, 4, 6, 3)):
        planes = width << i
        w = planes * 26 // 64
        for j in range(count):
            b = f"layer{i + 1}.{j}"
            red = max(1, 4 * w // 16)
            conv(f"{b}.me.conv1", red, 4 * w)
            bn(f"{b}.me.bn1", red)
            sd[f"{b}.me.conv2.weight"] = rnd(red, 1, 3, 3)
            conv(f"{b}.me.conv3", 4 * w, red)
            bn(f"{b}.me.bn3", 4 * w)
            conv(f"{b}.conv1", 4 * w, inplanes)
            bn(f"{b}.bn1", 4 * w)
            for k in range(3):
                conv(f"{b}.convs.{k}", w, w, 3)
                bns(b, k, w)
            for k in range(4):
                sd[f"{b}.shifts.{k}.conv.weight"] = rnd(w, 1, 3, scale=0.6)
            conv(f"{b}.conv3", planes * 4, 4 * w)
            bn(f"{b}.bn3", planes * 4)
            if j == 0:
                conv(f"{b}.downsample_conv", planes * 4, inplanes)
                bn(f"{b}.downsample_bn", planes * 4)
            inplanes = planes * 4
    sd["new_fc.weight"] = rnd(classes, inplanes)
    sd["new_fc.bias"] = rnd(classes, scale=0.1)
    return {"state_dict": {"module." + ("" if k.startswith("new_fc") else "base_model.") + k: v
                           for k, v in sd.items()}}


# --- the reference: the official TEA-FFN forward, written from its semantics ------------------

def ref_bn(sd, name, x, training):
    return F.batch_norm(x, sd[f"{name}.running_mean"].clone(), sd[f"{name}.running_var"].clone(),
                        sd[f"{name}.weight"], sd[f"{name}.bias"], training, 0.1, 1e-5)


def ref_me(sd, p, s, x, t, training):
    b = ref_bn(sd, f"{p}.bn1_{s}", F.conv2d(x, sd[f"{p}.conv1.weight"]), training)
    red = b.shape[1]
    moved = F.conv2d(b, sd[f"{p}.conv2.weight"], padding=1, groups=red)
    bv, mv = b.view(-1, t, *b.shape[1:]), moved.view(-1, t, *b.shape[1:])
    diff = F.pad(mv[:, 1:] - bv[:, :-1], (0, 0, 0, 0, 0, 0, 0, 1)).flatten(0, 1)
    y = F.adaptive_avg_pool2d(diff, 1)
    y = ref_bn(sd, f"{p}.bn3_{s}", F.conv2d(y, sd[f"{p}.conv3.weight"]), training)
    return x + x * (torch.sigmoid(y) - 0.5)


def ref_shift(weight, x, t):
    nt, c, h, w = x.shape
    v = x.view(nt // t, t, c, h, w).permute(0, 3, 4, 2, 1).reshape(-1, c, t)
    v = F.conv1d(v, weight, padding=1, groups=c)
    return v.view(nt // t, h, w, c, t).permute(0, 4, 3, 1, 2).reshape(nt, c, h, w)


def ref_block(sd, p, s, x, t, stage, stride, training):
    out = F.relu(ref_bn(sd, f"{p}.bn1_{s}", F.conv2d(x, sd[f"{p}.conv1.weight"]), training))
    out = ref_me(sd, f"{p}.me", s, out, t, training)
    w = sd[f"{p}.convs.0.weight"].shape[0]
    spx = torch.split(out, w, 1)
    outs = []
    for i in range(3):
        sp = spx[i] if i == 0 or stage else sp + spx[i]
        sp = ref_shift(sd[f"{p}.shifts.{i}.conv.weight"], sp, t)
        sp = F.conv2d(sp, sd[f"{p}.convs.{i}.weight"], stride=stride, padding=1)
        sp = F.relu(ref_bn(sd, f"{p}.bns_{s}.{i}", sp, training))
        outs.append(sp)
    last = ref_shift(sd[f"{p}.shifts.3.conv.weight"], spx[3], t)
    outs.append(F.avg_pool2d(last, 3, stride, 1) if stage else last)
    out = ref_bn(sd, f"{p}.bn3_{s}", F.conv2d(torch.cat(outs, 1), sd[f"{p}.conv3.weight"]), training)
    res = x
    if f"{p}.downsample_conv.weight" in sd:
        res = ref_bn(sd, f"{p}.downsample_bn_{s}",
                     F.conv2d(x, sd[f"{p}.downsample_conv.weight"], stride=stride), training)
    return F.relu(out + res)


def reference_forward(ckpt, clips, s, training=False):
    """The official TEA-FFN on ``[N, T, 3, H, W]`` clips with branch ``s``'s BNs; the temporal
    modules run over the given T (the official eval forces 16, docs/design.md §5.8)."""
    sd = {k.removeprefix("module.").removeprefix("base_model."): v
          for k, v in ckpt["state_dict"].items()}
    n, t = clips.shape[:2]
    x = clips.flatten(0, 1)
    x = F.relu(ref_bn(sd, f"bn1_{s}", F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), training))
    x = F.max_pool2d(x, 3, 2, 1)
    for i, count in enumerate((3, 4, 6, 3)):
        for j in range(count):
            x = ref_block(sd, f"layer{i + 1}.{j}", s, x, t, j == 0, 2 if i > 0 and j == 0 else 1,
                          training)
    x = x.mean((2, 3))  # the official AvgPool2d(7) at 224 pixels
    logits = F.linear(x, sd["new_fc.weight"], sd["new_fc.bias"])
    return logits.view(n, t, -1).mean(1)  # TSN's average consensus


def loaded_model(ckpt, width=16):
    model = FFNTEA(frames=FRAMES, num_classes=5, dropout=0.0, width=width).double()
    return load_official(model, ckpt)


@pytest.fixture(scope="module")
def official():
    ckpt = official_checkpoint()
    return ckpt, loaded_model(ckpt).eval()


@pytest.mark.parametrize("n", [4, 8, 16, 6, 12])
def test_eval_equals_the_official_reference_at_any_frame_count(official, n):
    ckpt, model = official
    clips = clips_of([n], n=2, seed=n)[0]
    with torch.no_grad():
        ours = model(clips)
        ref = reference_forward(ckpt, clips, SUFFIXES[nearest_branch(FRAMES, n)])
    err = rel(ours, ref)
    worst = float((ours - ref).abs().max() / ref.abs().max())
    print(f"tea50 eval n={n}: relative error {err:.3g} (norm), {worst:.3g} (max abs / max)")
    assert err <= 1e-5 and worst <= 1e-5


def test_training_step_equals_the_official_reference_per_branch(official):
    ckpt, model = official
    model = loaded_model(ckpt).train()
    clips = clips_of(FRAMES, n=2, seed=1)
    outs = model(clips)
    for out, c, s in zip(outs, clips, SUFFIXES, strict=True):
        assert rel(out, reference_forward(ckpt, c, s, training=True)) <= 1e-5


def test_matches_eager_twin_float64():
    torch.manual_seed(0)
    packed = FFNTEA(frames=FRAMES, num_classes=5, dropout=0.0, width=8).double()
    with torch.no_grad():  # random temporal taps: the shift/identity init hides mixing bugs
        for name, p in packed.named_parameters():
            if "shifts" in name:
                p.normal_(0, 0.5)
    eager = EagerFFNTEA.twin(packed)
    clips = clips_of(FRAMES, n=2, seed=2)
    results = []
    for model in (packed, eager):
        model.zero_grad()
        outs = model(clips)
        g = torch.Generator().manual_seed(3)
        torch.autograd.backward(outs, [torch.randn(o.shape, generator=g).double() for o in outs])
        results.append((outs, {n: p.grad for n, p in model.named_parameters()}))
    (outs_p, grads_p), (outs_e, grads_e) = results
    for a, b in zip(outs_p, outs_e, strict=True):
        assert rel(a, b) <= 1e-9
    for name, gr in grads_e.items():
        assert rel(grads_p[name], gr) <= 1e-8, name
    buffers = dict(packed.named_buffers())
    for name, buf in eager.named_buffers():
        assert rel(buffers[name].double(), buf.double()) <= 1e-9, name


def test_no_frame_of_another_clip_or_branch_leaks_in(official):
    _, model = official
    clips = clips_of((4, 8), n=3, seed=4)
    layout_in = [c.clone() for c in clips]
    layout_in[1][1] += 1.0  # change clip 1 of the 8-frame branch
    with torch.no_grad():
        a, b = model(clips), model(layout_in)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)  # other branch: bit-identical
    torch.testing.assert_close(a[1][[0, 2]], b[1][[0, 2]], rtol=0, atol=0)  # other clips too
    assert not torch.equal(a[1][1], b[1][1])


def test_every_shared_conv_runs_once_per_step():
    model = FFNTEA(frames=FRAMES, num_classes=5, width=8)
    calls = {}
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_hook(lambda mod, i, o, name=name: calls.__setitem__(
                name, calls.get(name, 0) + 1))
    model(clips_of(FRAMES, n=1, seed=5, dtype=torch.float32))
    assert calls and set(calls.values()) == {1}


def test_eval_runs_at_any_frame_count_with_the_nearest_branch():
    model = FFNTEA(frames=FRAMES, num_classes=5, width=8).eval()
    with torch.no_grad():
        for n in (1, 2, 3, 5, 20):
            assert model(clips_of([n], n=2, dtype=torch.float32)[0]).shape == (2, 5)


def plain_tea_checkpoint(width=64, classes=5):
    """A plain (one-branch) TEA checkpoint, resnet_TEA.py's naming, from a TEA-FFN one."""
    sd = official_checkpoint(width=width, classes=classes, branches=("8",))["state_dict"]
    out = {}
    for k, v in sd.items():
        k = k.replace("_8", "").replace("downsample_conv", "downsample.0").replace(
            "downsample_bn", "downsample.1")
        out[k] = v
    return out


def test_plain_tea_checkpoint_initialises_every_branch():
    sd = plain_tea_checkpoint(width=16)
    model = load_official(FFNTEA(frames=FRAMES, num_classes=5, width=16).double(), sd)
    key = "module.base_model.layer2.0.bns.1.running_var"
    for row in range(3):
        torch.testing.assert_close(model.layer2[0].bns[1].running_var[row], sd[key])
    torch.testing.assert_close(model.layer1[0].downsample.conv.weight,
                               sd["module.base_model.layer1.0.downsample.0.weight"])
    torch.testing.assert_close(model.layer3[1].shifts[3].conv.weight,
                               sd["module.base_model.layer3.1.shifts.3.conv.weight"])


def test_official_checkpoint_of_another_width_names_the_key():
    with pytest.raises(ValueError, match="conv1.weight"):
        load_official(FFNTEA(frames=FRAMES, num_classes=5, width=8), official_checkpoint(width=16))


def test_timm_res2net_weights_initialise_the_model():
    from ffn.ffnify import import_torchvision

    try:
        import_torchvision()  # timm imports torchvision (the PyPI wheel needs this workaround)
        import timm
    except ImportError:
        pytest.skip("timm or torchvision is not installed (pip install -r requirements-test.txt)")
    res2net = timm.create_model("res2net50_26w_4s", pretrained=False)
    model = load_res2net(FFNTEA(frames=FRAMES, num_classes=174, width=64), res2net.state_dict())
    sd = res2net.state_dict()
    torch.testing.assert_close(model.layer3[0].convs[2].weight, sd["layer3.0.convs.2.weight"])
    for row in range(3):
        torch.testing.assert_close(model.layer4[0].downsample.bn.weight[row],
                                   sd["layer4.0.downsample.1.weight"])
    # ME and the temporal taps keep their fresh init: TEA's shift and identity
    w = model.layer1[0].shifts[3].conv.weight
    assert w[:13, 0, 2].eq(1).all() and w[13:26, 0, 0].eq(1).all()


def test_parameter_counts():
    ffn = sum(p.numel() for p in FFNTEA(frames=FRAMES, num_classes=1000).parameters())
    plain = sum(p.numel() for p in FFNTEA(frames=(8,), num_classes=1000).parameters())
    ffn174 = sum(p.numel() for p in FFNTEA(frames=FRAMES, num_classes=174).parameters())
    print(f"tea50 params: FFN 1000 classes {ffn}, 174 classes {ffn174}; plain TEA {plain}")
    assert (ffn, ffn174, plain) == (TEA50_FFN_1000, TEA50_FFN_174, TEA50_PLAIN_1000)


# TEA-FFN, 3 branches (README): 1000 classes 26,293,810; 174 (Something-Something) 24,601,336.
# Plain TEA (one branch) 26,148,754: the two extra BN rows add 145,056 parameters.
TEA50_FFN_1000, TEA50_FFN_174, TEA50_PLAIN_1000 = 26_293_810, 24_601_336, 26_148_754


# --- everywhere the TSM model goes: compile_eval, export, ffn train/eval/diagnose --------------

def small_tea():
    torch.manual_seed(0)
    return FFNTEA(frames=FRAMES, num_classes=6, width=8).eval()


def test_compile_eval_one_graph_per_branch():
    from torch._dynamo.testing import CompileCounterWithBackend

    from ffn.compiled import compile_eval

    torch._dynamo.reset()
    model = small_tea()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = compile_eval(model, backend=counter)
    with torch.no_grad():
        for n, t in [(2, 2), (1, 3), (3, 5), (2, 7), (1, 11), (2, 13), (3, 20), (1, 4)]:
            x = clips_of([t], n=n, hw=16, seed=t, dtype=torch.float32)[0]
            torch.testing.assert_close(compiled(x), model(x), msg=f"N={n}, T={t}")
    assert counter.frame_count == len(FRAMES)
    torch._dynamo.reset()


def test_export_dynamic_batch_and_frames_per_branch():
    from ffn.export import export_model

    model = small_tea()
    programs = export_model(model, 16, max_clips=4, max_frames=20)
    assert sorted(programs) == [0, 1, 2]
    with torch.no_grad():
        for n, t in [(1, 2), (3, 5), (2, 9), (1, 20)]:
            x = clips_of([t], n=n, hw=16, seed=t, dtype=torch.float32)[0]
            torch.testing.assert_close(programs[model.branch_for(t)].module()(x), model(x))


def test_ffn_train_eval_and_diagnose_tea50(tmp_path, capsys):
    results, rows = train_eval_diagnose(tmp_path, ["model.arch=tea50", "data.size=16", "data.scale_size=16",
                                                   "model.frames=[2,4]"], "1..5", "2,4")
    assert "tea50" in capsys.readouterr().out
    assert list(results) == ["1", "2", "3", "4", "5"]
    assert "layer1.0.me.bn3" in rows and "layer4.2.bns.2" in rows
