"""format=original: the checkpoint the original ai-balatro pipeline (jcloix/ai-balatro, utils/inference_utils.py)
loads unchanged. Loaded here as it loads it, into a module with its key layout, on its preprocessing."""

from __future__ import annotations

import io
import json
import logging
from contextlib import redirect_stderr, redirect_stdout
from types import SimpleNamespace

import pytest
import torch
import torchvision
from conftest import compose, hydra_main, made_once, run_main, tiny_overrides, write_dataset
from PIL import Image
from torch import nn
from torchvision import transforms

import balatro_train.export as export_main
import balatro_train.predict as predict_main
from balatro_train.checkpoint import load_checkpoint
from balatro_train.export import export
from balatro_train.train import train

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
ORIGINAL_TRANSFORM = transforms.Compose(
    [
        transforms.Resize((224, 224)),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ]
)


def command(module, args: list[str]) -> tuple[str, str]:
    """`python -m <module> <args>` run in this process (its Hydra entry point); its stdout and stderr."""
    with (
        pytest.MonkeyPatch.context() as patch,
        redirect_stdout(io.StringIO()) as out,
        redirect_stderr(io.StringIO()) as err,
    ):
        code = hydra_main(module, args, patch)
    assert code == 0, err.getvalue()
    return out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_torch_thread):
    """A 1-epoch model at 224 px, the predict CLI's top-1 on its images, and its format=original export
    (trained in-process, the command lines' entry points run in this process); made once per session and
    shared by the xdist workers."""

    def make(work):
        data = write_dataset(work / "labelled")
        # The recipe this test was tuned with (no label smoothing, no weight decay: AdamW is then Adam):
        # two resize implementations agree to 1e-4 in probability on that model.
        train(
            compose(
                [
                    *tiny_overrides(data, work / "labelled"),
                    "data.image_size=224",
                    "trainer.epochs=1",
                    "publish_to=null",
                    "scheduler=cosine",
                    "optimizer.weight_decay=0",
                    "tasks.identification.label_smoothing=0",
                    "tasks.modifier.label_smoothing=0",
                ]
            ),
            work / "run",
        )
        predicted, _ = command(
            predict_main, [f"checkpoint={work / 'run'}", f"images={work / 'labelled' / 'dataset_default'}", "topk=1"]
        )
        (work / "predictions.json").write_text(predicted)
        _, exported = command(export_main, [f"checkpoint={work / 'run'}", "format=original"])
        (work / "export_stderr.txt").write_text(exported)

    work = made_once(tmp_path_factory, "original_model", make)
    run = work / "run"
    return SimpleNamespace(
        work=work,
        run=run,
        checkpoint=run / "checkpoints" / "best.pt",
        images=work / "labelled" / "dataset_default",
        predictions=json.loads((work / "predictions.json").read_text()),
        export_stderr=(work / "export_stderr.txt").read_text(),
    )


def test_their_loader_reads_it_and_agrees_with_predict_on_every_image(trained):
    path = trained.checkpoint.with_name("best_model.pth")  # the default out: next to the checkpoint
    assert "WARNING" not in trained.export_stderr  # trained at 224 px with ImageNet normalisation: nothing to warn
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # torch >= 2.6's default for torch.load
    assert set(checkpoint) == {"model", "head_states"}
    class_names = {task: head["class_names"] for task, head in checkpoint["head_states"].items()}
    assert class_names == load_checkpoint(trained.checkpoint).class_names and tuple(class_names) == TASKS
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


def test_another_backbone_is_refused_in_one_line_with_exit_2(trained, tmp_path, monkeypatch, capsys):
    state = torch.load(trained.checkpoint, weights_only=True)
    state["config"]["model"]["backbone"] = "mobilenet_v3_small"
    torch.save(state, tmp_path / "mobilenet.pt")
    monkeypatch.chdir(tmp_path)
    result = run_main(export_main, [f"checkpoint={tmp_path / 'mobilenet.pt'}", "format=original"], monkeypatch, capsys)
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert "format=original needs a resnet18 model, this one is mobilenet_v3_small" in line
    assert "Traceback" not in result.stderr and not (tmp_path / "best_model.pth").exists()


def test_a_model_trained_at_another_size_is_exported_with_a_warning(trained, tmp_path, caplog):
    state = torch.load(trained.checkpoint, weights_only=True)
    state["preprocessing"]["image_size"] = 64
    torch.save(state, tmp_path / "small.pt")
    with caplog.at_level(logging.WARNING, logger="balatro_train.export"):
        out = export(tmp_path / "small.pt", "original", tmp_path / "models" / "best_model.pth")
    assert out == tmp_path / "models" / "best_model.pth" and out.is_file()
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "trained at 64 px" in warning and "resizes every image to 224x224" in warning
