"""End-to-end training runs on tiny data, driven through the command line as a user would: a single
run (made once, and read by the tests of its folder, its split and its resume), a re-run from its saved
config, a multirun sweep. A new task's YAML and the structured config's refusals are checked in-process
(Hydra's compose API, as the command line composes), with one refusal on the command line."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import (
    compose,
    made_once,
    read_metrics,
    run_cli,
    run_dirs,
    run_main,
    tiny_overrides,
    validation_outputs,
    without_timing,
    write_dataset,
)
from hydra.errors import ConfigCompositionException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from balatro_train import train as train_module
from balatro_train.errors import UserError
from balatro_train.inference import Recognizer
from balatro_train.train import train


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """`python -m balatro_train` on the tiny set, 4 epochs with a checkpoint every 2, run once for the
    session (the xdist workers share it): its overrides, its run folder and its labels files. Without
    data.recolour: the tiny set tells its cards apart by colour alone, which a hue rotation or an inversion
    takes away from the images identification learns from, and 4 epochs then make no progress to judge
    (tests/test_recipe.py tests the recolouring)."""

    def make(work):
        data = write_dataset(work / "labelled")
        overrides = [
            *tiny_overrides(data, work / "labelled"),
            "trainer.epochs=4",
            "trainer.checkpoint_interval=2",
            "data.recolour=0",
        ]
        (work / "overrides.json").write_text(json.dumps(overrides))
        run_cli(overrides, cwd=work)

    work = made_once(tmp_path_factory, "train_single_run", make)
    [run] = run_dirs(work)
    return SimpleNamespace(
        overrides=json.loads((work / "overrides.json").read_text()),
        dir=run,
        labels_file=work / "labelled" / "dataset_default" / "labels.json",
        augmented=work / "labelled" / "augmented" / "augmented.json",
    )


def test_single_run_leaves_a_complete_run_folder(single_run):
    run = single_run.dir
    for name in (
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        ".hydra/hydra.yaml",
        "train.log",
        "split.json",
        "checkpoints/best.pt",
        "checkpoints/last.pt",
        "checkpoints/epoch_002.pt",
        "checkpoints/epoch_004.pt",
    ):
        assert (run / name).is_file(), name
    assert not (run / "checkpoints/epoch_003.pt").exists()
    train_events, val_events = EventAccumulator(str(run / "tb/train")), EventAccumulator(str(run / "tb/val"))
    train_events.Reload(), val_events.Reload()
    assert {"Loss/combined", "Loss/modifier", "lr/heads"} <= set(train_events.Tags()["scalars"])
    assert {"Loss/combined", "Loss/modifier", "Top1/identification", "identification/top3_acc"} <= set(
        val_events.Tags()["scalars"]
    )
    assert {
        "modifier/confusion_matrix",
        "identification/confusion_matrix",
        "modifier/misclassified",
        "identification/misclassified",
    } <= set(val_events.Tags()["images"])

    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    for key in (
        "train_loss",
        "val_loss",
        "lr",
        "epoch_seconds",
        "train_images_per_sec",
        "identification/train_loss",
        "identification/val_loss",
        "identification/top1_acc",
        "identification/top3_acc",
        "identification/precision",
        "identification/recall",
        "identification/f1",
        "modifier/train_loss",
        "modifier/val_loss",
        "modifier/top1_acc",
    ):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert "modifier/confusion_matrix" not in rows[0]  # a matrix is a TensorBoard figure, not a number
    # The combined losses use the default rule, max over tasks.
    assert rows[0]["val_loss"] == max(rows[0]["identification/val_loss"], rows[0]["modifier/val_loss"])
    # The data is easy: training must make progress (on the cards; 24 images and a dozen steps leave
    # the modifier head's loss noisy, and the warmup takes half of the four epochs).
    assert rows[-1]["identification/train_loss"] < 0.9 * rows[0]["identification/train_loss"]

    best = torch.load(run / "checkpoints/best.pt", weights_only=True)
    assert best["epoch"] == min(rows, key=lambda r: r["val_loss"])["epoch"]
    assert best["class_names"] == {
        "identification": ["Joker_001", "Joker_002", "Mercury", "The Fool"],
        "modifier": ["Base", "Foil", "Negative"],
    }
    assert best["pretrained_loaded"] is False and best["config"]["data"]["image_size"] == 32
    for key in ("model", "optimizer", "scheduler", "scaler", "best_val_loss", "bad_epochs", "rng"):
        assert key in best
    assert "Traceback" not in (run / "train.log").read_text()


def test_best_pt_holds_the_model_and_last_pt_the_run_to_resume(single_run, tmp_path):
    """best.pt (what publish_to copies, and predict, export and enrol read) is the model without the run's
    optimizer state; last.pt and epoch_NNN.pt are what a resume takes, and a resume from best.pt says so."""
    checkpoints = single_run.dir / "checkpoints"
    best, last, periodic = (
        torch.load(checkpoints / name, weights_only=True) for name in ("best.pt", "last.pt", "epoch_002.pt")
    )
    for key in ("optimizer", "scheduler", "scaler", "rng"):
        assert best[key] is None and last[key] is not None and periodic[key] is not None, key
    assert (checkpoints / "best.pt").stat().st_size < 0.5 * (checkpoints / "last.pt").stat().st_size
    with pytest.raises(
        UserError,
        match=rf"^resume={checkpoints / 'best.pt'}: a model checkpoint .*; resume from "
        rf"{checkpoints / 'last.pt'} or an epoch_NNN.pt beside it",
    ):
        train(compose([*single_run.overrides, f"resume={checkpoints / 'best.pt'}"]), tmp_path / "resumed")


def test_a_checkpoint_saved_with_per_task_pipelines_still_predicts_and_resumes(single_run, tmp_path):
    """Checkpoints written before the pipelines moved to data.train_transforms / data.val_transforms name
    them under each task: their config is read as today's, so a resume finds nothing changed."""
    state = torch.load(single_run.dir / "checkpoints" / "last.pt", weights_only=True)
    data = state["config"]["data"]
    pipelines = {"train_transforms": data.pop("train_transforms"), "val_transforms": data.pop("val_transforms")}
    for task in state["config"]["tasks"].values():
        task.update(pipelines)
    torch.save(state, tmp_path / "old.pt")
    image = np.zeros((40, 30, 3), dtype=np.uint8)
    assert Recognizer.from_checkpoint(tmp_path / "old.pt").predict(image) == Recognizer.from_checkpoint(
        single_run.dir / "checkpoints" / "last.pt"
    ).predict(image)
    cfg = compose([*single_run.overrides, "trainer.epochs=4", f"resume={tmp_path / 'old.pt'}", "publish_to=null"])
    assert train(cfg, tmp_path / "resumed") == state["best_val_loss"]  # a finished run: nothing left to train


def test_split_keeps_augmented_copies_of_validation_images_out_of_training(single_run):
    split = json.loads((single_run.dir / "split.json").read_text())
    labels = json.loads(single_run.labels_file.read_text())
    augmented = json.loads(single_run.augmented.read_text())
    assert set(split["val"]) <= set(labels)  # originals only
    for file in split["train"]:
        if file in augmented:
            assert augmented[file]["parent"] not in split["val"]
    # every class (4 originals each) sends round(0.2 * 4) = 1 original to validation
    names = sorted(labels[f]["name"] for f in split["val"])
    assert names == sorted({v["name"] for v in labels.values()})
    # augmented copies of training images do train
    assert any(f in augmented for f in split["train"])


def test_resume_continues_where_the_run_stopped(single_run, tmp_path):
    full = single_run.dir
    run_cli([*single_run.overrides, f"resume={full / 'checkpoints/epoch_002.pt'}"], cwd=tmp_path)
    [resumed] = run_dirs(tmp_path)
    assert "resuming from" in (resumed / "train.log").read_text()
    assert json.loads((resumed / "split.json").read_text()) == json.loads((full / "split.json").read_text())
    assert without_timing(read_metrics(resumed)) == without_timing(read_metrics(full))


def test_rerun_from_saved_config_reproduces_the_metrics(dataset, tmp_path):
    data, root = dataset
    run_cli([*tiny_overrides(data, root), "optimizer=group", "scheduler=step", "trainer.epochs=2"], cwd=tmp_path)
    [first] = run_dirs(tmp_path)
    run_cli(["--config-dir", str(first / ".hydra"), "--config-name", "config"], cwd=tmp_path)
    second = [d for d in run_dirs(tmp_path) if d != first][0]
    saved = yaml.safe_load((second / ".hydra/config.yaml").read_text())
    assert saved["optimizer"]["optimizer"] == "torch.optim.AdamW" and saved["data"]["image_size"] == 32
    assert without_timing(read_metrics(second)) == without_timing(read_metrics(first))


def test_multirun_sweep_leaves_one_self_contained_folder_per_job(dataset, tmp_path):
    data, root = dataset
    run_cli(
        ["-m", "optimizer=simple,group", "freeze=all,high", *tiny_overrides(data, root), "trainer.epochs=1"],
        cwd=tmp_path,
    )
    jobs = sorted(p for p in (tmp_path / "outputs/multirun").glob("*/*/*") if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        for name in (".hydra/config.yaml", "metrics.jsonl", "split.json", "checkpoints/last.pt"):
            assert (job / name).is_file(), (job, name)
        overrides = yaml.safe_load((job / ".hydra/overrides.yaml").read_text())
        seen.add(tuple(sorted(o for o in overrides if o.startswith(("optimizer=", "freeze=")))))
    assert len(seen) == 4


def test_a_new_task_is_one_yaml_file(dataset, tmp_path, one_torch_thread):
    """A task YAML in the user's own config folder, found through hydra.searchpath: composed as the command
    line composes it (Hydra's compose API) and trained in-process."""
    data, root = dataset
    extra = tmp_path / "my_conf"
    (extra / "task").mkdir(parents=True)
    (extra / "task" / "card_type.yaml").write_text(
        "# @package _global_\n"
        "tasks:\n"
        "  card_type:\n"
        "    field: type\n"
        "    metrics:\n"
        "      top1_acc: {_target_: torchmetrics.classification.MulticlassAccuracy, _partial_: true, average: micro}\n"
    )
    run = tmp_path / "run"
    train(
        compose(
            [*tiny_overrides(data, root), f"hydra.searchpath=[file://{extra}]", "task=card_type", "trainer.epochs=1"]
        ),
        run,
    )
    [row] = read_metrics(run)
    assert "identification/top1_acc" not in row and "modifier/val_loss" not in row
    assert torch.load(run / "checkpoints/last.pt", weights_only=True)["class_names"] == {
        "card_type": ["Joker", "Tarot"]
    }
    # the logged numbers are those of the card_type head on the validation images' types
    logits, targets = validation_outputs(run / "checkpoints/last.pt")
    assert set(logits) == {"card_type"} and targets["card_type"].tolist().count(0) == 2  # 2 Jokers, 2 Tarots
    right = (logits["card_type"].argmax(dim=1) == targets["card_type"]).float().mean().item()
    assert row["card_type/top1_acc"] == pytest.approx(right)
    # A task that does not set label_smoothing gets the schema's default, the recipe's 0.1.
    assert row["card_type/val_loss"] == pytest.approx(
        nn.functional.cross_entropy(logits["card_type"], targets["card_type"], label_smoothing=0.1).item(), rel=1e-4
    )


def test_unknown_key_and_wrong_type_are_refused_by_the_structured_config(dataset, tmp_path, monkeypatch, capsys):
    """The unknown key on the command line (its Hydra entry point, in this process): Hydra's composition
    error, printed without a traceback, and nothing ran. The wrong type: the same composition fails,
    naming the key."""
    data, root = dataset
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # as a user's shell has it
    result = run_main(train_module, [*tiny_overrides(data, root), "trainer.epoch=3"], monkeypatch, capsys)
    assert result.returncode != 0 and "epoch" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "outputs").exists()  # nothing ran
    with pytest.raises(ConfigCompositionException, match="batch_size"):
        compose([*tiny_overrides(data, root), "trainer.batch_size=many"])
