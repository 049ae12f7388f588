"""Predict, evaluate and export on one tiny trained model, through the command lines as a user runs them
(their Hydra entry points, run in this process: test_outputs.py runs a real `export` command line)."""

from __future__ import annotations

import io
import json
import warnings
from contextlib import redirect_stdout
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import compose, hydra_main, made_once, run_main, tiny_overrides, write_dataset
from omegaconf import OmegaConf
from PIL import Image

import balatro_train.enroll as enroll_main
import balatro_train.evaluate as evaluate_main
import balatro_train.export as export_main
import balatro_train.predict as predict_main
from balatro_train.checkpoint import load_checkpoint
from balatro_train.errors import UserError
from balatro_train.evaluate import evaluate, misclassified_grid
from balatro_train.export import export
from balatro_train.image_files import find_images
from balatro_train.inference import Recognizer
from balatro_train.predict import predict
from balatro_train.preprocessing import load_image
from balatro_train.train import train

TASKS = ("identification", "modifier")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # in-process training and inference: one thread a worker


CONFIDENT = [
    "scheduler=cosine",
    "optimizer.weight_decay=0",
    "tasks.identification.label_smoothing=0",
    "tasks.modifier.label_smoothing=0",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny model (32 px, 2 epochs) and the predict CLI's output on its images, shared by every test
    here. Under pytest-xdist the first worker makes them and the others wait for it and reuse them. Trained
    in-process; the predict command line's entry point runs in this process too, its stdout captured."""

    def make(work):
        data = write_dataset(work / "labelled")
        # Sure enough of its answers after two epochs for labels to pass predict's threshold of 0.3:
        # no warmup, no label smoothing, no weight decay (AdamW is then Adam).
        train(
            compose([*tiny_overrides(data, work / "labelled"), "trainer.epochs=2", "publish_to=null", *CONFIDENT]),
            work / "run",
        )
        # logging goes to stderr, so stdout is pure JSON; threshold=0.3 only filters "labels"
        with pytest.MonkeyPatch.context() as patch, redirect_stdout(io.StringIO()) as stdout:
            patch.chdir(work)
            args = [
                f"checkpoint={work / 'run'}",
                f"images={work / 'labelled/dataset_default'}",
                "topk=3",
                "threshold=0.3",
            ]
            code = hydra_main(predict_main, args, patch)
        assert code == 0
        (work / "predictions.json").write_text(stdout.getvalue())

    work = made_once(tmp_path_factory, "inference_model", make)
    run = work / "run"
    state = load_checkpoint(run / "checkpoints" / "best.pt")
    root = work / "labelled"
    return SimpleNamespace(
        work=work,
        root=root,
        labels_file=root / "dataset_default" / "labels.json",
        run=run,
        checkpoint=run / "checkpoints" / "best.pt",
        class_names=state.class_names,
        images=root / "dataset_default",
        predictions=json.loads((work / "predictions.json").read_text()),
    )


def test_predict_cli_prints_the_annotation_tool_shape(trained):
    assert set(trained.predictions) == {p.name for p in trained.images.glob("*.png")}
    for entry in trained.predictions.values():
        assert set(entry) == {"raw", "labels"} and set(entry["raw"]) == set(entry["labels"]) == set(TASKS)
        for task, names in trained.class_names.items():
            raw = entry["raw"][task]
            assert len(raw["indices"]) == len(raw["probs"]) == min(3, len(names))
            assert raw["probs"] == sorted(raw["probs"], reverse=True)
            assert sum(raw["probs"]) <= 1 + 1e-5 and all(0 <= p <= 1 for p in raw["probs"])
            # threshold=0.3 drops labels, never raw entries
            kept = [(names[i], p) for i, p in zip(raw["indices"], raw["probs"], strict=True) if p >= 0.3]
            assert [(x["label"], x["probability"]) for x in entry["labels"][task]] == kept
        assert entry["raw"]["identification"]["probs"][0] > 0.3  # 4 classes: the best has at least 1/4
        assert entry["labels"]["identification"][0]["label"] in trained.class_names["identification"]


def test_predict_writes_out_file_and_keeps_low_labels_without_threshold(trained, tmp_path):
    out = tmp_path / "sub" / "predictions.json"
    cfg = OmegaConf.create(
        {
            "checkpoint": str(trained.checkpoint),
            "images": str(trained.images / "*_1.png"),
            "topk": 10,
            "threshold": None,
            "out": str(out),
            "device": "cpu",
            "batch_size": 3,
        }
    )
    predict(cfg)
    written = json.loads(out.read_text())
    assert sorted(written) == sorted(p.name for p in trained.images.glob("*_1.png"))
    for entry in written.values():
        for task, names in trained.class_names.items():
            assert len(entry["labels"][task]) == len(names)  # topk capped at the number of classes
            assert sum(x["probability"] for x in entry["labels"][task]) == pytest.approx(1.0, abs=1e-5)


def test_python_api_matches_the_cli_on_pil_rgba_and_batches(trained):
    recognizer = Recognizer.from_checkpoint(trained.run, device="cpu")
    file = "The_Fool_1.png"
    pil = Image.open(trained.images / file)
    rgba = np.asarray(pil.convert("RGBA"))
    other = Image.open(trained.images / "Mercury_0.png")
    expected = trained.predictions[file]["raw"]
    for result in (recognizer.predict(pil), recognizer.predict(rgba), *recognizer.predict([pil, rgba, other])[:2]):
        assert set(result) == set(TASKS)
        for task, names in trained.class_names.items():
            assert len(result[task]) == min(3, len(names))
            assert result[task][0][0] == names[expected[task]["indices"][0]]
            assert [p for _, p in result[task]] == pytest.approx(expected[task]["probs"], abs=1e-5)
    batch = recognizer.predict([pil, rgba, other], topk=1)
    assert len(batch) == 3 and all(len(r["modifier"]) == 1 for r in batch)
    with pytest.raises(ValueError, match="HxWx3"):
        recognizer.predict(np.zeros((8, 8), np.uint8))


def test_transparent_numpy_images_are_flattened_like_training_files(trained, tmp_path):
    recognizer = Recognizer.from_checkpoint(trained.checkpoint, device="cpu")
    rgba = np.random.default_rng(0).integers(0, 256, (40, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "card.png")
    from_file = load_image(tmp_path / "card.png", recognizer.image_size, recognizer.preprocessing.background)
    assert np.array_equal(recognizer.prepare(rgba), from_file)


def test_evaluate_writes_report_metrics_and_figures(trained, tmp_path, monkeypatch, capsys):
    out = trained.work / "evaluation"
    monkeypatch.chdir(tmp_path)
    args = [
        f"checkpoint={trained.checkpoint}",
        f"dataset.labels_file={trained.labels_file}",
        f"dataset.root={trained.root}",
        f"out_dir={out}",
    ]
    evaluated = run_main(evaluate_main, args, monkeypatch, capsys)
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 16  # every original, no augmented copy
    for task in TASKS:
        scores = metrics["tasks"][task]
        assert {"top1_acc", "top3_acc", "precision", "recall", "f1"} <= set(scores)
        assert all(0.0 <= v <= 1.0 for v in scores.values())
        for name in (f"confusion_{task}.png", f"misclassified_{task}.png"):
            with Image.open(out / name) as image:
                assert image.width > 50 and image.height > 50
    report = (out / "report.md").read_text()
    assert "## identification" in report and "confusion_modifier.png" in report
    split, near = load_checkpoint(trained.checkpoint).split, metrics["near_duplicates"]
    originals = [f for f in split["train"] if f in json.loads(trained.labels_file.read_text())]  # not augmented
    assert near["training_images_evaluated"] == len(originals)  # its own training screenshots, told apart
    assert near["images_not_in_training"] == 16 - len(originals) and "near-duplicate among them" in report


def test_evaluate_counts_a_recapture_of_a_training_screenshot_as_a_near_copy(trained, tmp_path):
    labels = json.loads(trained.labels_file.read_text())
    first = load_checkpoint(trained.checkpoint).split["train"][0]
    with Image.open(trained.images / first) as image:  # the same scene captured again, at another size
        image.convert("RGB").resize((image.width * 3 // 2, image.height * 3 // 2)).save(tmp_path / "recapture.png")
    (tmp_path / "labels.json").write_text(json.dumps({"recapture.png": labels[first]}))
    report = evaluate(trained.checkpoint, tmp_path / "labels.json", tmp_path, tmp_path / "out", device="cpu")
    near = report["near_duplicates"]
    assert (near["training_images_evaluated"], near["images_not_in_training"], near["share_with"]) == (0, 1, 1.0)
    assert near["images_without"] == 0
    far = evaluate(trained.checkpoint, tmp_path / "labels.json", tmp_path, tmp_path / "out0", "cpu", 64, 32, 0)
    assert far["near_duplicates"]["max_distance"] == 0  # the key reaches the figure
    with pytest.raises(UserError, match="near_duplicate_distance=65 must be a number of bits from 0 to 64"):
        evaluate(trained.checkpoint, tmp_path / "labels.json", tmp_path, tmp_path / "out1", "cpu", 64, 32, 65)


def test_evaluate_names_classes_the_checkpoint_does_not_know(trained, tmp_path):
    labels = json.loads(trained.labels_file.read_text())
    labels[next(iter(labels))]["name"] = "Planet X"
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    with pytest.raises(UserError, match="does not know: Planet X"):
        evaluate(trained.checkpoint, tmp_path / "labels.json", trained.root, tmp_path / "out", device="cpu")


def test_misclassified_grid_draws_only_the_mistakes():
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    grid = misclassified_grid(images, list("abcde"), list("axcyz"), max_images=2)
    one = misclassified_grid(images[:2], ["a", "b"], ["a", "x"])
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    assert grid.shape[1] == 2 * one.shape[1] and grid.shape[0] == one.shape[0]  # 2 of the 3 mistakes, one row
    empty = misclassified_grid(images, list("abcde"), list("abcde"))
    assert empty.shape[2] == 3 and empty.size > 0


def reference_logits(trained, images: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return load_checkpoint(trained.checkpoint).model()(images)


def uint8_images(batch: int) -> torch.Tensor:
    """A batch as the exported model takes it: N x 32 x 32 x 3 uint8 RGB."""
    return torch.randint(0, 256, (batch, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(batch))


def test_onnx_export_matches_pytorch_for_a_dynamic_batch(trained, tmp_path, monkeypatch, capsys):
    import onnx
    import onnxruntime as ort

    out = trained.work / "export" / "cards.onnx"
    monkeypatch.chdir(tmp_path)
    exported = run_main(export_main, [f"checkpoint={trained.run}", "format=onnx", f"out={out}"], monkeypatch, capsys)
    assert exported.returncode == 0, exported.stderr
    sidecar = json.loads((out.with_suffix(".json")).read_text())
    assert sidecar["class_names"] == trained.class_names and sidecar["preprocessing"]["image_size"] == 32
    assert sidecar["preprocessing"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["class_names"]) == trained.class_names
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(trained.class_names)
    assert session.get_inputs()[0].type == "tensor(uint8)"  # the images as stored: the model normalises
    for batch in (1, 5):
        images = uint8_images(batch)
        outputs = session.run(None, {"images": images.numpy()})
        expected = reference_logits(trained, images)
        for task, got in zip(trained.class_names, outputs, strict=True):
            assert got.shape == (batch, len(trained.class_names[task]))
            assert np.abs(got - expected[task].numpy()).max() < 1e-4


def test_torchscript_export_loads_and_matches(trained):
    out = export(trained.checkpoint, "torchscript")  # the function: the ONNX test covers the command line's main
    assert out == trained.checkpoint.with_name("best.torchscript.pt")  # the default: next to the checkpoint
    extra = {"balatro_train.json": ""}
    with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; loading still works
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["balatro_train.json"])["class_names"] == trained.class_names
    for batch in (1, 5):
        images = uint8_images(batch)
        with torch.inference_mode():
            got = scripted(images)
        for task, logits in reference_logits(trained, images).items():
            assert (got[task] - logits).abs().max() < 1e-4


def test_missing_checkpoint_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    result = run_main(predict_main, [f"checkpoint={tmp_path / 'nope.pt'}", "images=x.png"], monkeypatch, capsys)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert f"checkpoint={tmp_path / 'nope.pt'}: no such checkpoint file" in line and "Traceback" not in line
    assert result.stdout == "" and not (tmp_path / "outputs").exists()  # no run folder either
    # evaluate and export report it the same way (their mains catch UserError as predict's does)
    for run in (
        lambda: evaluate(tmp_path / "nope.pt", tmp_path / "labels.json"),
        lambda: export(tmp_path / "nope.pt", "onnx"),
    ):
        with pytest.raises(UserError, match="no such checkpoint file"):
            run()


def test_enrolling_into_a_checkpoint_without_an_embedding_head_is_one_line_naming_it(
    trained, tmp_path, monkeypatch, capsys
):
    """A linear head has no prototypes to add a card to: the CLI says so before reading any screenshot."""
    monkeypatch.chdir(tmp_path)
    result = run_main(
        enroll_main,
        [
            f"checkpoint={trained.checkpoint}",
            f"images={tmp_path / 'not_read.png'}",
            "name=Mercury",
            f"out={tmp_path / 'never.pt'}",
        ],
        monkeypatch,
        capsys,
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert f"checkpoint={trained.checkpoint}: none of its tasks has an embedding head" in line
    assert "tasks.identification.head=cosine" in line and not (tmp_path / "never.pt").exists()


def test_export_refuses_an_unknown_format(tmp_path):
    with pytest.raises(UserError, match="format=tflite is not supported: use format=onnx or format=torchscript"):
        export(tmp_path / "any.pt", "tflite")


def test_no_image_matched_names_the_key(tmp_path):
    with pytest.raises(UserError, match=r"images=.*\*\.png: no image matched"):
        find_images(f"{tmp_path}/*.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="the folder holds no image"):
        find_images(tmp_path)


def test_evaluate_leaves_near_duplicates_out_where_the_training_set_is_gone(trained, tmp_path):
    """A checkpoint evaluated on another machine: its training labels file is not there. The report is written
    without the section, never a traceback."""
    import copy
    import dataclasses

    state = load_checkpoint(trained.checkpoint)
    config = copy.deepcopy(state.config)
    config["dataset"]["labels_file"] = str(tmp_path / "gone" / "labels.json")
    dataclasses.replace(state, config=config).save([tmp_path / "moved.pt"])
    report = evaluate(tmp_path / "moved.pt", trained.labels_file, trained.root, tmp_path / "out", device="cpu")
    assert report["near_duplicates"] is None and report["tasks"]["identification"]["top1_acc"] >= 0
