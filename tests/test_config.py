"""The shipped config tree: every pipeline builds, and none can turn one edition into another; configs
saved in older keys still read."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from balatro_train.config import CONFIG_DIR, check_config, typed_config, upgrade_saved_config

# Editions are colour effects (and cards carry text): these would change an image's true label.
FORBIDDEN = {
    "HueSaturationValue",
    "ColorJitter",
    "InvertImg",
    "ChannelShuffle",
    "ToGray",
    "RGBShift",
    "HorizontalFlip",
    "VerticalFlip",
    "Solarize",
    "ToSepia",
    "FancyPCA",
    "PlanckianJitter",
}


@pytest.fixture(scope="module")
def cfg():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=["data.image_size=48"])


@pytest.mark.parametrize("name", ["train", "val", "none", "heavy", "light", "wild"])
def test_every_pipeline_builds_and_keeps_editions_apart(cfg, name):
    targets = {t["_target_"].rsplit(".", 1)[-1] for t in cfg.transforms[name].transforms}
    assert not targets & FORBIDDEN
    pipeline = instantiate(cfg.transforms[name])
    image = pipeline(image=np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8))["image"]
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8  # the model's input layer normalises


def test_default_composition(cfg):
    assert set(cfg.tasks) == {"identification", "modifier"}
    assert cfg.tasks.identification.field == "name" and cfg.tasks.modifier.field == "modifier"
    assert cfg.model.backbone == "resnet18" and cfg.data.image_size == 48
    assert cfg.dataset.render.style == "collection"  # the real-scale demo
    # The recipe measured on it (README, "How good is a recipe"):
    assert (cfg.optimizer.optimizer, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("torch.optim.AdamW", 1e-3, 0.05)
    assert cfg.scheduler._target_ == "balatro_train.optim.warmup_cosine" and cfg.scheduler.epochs == cfg.trainer.epochs
    assert cfg.trainer.ema_decay == 0.99
    assert cfg.tasks.identification.label_smoothing == cfg.tasks.modifier.label_smoothing == 0.1
    assert cfg.data.recolour == 0.3  # identification learns from recoloured images, the modifier skips them
    assert cfg.tasks.identification.colour_invariant and not cfg.tasks.modifier.colour_invariant


# ---- configs saved before the pipelines moved from tasks.<task> to data.* ----------------------------


def saved_in_old_keys(cfg) -> dict:
    """`cfg` as runs saved it before data.train_transforms / val_transforms: per task, no data.* keys."""
    old = OmegaConf.to_container(cfg, resolve=False)
    del old["data"]["train_transforms"], old["data"]["val_transforms"]
    for task in old["tasks"].values():
        task.update(train_transforms="heavy", val_transforms="none")
    return old


def test_a_run_saved_in_the_old_keys_re_runs_with_its_pipelines(cfg, tmp_path):
    """As `--config-dir outputs/<run>/.hydra --config-name config` re-runs it: composed without the schema
    (which no longer knows tasks.<task>.train_transforms), then typed_config reads it in today's keys."""
    OmegaConf.save(OmegaConf.create(saved_in_old_keys(cfg)), tmp_path / "config.yaml")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        saved = compose(config_name="config")
    typed = typed_config(saved)
    assert (typed.data.train_transforms, typed.data.val_transforms) == ("heavy", "none")
    assert not {"train_transforms", "val_transforms"} & set(typed.tasks.identification)
    assert OmegaConf.is_struct(typed)  # an unknown key is still refused
    assert typed.transforms.val.transforms[0].height == 48  # interpolations survive, resolved after the merge
    check_config(typed)


def test_upgrading_a_saved_config(cfg):
    new = OmegaConf.to_container(cfg, resolve=True)
    assert upgrade_saved_config(new) == new  # today's keys: nothing to do
    old = saved_in_old_keys(cfg)
    before = copy.deepcopy(old)
    upgraded = upgrade_saved_config(old)
    assert old == before  # a copy: a checkpoint's own dict is left as it was
    assert (upgraded["data"]["train_transforms"], upgraded["data"]["val_transforms"]) == ("heavy", "none")
    assert all("train_transforms" not in task and "val_transforms" not in task for task in upgraded["tasks"].values())
    assert {**upgraded, "data": None} == {**before, "data": None, "tasks": upgraded["tasks"]}  # nothing else moves
