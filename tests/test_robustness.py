"""Nothing lost, nothing silent: interrupts, kills, bad input and hostile checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from balatro_train.data import read_labels, split_samples
from conftest import run_cli, run_dirs, tiny_overrides, write_dataset

TIMING_KEYS = {"epoch_seconds", "train_images_per_sec"}


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert ra[key] == pytest.approx(rb[key], abs=1e-6), (ra["epoch"], key)


def start_training(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "balatro_train", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(path_glob, cwd: Path, process: subprocess.Popen, timeout: float = 120) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(cwd.glob(path_glob))
        if found:
            return found[0]
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.05)
    raise AssertionError(f"{path_glob} did not appear")


@pytest.fixture
def slow_run(tmp_path):
    """A tiny run with many small steps, so that a signal lands inside an epoch."""
    root = tmp_path / "labelled"
    data = write_dataset(root, per_class=6)
    return [*tiny_overrides(data, root), "trainer.batch_size=2", "trainer.epochs=4"]


def test_ctrl_c_saves_last_and_the_printed_command_resumes_exactly(slow_run, tmp_path):
    uninterrupted_cwd = tmp_path / "a"
    uninterrupted_cwd.mkdir()
    run_cli(slow_run, cwd=uninterrupted_cwd)
    [uninterrupted] = run_dirs(uninterrupted_cwd)

    process = start_training(slow_run, tmp_path)
    wait_for("outputs/*/*/checkpoints/last.pt", tmp_path, process)
    process.send_signal(signal.SIGINT)  # at once: early in epoch 2 even on a fast machine
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "Traceback" not in output
    [line] = [l for l in output.splitlines() if "to resume:" in l]
    command = line.split("to resume: ", 1)[1].split()
    assert command[:3] == ["python", "-m", "balatro_train"] and command[-1].startswith("resume=")
    [interrupted] = run_dirs(tmp_path)
    assert len(metrics(interrupted)) < 4

    run_cli(command[3:], cwd=tmp_path)
    resumed = [d for d in run_dirs(tmp_path) if d != interrupted][0]
    assert_same_metrics(metrics(resumed), metrics(uninterrupted))


def test_kill_9_leaves_a_loadable_checkpoint_that_resumes_to_the_end(slow_run, tmp_path):
    process = start_training([*slow_run, "trainer.epochs=6"], tmp_path)
    last = wait_for("outputs/*/*/checkpoints/last.pt", tmp_path, process)
    time.sleep(0.5)
    process.kill()
    process.wait()
    state = torch.load(last, weights_only=True)  # complete, whatever moment the kill hit
    assert state["epoch"] >= 1
    run_cli([*slow_run, "trainer.epochs=6", f"resume={last}"], cwd=tmp_path)
    resumed = [d for d in run_dirs(tmp_path) if d != last.parents[1]][0]
    assert [r["epoch"] for r in metrics(resumed)] == [1, 2, 3, 4, 5, 6]


def test_malicious_checkpoint_is_refused_without_running_its_code(dataset, tmp_path):
    data, root = dataset
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "balatro-train/1", "model": Exploit()}, evil)
    result = run_cli([*tiny_overrides(data, root), f"resume={evil}"], cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "refused" in result.stdout and "Traceback" not in result.stdout + result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    (b"", "not a readable checkpoint"),
    (None, "not a balatro-train checkpoint"),
])
def test_truncated_or_foreign_checkpoint_fails_with_one_line(dataset, tmp_path, content, message):
    data, root = dataset
    path = tmp_path / "other.pt"
    if content is None:
        torch.save({"state_dict": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    result = run_cli([*tiny_overrides(data, root), f"init_from={path}"], cwd=tmp_path, check=False)
    assert result.returncode == 2 and message in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_init_from_a_checkpoint_with_other_classes_names_them(tmp_path):
    first = write_dataset(tmp_path / "first")
    run_cli([*tiny_overrides(first, tmp_path / "first"), "trainer.epochs=1"], cwd=tmp_path)
    [run] = run_dirs(tmp_path)
    second = write_dataset(tmp_path / "second")
    labels = json.loads(second["labels_file"].read_text())
    for meta in labels.values():
        meta["name"] = meta["name"].replace("Mercury", "Venus")
    second["labels_file"].write_text(json.dumps(labels))
    second["augmented"].write_text("{}")
    result = run_cli([*tiny_overrides(second, tmp_path / "second"), f"init_from={run}/checkpoints/last.pt"],
                     cwd=tmp_path, check=False)
    assert result.returncode == 2 and "classes the checkpoint does not know: Venus" in result.stdout


def test_init_from_starts_a_second_stage_with_another_strategy(dataset, tmp_path):
    data, root = dataset
    run_cli([*tiny_overrides(data, root), "freeze=all", "trainer.epochs=1"], cwd=tmp_path)
    [stage1] = run_dirs(tmp_path)
    run_cli([*tiny_overrides(data, root), "freeze=none", "optimizer=group", "trainer.epochs=1",
             f"init_from={stage1}/checkpoints/last.pt"], cwd=tmp_path)
    stage2 = [d for d in run_dirs(tmp_path) if d != stage1][0]
    before = torch.load(stage1 / "checkpoints/last.pt", weights_only=True)
    after = torch.load(stage2 / "checkpoints/last.pt", weights_only=True)
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
    return {"no field": f"entry {first!r}", "empty": "the dataset is empty",
            "unknown parent": "names parent 'nowhere.png'"}[how]


@pytest.mark.parametrize("how", ["missing", "not json", "not an object", "no field", "empty", "unknown parent"])
def test_bad_labels_fail_early_with_one_line(dataset, tmp_path, how):
    data, root = dataset
    message = break_labels(data, how)
    result = run_cli(tiny_overrides(data, root), cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stdout, result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert not list(tmp_path.glob("outputs/*/*/checkpoints"))


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
    result = run_cli([*tiny_overrides(data, root), f"seed={seed}"], cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "task modifier: classes with no training sample after the split: Polychrome" in result.stdout


@pytest.mark.parametrize("damage", ["zero bytes", "truncated", "not an image", "missing"])
def test_bad_image_stops_the_run_or_is_skipped_and_listed(dataset, tmp_path, damage):
    data, root = dataset
    victim = root / "dataset_default" / "Mercury_0.png"
    if damage == "zero bytes":
        victim.write_bytes(b"")
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:60])
    elif damage == "not an image":
        victim.write_text("hello")
    else:
        victim.unlink()
    result = run_cli(tiny_overrides(data, root), cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Mercury_0.png" in result.stdout and "on_bad_image=skip" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr

    run_cli([*tiny_overrides(data, root), "data.on_bad_image=skip", "trainer.epochs=1"], cwd=tmp_path)
    [run] = [d for d in run_dirs(tmp_path) if (d / "metrics.jsonl").exists()]
    skipped = json.loads((run / "skipped_images.json").read_text())
    assert list(skipped) == ["Mercury_0.png"]
    assert "Mercury_0.png" not in json.loads((run / "split.json").read_text())["train"]


@pytest.mark.parametrize("override, message", [
    ("optimizer=sgdx", "Available options in 'optimizer'"),
    ("scheduler=wobbly", "Available options in 'scheduler'"),
    ("task=colour", "Available options in 'task'"),
    ("model.backbone=resnet7", "model.backbone=resnet7 is not a torchvision classification model"),
    ("+tasks.modifier.metrics.auc._target_=torchmetrics.Nope", "tasks.modifier.metrics.auc: cannot build it"),
    ("data.image_size=16", "too small for the backbone"),
    ("trainer.batch_size=0", "trainer.batch_size=0 must be at least 1"),
    ("trainer.epochs=0", "trainer.epochs=0 must be at least 1"),
    ("optimizer.lr=-1", "optimizer.lr=-1 must be greater than 0"),
    ("data.val_split=1.5", "data.val_split=1.5 must lie strictly between 0 and 1"),
    ("tasks.modifier.train_transforms=sparkle", "tasks.modifier.train_transforms=sparkle is not a pipeline"),
])
def test_unknown_names_and_impossible_values(dataset, tmp_path, override, message):
    data, root = dataset
    result = run_cli([*tiny_overrides(data, root), override], cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(dataset, tmp_path):
    data, root = dataset
    result = run_cli([*tiny_overrides(data, root), "optimizer.lr=1e25", "trainer.epochs=5", "scheduler=none"],
                     cwd=tmp_path, check=False)
    assert result.returncode == 2 and "the loss became" in result.stdout, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
