"""What the runner trusts: a checkpoint never acts (its config is data), two runs never share a folder, a
resume goes on with its own run's settings and images, and a failing write leaves the last good file.
Most tests call the command lines' Hydra entry points in-process (`hydra_main`) on one small run."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import compose, hydra_main, made_once, read_metrics, tiny_overrides, write_dataset
from hydra.utils import instantiate
from omegaconf import open_dict

from balatro_train import enroll, evaluate, export, predict
from balatro_train import train as train_module
from balatro_train.checkpoint import save_checkpoint
from balatro_train.data import build_data
from balatro_train.errors import UserError
from balatro_train.inference import Recognizer
from balatro_train.job import check_publish_target
from balatro_train.run_folder import RunFolderGuard, new_folder
from balatro_train.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # in-process training beside another xdist worker
RUN = ["trainer.epochs=3", "trainer.checkpoint_interval=1", "publish_to=null"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 3-epoch tiny run (epoch_001..003.pt, best.pt, last.pt), trained in-process once."""

    def make(work):
        data = write_dataset(work / "labelled", per_class=3, augmented_per_image=0)
        (work / "overrides.json").write_text(json.dumps([*tiny_overrides(data, work / "labelled"), *RUN]))
        train(compose(json.loads((work / "overrides.json").read_text())), work / "run")

    work = made_once(tmp_path_factory, "trust_run", make)
    return SimpleNamespace(
        work=work,
        dir=work / "run",
        checkpoints=work / "run" / "checkpoints",
        overrides=json.loads((work / "overrides.json").read_text()),
        labels_file=work / "labelled" / "dataset_default" / "labels.json",
        image=next((work / "labelled" / "dataset_default").glob("*.png")),
    )


# ---- a checkpoint never acts ------------------------------------------------------------------------------


def evil_call(victim: Path) -> dict:
    """A `_target_` that the safe loader lets through (only dicts and strings) and that writes a file."""
    return {"_target_": "numpy.savetxt", "fname": str(victim), "X": ["written by a checkpoint"], "fmt": "%s"}


def plant(state: dict, where: str, victim: Path) -> dict:
    config = state["config"]
    if where == "head":
        config["heads"]["evil"] = evil_call(victim)
        config["tasks"]["identification"]["head"] = "evil"
    elif where == "model":
        config["model"] = {**evil_call(victim), "backbone": "resnet18"}
    else:  # a metric, which evaluate builds from the checkpoint's task config
        config["tasks"]["identification"]["metrics"]["top1_acc"] = evil_call(victim)
    return state


TOOLS = {  # each command line and the arguments that make it load the checkpoint
    "predict": (predict, lambda run, ckpt, tmp: [f"checkpoint={ckpt}", f"images={run.image}"]),
    "evaluate": (
        evaluate,
        lambda run, ckpt, tmp: [
            f"checkpoint={ckpt}",
            f"dataset.labels_file={run.labels_file}",
            f"dataset.root={run.work / 'labelled'}",
            f"out_dir={tmp / 'eval'}",
        ],
    ),
    "export": (export, lambda run, ckpt, tmp: [f"checkpoint={ckpt}", "format=onnx", f"out={tmp / 'model.onnx'}"]),
    "enroll": (
        enroll,
        lambda run, ckpt, tmp: [f"checkpoint={ckpt}", f"images={run.image}", "name=New", f"out={tmp / 'enrolled.pt'}"],
    ),
}


@pytest.mark.parametrize("where", ["head", "model", "metric"])
@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_a_checkpoint_whose_config_names_a_callable_is_refused_by_every_tool(
    run, tmp_path, monkeypatch, capsys, tool, where
):
    victim = tmp_path / "victim.txt"
    evil = tmp_path / "shared.pt"
    torch.save(plant(torch.load(run.checkpoints / "best.pt", weights_only=True), where, victim), evil)
    module, args = TOOLS[tool]
    assert hydra_main(module, args(run, evil, tmp_path), monkeypatch) == 2
    err = capsys.readouterr().err
    assert not victim.exists()  # nothing it names was called
    assert f"checkpoint={evil}: refused, its config names numpy.savetxt" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "numpy.savetxt" in line]) == 1


@pytest.mark.parametrize("key", ["resume", "init_from"])
def test_resume_and_init_from_refuse_such_a_checkpoint_before_building_anything(run, tmp_path, key):
    victim, evil = tmp_path / "victim.txt", tmp_path / "shared.pt"
    torch.save(plant(torch.load(run.checkpoints / "last.pt", weights_only=True), "head", victim), evil)
    with pytest.raises(UserError, match=rf"^{key}={evil}: refused, its config names numpy.savetxt \(heads.evil\)"):
        train(compose([*run.overrides, f"{key}={evil}"]), tmp_path / "out")
    assert not victim.exists()
    with pytest.raises(UserError, match="refused, its config names numpy.savetxt"):
        Recognizer.from_checkpoint(evil)
    assert not victim.exists()


def test_a_checkpoint_whose_preprocessing_names_something_else_is_refused_in_one_line(run, tmp_path):
    state = torch.load(run.checkpoints / "best.pt", weights_only=True)
    state["preprocessing"]["val_transforms"]["transform"] = {"__class_fullname__": "os.system", "command": "true"}
    torch.save(state, tmp_path / "shared.pt")
    with pytest.raises(
        UserError,
        match=rf"^checkpoint={tmp_path / 'shared.pt'}: refused, its preprocessing is not "
        r"an albumentations pipeline \(KeyError: 'os.system'\)",
    ):
        Recognizer.from_checkpoint(tmp_path / "shared.pt")


def test_a_training_config_naming_another_head_class_is_refused_too(run, tmp_path):
    """The same constructors build the model for training: a checkpoint it writes can always be loaded."""
    victim = tmp_path / "victim.txt"
    cfg = compose([*run.overrides, "tasks.identification.head=evil"])
    with open_dict(cfg):
        cfg.heads.evil = evil_call(victim)
    with pytest.raises(UserError, match=r"heads.evil._target_=numpy.savetxt is not one balatro-train builds"):
        train(cfg, tmp_path / "out")
    assert not victim.exists()


# ---- two runs never mix -----------------------------------------------------------------------------------


def test_two_runs_started_in_the_same_second_get_two_folders(tmp_path, monkeypatch):
    """RunFolderGuard, before Hydra makes the folder: the config's outputs/<date>/<time> is taken (by a run
    started this second), so this run claims <time>_2; a sweep's claimed folder reaches its jobs' configs."""
    monkeypatch.chdir(tmp_path)
    cfg = compose([], hydra_config=True)
    taken = Path(cfg.hydra.run.dir)
    taken.mkdir(parents=True)
    RunFolderGuard().on_run_start(cfg)
    assert cfg.hydra.run.dir == f"{taken}_2" and Path(cfg.hydra.run.dir).is_dir()
    Path(cfg.hydra.sweep.dir).mkdir(parents=True)
    RunFolderGuard().on_multirun_start(cfg)
    assert (
        cfg.hydra.sweep.dir.endswith("_2") and cfg.hydra.overrides.hydra[-1] == f"hydra.sweep.dir={cfg.hydra.sweep.dir}"
    )
    assert new_folder("x") == "x" and new_folder("x") == "x_2" and new_folder("x") == "x_3"
    assert sorted(p.name for p in taken.parent.iterdir()) == [taken.name, f"{taken.name}_2"]  # nothing else made


def test_a_run_refuses_a_folder_that_holds_another_run(run, tmp_path, monkeypatch, capsys):
    """Before Hydra writes into it: the other run's .hydra/config.yaml and metrics stay as they were."""
    other = tmp_path / "other"
    shutil.copytree(run.dir, other, ignore=shutil.ignore_patterns("*.pt"))
    (other / ".hydra").mkdir()
    (other / ".hydra" / "config.yaml").write_text("the other run's config\n")
    before = (other / "metrics.jsonl").read_text()
    assert hydra_main(train_module, [*run.overrides, f"hydra.run.dir={other}"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert f"{other} already holds a run" in err and f"resume={other}/checkpoints/last.pt" in err
    assert (other / ".hydra" / "config.yaml").read_text() == "the other run's config\n"
    assert (other / "metrics.jsonl").read_text() == before
    with pytest.raises(UserError, match="already holds a run"):  # train() itself, called without Hydra
        train(compose(run.overrides), other)


def test_evaluate_never_writes_into_a_run_folder(run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run.dir, other, ignore=shutil.ignore_patterns("*.pt"))
    before = {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()}
    with pytest.raises(UserError, match=rf"^out_dir={other} holds a training run"):
        evaluate.evaluate(run.checkpoints / "best.pt", run.labels_file, run.work / "labelled", other)
    assert {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()} == before


def test_a_sweep_relaunched_into_an_old_folder_resumes_only_its_own_jobs(run, tmp_path, monkeypatch):
    """Job 0 of a relaunch with another lr is refused (naming the key), and the old job's checkpoint stays;
    relaunched as it was, it resumes its own run, and its earlier error.txt no longer marks it failed."""
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sweep"
    base = ["-m", *run.overrides, "trainer.epochs=1", f"hydra.sweep.dir={sweep}"]
    assert hydra_main(train_module, [*base, "optimizer.lr=1e-3"], monkeypatch) == 0
    last = (sweep / "0" / "checkpoints" / "last.pt").read_bytes()
    assert hydra_main(train_module, [*base, "optimizer.lr=2e-3"], monkeypatch) == 0  # the sweep goes on
    error = (sweep / "0" / "error.txt").read_text()
    assert error.startswith(f"sweep job {sweep / '0'} holds an earlier job whose optimizer.lr is 0.001")
    assert (sweep / "0" / "checkpoints" / "last.pt").read_bytes() == last
    assert "failed" in (sweep / "summary.csv").read_text()
    assert hydra_main(train_module, [*base, "optimizer.lr=1e-3"], monkeypatch) == 0
    assert not (sweep / "0" / "error.txt").exists()
    assert "resuming from" in (sweep / "0" / "train.log").read_text()
    assert ",ok," in (sweep / "summary.csv").read_text()


# ---- a resume goes on with its own run --------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, difference",
    [
        ("freeze=all", r"freeze.trainable is \[\] here but None"),
        (
            "scheduler=plateau",
            r"scheduler._target_ is torch.optim.lr_scheduler.ReduceLROnPlateau here but "
            r"balatro_train.optim.warmup_cosine",
        ),
        ("optimizer=group", r"optimizer.lr_backbone is 1e-05 here but \(not set\)"),
        ("optimizer.lr=1e-2", r"optimizer.lr is 0.01 here but 0.003"),
        # trainer.epochs may change, but the default schedule's length follows it: the restored one would not
        (
            "trainer.epochs=5",
            r"scheduler.epochs is 5 here but 3 in the run it resumes \(it follows \$\{trainer.epochs\}\)",
        ),
    ],
)
def test_resume_with_other_settings_names_the_key_before_loading_any_state(run, tmp_path, change, difference):
    last = run.checkpoints / "last.pt"
    with pytest.raises(UserError, match=rf"^resume={last}: {difference}.*; a resume goes on .* init_from={last}$"):
        train(compose([*run.overrides, change, f"resume={last}"]), tmp_path / "resumed")


def test_resume_keeps_its_split_and_says_how_many_new_images_it_leaves_out(run, tmp_path, caplog):
    labelled = tmp_path / "labelled"
    shutil.copytree(run.work / "labelled", labelled)
    labels = json.loads(run.labels_file.read_text())
    for file, meta in list(labels.items())[:6]:  # labelled since the checkpoint: two more of three cards
        shutil.copy(labelled / "dataset_default" / file, labelled / "dataset_default" / f"new_{file}")
        labels[f"new_{file}"] = {**meta, "full_path": f"dataset_default/new_{file}"}
    (labelled / "dataset_default" / "labels.json").write_text(json.dumps(labels))
    moved = [f"dataset.labels_file={labelled / 'dataset_default' / 'labels.json'}", f"dataset.root={labelled}"]
    saved = json.loads((run.dir / "split.json").read_text())
    assert build_data(compose([*run.overrides, *moved])).split != saved  # drawn again, the split would differ

    train(compose([*run.overrides, *moved, f"resume={run.checkpoints / 'epoch_002.pt'}"]), tmp_path / "resumed")
    assert json.loads((tmp_path / "resumed" / "split.json").read_text()) == saved
    assert "6 images labelled since this run's split (e.g. 'new_" in caplog.text and "init_from=" in caplog.text


def test_a_damaged_best_checkpoint_beside_a_good_last_one_does_not_stop_the_resume(run, tmp_path, caplog):
    folder = tmp_path / "earlier" / "checkpoints"
    folder.mkdir(parents=True)
    os.link(run.checkpoints / "epoch_002.pt", folder / "last.pt")
    (folder / "best.pt").write_bytes(b"half a file")
    train(compose([*run.overrides, f"resume={folder / 'last.pt'}"]), tmp_path / "resumed")
    assert [row["epoch"] for row in read_metrics(tmp_path / "resumed")] == [1, 2, 3]
    assert f"{folder / 'best.pt'}, beside {folder / 'last.pt'}, is damaged" in caplog.text


def test_the_scheduler_steps_once_per_epoch(run):
    cfg = compose(run.overrides)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optimizer.lr)
    scheduler = instantiate(cfg.scheduler)(optimizer)
    expected = []
    for _ in range(cfg.trainer.epochs):
        expected.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    assert len(set(expected)) == 3  # warmup then cosine: every epoch has its own rate
    assert [row["lr"] for row in read_metrics(run.dir)] == pytest.approx(expected, rel=1e-9)


# ---- where a run writes ------------------------------------------------------------------------------------


def test_publish_to_is_checked_before_training(run, tmp_path, monkeypatch, capsys):
    (tmp_path / "models").mkdir()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="is a folder; give a file path"):
        check_publish_target(tmp_path / "models")
    with pytest.raises(UserError, match="a_file is a file, not a folder"):
        check_publish_target(tmp_path / "a_file" / "best.pt")
    check_publish_target(tmp_path / "new" / "folders" / "best.pt")  # made when publishing
    out = tmp_path / "run"
    args = [
        *[o for o in run.overrides if not o.startswith("publish_to")],
        f"publish_to={tmp_path / 'models'}",
        f"hydra.run.dir={out}",
    ]
    assert hydra_main(train_module, args, monkeypatch) == 2
    assert "is a folder" in "".join(capsys.readouterr()) and not (out / "metrics.jsonl").exists()


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """RLIMIT_FSIZE makes every write past 64 KiB fail as a full disk would (EFBIG rather than ENOSPC)."""
    path = tmp_path / "last.pt"
    save_checkpoint({"weights": torch.zeros(10)}, [path])
    before = path.read_bytes()
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limits[1]))
    try:
        with pytest.raises(UserError, match=rf"^{path}: could not be written \(.*\); the previous last.pt is intact"):
            save_checkpoint({"weights": torch.from_numpy(np.zeros(100_000, np.float32))}, [path])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
