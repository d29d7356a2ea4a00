"""Synchronised frequency-indexed BN (``ffn_kernels.sync_batchnorm``) on ffnified models, which call ``bn(x)`` and
leave the layout to the ``frame_layout`` context: 2 gloo processes with half the clips each equal
one process with all of them (outputs, running statistics, summed gradients), timm's
activation-fused BN included; ``ffn train model.arch=torchvision:... train.sync_bn=true`` under
torchrun equals one process with the whole batch."""

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ffn.ffnify import ffnify, first_conv, import_torchvision
from ffn_kernels import (FrameLayout, FreqBatchNorm2d, FreqBatchNormAct2d, SyncFreqBatchNorm2d,
                         SyncFreqBatchNormAct2d, convert_sync_freq_batchnorm, frame_layout)

ROOT = Path(__file__).resolve().parents[1]
FRAMES = (2, 4)
CLIPS = 4  # split 2 + 2 over the two processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn1(self.conv1(x)))


def build() -> nn.Module:
    """A tiny ffnified CNN (same weights in every process) whose stem BN is a FreqBatchNormAct2d,
    what ffnify makes of timm's BatchNormAct2d (built here by hand: timm is not needed)."""
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        Block(8), Block(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    video = ffnify(cnn, FRAMES, blocks=lambda name, m: first_conv(m) if isinstance(m, Block) else None)
    stem = FreqBatchNormAct2d(8, len(FRAMES), act=nn.ReLU(inplace=True))
    stem.load_state_dict(cnn[1].state_dict())
    cnn[1], cnn[2] = stem, nn.Identity()
    with torch.no_grad():  # rows that differ per branch
        for m in video.modules():
            if isinstance(m, FreqBatchNorm2d):
                m.weight.normal_(1, 0.2), m.bias.normal_(0, 0.2), m.running_var.uniform_(0.5, 1.5)
    return video


def inputs() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    clips = [torch.randn(CLIPS, t, 3, 8, 8, generator=g) for t in FRAMES]
    cotangents = [torch.randn(CLIPS, 3, generator=g) for _ in FRAMES]
    return clips, cotangents


def step(rank: int, world: int) -> dict:
    """One training forward and backward on this rank's clips, after convert_sync_freq_batchnorm."""
    video = convert_sync_freq_batchnorm(build())
    assert type(video.backbone[1]) is SyncFreqBatchNormAct2d and isinstance(video.backbone[1].act, nn.ReLU)
    assert type(video.backbone[3].bn1) is SyncFreqBatchNorm2d
    clips, cotangents = inputs()
    part = slice(rank * CLIPS // world, (rank + 1) * CLIPS // world)
    outs = video([x[part] for x in clips])
    sum((o * c[part]).sum() for o, c in zip(outs, cotangents)).backward()
    grads = {name: p.grad.clone() for name, p in video.named_parameters()}
    if world > 1:
        for g in grads.values():
            dist.all_reduce(g)
    return {"outs": [o.detach() for o in outs], "grads": grads,
            "buffers": {name: b.clone() for name, b in video.named_buffers()}}


def worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(step(rank, world), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sync_bn_of_an_ffnified_model_on_two_processes_equals_one_process(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = step(0, 1)  # no process group: the fused op on all clips
    tol = dict(rtol=1e-4, atol=1e-5)  # the synchronised path sums in another order
    for b, want in enumerate(single["outs"]):
        torch.testing.assert_close(torch.cat([r["outs"][b] for r in ranks]), want, **tol, msg=f"branch {b}")
    for r in ranks:
        for name, want in single["buffers"].items():  # the statistics of all clips, on every rank
            torch.testing.assert_close(r["buffers"][name], want, **tol, msg=name)
        for name, want in single["grads"].items():  # DDP's all-reduced gradients are these sums
            torch.testing.assert_close(r["grads"][name], want, **tol, msg=name)


def test_sync_bn_takes_the_layout_from_the_context_and_an_explicit_one_wins():
    bn = convert_sync_freq_batchnorm(nn.Sequential(FreqBatchNorm2d(4, 2)))[0]
    assert type(bn) is SyncFreqBatchNorm2d
    x = torch.randn(6, 4, 3, 3)
    layout, other = FrameLayout(clips=2, frames=(1, 2), rows=(0, 1)), FrameLayout.single(2, 3, row=1)
    with torch.no_grad():
        bn.weight[1].mul_(3)
    bn.eval()
    with frame_layout(layout):
        torch.testing.assert_close(bn(x), bn(x, layout))
        assert not torch.allclose(bn(x), bn(x, other))  # the explicit layout wins
    with pytest.raises(TypeError, match="SyncFreqBatchNorm2d needs a FrameLayout"):
        bn(x)


def test_an_unknown_freq_batch_norm_subclass_is_refused_by_the_conversion():
    class Mine(FreqBatchNorm2d):
        pass

    model = nn.Sequential(FreqBatchNorm2d(4, 2), nn.Sequential(Mine(4, 2)))
    with pytest.raises(ValueError, match=r"module '1.0' \(.*Mine\) is a FreqBatchNorm2d subclass"):
        convert_sync_freq_batchnorm(model)
    assert type(model[0]) is FreqBatchNorm2d  # nothing converted


def test_ffn_train_a_torchvision_arch_with_sync_bn_on_two_processes(tmp_path):
    """torchrun x 2 processes x 2 clips equals 1 process x 4 clips (as tests/test_train.py's DDP test
    for FFNResNet)."""
    try:
        import_torchvision()
    except ImportError:
        pytest.skip("torchvision is not installed (pip install 'ffn-kernels[torchvision]')")
    from ffn.config import load_config
    from ffn.engine import checkpoint
    from ffn.engine.trainer import fit

    # 64 px, 2 and 4 frames: a random MobileNetV2 normalising 1x1 maps of a few frames amplifies
    # float32 rounding (which the two processes' synchronised sums and one process's fused op
    # round differently) beyond any tolerance
    common = ["data.synthetic.train_videos=4", "data.synthetic.val_videos=2", "data.synthetic.num_frames=4",
              "data.synthetic.frame_size=64", "data.size=64", "data.scale_size=64", "data.workers=0",
              "model.frames=[2,4]", "model.dropout=0", "train.epochs=1", "train.progress=false",
              "optim.warmup_epochs=0", "model.arch=torchvision:mobilenet_v2", "train.sync_bn=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "ffn", "train", *common, "data.batch_size=2",
           f"train.out={tmp_path / 'ddp'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ffnify MobileNetV2: 52 per-branch BatchNorm2d") == 1  # the main process's

    fit(load_config(overrides=[*common, "data.batch_size=4", f"train.out={tmp_path / 'single'}"]))
    ddp, single = (checkpoint.load(tmp_path / run / "last.pt") for run in ("ddp", "single"))
    # the forward: the running statistics of all 4 clips on both (rank 0's 2 clips alone differ
    # by far more), the same loss
    for key, value in single["model"].items():
        if "running_" in key:
            torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    (row_ddp,), (row_single,) = (list(csv.DictReader(open(tmp_path / run / "log.csv"))) for run in ("ddp", "single"))
    assert float(row_ddp["loss"]) == pytest.approx(float(row_single["loss"]), rel=1e-5)
    # the step: float32 gradients of a random MobileNetV2's stem, through 52 BNs of a few frames,
    # are ill-conditioned: the fused op's are about 2% off float64 there (nn.BatchNorm2d's about
    # 0.6%, the synchronised path's less), so the weights after one step agree to 1e-3, not 1e-5
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key].float(), value.float(), rtol=0, atol=1e-3, msg=key)
