"""What training does, checked in-process on real objects: the config composed with Hydra's compose
API (conftest `tiny_cfg`), then the runner's own functions (`build_data`, `make_loaders`,
`train_one_epoch`, `build_metrics`, `class_weights`, `train(cfg, out_dir)`) called directly.

Each test is built to fail for one plausible regression that the end-to-end tests cannot see:
what the loader feeds (not what split.json says), whether resume restores the RNG, micro vs macro
averages, class weights, the weighted sampler, which modules a freeze strategy trains, early
stopping and the diverging-loss stop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import NAMES, compose, read_metrics, tiny_overrides, validation_outputs, without_timing, write_dataset
from hydra.utils import instantiate
from torch import nn

from balatro_train.checkpoint import load_checkpoint
from balatro_train.data import build_data
from balatro_train.distributed import Process
from balatro_train.errors import UserError
from balatro_train.loaders import make_loaders
from balatro_train.metrics import build_metrics
from balatro_train.preprocessing import load_image
from balatro_train.run_setup import build_run, class_weights
from balatro_train.train import train, train_one_epoch

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # in-process training beside another xdist worker

CPU = torch.device("cpu")
# A small backbone with a Dropout in its forward: whole runs take about a second.
SMALL = "model.backbone=mobilenet_v3_small"
# The `none` pipeline (no transform) makes a yielded image a function of its file alone.
UNAUGMENTED = ["data.train_transforms=none", "data.val_transforms=none", "data.recolour=0"]


def one_epoch(loader, epoch: int = 1) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """(image, {task: target}) of every sample the loader yields in `epoch`."""
    if hasattr(loader.sampler, "set_epoch"):  # the training loader's EpochSampler
        loader.sampler.set_epoch(epoch)
    return [
        (image, {task: t[i] for task, t in targets.items()})
        for images, targets in loader
        for i, image in enumerate(images)
    ]


# ---- what the loaders feed ---------------------------------------------------------------------------


def test_an_epoch_feeds_each_training_file_once_and_nothing_of_validation(dataset, tiny_cfg):
    """Identifies every image the training loader yields by its pixels. split.json can be right while
    the loader feeds something else (e.g. an augmented copy of a validation image)."""
    data, root = dataset
    cfg = tiny_cfg(*UNAUGMENTED)
    built = build_data(cfg)
    train_loader, val_loader = make_loaders(cfg, built, Process(0, 1, CPU))

    # every image of the labels files, decoded and normalised as the loader prepares it
    labels = json.loads(Path(data["labels_file"]).read_text())
    augmented = json.loads(Path(data["augmented"]).read_text())
    pipeline = instantiate(cfg.transforms.none)
    by_pixels = {}
    for file, meta in {**labels, **augmented}.items():
        pixels = load_image(root / meta["full_path"], cfg.data.image_size, tuple(cfg.data.background))
        by_pixels[pipeline(image=pixels)["image"].tobytes()] = file
    assert len(by_pixels) == len(labels) + len(augmented)  # no two files look alike

    def fed(loader, epoch=1):
        files = []
        for image, targets in one_epoch(loader, epoch):
            file = by_pixels.get(image.numpy().tobytes())
            assert file is not None, "the loader fed an image that is no file of the dataset"
            meta = {**labels, **augmented}[file]
            for task, field in (("identification", "name"), ("modifier", "modifier")):
                assert built.class_names[task][targets[task]] == meta[field], (file, task)
            files.append(file)
        return files

    val = set(built.split["val"])
    assert any(augmented[f]["parent"] in val for f in augmented)  # there are copies that must not train
    for epoch in (1, 2):
        files = fed(train_loader, epoch)
        assert Counter(files) == Counter(built.split["train"])  # each training file once, nothing else
        assert not val & set(files)
        leaked = [f for f in files if f in augmented and augmented[f]["parent"] in val]
        assert not leaked, f"augmented copies of validation images trained: {leaked}"
    assert any(f in augmented for f in files)  # augmented copies of training images do train
    assert fed(val_loader) == built.split["val"]


IMBALANCED = {"Joker_001": 12, "Joker_002": 4, "The Fool": 3, "Mercury": 2}


@pytest.mark.parametrize("weighted", [False, True])
def test_the_weighted_sampler_draws_rare_and_common_classes_about_evenly(tmp_path, weighted):
    """Training images per class (originals + one augmented copy): 20, 6, 4, 2."""
    root = tmp_path / "labelled"
    data = write_dataset(root, per_class=IMBALANCED)
    cfg = compose([*tiny_overrides(data, root), *UNAUGMENTED, f"data.weighted_sampler={weighted}"])
    built = build_data(cfg)
    names = built.class_names["identification"]
    available = Counter(built.train_labels)
    assert sorted(available.values()) == [2, 4, 6, 20]
    train_loader, _ = make_loaders(cfg, built, Process(0, 1, CPU))

    epochs = 8
    drawn = Counter(
        names[targets["identification"]]
        for epoch in range(1, epochs + 1)
        for _, targets in one_epoch(train_loader, epoch)
    )
    total = epochs * len(built.train)
    assert sum(drawn.values()) == total
    if not weighted:  # a plain shuffle: every image once per epoch
        assert drawn == Counter({name: epochs * n for name, n in available.items()})
    else:  # with replacement, each class a quarter of the draws: 64 +- 6.9 (one s.d.); seed 0 draws 58 to 70
        expected = total / len(names)
        assert all(0.65 * expected <= drawn[name] <= 1.35 * expected for name in names), (drawn, expected)


# ---- metrics and losses, built as the runner builds them ----------------------------------------------


def ranked_logits(rankings: list[list[int]]) -> torch.Tensor:
    """Logits whose classes rank as given, best first."""
    logits = torch.zeros(len(rankings), len(rankings[0]))
    for row, ranking in enumerate(rankings):
        for place, cls in enumerate(ranking):
            logits[row, cls] = float(len(ranking) - place)
    return logits


def test_identification_metrics_top_k_are_micro_and_the_rest_macro_on_an_imbalanced_set():
    cfg = compose([])
    metrics = build_metrics("identification", cfg.tasks.identification.metrics, num_classes=4)
    # 6 of class 0, 2 each of 1, 2, 3 (best first):
    cases = (
        [(0, [0, 1, 2, 3])] * 6  # top-1 right
        + [(1, [0, 2, 3, 1])] * 2  # top-1 wrong (0), not even in the top 3
        + [(2, [0, 2, 1, 3])] * 2  # top-1 wrong (0), in the top 3
        + [(3, [3, 0, 1, 2])] * 2
    )  # top-1 right
    targets = torch.tensor([c[0] for c in cases])
    logits = ranked_logits([c[1] for c in cases])
    result = {k: v.item() for k, v in metrics(logits, targets).items()}
    # micro top-k: the plain fraction of right answers (macro would be 0.5 and 0.75)
    assert result["top1_acc"] == pytest.approx(8 / 12)
    assert result["top3_acc"] == pytest.approx(10 / 12)
    # macro: per-class mean. Predicted: 0 for 10 images (6 right), 3 for 2 (right); 1 and 2 never.
    assert result["precision"] == pytest.approx((6 / 10 + 0 + 0 + 1) / 4)
    assert result["recall"] == pytest.approx((1 + 0 + 0 + 1) / 4)
    assert result["f1"] == pytest.approx((2 * 0.6 / 1.6 + 0 + 0 + 1) / 4)


def test_modifier_metrics_top1_is_micro_and_the_confusion_matrix_counts():
    cfg = compose([])
    metrics = build_metrics("modifier", cfg.tasks.modifier.metrics, num_classes=3)
    targets = torch.tensor([0] * 8 + [1, 2])
    predicted = torch.tensor([0] * 8 + [0, 2])
    result = metrics(nn.functional.one_hot(predicted, 3).float(), targets)
    assert result["top1_acc"].item() == pytest.approx(9 / 10)  # macro: (1 + 0 + 1) / 3
    assert result["confusion_matrix"].tolist() == [[8, 0, 0], [1, 0, 0], [0, 0, 1]]


def test_top3_is_left_out_where_a_task_has_fewer_than_three_classes():
    metrics = build_metrics("identification", compose([]).tasks.identification.metrics, num_classes=2)
    assert "top3_acc" not in metrics and "top1_acc" in metrics


def test_class_weights_weigh_each_image_by_its_class_name():
    cfg = compose(["+tasks.modifier.class_weights.Negative=3.0", "+tasks.modifier.class_weights.Base=0.5"])
    names = ["Base", "Foil", "Negative", "Polychrome"]
    weights = class_weights("modifier", cfg.tasks.modifier, names)
    assert weights.tolist() == [0.5, 1.0, 3.0, 1.0]  # by name; unnamed classes weigh 1
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 1, 2, 2])
    # cross-entropy by hand: log(sum(exp(logits))) - logit of the target
    per_image = [
        math.log(sum(math.exp(v) for v in row)) - row[t]
        for row, t in zip(logits.tolist(), targets.tolist(), strict=True)
    ]
    w = [0.5, 1.0, 3.0, 3.0]
    expected = sum(wi * li for wi, li in zip(w, per_image, strict=True)) / sum(w)
    assert loss_fn(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    assert abs(expected - sum(per_image) / 4) > 0.1  # the weights matter here
    assert class_weights("identification", cfg.tasks.identification, NAMES) is None


def test_a_run_weighs_its_losses_by_the_configured_class_weights(tiny_cfg, tmp_path):
    """The runner's logged validation loss is the class-weighted mean over the validation images."""
    weights = {"Base": 0.5, "Foil": 2.0, "Negative": 3.0}
    cfg = tiny_cfg(
        "trainer.epochs=1",
        "publish_to=null",
        "tasks.identification.label_smoothing=0",
        "tasks.modifier.label_smoothing=0",
        *(f"+tasks.modifier.class_weights.{name}={w}" for name, w in weights.items()),
    )
    train(cfg, tmp_path / "run")
    [row] = read_metrics(tmp_path / "run")
    logits, targets = validation_outputs(tmp_path / "run/checkpoints/last.pt")
    assert len(targets["modifier"]) <= cfg.trainer.batch_size  # one validation batch: one weighted mean
    names = load_checkpoint(tmp_path / "run/checkpoints/last.pt").class_names["modifier"]
    w = torch.tensor([weights[names[t]] for t in targets["modifier"].tolist()])
    per_image = nn.functional.cross_entropy(logits["modifier"], targets["modifier"], reduction="none")
    weighted, plain = (w * per_image).sum().item() / w.sum().item(), per_image.mean().item()
    assert abs(weighted - plain) > 1e-3 * plain  # the validation set's classes make weights matter
    assert row["modifier/val_loss"] == pytest.approx(weighted, rel=1e-4)
    unweighted = nn.functional.cross_entropy(logits["identification"], targets["identification"]).item()
    assert row["identification/val_loss"] == pytest.approx(unweighted, rel=1e-4)


# ---- freeze strategies: exactly the named modules train -----------------------------------------------

RESNET_STAGES = {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}  # the backbone's modules with weights


@pytest.mark.parametrize(
    "freeze, trained",
    [
        ("all", set()),
        ("high", {"layer3", "layer4"}),
        ("mid", {"layer2", "layer3", "layer4"}),
        ("none", RESNET_STAGES),
    ],
)
def test_one_step_changes_exactly_the_modules_the_freeze_strategy_trains(tiny_cfg, freeze, trained):
    """Weights and BatchNorm statistics of frozen modules stay bit-identical; everything of a trained
    module (and the heads, always) changes."""
    cfg = tiny_cfg(f"freeze={freeze}", "optimizer=group")
    built = build_data(cfg)
    loss_fns = {task: nn.CrossEntropyLoss() for task in built.class_names}
    run = dataclasses.replace(build_run(cfg, built, Process(0, 1, CPU)), losses=loss_fns)  # as train.train builds it
    model = run.model
    run.train_loader.sampler.set_epoch(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    stop = threading.Event()
    stop.set()  # one step, then stop
    seen, _ = train_one_epoch(run, stop)
    assert seen == cfg.trainer.batch_size

    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    stages = {k.split(".")[1] for k in before if k.startswith("backbone.")}
    assert stages == RESNET_STAGES
    for key in before:
        part = key.split(".")[1] if key.startswith("backbone.") else "heads"
        should_change = part == "heads" or part in trained
        assert (key in changed) == should_change, (key, "changed" if key in changed else "unchanged")


# ---- whole runs, in-process: train(cfg, out_dir) -----------------------------------------------------


def test_a_run_with_freeze_all_trains_only_the_heads_and_keeps_batchnorm_statistics(tiny_cfg, tmp_path):
    cfg = tiny_cfg(SMALL, "freeze=all", "trainer.epochs=2", "trainer.checkpoint_interval=1", "publish_to=null")
    train(cfg, tmp_path / "run")
    first, second = (load_checkpoint(tmp_path / f"run/checkpoints/epoch_00{e}.pt").weights for e in (1, 2))
    backbone = [k for k in first if k.startswith("backbone.")]
    assert any(k.endswith("running_mean") for k in backbone)
    assert all(torch.equal(first[k], second[k]) for k in backbone)
    assert not torch.equal(first["heads.identification.weight"], second["heads.identification.weight"])


def test_a_single_task_run_with_the_weighted_sampler_class_weights_and_plateau(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        SMALL,
        "task=modifier",
        "data.weighted_sampler=true",
        "+tasks.modifier.class_weights.Negative=3.0",
        "scheduler=plateau",
        "trainer.epochs=2",
        "publish_to=null",
    )
    train(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"modifier/top1_acc", "modifier/val_loss"} <= set(rows[0]) and "identification/val_loss" not in rows[0]
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt").class_names == {
        "modifier": ["Base", "Foil", "Negative"]
    }


def test_resume_is_exact_with_a_model_that_draws_random_numbers_in_its_forward(tiny_cfg, tmp_path):
    """mobilenet_v3_small keeps a Dropout in front of the heads: a resume that did not restore the
    RNG state would draw other dropout masks and other numbers (ResNet, without dropout, can't tell)."""
    cfg = tiny_cfg(SMALL, "trainer.epochs=2", "trainer.checkpoint_interval=1", "publish_to=null")
    model = instantiate(cfg.model, num_classes={"identification": 4, "modifier": 3}).train()
    assert any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.backbone.modules())
    features = torch.randn(4, model.backbone.classifier[0].in_features)  # what the pooled features feed
    assert not torch.equal(model.backbone.classifier(features), model.backbone.classifier(features))

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(cfg, full)
    cfg.resume = str(full / "checkpoints/epoch_001.pt")
    train(cfg, resumed)

    rows = read_metrics(full)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert without_timing(read_metrics(resumed)) == without_timing(rows)
    final, again = (load_checkpoint(d / "checkpoints/last.pt").weights for d in (full, resumed))
    assert all(torch.equal(final[k], again[k]) for k in final)


@pytest.mark.parametrize("patience, last_epoch", [(2, 3), (0, 6)])
def test_early_stopping_stops_at_the_epoch_the_patience_rule_says(tiny_cfg, tmp_path, patience, last_epoch):
    """A model that cannot change (frozen backbone and BatchNorm, heads moved by 1e-30 at most: below
    float32's resolution) has the same validation loss every epoch: epoch 1 improves on infinity,
    no later epoch is strictly better. Default precision: bf16 autocast where the CPU runs it fast."""
    cfg = tiny_cfg(
        SMALL,
        "freeze=all",
        "optimizer.lr=1e-30",
        "scheduler=none",
        "trainer.epochs=6",
        f"trainer.patience={patience}",
        "publish_to=null",
        precision=None,
    )
    train(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert len({r["val_loss"] for r in rows}) == 1  # the premise: nothing improves after epoch 1
    assert [r["epoch"] for r in rows] == list(range(1, last_epoch + 1))
    last = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert (last.progress.epoch, last.progress.bad_epochs) == (last_epoch, last_epoch - 1)
    assert load_checkpoint(tmp_path / "run/checkpoints/best.pt").progress.epoch == 1


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_cfg, tmp_path):
    """Epoch 1 at a learning rate of 1e-10, then StepLR multiplies it by 1e35: epoch 2 diverges."""
    cfg = tiny_cfg(
        SMALL,
        "optimizer.lr=1e-10",
        "scheduler=step",
        "scheduler.step_size=1",
        "scheduler.gamma=1e35",
        "trainer.epochs=4",
        "publish_to=null",
    )
    with pytest.raises(UserError, match="epoch 2: the loss became") as error:
        train(cfg, tmp_path / "run")
    last = tmp_path / "run/checkpoints/last.pt"
    assert f"The last good checkpoint is {last}" in str(error.value)
    assert [r["epoch"] for r in read_metrics(tmp_path / "run")] == [1]
    state = load_checkpoint(last)
    assert state.progress.epoch == 1
    assert all(torch.isfinite(v).all() for v in state.weights.values() if v.is_floating_point())
    logits, _ = validation_outputs(last)  # it loads into a model that computes finite outputs
    assert all(torch.isfinite(v).all() for v in logits.values())


def test_bf16_autocast_trains_and_validates_on_cpu(tiny_cfg, tmp_path):
    """The bf16 path, forced, on any CPU (trainer.precision=auto takes it only where it is fast): the
    weights stay float32, and the logged validation losses are those of the saved model recomputed
    in float32, to bf16's precision."""
    cfg = tiny_cfg(SMALL, "trainer.epochs=1", "publish_to=null", precision="bf16")
    train(cfg, tmp_path / "run")
    [row] = read_metrics(tmp_path / "run")
    assert math.isfinite(row["train_loss"]) and row["train_loss"] > 0
    weights = load_checkpoint(tmp_path / "run/checkpoints/last.pt").weights
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}
    logits, targets = validation_outputs(tmp_path / "run/checkpoints/last.pt")
    for task in logits:
        fp32 = nn.functional.cross_entropy(logits[task], targets[task]).item()
        assert row[f"{task}/val_loss"] == pytest.approx(fp32, rel=2e-2), task
