"""The shipped config tree: every pipeline builds, and none can turn one edition into another."""

from __future__ import annotations

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from balatro_train.config import CONFIG_DIR

# Editions are colour effects (and cards carry text): these would change an image's true label.
FORBIDDEN = {"HueSaturationValue", "ColorJitter", "InvertImg", "ChannelShuffle", "ToGray", "RGBShift",
             "HorizontalFlip", "VerticalFlip", "Solarize", "ToSepia", "FancyPCA", "PlanckianJitter"}


@pytest.fixture(scope="module")
def cfg():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=["data.image_size=48"])


@pytest.mark.parametrize("name", ["train", "val", "none", "heavy", "light"])
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
