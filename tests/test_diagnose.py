"""``ffn diagnose``: the BN input statistics it pools equal a direct computation, the shift is 0
where the running statistics are those of the data, and the command writes its files or exits 2."""

from contextlib import redirect_stderr, redirect_stdout
from io import StringIO

import pytest
import torch

from ffn.cli import main
from ffn.config import load_config
from ffn.data import eval_dataset
from ffn.diagnose import Moments, diagnose, norm_layers
from ffn.engine.factory import build_model
from ffn.engine.trainer import fit
from ffn_kernels import FrameLayout, FreqBatchNorm2d

# ResNet-18 of width 8 on 8x8 crops; 6 validation videos in batches of 4, so the last batch is short
TINY = [
    "data.synthetic.train_videos=4", "data.synthetic.val_videos=6", "data.synthetic.num_frames=6",
    "data.synthetic.frame_size=16", "data.size=8", "data.scale_size=8", "data.batch_size=4",
    "data.workers=0", "model.frames=[2,4]", "model.width=8", "model.dropout=0", "train.epochs=1",
    "train.max_steps=1", "train.progress=false",
]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(overrides=TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.synthetic.num_classes, pretrained=False).eval()
    for m in model.modules():  # running statistics unlike those of the data, distinct per row
        if isinstance(m, FreqBatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2)
    return model, cfg


def inputs_of(model, bn, cfg, frames, fused=False):
    """Every input ``bn`` gets on the validation clips of ``frames`` frames, seen by the BN itself
    (``fused``: a block boundary, where the fused op, not the module call, gets it)."""
    seen = []
    if fused:
        fused = bn.add_relu_shift_alter
        bn.add_relu_shift_alter = lambda z, *a, **k: (seen.append(z), fused(z, *a, **k))[1]
        undo = lambda: delattr(bn, "add_relu_shift_alter")  # noqa: E731
    else:
        undo = bn.register_forward_pre_hook(lambda m, args: seen.append(args[0])).remove
    data = eval_dataset(cfg.data, frames)
    try:
        with torch.no_grad():
            for i in range(0, len(data), cfg.data.batch_size):
                clips = torch.stack([data[j][0] for j in range(i, min(i + cfg.data.batch_size, len(data)))])
                model(clips.flatten(0, 1))
    finally:
        undo()
    return torch.cat(seen).double()


@pytest.mark.parametrize("layer", ["bn1", "layer1.0.bn2", "layer2.0.downsample.bn", "layer4.1.bn1"])
def test_statistics_match_a_direct_computation(tiny, layer):
    model, cfg = tiny
    result = diagnose(model, cfg.data, [3], CPU, progress=True)
    bn = model.get_submodule(layer)
    x = inputs_of(model, bn, cfg, 3, fused=layer == "layer1.0.bn2")
    assert x.shape[0] == 6 * 3  # every video, every frame
    row = model.branch_for(3)  # 3 frames: a tie between 2 and 4, served by 4
    assert model.frames[row] == 4 and result.branch[3] == 4
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), correction=0)
    mean_r, var_r = bn.running_mean[row].double(), bn.running_var[row].double()
    expected_mean = ((mean - mean_r).abs() / (var_r + bn.eps).sqrt()).mean()
    expected_var = ((var + bn.eps) / (var_r + bn.eps)).log().abs().mean()
    assert result.layers[layer][3]["mean_shift"] == pytest.approx(expected_mean.item(), rel=1e-5)
    assert result.layers[layer][3]["var_shift"] == pytest.approx(expected_var.item(), rel=1e-5)
    assert result.accuracy[3]["videos"] == 6


def test_moments_merge_batches_exactly():
    x = torch.randn(23, 5, 3, 4, dtype=torch.float64) * 3 + 1
    m = Moments()
    for part in x.split([1, 10, 12]):
        m.add(part)
    assert m.count == 23 * 12
    torch.testing.assert_close(m.mean, x.mean((0, 2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.var, x.var((0, 2, 3), correction=0), rtol=1e-6, atol=1e-6)


def test_no_shift_where_running_statistics_are_the_datas(tiny):
    model, cfg = tiny
    model = build_model(cfg.model, cfg.data.synthetic.num_classes, pretrained=False).eval()
    model.load_state_dict(tiny[0].state_dict())
    layers = norm_layers(model)
    row = model.branch_for(4)
    # a layer's input depends on the running statistics of the layers before it: after one pass per
    # layer, copying the measured statistics into the row, every layer's input is settled
    for _ in layers:
        moments = {name: Moments() for name in layers}
        hooks = [conv.register_forward_hook(lambda c, a, out, m=moments[name]: m.add(out))
                 for name, (conv, _) in layers.items()]
        with torch.no_grad():
            data = eval_dataset(cfg.data, 4)
            model(torch.stack([data[i][0] for i in range(len(data))]).flatten(0, 1))
        for h in hooks:
            h.remove()
        for name, (_, bn) in layers.items():
            bn.running_mean[row] = moments[name].mean.float()
            bn.running_var[row] = moments[name].var.float()
    result = diagnose(model, cfg.data, [1, 4], CPU, progress=False)
    for name, by_n in result.layers.items():
        assert by_n[4]["mean_shift"] < 1e-4 and by_n[4]["var_shift"] < 1e-4, name
    # 1 frame is served by the 2-frame row, still far from these statistics
    assert result.branch[1] == 2
    assert sum(by_n[1]["mean_shift"] for by_n in result.layers.values()) > 1


def test_every_bn_layer_is_measured(tiny):
    model, _ = tiny
    names = [n for n, m in model.named_modules() if isinstance(m, FreqBatchNorm2d)]
    assert sorted(norm_layers(model)) == sorted(names) and len(names) == 20  # ResNet-18


class Plain(torch.nn.Module):
    """An FFN model other than FFNResNet: its BNs are called as modules, one of them maybe not."""

    def __init__(self, fused: bool = False):
        super().__init__()
        self.frames, self.fused = (2, 4), fused
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.bn = FreqBatchNorm2d(8, 2)
        self.bn2 = FreqBatchNorm2d(8, 2)
        self.fc = torch.nn.Linear(8, 3)

    def branch_for(self, n):
        return 0 if n < 3 else 1

    def forward(self, clips):
        n, t = clips.shape[:2]
        layout = FrameLayout.single(n, t, self.branch_for(t))
        h = self.bn(self.conv(clips.flatten(0, 1)), layout, activation="relu")
        h = self.bn2.add_relu_shift_alter(h, h, layout)[0] if self.fused else self.bn2(h, layout)
        return self.fc(h.mean((2, 3)).view(n, t, -1).mean(1))


def test_other_models_show_bn_inputs_to_hooks_on_the_bns(tiny):
    _, cfg = tiny
    torch.manual_seed(0)
    model = Plain().eval()
    result = diagnose(model, cfg.data, [4], CPU, progress=False)
    x = inputs_of(model, model.bn2, cfg, 4)
    var, mean = torch.var_mean(x, (0, 2, 3), correction=0)  # running statistics are 0 and 1
    assert result.layers["bn2"][4]["mean_shift"] == pytest.approx(
        (mean.abs() / (1 + model.bn2.eps) ** 0.5).mean().item(), rel=1e-5)
    assert list(result.layers) == ["bn", "bn2"]
    with pytest.raises(ValueError, match=r"BatchNorm layers \['bn2'\] were not seen"):
        diagnose(Plain(fused=True).eval(), cfg.data, [4], CPU, progress=False)


def run(*args):
    err = StringIO()
    with redirect_stderr(err), redirect_stdout(StringIO()):
        try:
            code = main([*args])
        except SystemExit as e:  # argparse
            code = e.code
    return code, err.getvalue()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    w = tmp_path_factory.mktemp("diag")
    fit(load_config(overrides=[*TINY, f"train.out={w / 'run'}"]))
    return w


def test_cli_writes_the_table_and_plot(run_dir):
    out = run_dir / "out"
    code, err = run("diagnose", str(run_dir / "run" / "last.pt"), str(run_dir / "run" / "best.pt"),
                    "--labels", "last", "best", "--frames", "1..2,4", "--out", str(out))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["diagnose.md", "diagnose.png", "shift.csv"]
    lines = (out / "shift.csv").read_text().splitlines()
    assert lines[0] == "model,layer,frames,branch_frames,mean_shift,var_shift"
    assert len(lines) == 1 + 2 * 20 * 3 and lines[1].startswith("last,bn1,1,2,")
    md = (out / "diagnose.md").read_text()
    assert "| frames | last | best |" in md and "| 4 |" in md
    assert (out / "diagnose.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args,expected", [
    ("{w}/nothere.pt", "nothere.pt does not exist"),
    ("{w}/run/last.pt --frames 0..4", "--frames"),
    ("{w}/run/last.pt --frames 4..2", "--frames"),
    ("{w}/run/last.pt --frames a", "--frames"),
    ("{w}/run/last.pt {w}/run/best.pt", "--labels"),
    ("{w}/run/last.pt --labels a b", "--labels"),
    ("{w}/run/last.pt model.frames=[4,8]", "model.frames=[4, 8] contradicts"),
    ("{w}/run/last.pt --out {w}/run/log.csv", "is a file"),
    ("data.size=8", "give at least one checkpoint"),
])
def test_bad_arguments_exit_2_with_one_error_line(run_dir, args, expected):
    code, err = run("diagnose", *args.replace("{w}", str(run_dir)).split())
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert expected in errors[0] and errors[0].startswith("ffn diagnose: error:"), err
