"""format=original: the checkpoint the original ai-balatro pipeline (jcloix/ai-balatro, utils/inference_utils.py)
loads unchanged. Loaded here as it loads it, into a module with its key layout, on its preprocessing."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms

from balatro_train.checkpoint import load_checkpoint
from balatro_train.export import export
from conftest import run_cli, run_dirs, tiny_overrides, write_dataset

TASKS = ("identification", "modifier")


class OriginalLayout(nn.Module):
    """ai-balatro's MultiHeadModel as its load_model builds it: resnet18's children but fc, one Linear per head."""

    def __init__(self, head_configs: dict[str, int]):
        super().__init__()
        self.backbone = nn.Sequential(*list(torchvision.models.resnet18(weights=None).children())[:-1])
        self.heads = nn.ModuleDict({task: nn.Linear(512, n) for task, n in head_configs.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = torch.flatten(self.backbone(x), 1)
        return {task: head(features) for task, head in self.heads.items()}


# ai-balatro's preprocess_image: RGB, Resize((224, 224)) on the PIL image, ToTensor, ImageNet Normalize
ORIGINAL_TRANSFORM = transforms.Compose([
    transforms.Resize((224, 224)),
    transforms.ToTensor(),
    transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-epoch model at 224 px, the predict CLI's top-1 on its images, and its format=original export."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # the predict/export subprocesses (training sets its own)
        work = tmp_path_factory.mktemp("original")
        data = write_dataset(work / "labelled")
        # The recipe this test was tuned with (no label smoothing, no weight decay: AdamW is then Adam):
        # two resize implementations agree to 1e-4 in probability on that model.
        run_cli([*tiny_overrides(data, work / "labelled"), "data.image_size=224", "trainer.epochs=1",
                 "publish_to=null", "scheduler=cosine", "optimizer.weight_decay=0",
                 "tasks.identification.label_smoothing=0", "tasks.modifier.label_smoothing=0"], cwd=work)
        [run] = run_dirs(work)
        images = work / "labelled" / "dataset_default"
        predicted = run_cli([f"checkpoint={run}", f"images={images}", "topk=1"], cwd=work,
                            module="balatro_train.predict")
        exported = run_cli([f"checkpoint={run}", "format=original"], cwd=work, module="balatro_train.export")
        yield SimpleNamespace(work=work, run=run, checkpoint=run / "checkpoints" / "best.pt", images=images,
                              predictions=json.loads(predicted.stdout), export_stderr=exported.stderr)
    torch.set_num_threads(threads)


def test_their_loader_reads_it_and_agrees_with_predict_on_every_image(trained):
    path = trained.checkpoint.with_name("best_model.pth")  # the default out: next to the checkpoint
    assert "WARNING" not in trained.export_stderr  # trained at 224 px with ImageNet normalisation: nothing to warn
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # torch >= 2.6's default for torch.load
    assert set(checkpoint) == {"model", "head_states"}
    class_names = {task: head["class_names"] for task, head in checkpoint["head_states"].items()}
    assert class_names == load_checkpoint(trained.checkpoint)["class_names"] and tuple(class_names) == TASKS
    model = OriginalLayout({task: len(names) for task, names in class_names.items()})
    model.load_state_dict(checkpoint["model"])  # strict, as theirs
    model.eval()
    files = sorted(trained.images.glob("*.png"))
    assert len(files) == len(trained.predictions) == 16
    with torch.no_grad():
        outputs = model(torch.stack([ORIGINAL_TRANSFORM(Image.open(f).convert("RGB")) for f in files]))
    for task in TASKS:
        probs = outputs[task].softmax(dim=1)
        for n, file in enumerate(files):
            ours = trained.predictions[file.name]
            assert probs[n].argmax().item() == ours["raw"][task]["indices"][0], (file.name, task)
            assert class_names[task][probs[n].argmax()] == ours["labels"][task][0]["label"]
            assert probs[n].max().item() == pytest.approx(ours["raw"][task]["probs"][0], abs=1e-4)


def test_another_backbone_is_refused_in_one_line_with_exit_2(trained, tmp_path):
    state = load_checkpoint(trained.checkpoint)
    state["config"]["model"]["backbone"] = "mobilenet_v3_small"
    torch.save(state, tmp_path / "mobilenet.pt")
    result = run_cli([f"checkpoint={tmp_path / 'mobilenet.pt'}", "format=original"], cwd=tmp_path,
                     module="balatro_train.export", check=False)
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert "format=original needs a resnet18 model, this one is mobilenet_v3_small" in line
    assert "Traceback" not in result.stderr and not (tmp_path / "best_model.pth").exists()


def test_a_model_trained_at_another_size_is_exported_with_a_warning(trained, tmp_path, caplog):
    state = load_checkpoint(trained.checkpoint)
    state["preprocessing"]["image_size"] = 64
    torch.save(state, tmp_path / "small.pt")
    with caplog.at_level(logging.WARNING, logger="balatro_train.export"):
        out = export(tmp_path / "small.pt", "original", tmp_path / "models" / "best_model.pth")
    assert out == tmp_path / "models" / "best_model.pth" and out.is_file()
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "trained at 64 px" in warning and "resizes every image to 224x224" in warning
