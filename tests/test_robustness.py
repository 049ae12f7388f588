"""Nothing lost, nothing silent: interrupts, kills, bad input and hostile checkpoints.

A mistake in the config, the labels, the images or a checkpoint is checked in-process (`refusal`: the
UserError that the command line prints as its one line with exit code 2), and each kind of mistake once
through the command line's Hydra entry point (`refused_on_the_command_line`, in this process; a hostile
checkpoint through a real process). Ctrl-C and kill -9 are real processes."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import hydra
import pytest
import torch
from conftest import (
    compose,
    hydra_main,
    made_once,
    own_core,
    read_metrics,
    run_cli,
    tiny_overrides,
    without_timing,
    write_dataset,
)
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from balatro_train import predict
from balatro_train import train as train_module
from balatro_train.checkpoint import FORMAT, load_checkpoint
from balatro_train.data import build_data, split_samples
from balatro_train.errors import Interrupted, UserError, user_error_in
from balatro_train.job import threads_for_this_process
from balatro_train.labels import read_labels
from balatro_train.train import train


def metrics(run_dir: Path) -> list[dict]:
    return without_timing(read_metrics(run_dir))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # in-process training beside another xdist worker


def refusal(cfg, out_dir: Path) -> str:
    """The line `python -m balatro_train` would print for this run before exiting with code 2: train()
    stops with a UserError (found as the command line finds it, inside Hydra's InstantiationException
    too), in one line, before it writes any checkpoint."""
    with pytest.raises(Exception) as raised:
        train(cfg, out_dir)
    error = user_error_in(raised.value)
    assert error is not None, f"not a UserError, the command line would print a traceback: {raised.value!r}"
    assert "\n" not in str(error), str(error)
    assert not (out_dir / "checkpoints").exists()
    return str(error)


def refused_on_the_command_line(args: list[str], cwd: Path, monkeypatch, capsys) -> str:
    """The command line's Hydra entry point, in this process, on a mistake: exit code 2, no traceback, no
    checkpoint; its output. (test_malicious_checkpoint_is_refused_without_running_its_code is the real
    process.)"""
    monkeypatch.chdir(cwd)
    code = hydra_main(train_module, args, monkeypatch)
    output = "".join(capsys.readouterr())
    assert code == 2, output
    assert "Traceback" not in output
    assert not list(cwd.glob("outputs/*/*/checkpoints"))
    return output


def cli_threads() -> int:
    """The torch threads of a command line that run_cli or start_training starts (job.py gives a run its
    cores): an in-process run on as many threads differs from it only in the last bits."""
    return 1 if own_core() else threads_for_this_process(1)


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def start_training(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "balatro_train", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=own_core(),
    )


def wait_for(path_glob, cwd: Path, process: subprocess.Popen, timeout: float = 120) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(cwd.glob(path_glob))
        if found:
            return found[0]
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.05)
    raise AssertionError(f"{path_glob} did not appear")


EPOCHS = 3  # of slow_run


@pytest.fixture
def slow_run(tmp_path):
    """A tiny run with enough steps (10 an epoch) that a signal sent as epoch 1's last.pt appears lands
    in the middle of the run."""
    root = tmp_path / "labelled"
    data = write_dataset(root, per_class=6)
    return [*tiny_overrides(data, root), "trainer.batch_size=4", f"trainer.epochs={EPOCHS}"]


class StopAfterSteps(threading.Event):
    """A Ctrl-C at a chosen point: the loop asks `is_set()` once after every training step and once
    after an epoch's last one, so the k+1-th question is answered yes."""

    def __init__(self, k: int):
        super().__init__()
        self.k, self.asked = k, 0

    def is_set(self) -> bool:
        self.asked += 1
        return self.asked > self.k or super().is_set()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Two epochs of 24 training images in batches of 2, not interrupted: (config, run folder). Trained in
    this process (not shared with the other xdist worker): the tests compare bit for bit."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    data = write_dataset(tmp / "labelled")
    cfg = compose([*tiny_overrides(data, tmp / "labelled"), "trainer.batch_size=2", "trainer.epochs=2"])
    torch.set_num_threads(1)
    train(cfg.copy(), tmp / "run")
    return cfg, tmp / "run"


# 12 steps an epoch: the loop asks 13 times per epoch.
@pytest.mark.parametrize(
    "k, stopped_at",
    [
        (3, "epoch 1 after 8 images"),  # mid-epoch
        (11, "epoch 1 after 24 images"),  # after the epoch's last step, before validation
        (13, "epoch 2 after 2 images"),  # during validation or the checkpoint write of epoch 1
        (16, "epoch 2 after 8 images"),  # mid-epoch, with a finished epoch behind it
    ],
)
def test_an_interrupt_at_any_point_resumes_bit_exactly(uninterrupted, tmp_path, k, stopped_at):
    cfg, expected = uninterrupted
    with pytest.raises(Interrupted, match=stopped_at) as interrupted:
        train(cfg.copy(), tmp_path / "run with space", stop=StopAfterSteps(k))
    command = shlex.split(str(interrupted.value).split("to resume: ", 1)[1])  # pasteable despite the space
    assert command[:3] == ["python", "-m", "balatro_train"]
    assert Path(command[4]) == tmp_path / "run with space" / ".hydra"
    resume = command[-1].removeprefix("resume=")
    assert Path(resume) == tmp_path / "run with space" / "checkpoints" / "last.pt"

    resumed_cfg = cfg.copy()
    resumed_cfg.resume = resume
    train(resumed_cfg, tmp_path / "resumed")

    # One process, same threads: everything must be bit-identical, the weights and every metric but the top-3
    # accuracies. After two epochs at lr 3e-3 the softmax saturates (val_loss about 11): the runner-up classes'
    # probabilities are exact zeros, and torch.topk orders exact ties as it likes (seen flipping here from one
    # run to the next with identical weights and losses).
    def comparable(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if not k.endswith("top3_acc")} for row in without_timing(rows)]

    assert comparable(read_metrics(tmp_path / "resumed")) == comparable(read_metrics(expected))
    final = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)["model"]
    weights = torch.load(expected / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(final[key], weights[key]) for key in weights)


def test_ctrl_c_saves_last_and_the_printed_command_resumes(slow_run, tmp_path):
    """The real signal, in a real process, in a folder whose name needs quoting, and the printed command
    run as printed. The uninterrupted run to compare with is trained in this process, on as many threads
    as the command lines get. Two processes may differ in the last bits (oneDNN picks kernels by memory
    alignment), so losses and weights are compared with a tolerance that a wrong resume (another sampler
    position, other RNG) exceeds by orders of magnitude, and top-k accuracies, which near ties can flip,
    are not compared here: the in-process test above compares everything bit for bit."""
    with torch_threads(cli_threads()):
        train(compose(slow_run), tmp_path / "uninterrupted")
    uninterrupted = tmp_path / "uninterrupted"

    process = start_training([*slow_run, "hydra.run.dir=outputs/run with space"], tmp_path)
    wait_for("outputs/run with space/checkpoints/last.pt", tmp_path, process)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "Traceback" not in output
    [line] = [text for text in output.splitlines() if "to resume:" in text]
    command = shlex.split(line.split("to resume: ", 1)[1])
    assert command[:3] == ["python", "-m", "balatro_train"] and command[-1].startswith("resume=")
    interrupted = tmp_path / "outputs" / "run with space"
    assert len(metrics(interrupted)) < EPOCHS

    run_cli([*command[3:], "hydra.run.dir=outputs/resumed"], cwd=tmp_path)
    resumed = tmp_path / "outputs" / "resumed"
    rows, expected = metrics(resumed), metrics(uninterrupted)
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    for row, want in zip(rows, expected, strict=True):
        for key in (k for k in want if k.endswith("loss") or k.startswith("lr")):
            assert row[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (row["epoch"], key)
    final = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)["model"]
    expected_weights = torch.load(uninterrupted / "checkpoints" / "last.pt", weights_only=True)["model"]
    for key, value in expected_weights.items():
        assert torch.allclose(final[key].float(), value.float(), rtol=1e-3, atol=1e-5), key


def test_kill_9_leaves_a_loadable_checkpoint_that_resumes_to_the_end(slow_run, tmp_path):
    process = start_training(slow_run, tmp_path)
    last = wait_for("outputs/*/*/checkpoints/last.pt", tmp_path, process)
    time.sleep(0.5)
    process.kill()
    process.wait()
    assert process.returncode == -signal.SIGKILL  # the kill hit the run, before its end
    state = torch.load(last, weights_only=True)  # complete, whatever moment the kill hit
    assert state["epoch"] >= 1
    train(compose([*slow_run, f"resume={last}"]), tmp_path / "resumed")
    assert [r["epoch"] for r in metrics(tmp_path / "resumed")] == list(range(1, EPOCHS + 1))


def test_malicious_checkpoint_is_refused_without_running_its_code(dataset, tmp_path):
    """A checkpoint's mistake on the real command line (the other checkpoint tests run in-process)."""
    data, root = dataset
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "model": Exploit()}, evil)
    result = run_cli([*tiny_overrides(data, root), f"resume={evil}"], cwd=tmp_path, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output
    assert not list(tmp_path.glob("outputs/*/*/checkpoints"))
    assert "refused" in output
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "damaged or not a checkpoint"),
        (None, "not a balatro-train checkpoint"),
    ],
)
def test_truncated_or_foreign_checkpoint_fails_with_one_line(dataset, tmp_path, content, message):
    data, root = dataset
    path = tmp_path / "other.pt"
    if content is None:
        torch.save({"state_dict": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    assert message in refusal(compose([*tiny_overrides(data, root), f"init_from={path}"]), tmp_path / "run")


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A first stage on the tiny set, freeze=all, one epoch, trained once for the session: its
    overrides (without freeze=) and its last.pt."""

    def make(work):
        data = write_dataset(work / "labelled")
        (work / "overrides.json").write_text(json.dumps(tiny_overrides(data, work / "labelled")))
        with torch_threads(1):
            train(
                compose([*json.loads((work / "overrides.json").read_text()), "freeze=all", "trainer.epochs=1"]),
                work / "run",
            )

    work = made_once(tmp_path_factory, "robustness_stage1", make)
    return SimpleNamespace(
        overrides=json.loads((work / "overrides.json").read_text()), last=work / "run" / "checkpoints" / "last.pt"
    )


def test_init_from_a_checkpoint_with_other_classes_names_them(stage1, tmp_path):
    second = write_dataset(tmp_path / "second")
    labels = json.loads(second["labels_file"].read_text())
    for meta in labels.values():
        meta["name"] = meta["name"].replace("Mercury", "Venus")
    second["labels_file"].write_text(json.dumps(labels))
    second["augmented"].write_text("{}")
    message = refusal(
        compose([*tiny_overrides(second, tmp_path / "second"), f"init_from={stage1.last}"]), tmp_path / "run"
    )
    assert "classes the checkpoint does not know: Venus" in message


def test_init_from_starts_a_second_stage_with_another_strategy(stage1, tmp_path):
    train(
        compose([*stage1.overrides, "freeze=none", "optimizer=group", "trainer.epochs=1", f"init_from={stage1.last}"]),
        tmp_path / "stage2",
    )
    before = torch.load(stage1.last, weights_only=True)
    after = torch.load(tmp_path / "stage2" / "checkpoints/last.pt", weights_only=True)
    assert before["config"]["freeze"]["trainable"] == []  # stage 1 trained the heads only
    assert after["epoch"] == 1 and after["class_names"] == before["class_names"]
    assert not torch.equal(before["model"]["backbone.conv1.weight"], after["model"]["backbone.conv1.weight"])


def break_labels(data: dict, how: str) -> str:
    labels_file = data["labels_file"]
    labels = json.loads(labels_file.read_text())
    first = next(iter(labels))
    if how == "missing":
        labels_file.unlink()
        return "labels file not found"
    if how == "not json":
        labels_file.write_text('{"a.png": {"name": "x",}')
        return "not valid JSON (line 1"
    if how == "not an object":
        labels_file.write_text("[1, 2]")
        return "expected a JSON object"
    if how == "no field":
        del labels[first]["modifier"]
    if how == "empty":
        labels = {}
    if how == "unknown parent":
        augmented = json.loads(data["augmented"].read_text())
        next(iter(augmented.values()))["parent"] = "nowhere.png"
        data["augmented"].write_text(json.dumps(augmented))
    labels_file.write_text(json.dumps(labels))
    return {
        "no field": f"entry {first!r}",
        "empty": "the dataset is empty",
        "unknown parent": "names parent 'nowhere.png'",
    }[how]


@pytest.mark.parametrize("how", ["missing", "not json", "not an object", "no field", "empty", "unknown parent"])
def test_bad_labels_fail_early_with_one_line(dataset, tmp_path, how):
    data, root = dataset
    message = break_labels(data, how)
    assert message in refusal(compose(tiny_overrides(data, root)), tmp_path / "run")


def test_bad_labels_on_the_command_line_are_one_line_and_exit_2(dataset, tmp_path, monkeypatch, capsys):
    data, root = dataset
    message = break_labels(data, "not json")
    assert message in refused_on_the_command_line(tiny_overrides(data, root), tmp_path, monkeypatch, capsys)


def test_a_class_left_without_training_images_is_named(dataset, tmp_path):
    """The split stratifies by the first task (identification): an edition seen on a single image
    can land in validation only, and the modifier head could then never learn it."""
    data, root = dataset
    labels = json.loads(data["labels_file"].read_text())
    lone = "Mercury_1.png"
    labels[lone]["modifier"] = "Polychrome"
    data["labels_file"].write_text(json.dumps(labels))
    augmented = {f: m for f, m in json.loads(data["augmented"].read_text()).items() if m["parent"] != lone}
    data["augmented"].write_text(json.dumps(augmented))
    originals = read_labels(data["labels_file"], root)
    extra = read_labels(data["augmented"], root, augmented=True)
    seed = next(s for s in range(100) if lone in split_samples(originals, extra, "name", 0.2, s)[1])
    message = refusal(compose([*tiny_overrides(data, root), f"seed={seed}"]), tmp_path / "run")
    assert "task modifier: classes with no training sample after the split: Polychrome" in message


def damage_image(root: Path, damage: str) -> None:
    victim = root / "dataset_default" / "Mercury_0.png"
    if damage == "zero bytes":
        victim.write_bytes(b"")
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:60])
    elif damage == "not an image":
        victim.write_text("hello")
    else:
        victim.unlink()


@pytest.mark.parametrize("damage", ["zero bytes", "truncated", "not an image", "missing"])
def test_bad_image_stops_the_run_or_is_skipped_and_listed(dataset, tmp_path, damage):
    data, root = dataset
    damage_image(root, damage)
    message = refusal(compose(tiny_overrides(data, root)), tmp_path / "stopped")
    assert "Mercury_0.png" in message and "on_bad_image=skip" in message

    train(compose([*tiny_overrides(data, root), "data.on_bad_image=skip", "trainer.epochs=1"]), tmp_path / "run")
    run = tmp_path / "run"
    assert [row["epoch"] for row in read_metrics(run)] == [1]
    skipped = json.loads((run / "skipped_images.json").read_text())
    assert list(skipped) == ["Mercury_0.png"]
    assert "Mercury_0.png" not in json.loads((run / "split.json").read_text())["train"]


def test_a_bad_image_on_the_command_line_is_one_line_and_exit_2(dataset, tmp_path, monkeypatch, capsys):
    data, root = dataset
    damage_image(root, "truncated")
    output = refused_on_the_command_line(tiny_overrides(data, root), tmp_path, monkeypatch, capsys)
    assert "Mercury_0.png" in output and "on_bad_image=skip" in output


UNKNOWN_GROUP_OPTIONS = {"optimizer=sgdx", "scheduler=wobbly", "task=colour"}  # Hydra's composition refuses them


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer=sgdx", "Available options in 'optimizer'"),
        ("scheduler=wobbly", "Available options in 'scheduler'"),
        ("task=colour", "Available options in 'task'"),
        ("model.backbone=resnet7", "model.backbone=resnet7 is not a torchvision classification model"),
        (
            "+tasks.modifier.metrics.auc._target_=torchmetrics.Nope",
            "tasks.modifier.metrics.auc._target_=torchmetrics.Nope is not one balatro-train builds",
        ),
        ("data.image_size=16", "too small for the backbone"),
        ("trainer.batch_size=0", "trainer.batch_size=0 must be at least 1"),
        ("trainer.batch_size=1", "trainer.batch_size=1: BatchNorm needs at least 2 images per batch"),
        ("trainer.epochs=0", "trainer.epochs=0 must be at least 1"),
        ("optimizer.lr=-1", "optimizer.lr=-1 must be greater than 0"),
        ("data.val_split=1.5", "data.val_split=1.5 must lie strictly between 0 and 1"),
        ("data.train_transforms=sparkle", "data.train_transforms=sparkle is not a pipeline"),
    ],
)
def test_unknown_names_and_impossible_values(dataset, tmp_path, override, message):
    """In-process: the same composition as the command line's (Hydra prints its composition errors
    without a traceback: tests/test_train.py runs one), then train()'s one-line refusal."""
    data, root = dataset
    overrides = [*tiny_overrides(data, root), override]
    if override in UNKNOWN_GROUP_OPTIONS:
        with pytest.raises(MissingConfigException) as error:
            compose(overrides)
        assert message in str(error.value)
    else:
        assert message in refusal(compose(overrides), tmp_path / "run")


def test_an_impossible_value_on_the_command_line_is_one_line_and_exit_2(dataset, tmp_path, monkeypatch, capsys):
    data, root = dataset
    output = refused_on_the_command_line(
        [*tiny_overrides(data, root), "trainer.batch_size=1"], tmp_path, monkeypatch, capsys
    )
    assert "trainer.batch_size=1: BatchNorm needs at least 2 images per batch" in output


# ---- found when tried as a new user -----------------------------------------------------------------


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A finished tiny run of 2 epochs with a checkpoint after each, trained once for the session: its
    overrides, its folder, its labelled images."""

    def make(work):
        data = write_dataset(work / "labelled")
        # StepLR, whose length is not trainer.epochs: a resume may then stop it earlier (trainer.epochs=1)
        overrides = [
            *tiny_overrides(data, work / "labelled"),
            "trainer.epochs=2",
            "trainer.checkpoint_interval=1",
            "scheduler=step",
        ]
        (work / "overrides.json").write_text(json.dumps(overrides))
        with torch_threads(1):
            train(compose(overrides), work / "first")

    work = made_once(tmp_path_factory, "robustness_two_epochs", make)
    return SimpleNamespace(
        overrides=json.loads((work / "overrides.json").read_text()),
        dir=work / "first",
        images=work / "labelled" / "dataset_default",
    )


@pytest.mark.parametrize(
    "resume_from, epochs", [("epoch_001.pt", 1), ("last.pt", 2)], ids=["after_epoch_1", "finished"]
)
def test_a_resumed_run_that_trains_no_better_epoch_still_has_and_publishes_its_best(
    two_epochs, tmp_path, monkeypatch, capsys, resume_from, epochs
):
    """Resuming a finished run (or one whose later epochs never beat the saved best) used to end in
    a FileNotFoundError while publishing, with no best.pt in the new run folder. The command lines'
    Hydra entry points run in this process: publishing is theirs (balatro_train/job.py)."""
    resume_from = two_epochs.dir / "checkpoints" / resume_from
    monkeypatch.chdir(tmp_path)
    code = hydra_main(
        train_module,
        [
            *two_epochs.overrides,
            f"trainer.epochs={epochs}",
            f"resume={resume_from}",
            "hydra.run.dir=outputs/resumed",
            "publish_to=published.pt",
        ],
        monkeypatch,
    )
    printed = capsys.readouterr()
    assert code == 0, printed.out + printed.err
    assert "Traceback" not in printed.out + printed.err
    history = torch.load(resume_from, weights_only=True)["history"]
    best = torch.load(tmp_path / "outputs/resumed/checkpoints/best.pt", weights_only=True)
    assert best["epoch"] == min(history, key=lambda r: r["val_loss"])["epoch"]
    assert (tmp_path / "published.pt").read_bytes() == (tmp_path / "outputs/resumed/checkpoints/best.pt").read_bytes()
    assert (
        hydra_main(predict, [f"checkpoint={tmp_path / 'outputs/resumed'}", f"images={two_epochs.images}"], monkeypatch)
        == 0
    )
    assert len(json.loads(capsys.readouterr().out)) == 16


def test_an_edition_seen_only_on_an_augmented_copy_of_a_validation_image_is_refused(dataset, tiny_cfg):
    """Augmented copies of validation images never train, so that edition would have no training
    image and no validation image: the head could never learn it, and nothing said so."""
    data, root = dataset
    augmented = json.loads(data["augmented"].read_text())
    cfg = tiny_cfg("task=modifier")
    val = set(build_data(cfg).split["val"])
    victim = next(f for f, meta in augmented.items() if meta["parent"] in val)
    augmented[victim]["modifier"] = "Polychrome"
    data["augmented"].write_text(json.dumps(augmented))
    with pytest.raises(
        UserError,
        match="task modifier: classes with no training sample after the split: "
        "Polychrome; label more images of them or lower data.val_split",
    ):
        build_data(cfg)


def test_an_augmented_file_named_like_an_original_is_refused_naming_both_files(dataset, tiny_cfg):
    data, root = dataset
    augmented = json.loads(data["augmented"].read_text())
    original = "Mercury_0.png"
    augmented[original] = augmented.pop(f"aug_0_{original}")
    data["augmented"].write_text(json.dumps(augmented))
    with pytest.raises(
        UserError,
        match=rf"'{original}' is listed in both {data['labels_file']} and "
        rf"{data['augmented']}",
    ):
        build_data(tiny_cfg())


def test_an_image_listed_twice_in_one_labels_file_is_refused(dataset):
    data, root = dataset
    text = data["labels_file"].read_text()
    data["labels_file"].write_text(text.rstrip().removesuffix("}") + ', "Mercury_0.png": {"name": "Mercury"}}')
    with pytest.raises(UserError, match="'Mercury_0.png' is listed twice"):
        read_labels(data["labels_file"], root)


def test_an_absolute_full_path_from_another_machine_falls_back_to_the_file_beside_the_labels(tmp_path):
    data = write_dataset(tmp_path / "copied")
    labels = json.loads(data["labels_file"].read_text())
    for file, meta in labels.items():
        meta["full_path"] = f"/home/colleague/balatro/dataset_default/{file}"  # not on this machine
    data["labels_file"].write_text(json.dumps(labels))
    samples = read_labels(data["labels_file"], root=tmp_path)
    assert all(s.path == data["labels_file"].parent / s.file and s.path.is_file() for s in samples)


def test_classes_without_a_validation_image_are_logged(tmp_path, caplog):
    data = write_dataset(tmp_path / "labelled", per_class={"Joker_001": 4, "Joker_002": 1, "The Fool": 4, "Mercury": 1})
    cfg = compose(tiny_overrides(data, tmp_path / "labelled"))
    with caplog.at_level("INFO", logger="balatro_train"):
        build_data(cfg)
    assert (
        "task identification: 2 of 4 classes have no validation image (too few originals): Joker_002, Mercury"
        in caplog.text
    )


@pytest.mark.parametrize(
    "write",
    [
        lambda p: p.write_bytes(b""),
        lambda p: p.write_bytes(os.urandom(4096)),
        lambda p: p.write_text("not a checkpoint"),
        lambda p: p.write_bytes(TRUNCATED_CHECKPOINT),
    ],
    ids=["empty", "random bytes", "text", "truncated"],
)
def test_a_damaged_file_is_called_damaged_and_the_safe_loader_is_never_questioned(tmp_path, write):
    path = tmp_path / "model.pt"
    write(path)
    with pytest.raises(UserError) as error:
        load_checkpoint(path, "checkpoint")
    message = str(error.value)
    assert message.startswith(f"checkpoint={path}: damaged or not a checkpoint") and "\n" not in message
    assert "weights_only" not in message and "refused" not in message


def truncated_checkpoint() -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "model": {"w": torch.zeros(1000)}}, buffer)
    return buffer.getvalue()[:2000]


TRUNCATED_CHECKPOINT = truncated_checkpoint()


def test_a_rerun_from_a_saved_config_keeps_the_type_checks(tmp_path):
    """The saved .hydra/config.yaml has no defaults list, so Hydra does not apply the schema to it. Composed
    here as `--config-dir <run>/.hydra --config-name config trainer.batch_size=many` composes it."""
    saved = tmp_path / "run" / ".hydra"
    saved.mkdir(parents=True)
    (saved / "config.yaml").write_text(OmegaConf.to_yaml(compose([])))
    with hydra.initialize_config_dir(config_dir=str(saved), version_base="1.3"):
        cfg = hydra.compose("config", overrides=["trainer.batch_size=many"])
    assert "trainer.batch_size: Value 'many' of type 'str' could not be converted to Integer" in refusal(
        cfg, tmp_path / "rerun"
    )


def test_processes_side_by_side_share_the_cores(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    assert threads_for_this_process(1) == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))  # torchrun --nproc_per_node=<cores>
    assert threads_for_this_process(1) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert threads_for_this_process(-1) == 1  # joblib n_jobs=-1: one job per core


def test_a_checkpoint_of_the_older_format_says_so(tmp_path):
    """Format 1 models took images their pipeline had normalised; today's normalise their uint8 input."""
    torch.save({"format": "balatro-train/1", "model": {}}, tmp_path / "old.pt")
    with pytest.raises(UserError, match=r"written by an older balatro-train \(format 1.*retrain it"):
        load_checkpoint(tmp_path / "old.pt", "checkpoint")
