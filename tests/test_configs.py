"""The recipes shipped in ffn/configs: found by name from any folder, valid, and the demo's
settings unchanged (the README's demo table was measured with them)."""

import copy
import pytest

from ffn.config import SHIPPED, UserError, config_path, load_config, shipped_configs


def test_shipped_recipes_load_by_name():
    assert shipped_configs() == ["demo", "k400_tsm_ffn", "ssv2_tsm_ffn"]
    for name in shipped_configs():
        assert config_path(name) == SHIPPED / f"{name}.toml"
        load_config(name)  # every key known, every value in range


@pytest.mark.parametrize("name,classes,weight_decay,flip", [("ssv2_tsm_ffn", 174, 5e-4, False),
                                                             ("k400_tsm_ffn", 400, 1e-4, True)])
def test_paper_recipes(name, classes, weight_decay, flip):
    """FFN-pytorch 2D_Network/exp/tsm_{sthv2,k400}_FFN/run.sh: ResNet-50, 4/8/16 frames, lr 0.01
    /10 at 20 and 40 of 50 epochs, 32 clips (16 per process on 2 GPUs), AMP, gradient clip 20."""
    c = load_config(name)
    assert (c.model.arch, c.model.frames, c.model.weight_alteration, c.model.distill_weight) == \
        ("resnet50", [4, 8, 16], True, 1.0)
    assert (c.optim.lr, c.optim.schedule, c.optim.milestones, c.optim.gamma, c.train.epochs) == \
        (0.01, "step", [20, 40], 0.1, 50)
    assert (c.data.batch_size * 2, c.optim.amp, c.optim.clip_grad, c.model.dropout) == (32, "fp16", 20.0, 0.5)
    assert (c.data.num_classes, c.optim.weight_decay, c.data.flip) == (classes, weight_decay, flip)


def test_demo_recipe_is_the_demo_table_settings():
    demo = [
        "data.synthetic.task=speed", "data.synthetic.num_classes=3", "data.synthetic.travel=4",
        "data.synthetic.movers=3", "data.synthetic.noise=6", "data.synthetic.train_videos=1200",
        "data.synthetic.val_videos=300", "data.synthetic.num_frames=48", "data.synthetic.frame_size=32",
        "data.size=32", "data.scale_size=32", "data.batch_size=16", "data.workers=1",
        "model.arch=resnet18", "model.width=16", "model.dropout=0.2", "model.frames=[4,8,16]",
        "optim.lr=0.01", "optim.fc_lr_mult=1", "optim.weight_decay=1e-4", "optim.warmup_epochs=1",
        "optim.schedule=cosine", "train.epochs=8", "train.seed=0", "train.out=runs/ffn",
    ]
    assert load_config("demo") == load_config(overrides=demo)


def test_a_path_wins_and_an_unknown_name_lists_the_recipes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("")  # a file named like a recipe is the user's file
    assert config_path("demo") == tmp_path.joinpath("demo").relative_to(tmp_path)
    with pytest.raises(UserError, match=r"config file ssv2 does not exist .*demo, k400_tsm_ffn, ssv2_tsm_ffn"):
        load_config("ssv2")
    with pytest.raises(UserError, match="does not exist"):
        load_config("configs/demo.toml")  # no shipped lookup for a path


def test_overrides_leave_the_base_config_unchanged():
    """A checkpoint's config given as ``base`` is read, not written: the overrides go into a copy."""
    from ffn.config import Config, load_config

    base = Config().to_dict()
    before = copy.deepcopy(base)
    config = load_config(overrides=["optim.lr=0.5", "model.frames=[2,4]"], base=base)
    assert config.optim.lr == 0.5 and base == before
