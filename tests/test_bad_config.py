"""Bad configs and overrides, the traceback class of issue 25: every one is refused before any work
starts with one line naming the key (and file:line for YAML), exit status 2, no traceback, and no
run folder made. Run in-process through the command's entry point, on tiny synthetic settings."""

from contextlib import redirect_stderr, redirect_stdout
from fractions import Fraction
from io import StringIO

import numpy as np
import pytest
import torch

from ffn.cli import main
from ffn.config import MAX_YAML_DEPTH, Config, UserError, check_config, load_config
from ffn.engine.trainer import fit
from conftest import TINY_RUN as TINY


DEEP = "[" * 5000 + "]" * 5000
# config files: name -> text
FILES = {
    "dup_table.yaml": "optim:\n  lr: 0.1\ntrain:\n  epochs: 2\noptim:\n  momentum: 0.5\n",
    "dup_key.yaml": "optim:\n  lr: 0.1\n  lr: 0.2\n",
    "int_key.yaml": "optim:\n  lr: 0.1\n  1: 2\n",
    "float_key.yaml": "optim: {lr: 0.1, 2.5: x}\n",
    "bool_key.yaml": "train:\n  yes: 1\n",
    "null_key.yaml": "train:\n  ~: 1\n",
    "list_key.yaml": "train:\n  ? [a, b]\n  : 1\n",
    "date.yaml": "train:\n  out: 2024-01-01\n",
    "set.yaml": "train:\n  out: !!set {a, b}\n",
    "binary.yaml": "train:\n  out: !!binary aGVsbG8=\n",
    "omap.yaml": "train:\n  out: !!omap [a: 1]\n",
    "pairs.yaml": "train:\n  out: !!pairs [a: 1]\n",
    "pyobj.yaml": "train:\n  out: !!python/name:os.system\n",
    "merge_odd.yaml": "base: &b 3\noptim:\n  <<: *b\n",
    "deep_list.yaml": f"model:\n  frames: {DEEP}\n",
    "deep_map.yaml": "".join("  " * i + f"k{i}:\n" for i in range(5000)) + "  " * 5000 + "x\n",
    "laughs.yaml": "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                   "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nmodel:\n  frames: [*c, *c, *c, *c, *c, *c]\n",
    "range.yaml": "optim:\n  lr: 100\n",
    "str_for_int.yaml": "train:\n  log_every: '8'\n",
    "dup.toml": "[optim]\nlr = 0.1\n[optim]\nmomentum = 0.5\n",
    "deep.toml": f"a = {DEEP}\n",
    "date.toml": "[data]\nroot = 2024-01-01\n",
    "table.json": "{}\n",
    "unknown.toml": "[model]\narch = \"resnet18\"\nwidht = 8\n",
    "unknown.yaml": "data:\n  synthetic: {nosie: 3}\n",
}

# (command line: {w} is the fixture folder, text the error line must hold)
CASES = [
    # integers: ranges, and bounds of what can be allocated (the bound is stated)
    ("train train.seed=-1", "config train.seed: must be 0..2147483647"),
    ("train train.seed=4294967296", "config train.seed: 4294967296 is beyond"),
    ("train train.seed=true", "config train.seed: expected int"),
    ("train model.width=1e8", "config model.width: expected int"),
    ("train model.width=100000000", "config model.width: must be 1..1024"),
    ("train model.width=0", "config model.width"),
    ("train model.width=8.0", "config model.width: expected int"),
    ("train data.size=100000", "config data.size: must be 1..4096"),
    ("train data.scale_size=100000", "config data.scale_size"),
    ("train data.synthetic.frame_size=100000000", "config data.synthetic.frame_size: must be 8..4096"),
    ("train data.batch_size=1000000000", "config data.batch_size: a step's input"),
    ("train data.batch_size=100000 data.size=64 data.scale_size=0", "2,147,483,647"),
    ("train data.workers=100000", "config data.workers: must be 0.."),
    ("train data.num_classes=1", "config data.num_classes"),
    ("train data.num_classes=10000000", "config data.num_classes: must be 2..100000"),
    ("train data.synthetic.train_videos=100000000000", "config data.synthetic.train_videos"),
    ("train data.synthetic.val_videos=20000000", "config data.synthetic.val_videos: must be 1..10000000"),
    ("train data.synthetic.movers=1000", "config data.synthetic.movers"),
    ("train data.synthetic.num_classes=1000000", "config data.synthetic.num_classes"),
    ("train train.epochs=99999999999", "config train.epochs"),
    ("train train.max_steps=-5", "config train.max_steps"),
    ("train train.log_every=0", "config train.log_every"),
    ("train train.dist_timeout=0", "config train.dist_timeout"),
    ("train train.dist_timeout=nan", "config train.dist_timeout"),
    ("train data.start_index=-1", "config data.start_index"),
    # lists of integers
    ("train model.frames=[1,1e9]", "config model.frames[1]: expected int"),
    ("train model.frames=[1,1000000000]", "config model.frames: must be frame counts in 1..1024"),
    ("train model.frames=[]", "config model.frames"),
    (f"train model.frames={DEEP}", "config model.frames"),
    (f"train model.frames=[{','.join(map(str, range(1, 2000)))}]", "config model.frames: at most 1024 values"),
    ("train optim.milestones=[1,2e9]", "config optim.milestones[1]"),
    ("train optim.milestones=[3,2]", "config optim.milestones"),
    # floats
    ("train optim.lr=1e30", "config optim.lr: must be a finite number > 0 and <= 10"),
    ("train optim.lr=1e999", "config optim.lr"),
    ("train optim.lr=inf", "config optim.lr"),
    ("train optim.lr=[1,2]", "config optim.lr: expected float"),
    ("train optim.weight_decay=5", "config optim.weight_decay"),
    ("train optim.fc_lr_mult=1e9", "config optim.fc_lr_mult"),
    ("train model.distill_weight=1e12", "config model.distill_weight"),
    ("train data.synthetic.noise=1e400", "config data.synthetic.noise"),
    # strings, choices, tables, keys
    ("train optim.amp=fp8", "config optim.amp"),
    ("train model.impl=yes", "config model.impl"),
    ("train --out=", "config train.out (--out): must name a folder"),
    ("train optim=3", "config optim: expected a table"),
    ("train optim.lr.x=1", "config optim.lr: expected float"),
    ("train optim.lr=0.1 optim.lr.x=1", "config optim.lr is not a table"),
    ("train =3", "expected key.sub=value"),
    ("train optim.nope=1", "'nope'"),
    # config files: file:line for YAML
    ("train --config {w}/dup_table.yaml", "dup_table.yaml:5: duplicate key 'optim'"),
    ("train --config {w}/dup_key.yaml", "dup_key.yaml:3: duplicate key 'lr'"),
    ("train --config {w}/int_key.yaml", "int_key.yaml:3: key '1' is not a string"),
    ("train --config {w}/float_key.yaml", "float_key.yaml:1: key '2.5' is not a string"),
    ("train --config {w}/bool_key.yaml", "bool_key.yaml:2: key 'yes' is not a string"),
    ("train --config {w}/null_key.yaml", "null_key.yaml:2"),
    ("train --config {w}/list_key.yaml", "list_key.yaml:2"),
    ("train --config {w}/date.yaml", "date.yaml:2: a timestamp is not a config value"),
    ("train --config {w}/set.yaml", "set.yaml:2: a set is not a config value"),
    ("train --config {w}/binary.yaml", "binary.yaml:2: a binary is not a config value"),
    ("train --config {w}/omap.yaml", "omap.yaml:2: a omap"),
    ("train --config {w}/pairs.yaml", "pairs.yaml:2: a pairs"),
    ("train --config {w}/pyobj.yaml", "pyobj.yaml:2: could not determine a constructor"),
    ("train --config {w}/merge_odd.yaml", "merge_odd.yaml:1: expected a mapping"),
    ("train --config {w}/deep_list.yaml", f"deep_list.yaml:2: nested more than {MAX_YAML_DEPTH} levels"),
    ("train --config {w}/deep_map.yaml", f"nested more than {MAX_YAML_DEPTH} levels"),
    ("train --config {w}/laughs.yaml", "config root: unknown key(s)"),
    ("train --config {w}/range.yaml", "range.yaml:2: config optim.lr: must be"),
    ("train --config {w}/str_for_int.yaml", "str_for_int.yaml:2: config train.log_every: expected int"),
    ("train --config {w}/dup.toml", "dup.toml"),
    ("train --config {w}/deep.toml", "deep.toml: nested too deeply"),
    ("train --config {w}/date.toml", "date.toml:2: config data.root: expected str"),
    ("train --config {w}/unknown.toml", "unknown.toml:3: config model: unknown key(s) ['widht']"),
    ("train --config {w}/unknown.yaml", "unknown.yaml:2: config data.synthetic: unknown key(s) ['nosie']"),
    ("train --config {w}/table.json", "use .toml, .yaml or .yml"),
    # output folders, checked before any work (eval's after all of it, before)
    ("eval {w}/run/last.pt --out {w}/afile", "--out {w}/afile is a file, not a folder"),
    ("eval {w}/run/last.pt --out {w}/afile/sub", "is a file, not a folder"),
    ("diagnose {w}/run/last.pt --out {w}/afile", "--out {w}/afile is a file"),
    ("demo --out {w}/afile", "--out {w}/afile is a file"),
    ("train --out {w}/afile", "train.out (--out) {w}/afile is a file"),
    ("train --out {w}/afile/sub", "is a file, not a folder"),
    # initial weights that are not a checkpoint: one line of ours, not torch's advice
    ("train model.pretrained={w}/missing.pt", "config model.pretrained: checkpoint {w}/missing.pt does not exist"),
    ("train model.pretrained={w}/empty.pt", "config model.pretrained: checkpoint {w}/empty.pt is empty"),
    ("train model.pretrained={w}/random.pt", "config model.pretrained: checkpoint {w}/random.pt"),
    ("train model.pretrained={w}/pickled.pt", "config model.pretrained: checkpoint {w}/pickled.pt"),
    ("train model.pretrained={w}/tensor.pt", "config model.pretrained"),
]


INPUTS = ("afile", "empty.pt", "random.pt", "pickled.pt", "tensor.pt")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = tmp_path_factory.mktemp("badcfg")
    for name, text in FILES.items():
        (w / name).write_text(text)
    for name in INPUTS:
        (w / name).touch()
    (w / "afile").write_text("not a folder\n")
    (w / "empty.pt").write_bytes(b"")
    (w / "random.pt").write_bytes(np.random.default_rng(0).bytes(300))
    torch.save({"weights": Fraction(1, 2)}, w / "pickled.pt")  # a class weights_only refuses
    torch.save(torch.zeros(3), w / "tensor.pt")
    (w / "run").mkdir()
    (w / "run" / "last.pt").write_bytes(b"a checkpoint: read only once the arguments are found good")
    return w


def run(line: str, w, out) -> tuple[int, str]:
    """``ffn LINE`` (``train`` with the TINY settings and ``--out out`` unless it has its own)."""
    words = [word.replace("{w}", str(w)) for word in line.split()]
    if words[0] == "train":
        words = ["train", *TINY, *([] if any(w.startswith("--out") for w in words) else ["--out", str(out)]),
                 *words[1:]]
    err = StringIO()
    with redirect_stderr(err), redirect_stdout(StringIO()):
        try:
            code = main(words)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


@pytest.mark.parametrize("line,expected", CASES, ids=[line[:60] for line, _ in CASES])
def test_a_bad_config_is_one_line_naming_the_key(world, tmp_path, monkeypatch, line, expected):
    monkeypatch.chdir(world)
    new = tmp_path / "new"
    code, err = run(line, world, new)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err and "weights_only" not in err, err
    assert lines[0].startswith(f"ffn {line.split()[0]}: error: ") and expected.replace("{w}", str(world)) in lines[0]
    # nothing trained: no run folder (one made to hold its lock is removed), no results
    assert not new.exists()
    assert sorted(p.name for p in world.iterdir()) == sorted([*FILES, *INPUTS, "run"])


@pytest.mark.parametrize("key", ["train.out", "data.root", "data.train_list", "data.val_list", "model.pretrained",
                                 "data.template", "model.arch"])
@pytest.mark.parametrize("value", ["runs/exp #2", "null", "2024", "~", "yes", "1e3", "[a, b]", "{x: 1}", "a: b",
                                   "2024-01-01", "'quoted'", ""])
def test_string_keys_take_override_values_as_written(key, value):
    section, name = key.split(".")
    assert getattr(getattr(load_config(overrides=[f"{key}={value}"], ranges=False), section), name) == value


def test_python_configs_are_checked_and_normalised():
    cfg = Config()
    cfg.model.frames, cfg.train.seed, cfg.data.size = (np.int64(2), np.int32(4)), np.uint8(3), np.int16(16)
    cfg.optim.lr = np.float32(0.5)
    got = check_config(cfg)
    assert got.model.frames == [2, 4] and type(got.model.frames) is list
    assert all(type(v) is int for v in (*got.model.frames, got.train.seed, got.data.size))
    assert type(got.optim.lr) is float and got.optim.lr == 0.5
    cfg.model.width = np.int64(10**9)
    with pytest.raises(UserError, match=r"^config model.width: must be 1..1024"):
        fit(cfg)  # checked before any folder is made or model built
