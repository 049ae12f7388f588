"""The recipe's ingredients, each a config key: the warmup-then-cosine schedule, label smoothing, the
EMA of the weights (validated and saved as the model, resumed exactly), a local weights file and the
recolouring that only the card's identity learns from."""

from __future__ import annotations

import dataclasses
import math
import pickle
import threading

import numpy as np
import pytest
import torch
import torchvision
from conftest import compose, read_metrics, validation_outputs
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_robustness import StopAfterSteps
from torch import nn

from balatro_train.checkpoint import Checkpoint, load_checkpoint
from balatro_train.data import CardDataset, build_data
from balatro_train.distributed import Process
from balatro_train.embedding import IGNORE, MarginCrossEntropyLoss
from balatro_train.errors import Interrupted, UserError, user_error_in
from balatro_train.model import build_model
from balatro_train.preprocessing import Preprocessing
from balatro_train.run_setup import build_run
from balatro_train.train import train, train_one_epoch

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # in-process training beside another xdist worker

SMALL = "model.backbone=mobilenet_v3_small"
CPU = torch.device("cpu")
CLASSES = {"identification": ["a", "b", "c"], "modifier": ["Base", "Foil"]}


def test_warmup_rises_linearly_then_cosine_decays_to_eta_min():
    cfg = compose(
        [
            "scheduler=warmup_cosine",
            "trainer.epochs=10",
            "scheduler.warmup_epochs=2",
            "scheduler.eta_min=0",
            "optimizer.lr=1.0",
        ]
    )
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.optimizer.lr)
    scheduler = instantiate(cfg.scheduler)(optimizer)
    lrs = []
    for _ in range(cfg.trainer.epochs):  # the lr each epoch trains with, stepped after it as the loop does
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == pytest.approx([0.1, 0.55, 1.0])
    cosine = [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]  # 8 epochs after the warmup
    assert lrs[2:] == pytest.approx(cosine)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # reached by the end


def test_the_validation_loss_is_label_smoothed_as_configured(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "trainer.epochs=1",
        "publish_to=null",
        "tasks.identification.label_smoothing=0.3",
        "tasks.modifier.label_smoothing=0",
    )
    train(cfg, tmp_path / "run")
    [row] = read_metrics(tmp_path / "run")
    logits, targets = validation_outputs(tmp_path / "run/checkpoints/last.pt")
    smoothed = nn.functional.cross_entropy(logits["identification"], targets["identification"], label_smoothing=0.3)
    plain = nn.functional.cross_entropy(logits["identification"], targets["identification"])
    assert abs(smoothed - plain) > 1e-3
    assert row["identification/val_loss"] == pytest.approx(smoothed.item(), rel=1e-4)
    assert row["modifier/val_loss"] == pytest.approx(  # the other task keeps its own (none here)
        nn.functional.cross_entropy(logits["modifier"], targets["modifier"]).item(), rel=1e-4
    )


def test_with_an_ema_the_average_is_validated_and_saved_and_training_goes_on_from_the_raw_weights(tiny_cfg, tmp_path):
    cfg = tiny_cfg("trainer.epochs=2", "publish_to=null", "trainer.ema_decay=0.9")
    train(cfg, tmp_path / "run")
    last = tmp_path / "run/checkpoints/last.pt"
    state = load_checkpoint(last)
    ema, raw = state.weights, state.training.training_weights
    assert state.training.averaged_steps == 2 * math.ceil(len(state.split["train"]) / cfg.trainer.batch_size)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if ema[k].is_floating_point())
    # The logged validation loss is the saved model's (the average's), not the raw weights'.
    logits, targets = validation_outputs(last)
    row = read_metrics(tmp_path / "run")[-1]
    smoothing = cfg.tasks.identification.label_smoothing
    assert row["identification/val_loss"] == pytest.approx(
        nn.functional.cross_entropy(
            logits["identification"], targets["identification"], label_smoothing=smoothing
        ).item(),
        rel=1e-4,
    )
    raw_model = build_model(state.config["model"], state.class_names, raw).eval()
    with torch.no_grad():
        raw_logits = raw_model(torch.stack(val_images(last)))
    raw_loss = nn.functional.cross_entropy(
        raw_logits["identification"], targets["identification"], label_smoothing=smoothing
    ).item()
    assert raw_loss != pytest.approx(row["identification/val_loss"], rel=1e-2)  # the two are told apart


def val_images(checkpoint) -> list[torch.Tensor]:
    state = load_checkpoint(checkpoint)
    data = build_data(OmegaConf.create(state.config), state.class_names, state.split)
    return [data.val[i][0] for i in range(len(data.val))]


def test_an_ema_run_interrupted_and_resumed_ends_bit_identical(tiny_cfg, tmp_path):
    """With a Dropout in the model (MobileNetV3), so that a resume that shifts torch's RNG shows."""
    cfg = tiny_cfg("trainer.epochs=2", "publish_to=null", "trainer.ema_decay=0.8", "trainer.batch_size=4", SMALL)
    train(cfg.copy(), tmp_path / "whole")
    with pytest.raises(Interrupted):
        train(cfg.copy(), tmp_path / "cut", stop=StopAfterSteps(8))  # epoch 2, mid-epoch
    resumed = cfg.copy()
    resumed.resume = str(tmp_path / "cut/checkpoints/last.pt")
    train(resumed, tmp_path / "resumed")
    assert read_metrics(tmp_path / "resumed")[-1]["val_loss"] == read_metrics(tmp_path / "whole")[-1]["val_loss"]
    a = torch.load(tmp_path / "whole/checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed/checkpoints/last.pt", weights_only=True)
    assert a["averaged_steps"] == b["averaged_steps"]
    for key in ("model", "training_weights"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


@pytest.mark.parametrize("value", [1.0, -0.1])
def test_an_impossible_ema_decay_is_named(tiny_cfg, tmp_path, value):
    with pytest.raises(UserError, match="trainer.ema_decay"):
        train(tiny_cfg(f"trainer.ema_decay={value}"), tmp_path / "run")


def test_model_weights_loads_a_local_state_dict_which_a_checkpoint_then_no_longer_needs(tmp_path):
    torch.manual_seed(1)
    saved = torchvision.models.mobilenet_v3_small().state_dict()
    path = tmp_path / "mobilenet_v3_small.pth"
    torch.save(saved, path)
    cfg = compose([SMALL, f"model.weights={path}"])
    model = build_model(cfg.model, CLASSES)
    assert model.pretrained_loaded
    assert all(torch.equal(model.backbone.state_dict()[k], saved[k]) for k in model.backbone.state_dict())
    # A model rebuilt from its checkpoint takes the checkpoint's weights and never reads the file.
    path.unlink()
    rebuilt = Checkpoint(
        {"model": dict(cfg.model)}, CLASSES, model.state_dict(), Preprocessing(32, (0, 0, 0), {})
    ).model()
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ({"conv.weight": torch.zeros(1)}, "not a state dict of torchvision's mobilenet_v3_small"),
        (pickle.dumps(object()), "not a state dict"),
    ],
)
def test_a_wrong_weights_file_is_named_in_one_line(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(Exception) as error:  # Hydra's instantiate wraps it; the CLIs print the UserError
        build_model(compose([SMALL, f"model.weights={path}"]).model, CLASSES)
    assert str(user_error_in(error.value)).startswith(f"model.weights={path}: {message}")
    assert "\n" not in str(user_error_in(error.value))


# ---- recolouring: identity learns that a Polychrome or Negative card is the same card --------------


def test_a_recoloured_training_image_keeps_its_identity_label_and_the_modifier_skips_it(tiny_cfg):
    data = build_data(tiny_cfg("data.recolour=1.0"))
    plain = build_data(tiny_cfg("data.recolour=0")).train
    assert data.train.recolouring.ignored_by == ("modifier",)
    for index in range(len(data.train)):
        image, targets = data.train[(index, 1000 + index)]
        unchanged, plain_targets = plain[(index, 1000 + index)]
        assert targets["identification"] == plain_targets["identification"]
        assert targets["modifier"] == IGNORE and plain_targets["modifier"] != IGNORE
        assert image.dtype == torch.uint8 and image.shape == unchanged.shape
        assert not torch.equal(image, unchanged)  # recoloured after the same geometric augmentation
        assert torch.equal(image, data.train[(index, 1000 + index)][0])  # the seed decides it: resumes exactly


def test_recolour_is_the_share_of_images_recoloured_and_is_off_when_no_task_is_colour_invariant(tiny_cfg):
    train = build_data(tiny_cfg("data.recolour=0.3")).train
    skipped = [train[(0, seed)][1]["modifier"] == IGNORE for seed in range(400)]
    assert 0.22 < sum(skipped) / len(skipped) < 0.38
    assert build_data(tiny_cfg("data.recolour=0.3", "task=modifier")).train.recolouring is None
    assert build_data(tiny_cfg("data.recolour=0")).train.recolouring is None


def test_the_transforms_of_a_pipeline_draw_independently_for_an_image():
    """Two inversions at p=0.5: with each transform seeded alike (albumentations' set_random_seed) both
    or neither would apply, and the image would never change."""
    import albumentations

    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    twice = albumentations.Compose([albumentations.InvertImg(p=0.5), albumentations.InvertImg(p=0.5)])
    dataset = CardDataset(image[None], {"identification": torch.tensor([0])}, twice)
    inverted = [not torch.equal(dataset[(0, seed)][0], torch.from_numpy(image)) for seed in range(200)]
    assert 0.35 < sum(inverted) / len(inverted) < 0.65


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.recolour=1.5", "data.recolour=1.5"),
        ("data.recolour=1.0", "data.recolour=1.0 leaves task modifier"),
        ("data.recolour_transforms=sparkle", "data.recolour_transforms=sparkle"),
    ],
)
def test_an_impossible_recolouring_is_named(tiny_cfg, tmp_path, override, key):
    with pytest.raises(UserError, match=key):
        train(tiny_cfg("data.recolour=0.3", override), tmp_path / "run")


def test_a_tasks_training_loss_is_its_mean_over_the_images_it_learned_from(tiny_cfg):
    """The modifier skips the recoloured images of a batch: the epoch's mean must not count them as zeros.
    At lr 0 the model stays what it was, so the same batches (the sampler's epoch decides them, and
    their augmentation) give the same per-batch losses again."""
    cfg = tiny_cfg("data.recolour=0.5", "optimizer.lr=0")
    built = build_data(cfg)
    loss_fns = {task: MarginCrossEntropyLoss() for task in built.class_names}
    run = dataclasses.replace(build_run(cfg, built, Process(0, 1, CPU)), losses=loss_fns)
    model, train_loader = run.model, run.train_loader
    train_loader.sampler.set_epoch(1)
    _, means = train_one_epoch(run, threading.Event())
    sums = {task: {"learned": 0.0, "batch": 0.0} for task in loss_fns}
    counts = {task: {"learned": 0, "batch": 0} for task in loss_fns}
    with torch.no_grad():
        for images, targets in train_loader:
            outputs = model(images)
            for task, fn in loss_fns.items():
                loss, learned = fn(outputs[task], targets[task]).item(), int((targets[task] != IGNORE).sum())
                for kind, n in (("learned", learned), ("batch", len(images))):
                    sums[task][kind] += loss * n
                    counts[task][kind] += n
    for task, mean in means.items():
        assert mean.compute().item() == pytest.approx(sums[task]["learned"] / counts[task]["learned"], rel=1e-4)
    # the modifier skipped some images, so counting them would have given another figure
    assert counts["modifier"]["learned"] < counts["modifier"]["batch"]
    assert sums["modifier"]["batch"] / counts["modifier"]["batch"] != pytest.approx(
        sums["modifier"]["learned"] / counts["modifier"]["learned"], rel=1e-3
    )


@pytest.mark.parametrize("margin", [0.0, 1.6])
def test_the_loss_is_torchs_weighted_smoothed_mean_over_the_images_a_task_learns_from(margin):
    torch.manual_seed(0)
    logits, target, weight = torch.randn(8, 5), torch.randint(0, 5, (8,)), torch.rand(5) + 0.1
    target[:3] = IGNORE
    shifted = logits.clone()
    shifted[torch.arange(3, 8), target[3:]] -= margin
    expected = nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)(shifted, target)
    assert MarginCrossEntropyLoss(margin, weight=weight, label_smoothing=0.1)(logits, target) == pytest.approx(
        expected.item(), rel=1e-5
    )
    # A batch the task learns nothing from: 0 and no gradient (torch's mean would be NaN)
    logits.requires_grad_(True)
    loss = MarginCrossEntropyLoss(margin, weight=weight, label_smoothing=0.1)(logits, torch.full((8,), IGNORE))
    loss.backward()
    assert loss.item() == 0 and torch.equal(logits.grad, torch.zeros_like(logits))
