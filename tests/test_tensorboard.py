"""What a run shows in TensorBoard and on the terminal, read back with TensorBoard's own event reader:
train and validation curves on one tag, a learning rate per parameter group, the step-level loss,
HPARAMS (its config written at the start, the swept keys first, values of their own types, the
session's end status), the config and the run's summary as text, and every task's confusion summary;
the progress bar's numbers, and no bar where there is no terminal."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import logging
import os
import pty
import re
import struct
import sys
import termios
import threading

import numpy as np
import pytest
import torch
import yaml
from conftest import compose, read_metrics, run_cli, tiny_overrides, write_dataset
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

from balatro_train.errors import Interrupted
from balatro_train.evaluate import evaluate
from balatro_train.metrics import (
    MAX_FIGURE_CLASSES,
    confusion_counts,
    confusion_figure,
    confusion_summary,
    misclassified_grid,
)
from balatro_train.progress import bar_columns
from balatro_train.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # in-process training beside another xdist worker

SMALL = "model.backbone=mobilenet_v3_small"  # whole runs in about a second
LOSS_TAGS = {"Loss/combined", "Loss/identification", "Loss/modifier"}


def events(folder) -> EventAccumulator:
    """Every event of one TensorBoard run (the event files directly in `folder`)."""
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalars(run: EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in run.Scalars(tag)}


def text(run: EventAccumulator, tag: str) -> str:
    """The last text written under `tag` (torch's add_text stores it as <tag>/text_summary)."""
    return run.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


def hparams_data(run: EventAccumulator, tag: str) -> plugin_data_pb2.HParamsPluginData:
    """What the HPARAMS plugin reads from a run: its experiment, session start or session end."""
    data = plugin_data_pb2.HParamsPluginData()
    data.ParseFromString(run.SummaryMetadata(tag).plugin_data.content)
    return data


class Terminal(io.StringIO):
    """A terminal as far as tqdm and the runner can tell (one that does not say its width)."""

    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One in-process run with the `group` optimizer, on a terminal, its log also written to a file."""
    root = tmp_path_factory.mktemp("tb")
    data = write_dataset(root / "labelled")
    cfg = compose(
        [
            *tiny_overrides(data, root / "labelled"),
            SMALL,
            "optimizer=group",
            "trainer.epochs=2",
            "trainer.log_every_n_steps=2",
            "publish_to=null",
        ]
    )
    out, terminal, log_file = root / "run", Terminal(), root / "train.log"
    handler, logger = logging.FileHandler(log_file), logging.getLogger("balatro_train")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    level, stderr, threads = logger.level, sys.stderr, torch.get_num_threads()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    sys.stderr = terminal
    torch.set_num_threads(1)
    try:
        train(cfg, out)
    finally:
        sys.stderr = stderr
        torch.set_num_threads(threads)
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()
    images = len(json.loads((out / "split.json").read_text())["train"])  # batches of 8, none of a single image
    return {
        "out": out,
        "terminal": terminal.getvalue(),
        "log": log_file.read_text(),
        "data": data,
        "root": root / "labelled",
        "steps": images // 8 if images % 8 == 1 else -(-images // 8),
    }


def test_train_and_val_share_each_loss_tag_and_the_page_opens_on_loss_and_top1(run):
    train_run, val_run = events(run["out"] / "tb/train"), events(run["out"] / "tb/val")
    rows = read_metrics(run["out"])
    assert LOSS_TAGS <= set(train_run.Tags()["scalars"]) & set(val_run.Tags()["scalars"])
    for task in ("identification", "modifier"):
        assert scalars(train_run, f"Loss/{task}") == pytest.approx({r["epoch"]: r[f"{task}/train_loss"] for r in rows})
        assert scalars(val_run, f"Loss/{task}") == pytest.approx({r["epoch"]: r[f"{task}/val_loss"] for r in rows})
        assert scalars(val_run, f"Top1/{task}") == pytest.approx({r["epoch"]: r[f"{task}/top1_acc"] for r in rows})
    assert scalars(train_run, "Loss/combined") == pytest.approx({r["epoch"]: r["train_loss"] for r in rows})
    assert scalars(val_run, "Loss/combined_best") == pytest.approx(
        {r["epoch"]: min(q["val_loss"] for q in rows[: i + 1]) for i, r in enumerate(rows)}
    )
    assert {"identification/top3_acc", "identification/f1", "modifier/precision"} <= set(val_run.Tags()["scalars"])
    # one learning rate per parameter group (optimizer=group: 1e-5 and 1e-4), timing in a group sorting last
    assert {t for t in train_run.Tags()["scalars"] if t.startswith("lr/")} == {"lr/backbone", "lr/heads"}
    assert scalars(train_run, "lr/backbone")[1] == pytest.approx(1e-5 * 0.1)  # epoch 1: a tenth, warming up
    assert scalars(train_run, "lr/heads")[1] == pytest.approx(1e-4 * 0.1)
    assert {"zz_time/epoch_seconds", "zz_time/train_images_per_sec"} <= set(train_run.Tags()["scalars"])
    groups = sorted(
        {
            tag.split("/")[0]
            for run_ in (train_run, val_run)
            for kind in ("scalars", "images")
            for tag in run_.Tags()[kind]
        }
    )  # TensorBoard sorts groups by character code
    assert groups[:2] == ["Loss", "Top1"] and groups[-1] == "zz_time"
    # the training loss every 2 optimizer steps and at each epoch's last, at the run's optimizer step
    steps, per_epoch = sorted(scalars(train_run, "train_steps/loss")), run["steps"]
    expected = sorted(
        {(e - 1) * per_epoch + s for e in (1, 2) for s in range(1, per_epoch + 1) if s % 2 == 0 or s == per_epoch}
    )
    assert steps == expected


def test_every_task_has_a_confusion_figure_a_misclassified_grid_and_a_confusion_summary(run):
    val_run = events(run["out"] / "tb/val")
    assert {
        f"{task}/{kind}" for task in ("identification", "modifier") for kind in ("confusion_matrix", "misclassified")
    } <= set(val_run.Tags()["images"])
    predictions = json.loads((run["out"] / "val_predictions.json").read_text())  # the best epoch's, as the summary
    with (run["out"] / "confusion_summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    for task in ("identification", "modifier"):
        summary = text(val_run, f"{task}/confusion_summary")
        assert "| class | support | precision | recall | F1 | most often mistaken for |" in summary
        wrong = sum(p[task]["true"] != p[task]["pred"] for p in predictions.values())
        task_rows = [r for r in rows if r["task"] == task]
        assert sum(int(r["support"]) for r in task_rows) == len(predictions)
        for r in task_rows:
            mine = [p[task] for p in predictions.values() if p[task]["true"] == r["class"]]
            if mine:
                assert float(r["recall"]) == pytest.approx(
                    sum(p["pred"] == r["class"] for p in mine) / len(mine), abs=1e-4
                )
        assert [float(r["f1"]) for r in task_rows] == sorted(float(r["f1"]) for r in task_rows)  # worst first
        best_epoch = min(read_metrics(run["out"]), key=lambda r: r["val_loss"])["epoch"]
        assert f"## {task}" in (run["out"] / "confusion_summary.md").read_text()
        assert f"epoch {best_epoch}" in (run["out"] / "confusion_summary.md").read_text()
        assert wrong == sum(int(r["support"]) - round(float(r["recall"] or 0) * int(r["support"])) for r in task_rows)


def test_the_config_and_the_runs_summary_are_text_and_hparams_has_its_session(run):
    root = events(run["out"] / "tb")
    assert "```yaml" in text(root, "config") and "image_size: 32" in text(root, "config")
    summary = text(root, "summary")
    best = min(read_metrics(run["out"]), key=lambda r: r["val_loss"])
    assert f"Best epoch {best['epoch']}" in summary and str(run["out"] / "checkpoints/best.pt") in summary
    experiment = hparams_data(root, metadata.EXPERIMENT_TAG).experiment
    assert [(m.name.group, m.name.tag) for m in experiment.metric_infos] == [
        ("val", "Loss/combined_best"),
        ("val", "Top1/identification"),
        ("val", "Top1/modifier"),
    ]
    start = hparams_data(root, metadata.SESSION_START_INFO_TAG).session_start_info
    assert start.hparams["trainer.batch_size"].number_value == 8
    assert start.hparams["data.weighted_sampler"].HasField("bool_value")
    assert hparams_data(root, metadata.SESSION_END_INFO_TAG).session_end_info.status == api_pb2.STATUS_SUCCESS


def test_the_bar_shows_the_epoch_lines_loss_and_the_log_file_no_bar(run):
    terminal, rows = run["terminal"], read_metrics(run["out"])
    for row in rows:
        shown = re.findall(rf"epoch {row['epoch']}/2 [^\r\n]*?loss (\d+\.\d{{4}}), (\d+) img/s", terminal)
        assert shown, terminal[-2000:]
        assert shown[-1][0] == f"{row['train_loss']:.4f}"  # the bar's last number is the epoch line's
        assert f"train_loss {row['train_loss']:.4f}" in run["log"]
        assert f"validate {row['epoch']}/2" in terminal
    assert re.search(rf"epoch 2/2 100%\|█+\| {run['steps']}/{run['steps']} ", terminal)  # a bar, on a terminal
    # that does not say its width
    assert "\r" not in run["log"] and "%|" not in run["log"] and "█" not in run["log"]


def test_evaluate_writes_the_same_confusion_summary(run, tmp_path):
    evaluate(
        run["out"] / "checkpoints/best.pt", run["data"]["labels_file"], run["root"], tmp_path / "eval", device="cpu"
    )
    with (tmp_path / "eval/confusion_summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["task"] for r in rows} == {"identification", "modifier"}
    assert sum(int(r["support"]) for r in rows if r["task"] == "modifier") == 16  # every original image
    assert "confusion_summary.md" in (tmp_path / "eval/report.md").read_text()


def test_an_interrupted_run_ends_its_session_as_unknown_with_its_hparams_written_at_the_start(tiny_cfg, tmp_path):
    stop = threading.Event()
    stop.set()  # one step, then the interrupt
    with pytest.raises(Interrupted):
        train(tiny_cfg(SMALL, "publish_to=null"), tmp_path / "run", stop=stop)
    root = events(tmp_path / "run/tb")
    assert hparams_data(root, metadata.EXPERIMENT_TAG).experiment.hparam_infos
    assert hparams_data(root, metadata.SESSION_START_INFO_TAG).session_start_info.hparams
    assert hparams_data(root, metadata.SESSION_END_INFO_TAG).session_end_info.status == api_pb2.STATUS_UNKNOWN


def test_a_sweep_names_its_runs_after_the_swept_overrides_and_hparams_lists_them_first(dataset, tmp_path):
    data, root = dataset
    result = run_cli(["-m", "optimizer=simple,group", *tiny_overrides(data, root), "trainer.epochs=1"], cwd=tmp_path)
    assert "%|" not in result.stderr + result.stdout and "\r" not in result.stderr  # no terminal: no bar
    jobs = sorted(p for p in (tmp_path / "outputs/multirun").glob("*/*/*") if (p / ".hydra").is_dir())
    assert [j.name for j in jobs] == ["0", "1"]
    for job in jobs:
        [chosen] = [
            o for o in yaml.safe_load((job / ".hydra/overrides.yaml").read_text()) if o.startswith("optimizer=")
        ]
        folder = job / "tb" / chosen  # tb/optimizer=simple/, tb/optimizer=group/
        assert {p.name for p in folder.iterdir() if p.is_dir()} == {"train", "val"}
        session = events(folder)
        experiment = hparams_data(session, metadata.EXPERIMENT_TAG).experiment
        infos = {info.name: info for info in experiment.hparam_infos}
        assert experiment.hparam_infos[0].name == "optimizer"
        assert [name for name, info in infos.items() if info.differs] == ["optimizer"]
        assert infos["optimizer"].type == api_pb2.DATA_TYPE_STRING
        assert infos["trainer.epochs"].type == api_pb2.DATA_TYPE_FLOAT64
        assert infos["data.weighted_sampler"].type == api_pb2.DATA_TYPE_BOOL
        assert {
            "freeze",
            "scheduler",
            "model",
            "dataset",
            "task",
            "optimizer.lr",
            "data.image_size",
            "data.recolour",
        } <= set(infos)
        values = hparams_data(session, metadata.SESSION_START_INFO_TAG).session_start_info.hparams
        assert values["optimizer"].string_value == chosen.split("=")[1]
        assert values["trainer.epochs"].number_value == 1 and values["data.image_size"].number_value == 32
        assert values["data.weighted_sampler"].bool_value is False and values["freeze"].string_value == "none"
        assert values["dataset.labels_file"].string_value == str(data["labels_file"])
        val_tags = set(events(folder / "val").Tags()["scalars"])
        assert {(m.name.group, m.name.tag) for m in experiment.metric_infos} <= {("val", t) for t in val_tags}
        assert LOSS_TAGS <= set(events(folder / "train").Tags()["scalars"]) & val_tags


def test_bar_width_on_a_terminal_of_zero_columns_a_real_one_and_no_terminal(tmp_path, monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    master, slave = pty.openpty()
    try:
        with open(slave, "w", closefd=False) as stream:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
            assert bar_columns(stream) == 79  # says 0 columns: a bar all the same
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
            assert bar_columns(stream) == 119
            monkeypatch.setenv("TERM", "dumb")
            assert bar_columns(stream) is None
    finally:
        os.close(master)
        os.close(slave)
    with open(tmp_path / "log.txt", "w") as stream:
        assert bar_columns(stream) is None
    assert bar_columns(io.StringIO()) is None


def test_confusion_summary_numbers_and_a_readable_figure_for_many_classes():
    true, predicted = [0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 2, 2, 2, 0]
    rows = {r["class"]: r for r in confusion_summary(confusion_counts(true, predicted, 4), ["a", "b", "c", "d"])}
    assert set(rows) == {"a", "b", "c"}  # d: never validated, never predicted
    assert rows["a"]["support"] == 3 and rows["a"]["recall"] == pytest.approx(1 / 3)
    assert rows["a"]["precision"] == pytest.approx(1 / 2) and rows["a"]["confused_with"] == [("b", 2)]
    assert rows["b"]["f1"] == pytest.approx(2 * 2 / (2 + 4))
    assert [r["class"] for r in confusion_summary(confusion_counts(true, predicted, 4), list("abcd"))][0] == "a"

    rng = np.random.default_rng(0)
    names = [f"Joker_{i:03d}" for i in range(180)]
    truth = rng.integers(0, 180, 2000)
    guess = np.where(rng.random(2000) < 0.8, truth, rng.integers(0, 180, 2000))
    figure = confusion_figure(confusion_counts(truth, guess, 180), names, "identification")
    [axes] = figure.axes
    assert len(axes.get_xticklabels()) == MAX_FIGURE_CLASSES
    assert f"the {MAX_FIGURE_CLASSES} most confused of 180 classes" in axes.get_title()
    assert max(figure.get_size_inches() * figure.dpi) <= 450


def test_the_misclassified_grid_says_how_many_were_wrong_and_how_sure():
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    plain = misclassified_grid(images, list("abcde"), list("axcyz"))
    sure = misclassified_grid(images, list("abcde"), list("axcyz"), confidences=[0.9, 0.8, 0.7, 0.6, 0.5])
    assert plain.shape == sure.shape and not np.array_equal(plain, sure)  # the probabilities are drawn
    shown = misclassified_grid(images, list("abcde"), list("axcyz"), max_images=2)
    assert shown.shape[1] < plain.shape[1]
