"""A model option is one YAML file under conf/model: nothing in the code names a backbone, so every
tool rebuilds the model from the checkpoint's own config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision

from balatro_train.evaluate import evaluate
from balatro_train.export import export
from balatro_train.inference import Recognizer
from balatro_train.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_mobilenet_trains_predicts_evaluates_and_exports_from_its_yaml_alone(dataset, tiny_cfg, tmp_path):
    import onnxruntime as ort

    data, root = dataset
    train(tiny_cfg("model=mobilenet_v3_small", "trainer.epochs=1", "publish_to=null"), tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "best.pt"

    recognizer = Recognizer.from_checkpoint(checkpoint, device="cpu")
    assert isinstance(recognizer.model.backbone, torchvision.models.MobileNetV3)
    files = sorted((root / "dataset_default").glob("*.png"))
    images = np.stack([recognizer.preprocessing.load(f) for f in files])  # uint8 N x 32 x 32 x 3
    probs = recognizer.probabilities(images)

    report = evaluate(checkpoint, data["labels_file"], root, tmp_path / "evaluation", "cpu")
    names = recognizer.class_names["identification"]
    labels = json.loads(data["labels_file"].read_text())
    truth = torch.tensor([names.index(labels[f.name]["name"]) for f in files])
    right = (probs["identification"].argmax(dim=1) == truth).float().mean().item()
    assert report["num_images"] == 16 and report["tasks"]["identification"]["top1_acc"] == pytest.approx(right)

    onnx_file = export(checkpoint, "onnx", tmp_path / "mobilenet.onnx")
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"images": images})  # the same uint8 images, nothing else to do
    with torch.inference_mode():
        expected = recognizer.model(torch.from_numpy(images))
    for task, got in zip(recognizer.class_names, outputs, strict=True):
        assert np.abs(got - expected[task].numpy()).max() < 1e-4
        assert np.allclose(torch.from_numpy(got).softmax(dim=1).numpy(), probs[task].numpy(), atol=1e-5)
