"""What predict, export and enroll write (balatro_train/outputs.py): never over one of their inputs, over
another existing file only with overwrite=true, and atomically. In-process on one tiny trained model
(test_openset's cosine-head model, so that enroll takes it too), each test on its own copy of the checkpoint;
the command line once, for the documented `export ... benchmark=true` (its one-line refusal in-process)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import hydra
import onnx
import pytest
from conftest import cosine_model_folder, run_cli, run_main

import balatro_train.export as export_main
from balatro_train.checkpoint import load_checkpoint
from balatro_train.config import CONFIG_DIR
from balatro_train.enroll import enroll_checkpoint
from balatro_train.errors import UserError
from balatro_train.export import export
from balatro_train.predict import predict

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A 32 px model with a cosine identification head, and its labelled screenshots (labelled/cards/, every
    card's): test_openset's, made once per session and shared (conftest.cosine_model_folder)."""
    work = cosine_model_folder(tmp_path_factory)
    images = work / "labelled" / "cards"
    return SimpleNamespace(
        checkpoint=work / "run" / "checkpoints" / "best.pt",
        images=images,
        labels_file=images / "labels.json",
        root=work / "labelled",
    )


@pytest.fixture
def checkpoint(model, tmp_path) -> Path:
    """This test's copy of the checkpoint, in a run folder's layout: what it writes beside it stays here."""
    copy = tmp_path / "run" / "checkpoints" / "best.pt"
    copy.parent.mkdir(parents=True)
    shutil.copyfile(model.checkpoint, copy)
    return copy


@pytest.fixture
def screenshots(model, tmp_path) -> Path:
    """A copy of the labelled screenshots and their labels.json (full_path relative to tmp_path), for tests
    that aim out= at one of them."""
    return Path(shutil.copytree(model.images, tmp_path / model.images.name))


def config(tool: str, **keys) -> object:
    """conf/<tool>.yaml composed as `python -m balatro_train.<tool> key=value ...` composes it."""
    with hydra.initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra.compose(tool, overrides=[f"{key}={value}" for key, value in keys.items()])


def unchanged(path: Path):
    """A check that `path` still holds what it holds now."""
    before = path.read_bytes()
    return lambda: path.read_bytes() == before


# ---- predict --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", ["false", "true"])
def test_predict_never_writes_over_the_checkpoint_it_reads(checkpoint, model, overwrite):
    kept = unchanged(checkpoint)
    cfg = config(
        "predict",
        checkpoint=checkpoint,
        images=model.images / "Mercury_0.png",
        out=checkpoint,
        overwrite=overwrite,
        device="cpu",
    )
    with pytest.raises(
        UserError,
        match=r"out=.*best\.pt is the checkpoint it reads .*outputs never replace inputs, "
        r"not even with overwrite=true; give another out=",
    ):
        predict(cfg)
    assert kept()
    load_checkpoint(checkpoint, "checkpoint")  # still a checkpoint, not 371 bytes of JSON


def test_predict_never_writes_over_one_of_its_images(checkpoint, screenshots):
    image = screenshots / "The_Fool_2.png"
    kept = unchanged(image)
    cfg = config("predict", checkpoint=checkpoint, images=screenshots, out=image, overwrite="true", device="cpu")
    with pytest.raises(UserError, match=r"is the image .*The_Fool_2\.png it reads \(images="):
        predict(cfg)
    assert kept()


def test_predict_replaces_an_existing_out_only_with_overwrite(checkpoint, model, tmp_path):
    out = tmp_path / "notes.json"
    out.write_text("my notes\n")
    kept = unchanged(out)
    keys = dict(checkpoint=checkpoint, images=model.images / "Mercury_0.png", out=out, device="cpu")
    with pytest.raises(UserError, match=r"out=.*notes\.json already exists; give another out=, or add overwrite=true"):
        predict(config("predict", **keys))
    assert kept()
    predict(config("predict", **keys, overwrite="true"))
    assert list(json.loads(out.read_text())) == ["Mercury_0.png"]


def test_predict_replaces_the_file_whole_rather_than_rewriting_it(checkpoint, model, tmp_path):
    """Written beside and renamed into place (as checkpoints are): a reader of the old file, here a hard
    link to it, keeps the old file whole instead of seeing it truncated and rewritten."""
    out, reader = tmp_path / "predictions.json", tmp_path / "reader.json"
    out.write_text("{}\n")
    os.link(out, reader)
    predict(
        config(
            "predict",
            checkpoint=checkpoint,
            images=model.images / "Mercury_0.png",
            out=out,
            overwrite="true",
            device="cpu",
        )
    )
    assert reader.read_text() == "{}\n" and "Mercury_0.png" in json.loads(out.read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.json", "reader.json", "run"]  # no temp file


# ---- export ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "original"])
def test_export_never_writes_over_the_checkpoint(checkpoint, fmt):
    kept = unchanged(checkpoint)
    with pytest.raises(UserError, match=r"out=.*best\.pt is the checkpoint it reads .*not even with overwrite=true"):
        export(checkpoint, fmt, checkpoint, overwrite=True)
    assert kept()


def test_export_never_writes_its_sidecar_over_the_checkpoint(checkpoint):
    """`<out without suffix>.json` is written too: out=model.onnx beside a checkpoint named model.json."""
    named_json = checkpoint.rename(checkpoint.with_name("model.json"))
    kept = unchanged(named_json)
    with pytest.raises(
        UserError,
        match=r"out=.*model\.onnx would write its sidecar .*model\.json, which is the "
        r"checkpoint it reads",
    ):
        export(named_json, "onnx", named_json.with_name("model.onnx"), overwrite=True)
    assert kept() and not named_json.with_name("model.onnx").exists()


def test_export_replaces_an_existing_sidecar_only_with_overwrite(checkpoint, screenshots):
    """The user's case: out=data/dataset_default/labels.onnx rewrote labels.json."""
    out, labels = screenshots / "labels.onnx", screenshots / "labels.json"
    kept = unchanged(labels)
    with pytest.raises(
        UserError,
        match=r"out=.*labels\.onnx would write its sidecar .*labels\.json, which already "
        r"exists; give another out=, or add overwrite=true",
    ):
        export(checkpoint, "onnx", out)
    assert kept() and not out.exists()  # refused before anything was written
    export(checkpoint, "onnx", out, overwrite=True)
    assert json.loads(labels.read_text())["format"] == "onnx" and out.is_file()


def test_a_second_export_to_the_default_out_needs_overwrite(checkpoint):
    first = export(checkpoint, "torchscript")
    assert first == checkpoint.with_name("best.torchscript.pt")
    kept = unchanged(first)
    with pytest.raises(
        UserError,
        match=r"out=.*best\.torchscript\.pt \(the default, beside the checkpoint\) "
        r"already exists; give another out=, or add overwrite=true",
    ):
        export(checkpoint, "torchscript")
    assert kept()
    assert export(checkpoint, "torchscript", overwrite=True) == first


def test_format_original_replaces_an_existing_file_only_with_overwrite(checkpoint, tmp_path):
    """The same guard as the other formats (format=original used to check only out == checkpoint)."""
    out = tmp_path / "best_model.pth"
    out.write_bytes(b"an older export")
    kept = unchanged(out)
    with pytest.raises(UserError, match=r"out=.*best_model\.pth already exists; give another out=, or add overwrite="):
        export(checkpoint, "original", out)
    assert kept()


def test_export_replaces_the_model_and_its_sidecar_whole(checkpoint, tmp_path):
    out, readers = tmp_path / "cards.onnx", [tmp_path / "old.onnx", tmp_path / "old.json"]
    for written, reader in zip([out, out.with_suffix(".json")], readers, strict=True):
        written.write_text("an earlier export\n")
        os.link(written, reader)
    export(checkpoint, "onnx", out, overwrite=True)
    assert [r.read_text() for r in readers] == ["an earlier export\n"] * 2  # renamed over, not rewritten
    onnx.checker.check_model(onnx.load(str(out)))
    assert json.loads(out.with_suffix(".json").read_text())["format"] == "onnx"


def test_the_readme_export_benchmark_command_runs_and_a_second_one_is_refused_in_one_line(
    checkpoint, tmp_path, monkeypatch, capsys
):
    """`python -m balatro_train.export checkpoint=<run> format=onnx benchmark=true`, as the README writes it:
    Hydra used to read benchmark=true as conf/benchmark/, a training config group, and stop. The command line
    itself the first time; the second, refused, runs its entry point in this process."""
    run = checkpoint.parents[1]
    args = [f"checkpoint={run}", "format=onnx", "benchmark=true"]
    timed = run_cli(args, cwd=tmp_path, module="balatro_train.export")
    assert "onnxruntime" in timed.stdout and "pytorch eager" in timed.stdout  # the table
    assert checkpoint.with_name("best.onnx").is_file()
    monkeypatch.chdir(tmp_path)
    again = run_main(export_main, args, monkeypatch, capsys)
    assert again.returncode == 2 and again.stdout == ""
    [line] = again.stderr.strip().splitlines()
    assert "best.onnx (the default, beside the checkpoint) already exists" in line and "overwrite=true" in line


# ---- enroll ---------------------------------------------------------------------------------------------


def enrolment(checkpoint: Path, screenshots: Path, image: str = "Mercury_0.png", **keys) -> object:
    return config("enroll", checkpoint=checkpoint, images=screenshots / image, name="Mercury", device="cpu", **keys)


def test_enroll_never_writes_over_the_checkpoint_it_reads_even_with_overwrite(checkpoint, screenshots):
    kept = unchanged(checkpoint)
    with pytest.raises(UserError, match=r"out=.*best\.pt is the checkpoint it reads .*not even with overwrite=true"):
        enroll_checkpoint(enrolment(checkpoint, screenshots, out=checkpoint, overwrite="true"))
    assert kept()


def test_enroll_never_writes_over_a_screenshot_or_the_labels_file(checkpoint, screenshots):
    image, labels = screenshots / "Mercury_0.png", screenshots / "labels.json"
    kept = [unchanged(image), unchanged(labels)]
    with pytest.raises(UserError, match=r"is the screenshot .*Mercury_0\.png it reads \(images="):
        enroll_checkpoint(enrolment(checkpoint, screenshots, out=image, overwrite="true"))
    with pytest.raises(UserError, match=r"is the labels file it reads \(labels="):
        enroll_checkpoint(
            config(
                "enroll",
                checkpoint=checkpoint,
                labels=labels,
                root=screenshots.parent,
                out=labels,
                overwrite="true",
                device="cpu",
            )
        )
    assert all(check() for check in kept)


def test_a_second_enrolment_to_the_default_out_needs_overwrite(checkpoint, screenshots):
    first = enroll_checkpoint(enrolment(checkpoint, screenshots))
    assert first == checkpoint.with_name("best_enrolled.pt")
    kept = unchanged(first)
    with pytest.raises(
        UserError,
        match=r"out=.*best_enrolled\.pt \(the default, beside the checkpoint\) already "
        r"exists; give another out=, or add overwrite=true",
    ):
        enroll_checkpoint(enrolment(checkpoint, screenshots, "Mercury_1.png"))
    assert kept()
    enroll_checkpoint(enrolment(checkpoint, screenshots, "Mercury_1.png", overwrite="true"))
    assert not kept() and load_checkpoint(first, "checkpoint").enrolled  # the second enrolment, whole
