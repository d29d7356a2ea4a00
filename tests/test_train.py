"""Training and evaluation: config, optimizer policy, AMP clipping, `ffn train` / `ffn eval` end to
end, exact resume, 2-process gloo DDP with synchronised frequency-indexed BN, skipping bad videos."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ffn.cli import main, parse_frames
from ffn.config import load_config
from ffn.data import BadSampleError
from ffn.engine import checkpoint, distributed
from ffn.engine.optim import build_optimizer, lr_factor
from ffn.engine.trainer import Trainer, fit
from ffn.models import FFNResNet

ROOT = Path(__file__).resolve().parents[1]

# a tiny run: ResNet-18 on 16x16 crops of 8-frame synthetic videos, branches of 2 and 4 frames
TINY = [
    "data.synthetic.train_videos=8", "data.synthetic.val_videos=6", "data.synthetic.num_frames=8",
    "data.synthetic.frame_size=20", "data.size=16", "data.batch_size=4", "data.workers=0",
    "model.arch=resnet18", "model.frames=[2,4]", "model.dropout=0", "optim.lr=0.01",
    "optim.warmup_epochs=0.5", "train.epochs=1", "train.progress=false",
]


def tiny(tmp_path, *extra) -> list[str]:
    return [*TINY, f"train.out={tmp_path}", *extra]


def child_env(**extra) -> dict:
    """Environment of a child Python process that imports this checkout."""
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra}


def read_log(out) -> list[dict]:
    with open(Path(out) / "log.csv") as f:
        return list(csv.DictReader(f))


# --- config, optimizer, schedule -----------------------------------------------------------------

def test_config_files_and_overrides(tmp_path):
    (tmp_path / "c.toml").write_text('[optim]\nlr = 0.5\n[model]\nframes = [8, 16]\n')
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 0.5\nmodel:\n  frames: [8, 16]\n")
    for name in ("c.toml", "c.yaml"):
        cfg = load_config(tmp_path / name, ["optim.lr=0.1", "data.synthetic.num_classes=6"])
        assert cfg.optim.lr == 0.1 and cfg.model.frames == [8, 16] and cfg.data.synthetic.num_classes == 6
    with pytest.raises(ValueError, match=r"optim: unknown key\(s\) \['lrr'\]"):
        load_config(overrides=["optim.lrr=1"])
    with pytest.raises(ValueError, match="optim.amp"):
        load_config(overrides=["optim.amp=fp8"])
    assert parse_frames("2..5,8") == [2, 3, 4, 5, 8]
    import argparse
    with pytest.raises(argparse.ArgumentTypeError, match="1..1024"):  # built 10^8 counts before
        parse_frames("1..100000000")


def test_parameter_groups_follow_the_tsm_policy():
    model = FFNResNet(18, (2, 4), num_classes=3)
    cfg = load_config(overrides=["optim.lr=0.1", "optim.weight_decay=0.001"]).optim
    groups = {g["name"]: g for g in build_optimizer(model, cfg).param_groups}
    assert {id(p) for p in groups["fc_weight"]["params"]} == {id(model.fc.weight)}
    assert groups["fc_weight"]["lr"] == pytest.approx(0.5) and groups["fc_weight"]["weight_decay"] == 0.001
    assert groups["fc_bias"]["lr"] == pytest.approx(1.0) and groups["fc_bias"]["weight_decay"] == 0
    bn = {id(model.bn1.weight), id(model.bn1.bias), id(model.layer1[0].bn2.weight)}
    assert bn <= {id(p) for p in groups["bn"]["params"]} and groups["bn"]["weight_decay"] == 0
    weights = {id(p) for p in groups["weight"]["params"]}
    assert {id(model.conv1.weight), id(model.layer2[0].alter.weight)} <= weights
    assert groups["weight"]["lr"] == pytest.approx(0.1) and groups["weight"]["weight_decay"] == 0.001
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_lr_schedules():
    cos = load_config(overrides=["optim.warmup_epochs=1"]).optim
    assert [lr_factor(s, cos, 3, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, cos, 3, 4) == 1.0 and lr_factor(8, cos, 3, 4) == pytest.approx(0.5)
    assert lr_factor(12, cos, 3, 4) == pytest.approx(0.0)
    step = load_config(overrides=["optim.schedule=step", "optim.milestones=[1,2]"]).optim
    assert [lr_factor(s, step, 3, 4) for s in (3, 4, 8)] == pytest.approx([1, 0.1, 0.01])


def test_gradient_clipping_runs_on_unscaled_gradients_under_amp(tmp_path):
    cfg = load_config(overrides=tiny(tmp_path, "optim.amp=fp16", "optim.clip_grad=1e-3", "optim.lr=1",
                                     "optim.momentum=0", "optim.weight_decay=0", "optim.warmup_epochs=0",
                                     "optim.fc_lr_mult=1", "optim.schedule=step"))
    trainer = Trainer(cfg, *distributed.setup("cpu"))
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() > 1
    before = [p.detach().clone() for p in trainer.model.parameters()]
    batch = next(iter(trainer.loader))
    trainer.step(trainer.model, batch)
    # plain SGD with lr 1 moves the weights by the clipped gradient: norm 1e-3 (x2 for biases)
    moved = torch.stack([(p.detach() - b).norm() for p, b in zip(trainer.model.parameters(), before)]).norm()
    assert 0 < moved <= 2.01e-3


# --- ffn train / ffn eval ------------------------------------------------------------------------

def test_train_then_eval_ffn_and_a_single_frame_count_baseline(tmp_path, capsys):
    assert main(["train", *tiny(tmp_path / "ffn")]) == 0
    assert main(["train", *tiny(tmp_path / "tsm4", "model.frames=[4]", "model.weight_alteration=false",
                                "model.impl=eager")]) == 0
    for run in ("ffn", "tsm4"):
        assert {p.name for p in (tmp_path / run).iterdir()} == {"last.pt", "best.pt", "config.yaml", "log.csv",
                                                                 "log.jsonl", "log.png"}
    (row,) = read_log(tmp_path / "ffn")
    assert {"val_top1@2", "val_top1@4", "train_top1@2", "loss", "kl", "clips_per_s"} <= set(row)
    assert float(row["skipped"]) == 0 and 0 <= float(row["val_top1@2"]) <= 100
    assert list(json.loads((tmp_path / "ffn" / "log.jsonl").read_text())) == list(row)

    out = tmp_path / "eval"
    assert main(["eval", str(tmp_path / "ffn" / "last.pt"), str(tmp_path / "tsm4" / "last.pt"),
                 "--frames", "1..5", "--out", str(out), "data.batch_size=3"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["ffn", "tsm4"] and list(results["ffn"]) == ["1", "2", "3", "4", "5"]
    assert all(v["videos"] == 6 and 0 <= v["top1"] <= v["top5"] <= 100
               for r in results.values() for v in r.values())
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "| frames | ffn | tsm4 |" in (out / "results.md").read_text()
    printed = capsys.readouterr()
    assert "| 5 |" in printed.out
    # recorded output (not a terminal): a line per frame count on stderr, no bar's \r frames
    assert "eval tsm4: frame count 5/5, frames 5, top1 " in printed.err and "\r" not in printed.err


DEMO_SMALL = ["data.synthetic.train_videos=4", "data.synthetic.val_videos=3", "data.synthetic.num_frames=16",
              "data.synthetic.frame_size=16", "data.size=16", "data.scale_size=16", "data.batch_size=4",
              "data.workers=0", "train.epochs=1", "train.progress=false"]


def test_demo_compares_ffn_with_separated_training_over_seeds(tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["demo", "--out", str(out), "--seeds", "2", *DEMO_SMALL]) == 0
    for seed in (0, 1):
        assert {p.name for p in (out / f"seed{seed}").iterdir()} == {"tsm16", "st4", "st8", "ffn"}
    assert [r["epoch"] for r in read_log(out / "seed1" / "st4")] == ["1"]
    runs = json.loads((out / "seeds.json").read_text())
    assert runs["st8"][1]["settings"] == ["model.frames=[8]", "model.weight_alteration=false", "train.seed=1",
                                          *DEMO_SMALL]
    # the ST row is, at each count, the nearest ST model's accuracy there: ST-4 up to 5, ST-8 6..11
    summary = json.loads((out / "results.json").read_text())
    assert list(summary) == ["TSM, trained at 16", "ST, nearest of 4/8/16", "FFN, trained at 4/8/16"]
    for n, model in ((5, "st4"), (6, "st8"), (11, "st8"), (12, "tsm16")):
        top1 = [runs[model][s]["results"][str(n)]["top1"] for s in (0, 1)]
        cell = summary["ST, nearest of 4/8/16"][str(n)]
        assert (cell["top1"], cell["top1_min"], cell["top1_max"]) == (sum(top1) / 2, min(top1), max(top1))
    report = (out / "report.md").read_text()
    assert "| frames | TSM, trained at 16 | ST, nearest of 4/8/16 | FFN, trained at 4/8/16 |" in report
    assert "- 16 frames, FFN vs ST-16 (the TSM-16): " in report and "threads" in report
    assert "| parameters stored |" in report and "| 16 | " in report.split("| frames | GFLOPs")[1]
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    # same command, same machine and threads: the same tables; --resume reuses the finished models
    assert main(["demo", "--out", str(tmp_path / "b"), "--seeds", "2", *DEMO_SMALL]) == 0
    assert (tmp_path / "b" / "seeds.json").read_text().count('"top1"') == 2 * 4 * 19
    assert strip_minutes(tmp_path / "b" / "seeds.json") == strip_minutes(out / "seeds.json")
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--seeds", "2", "--resume", *DEMO_SMALL]) == 0
    assert capsys.readouterr().out.count("finished before, reused") == 8
    assert json.loads((out / "results.json").read_text()) == summary


def strip_minutes(path) -> list:
    """A demo's per-model records without their (timed) training minutes."""
    runs = json.loads(path.read_text())
    return [{k: v for k, v in r.items() if k != "train_minutes"} for records in runs.values() for r in records]


def test_checkpoints_load_weights_only_and_hold_the_whole_state(tmp_path):
    fit(load_config(overrides=tiny(tmp_path, "optim.amp=bf16")))
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {"epoch", "best", "config", "model", "optimizer", "scheduler", "scaler", "rng"} <= set(state)
    assert state["epoch"] == 1 and state["config"]["optim"]["amp"] == "bf16"
    assert not list(tmp_path.glob("*.tmp"))


# The interrupted run is SIGKILLed (no finally blocks, no flush) as it starts its second epoch.
KILL_IN_SECOND_EPOCH = """
import os, signal, sys
from ffn.cli import main
from ffn.engine.trainer import Trainer
train_epoch = Trainer.train_epoch
def kill_in_second_epoch(self, net, epoch):
    if epoch == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return train_epoch(self, net, epoch)
Trainer.train_epoch = kill_in_second_epoch
main(["train", *sys.argv[1:]])
"""


def test_resume_after_a_kill_continues_exactly(tmp_path):
    args = ["train.epochs=2", "model.dropout=0.5", "data.synthetic.train_videos=12"]
    fit(load_config(overrides=tiny(tmp_path / "straight", *args)))

    proc = subprocess.run([sys.executable, "-c", KILL_IN_SECOND_EPOCH, *tiny(tmp_path / "resumed", *args)],
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert checkpoint.load(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    assert main(["train", *tiny(tmp_path / "resumed", *args), "--resume"]) == 0

    a, b = (checkpoint.load(tmp_path / run / "last.pt") for run in ("straight", "resumed"))
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"] and torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    drop = {"clips_per_s", "epoch_s"}
    rows = [[{k: v for k, v in r.items() if k not in drop} for r in read_log(tmp_path / run)]
            for run in ("straight", "resumed")]
    assert rows[0] == rows[1] and len(rows[0]) == 2


# --- kills while an epoch's outputs are saved, resume, run folders ----------------------------------

# width 8 on 8x8 crops, one step per epoch, 2 epochs: a run takes a few seconds
SMALL = [
    "data.synthetic.train_videos=4", "data.synthetic.val_videos=2", "data.synthetic.num_frames=4",
    "data.synthetic.frame_size=16", "data.size=8", "data.scale_size=8", "data.batch_size=2",
    "data.workers=0", "model.frames=[1,2]", "model.width=8", "model.dropout=0.5", "train.epochs=2",
    "train.max_steps=1", "train.progress=false",
]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 2-epoch run of SMALL."""
    out = tmp_path_factory.mktemp("straight")
    assert main(["train", *SMALL, "--out", str(out)]) == 0
    return out


def same_run(a, b) -> None:
    """Runs ``a`` and ``b`` hold the same checkpoints and log rows (timings aside)."""
    for name in ("last.pt", "best.pt"):
        sa, sb = checkpoint.load(Path(a) / name), checkpoint.load(Path(b) / name)
        assert (sa["epoch"], sa["best"]) == (sb["epoch"], sb["best"]), name
        for key, value in sa["model"].items():
            assert torch.equal(value, sb["model"][key]), (name, key)
    drop = {"clips_per_s", "epoch_s"}
    rows = [[{k: v for k, v in r.items() if k not in drop} for r in read_log(run)] for run in (a, b)]
    assert rows[0] == rows[1]


# Points of an epoch's save (ffn.engine.checkpoint.kill_point): best.pt.tmp = the temporary file
# open and empty (the kill of the issue), best.pt = best.pt in place but last.pt not yet, log.jsonl =
# the log row written but no checkpoint of its epoch
@pytest.mark.parametrize("point,rows,last,best", [
    ("epoch1:best.pt.tmp", [1], None, None), ("epoch1:best.pt", [1], None, 1), ("epoch2:log.jsonl", [1, 2], 1, 1),
])
def test_a_kill_while_an_epoch_is_saved_resumes_to_the_same_run(tmp_path, straight, point, rows, last, best):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "ffn", "train", *SMALL, "--out", str(out)],
                          env=child_env(FFN_TEST_KILL_AT=point),  # same threads: same sums
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # what the kill left: whole checkpoints of completed epochs, whole log rows (at most one more)
    for name, epoch in (("last.pt", last), ("best.pt", best)):
        assert (checkpoint.load(out / name)["epoch"] if (out / name).exists() else None) == epoch, name
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == rows

    assert main(["train", *SMALL, "--out", str(out), "--resume"]) == 0
    same_run(straight, out)
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.yaml", "last.pt", "log.csv", "log.jsonl",
                                                     "log.png"]


def test_resume_takes_the_checkpoints_config_and_says_what_it_changes(tmp_path, straight, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "train.epochs=3"]) == 0  # no config given again
    printed = capsys.readouterr().out
    assert "train.epochs: 2 -> 3" in printed and "train.out" in printed
    state = checkpoint.load(out / "last.pt")
    assert state["epoch"] == 3 and state["config"]["train"]["epochs"] == 3
    assert state["config"]["model"]["width"] == 8 and [r["epoch"] for r in read_log(out)] == ["1", "2", "3"]
    # a change the restored state would not follow is refused, naming the key and both values
    with pytest.raises(ValueError, match=r"optim.lr: 0.01 -> 0.5"):
        fit(load_config(overrides=[*SMALL, f"train.out={out}", "train.epochs=4", "optim.lr=0.5"]), out / "last.pt")
    assert checkpoint.load(out / "last.pt")["epoch"] == 3


def test_a_new_run_into_a_folder_holding_one_is_refused_unless_overwrite(tmp_path, straight):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    with pytest.raises(ValueError, match="--resume.*--overwrite"):
        fit(load_config(overrides=[*SMALL, f"train.out={out}"]))
    assert checkpoint.load(out / "last.pt")["epoch"] == 2 and len(read_log(out)) == 2
    assert main(["train", *SMALL, "--out", str(out), "train.epochs=1", "--overwrite"]) == 0
    assert checkpoint.load(out / "last.pt")["epoch"] == 1 and len(read_log(out)) == 1


def test_ddp_gloo_two_processes_match_one_process_with_sync_bn(tmp_path):
    """2 ranks x 2 clips with all-reduced per-branch BN statistics take the same steps as 1 process x 4
    clips: same permutation, same augmentation, same global statistics, averaged gradients."""
    common = ["data.synthetic.train_videos=8", "data.batch_size=2", "train.epochs=1", "train.sync_bn=true",
              "optim.warmup_epochs=0"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = child_env(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "ffn", "train", *tiny(tmp_path / "ddp", *common)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    fit(load_config(overrides=tiny(tmp_path / "single", *common, "data.batch_size=4")))
    ddp, single = (checkpoint.load(tmp_path / run / "last.pt") for run in ("ddp", "single"))
    assert len(ddp["rng"]) == 2
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    (row_ddp,), (row_single,) = read_log(tmp_path / "ddp"), read_log(tmp_path / "single")
    for key in ("val_top1@2", "val_top1@4", "train_top1@4"):
        assert row_ddp[key] == row_single[key], key
    assert float(row_ddp["loss"]) == pytest.approx(float(row_single["loss"]), rel=1e-4)


# --- bad videos ----------------------------------------------------------------------------------

def test_training_on_frame_folders_raises_on_a_missing_frame_or_skips_it(tmp_path, capsys):
    from PIL import Image
    import numpy as np

    lines = []
    for v in range(8):
        folder = tmp_path / "frames" / f"v{v}"
        folder.mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((20, 24, 3), 25 * v + 5 * i, np.uint8)).save(folder / f"{i + 1:05d}.jpg")
        lines.append(f"v{v} 6 {v % 2}")
    (tmp_path / "list.txt").write_text("\n".join(lines))
    for i in range(4, 7):  # every clip of v3 needs one of these
        (tmp_path / "frames" / "v3" / f"{i:05d}.jpg").unlink()
    data = ["data.kind=frames", f"data.root={tmp_path / 'frames'}", f"data.train_list={tmp_path / 'list.txt'}",
            f"data.val_list={tmp_path / 'list.txt'}", "data.template={:05d}.jpg", "data.num_classes=2",
            "data.synthetic.num_classes=2"]
    with pytest.raises(BadSampleError, match=r"v3: frame \d \(0000[456].jpg\)"):
        fit(load_config(overrides=tiny(tmp_path / "strict", *data)))
    assert main(["train", *tiny(tmp_path / "lenient", *data), "--skip-bad"]) == 0
    (row,) = read_log(tmp_path / "lenient")
    assert int(row["skipped"]) == 1 and int(row["val_skipped"]) == 1
    # eval --skip-bad says what it skipped, once per video (it printed nothing before)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "lenient" / "last.pt"), "--skip-bad", "--frames", "2..4",
                 "--out", str(tmp_path / "eval")]) == 0
    skipped = [line for line in capsys.readouterr().err.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and "v3" in skipped[0], skipped
