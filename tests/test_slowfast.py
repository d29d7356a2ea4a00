"""FFN on SlowFast-R50 (model.arch=slowfast_r50): the model equals a reference forward written
from the official SlowFast-FFN semantics on a checkpoint in the official key naming (float64, at
the three branch counts and one in between), equals its eager twin (outputs, gradients, running
statistics), keeps clips and branches apart, loads plain PySlowFast weights into every branch row,
and trains, evaluates and diagnoses through the CLI."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import RandomWeights, clips_of, rel, train_eval_diagnose
from ffn import nearest_branch
from ffn.cli import main
from ffn.convert import load_official, load_pyslowfast
from ffn.slowfast import EagerFFNSlowFast, FFNSlowFast, slow_indices

FRAMES = (16, 32, 64)  # the official fast-pathway counts
SUFFIXES = ("4", "8", "16")  # the official BN suffixes (slow-pathway counts) of those branches
ALPHA = 4
SLOW_KT, FAST_KT = (1, 1, 3, 3), (3, 3, 3, 3)  # temporal kernels of res2..res5 (slowfast_FFN)


# --- a checkpoint in the official SlowFast-FFN naming, with random weights --------------------

def official_checkpoint(width=8, classes=5, seed=0, branches=SUFFIXES):
    """``{"model_state": ...}`` as PySlowFast saves the official ``SlowFast_FFN``, every tensor
    random (BN statistics and WA too). ``branches=None``: a plain PySlowFast SlowFast (one BN per
    layer named without a suffix, no WA)."""
    weights = RandomWeights(seed)
    sd, rnd = weights.sd, weights.rnd

    def bn(name, c):
        for key in ([f"{name}_{s}" for s in branches] if branches else [name]):
            weights.bn(key, c)

    fast = width // 8
    for p, (c, kt) in enumerate([(width, 1), (fast, 5)]):
        sd[f"s1.pathway{p}_stem.conv.weight"] = rnd(c, 3, kt, 7, 7)
        bn(f"s1.pathway{p}_stem.bn", c)

    def fuse(name, c):
        sd[f"{name}.conv_f2s.weight"] = rnd(2 * c, c, 7, 1, 1)
        bn(f"{name}.bn", 2 * c)

    fuse("s1_fuse", fast)
    cins = (width + width // 4, fast)
    for i, count in enumerate((3, 4, 6, 3)):
        outs = (width * 4 << i, (width * 4 << i) // 8)
        inners = (width << i, (width << i) // 8)
        for p, kt in enumerate((SLOW_KT[i], FAST_KT[i])):
            for j in range(count):
                b = f"s{i + 2}.pathway{p}_res{j}"
                cin = cins[p] if j == 0 else outs[p]
                if branches:
                    for s in branches:
                        sd[f"{b}.branch2.adaconv_{s}.weight"] = rnd(cin, 1, 1, 1, 1, scale=0.3)
                sd[f"{b}.branch2.a.weight"] = rnd(inners[p], cin, kt, 1, 1)
                bn(f"{b}.branch2.a_bn", inners[p])
                sd[f"{b}.branch2.b.weight"] = rnd(inners[p], inners[p], 1, 3, 3)
                bn(f"{b}.branch2.b_bn", inners[p])
                sd[f"{b}.branch2.c.weight"] = rnd(outs[p], inners[p], 1, 1, 1)
                bn(f"{b}.branch2.c_bn", outs[p])
                if j == 0:
                    sd[f"{b}.branch1.weight"] = rnd(outs[p], cin, 1, 1, 1)
                    bn(f"{b}.branch1_bn", outs[p])
        if i < 3:
            fuse(f"s{i + 2}_fuse", outs[1])
        cins = (outs[0] + outs[1] * 2, outs[1])
    sd["head.projection.weight"] = rnd(classes, sum(outs))
    sd["head.projection.bias"] = rnd(classes, scale=0.1)
    return {"epoch": 3, "model_state": sd, "cfg": "MODEL:\n  ARCH: slowfast_FFN\n"}


# --- the reference: the official SlowFast-FFN forward, written from its semantics -------------

def ref_bn(sd, name, x, training):
    return F.batch_norm(x, sd[f"{name}.running_mean"].clone(), sd[f"{name}.running_var"].clone(),
                        sd[f"{name}.weight"], sd[f"{name}.bias"], training, 0.1, 1e-5)


def ref_stem(sd, p, s, x, kt, training):
    x = F.conv3d(x, sd[f"{p}.conv.weight"], stride=(1, 2, 2), padding=(kt // 2, 3, 3))
    return F.max_pool3d(F.relu(ref_bn(sd, f"{p}.bn_{s}", x, training)), (1, 3, 3), (1, 2, 2), (0, 1, 1))


def ref_fuse(sd, p, s, slow, fast, training):
    f = F.conv3d(fast, sd[f"{p}.conv_f2s.weight"], stride=(ALPHA, 1, 1), padding=(3, 0, 0))
    return torch.cat([slow, F.relu(ref_bn(sd, f"{p}.bn_{s}", f, training))], 1)


def ref_block(sd, p, s, x, kt, stride, training):
    b2 = f"{p}.branch2"
    h = x + F.conv3d(x, sd[f"{b2}.adaconv_{s}.weight"], groups=x.shape[1])
    h = F.conv3d(h, sd[f"{b2}.a.weight"], padding=(kt // 2, 0, 0))
    h = F.relu(ref_bn(sd, f"{b2}.a_bn_{s}", h, training))
    h = F.conv3d(h, sd[f"{b2}.b.weight"], stride=(1, stride, stride), padding=(0, 1, 1))
    h = F.relu(ref_bn(sd, f"{b2}.b_bn_{s}", h, training))
    h = ref_bn(sd, f"{b2}.c_bn_{s}", F.conv3d(h, sd[f"{b2}.c.weight"]), training)
    if f"{p}.branch1.weight" in sd:
        x = ref_bn(sd, f"{p}.branch1_bn_{s}",
                   F.conv3d(x, sd[f"{p}.branch1.weight"], stride=(1, stride, stride)), training)
    return F.relu(x + h)


def reference_forward(ckpt, clips, s, training=False, slow_frames=None):
    """The official SlowFast-FFN on ``[N, T, 3, H, W]`` clips with branch ``s``'s BNs and WA: the
    slow pathway is PySlowFast's ``linspace(0, T-1, T // alpha)`` frames (``slow_frames``
    overrides the count); the pathway pools after res2 are 1x1x1 (identity). Logits, before the
    softmax the official head applies at eval."""
    sd = ckpt["model_state"]
    fast = clips.permute(0, 2, 1, 3, 4)
    t = fast.shape[2]
    slow = fast.index_select(2, torch.linspace(0, t - 1, slow_frames or t // ALPHA).long())
    slow = ref_stem(sd, "s1.pathway0_stem", s, slow, 1, training)
    fast = ref_stem(sd, "s1.pathway1_stem", s, fast, 5, training)
    slow = ref_fuse(sd, "s1_fuse", s, slow, fast, training)
    for i, count in enumerate((3, 4, 6, 3)):
        for j in range(count):
            stride = 2 if i > 0 and j == 0 else 1
            slow = ref_block(sd, f"s{i + 2}.pathway0_res{j}", s, slow, SLOW_KT[i], stride, training)
        for j in range(count):
            stride = 2 if i > 0 and j == 0 else 1
            fast = ref_block(sd, f"s{i + 2}.pathway1_res{j}", s, fast, FAST_KT[i], stride, training)
        if i < 3:
            slow = ref_fuse(sd, f"s{i + 2}_fuse", s, slow, fast, training)
    pooled = torch.cat([slow.mean((2, 3, 4)), fast.mean((2, 3, 4))], 1)
    return F.linear(pooled, sd["head.projection.weight"], sd["head.projection.bias"])


def loaded_model(ckpt, cls=FFNSlowFast):
    return load_official(cls(frames=FRAMES, num_classes=5, dropout=0.0, width=8).double(), ckpt)


@pytest.fixture(scope="module")
def official():
    ckpt = official_checkpoint()
    return ckpt, loaded_model(ckpt).eval()


@pytest.mark.parametrize("n", [16, 32, 64, 24])
def test_eval_equals_the_official_reference(official, n):
    ckpt, model = official
    clips = clips_of([n], n=2, hw=32, seed=n)[0]
    with torch.no_grad():
        ours = model(clips)
        ref = reference_forward(ckpt, clips, SUFFIXES[nearest_branch(FRAMES, n)])
    worst = float((ours - ref).abs().max() / ref.abs().max())
    print(f"slowfast_r50 eval n={n}: relative error {rel(ours, ref):.3g}, {worst:.3g} (max abs / max)")
    assert rel(ours, ref) <= 1e-5 and worst <= 1e-5


def test_a_count_alpha_does_not_divide_takes_ceil_n_over_alpha_slow_frames(official):
    ckpt, model = official
    clips = clips_of([18], n=1, hw=16, seed=18)[0]
    assert slow_indices(18, ALPHA).tolist() == [0, 4, 8, 12, 17]  # linspace(0, 17, 5), truncated
    assert slow_indices(16, ALPHA).tolist() == [0, 5, 10, 15]  # PySlowFast's rule
    with torch.no_grad():
        ref = reference_forward(ckpt, clips, "4", slow_frames=5)
        assert rel(model(clips), ref) <= 1e-5


def test_fewer_frames_than_alpha_are_refused(official):
    _, model = official
    with pytest.raises(ValueError, match="alpha=4"):
        model(clips_of([3], n=1, hw=16)[0])


def test_training_step_equals_the_official_reference_per_branch(official):
    ckpt, _ = official
    model = loaded_model(ckpt).train()
    clips = clips_of(FRAMES, n=2, hw=16, seed=1)
    outs = model(clips)
    for out, c, s in zip(outs, clips, SUFFIXES, strict=True):
        assert rel(out, reference_forward(ckpt, c, s, training=True)) <= 1e-5


def test_matches_eager_twin_float64():
    torch.manual_seed(0)
    fused = FFNSlowFast(frames=(4, 8, 12), num_classes=5, dropout=0.0, width=8).double()
    with torch.no_grad():  # non-trivial WA and final BN scales (both start near 0)
        for name, p in fused.named_parameters():
            if "adaconv" in name or "c_bn.weight" in name:
                p.normal_(0, 0.5)
    eager = EagerFFNSlowFast.twin(fused)
    clips = clips_of((4, 8, 12), n=2, hw=16, seed=2)
    results = []
    for model in (fused, eager):
        outs = model(clips)
        g = torch.Generator().manual_seed(3)
        torch.autograd.backward(outs, [torch.randn(o.shape, generator=g).double() for o in outs])
        results.append((outs, {n: p.grad for n, p in model.named_parameters()}))
    (outs_f, grads_f), (outs_e, grads_e) = results
    for a, b in zip(outs_f, outs_e, strict=True):
        assert rel(a, b) <= 1e-9
    for name, gr in grads_e.items():
        # a floor: a scale right before a training-mode BN over one channel has ~0 gradient
        assert float((grads_f[name] - gr).norm()) <= 1e-8 * max(float(gr.norm()), 1e-4), name
    buffers = dict(fused.named_buffers())
    for name, buf in eager.named_buffers():
        assert rel(buffers[name].double(), buf.double()) <= 1e-9, name
    assert int(fused.s5["pathway1_res2"].branch2.c_bn.num_batches_tracked.sum()) == 3


def test_no_frame_of_another_clip_or_branch_leaks_in(official):
    _, model = official
    clips = clips_of((16, 32), n=3, hw=16, seed=4)
    changed = [c.clone() for c in clips]
    changed[1][1] += 1.0  # clip 1 of the 32-frame branch
    with torch.no_grad():
        a, b = model(clips), model(changed)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1][[0, 2]], b[1][[0, 2]], rtol=0, atol=0)
    assert not torch.equal(a[1][1], b[1][1])


def test_bad_construction_names_the_argument():
    with pytest.raises(ValueError, match="multiples of alpha=4"):
        FFNSlowFast(frames=(16, 30), width=8)
    with pytest.raises(ValueError, match="width must be a positive multiple of 8"):
        FFNSlowFast(width=12)


def test_pyslowfast_checkpoint_initialises_every_branch_row():
    ckpt = official_checkpoint(classes=400, branches=None)
    sd = ckpt["model_state"]
    model = FFNSlowFast(frames=FRAMES, num_classes=5, width=8).double()
    fresh_wa = model.s3["pathway1_res1"].branch2.adaconv.weight.clone()
    load_pyslowfast(model, ckpt)
    for row in range(3):
        torch.testing.assert_close(model.s3["pathway0_res0"].branch1_bn.running_var[row],
                                   sd["s3.pathway0_res0.branch1_bn.running_var"])
        torch.testing.assert_close(model.s2_fuse.bn.weight[row], sd["s2_fuse.bn.weight"])
    torch.testing.assert_close(model.s4["pathway1_res2"].branch2.a.weight,
                               sd["s4.pathway1_res2.branch2.a.weight"])
    # WA and the 5-class head keep their fresh initialisation (the checkpoint's head has 400)
    torch.testing.assert_close(model.s3["pathway1_res1"].branch2.adaconv.weight, fresh_wa)
    assert model.head["projection"].weight.abs().max() < 0.1
    with pytest.raises(ValueError, match="pretrained_format=pyslowfast"):
        load_official(FFNSlowFast(frames=FRAMES, num_classes=5, width=8), ckpt)


def test_official_checkpoint_of_another_width_names_the_key():
    with pytest.raises(ValueError, match="s1.pathway0_stem.conv.weight"):
        load_official(FFNSlowFast(frames=FRAMES, num_classes=5, width=16), official_checkpoint())


def test_parameter_counts():
    model = FFNSlowFast(frames=FRAMES, num_classes=174)
    count = sum(p.numel() for p in model.parameters())
    head_in = model.head["projection"].in_features
    one = FFNSlowFast(frames=(32,), num_classes=400)  # one branch, less its WA: plain SlowFast
    plain = sum(p.numel() for n, p in one.named_parameters() if "adaconv" not in n)
    print(f"slowfast_r50 FFN params: 174 classes {count}, 400 classes {count + 226 * (head_in + 1)}; "
          f"plain SlowFast-R50 400 classes {plain}")
    assert (count, head_in, plain) == (SLOWFAST_FFN_174, 2304, SLOWFAST_PLAIN_400)


# SlowFast-R50 FFN, 3 branches, width 64 (README): 174 classes (Something-Something) 34,212,606;
# 400 (Kinetics) 34,733,536. Plain SlowFast-R50 (one BN per layer, no WA), 400 classes: 34,566,488.
SLOWFAST_FFN_174, SLOWFAST_PLAIN_400 = 34_212_606, 34_566_488


def test_ffn_train_eval_and_diagnose_slowfast(tmp_path, capsys):
    results, rows = train_eval_diagnose(tmp_path, [
        "model.arch=slowfast_r50", "data.synthetic.num_frames=8", "data.size=16", "data.scale_size=16",
        "model.frames=[4,8]"], "4..6", "4,8")
    assert "slowfast_r50" in capsys.readouterr().out
    assert list(results) == ["4", "5", "6"]
    assert "s1_fuse.bn" in rows and "s5.pathway1_res2.branch2.c_bn" in rows
    assert main(["eval", str(tmp_path / "run" / "last.pt"), "--frames", "2..6", "--out", str(tmp_path)]) != 0
    assert "at least 4 frames" in capsys.readouterr().err


@pytest.mark.parametrize("override, key", [
    ("model.frames=[4,6]", "model.frames"),
    ("model.width=12", "model.width"),
    ("model.weight_alteration=false", "model.weight_alteration"),
    ("model.pretrained=x.pyth", "model.pretrained_format"),
    ("train.sync_bn=true", "train.sync_bn"),
])
def test_config_refuses_what_slowfast_cannot_take(override, key):
    from ffn.config import UserError, load_config

    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(overrides=["model.arch=slowfast_r50", override])


def test_pyslowfast_format_is_for_slowfast_only():
    from ffn.config import UserError, load_config

    with pytest.raises(UserError, match=r"model\.pretrained_format"):
        load_config(overrides=["model.pretrained_format=pyslowfast"])


@pytest.mark.parametrize("fmt, branches", [("official", SUFFIXES), ("pyslowfast", None)])
def test_model_pretrained_reads_a_pyslowfast_file(tmp_path, fmt, branches):
    from ffn.config import load_config
    from ffn.engine.factory import build_model

    ckpt = official_checkpoint(classes=5, branches=branches)
    torch.save(ckpt, tmp_path / "sf.pyth")  # as PySlowFast saves it: epoch, cfg text, model_state
    cfg = load_config(overrides=["model.arch=slowfast_r50", "model.width=8", "model.frames=[16,32,64]",
                                 f"model.pretrained={tmp_path / 'sf.pyth'}",
                                 f"model.pretrained_format={fmt}"])
    model = build_model(cfg.model, 5)
    key = "s1_fuse.bn_16.running_mean" if branches else "s1_fuse.bn.running_mean"
    torch.testing.assert_close(model.s1_fuse.bn.running_mean[2], ckpt["model_state"][key].float())
