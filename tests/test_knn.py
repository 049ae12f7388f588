"""The no-training baseline (python -m balatro_train.knn): its two rules on hand-made embeddings, and the
command on the tiny set with EfficientNet-Lite0's packaged ImageNet weights and with a trained checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import compose, tiny_overrides, write_dataset

from balatro_train.knn import centred_units, classify, main
from balatro_train.train import train


def test_nearest_takes_the_closest_screenshot_and_class_mean_the_closest_mean():
    # class 0: two screenshots far apart, class 1: one; the query sits next to class 0's outlier,
    # but nearer to class 1's screenshot than to class 0's mean direction
    train = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), dim=1)
    known = torch.tensor([0, 0, 1])
    query = F.normalize(torch.tensor([[0.1, 1.0]]), dim=1)
    assert classify(query, train, known, 2, "nearest").tolist() == [0]
    assert classify(query, train, known, 2, "class_mean").tolist() == [1]


def test_embeddings_are_centred_by_the_training_mean_before_the_cosine():
    """A large part common to every embedding (pooled features are all positive) would decide every cosine:
    here the query's raw nearest neighbour is the wrong card, and after centring the right one."""
    train = torch.tensor([[11.0, 9.0], [9.0, 11.0], [20.0, 20.0]])  # cards 0 and 1 either side, card 2 far out
    query = torch.tensor([[10.2, 9.8]])  # card 0's side; by its raw direction, card 2's
    known = torch.tensor([0, 1, 2])
    assert classify(F.normalize(query, dim=1), F.normalize(train, dim=1), known, 3, "nearest").tolist() == [2]
    centred_train, centred_query = centred_units(train, query)
    assert torch.allclose(centred_train.norm(dim=1), torch.ones(3))
    assert classify(centred_query, centred_train, known, 3, "nearest").tolist() == [0]


@pytest.mark.parametrize("with_checkpoint", [False, True], ids=["pretrained", "checkpoint"])
def test_the_baseline_reports_every_task_rule_and_group_over_the_seeds(tmp_path, with_checkpoint):
    data = write_dataset(tmp_path / "labelled")
    overrides = [*tiny_overrides(data, tmp_path / "labelled"), "model=efficientnet_lite0"]
    args = ["--seeds", "0", "1", "--out", str(tmp_path / "knn")]
    if with_checkpoint:
        train(compose([*overrides, "trainer.epochs=1", "publish_to=null"]), tmp_path / "run")
        args += ["--checkpoint", str(tmp_path / "run" / "checkpoints" / "best.pt")]
    report = main([*args, *overrides])
    assert json.loads(json.dumps(report)) == json.loads((tmp_path / "knn" / "knn.json").read_text())
    assert report["seeds"] == [0, 1] and report["image_size"] == 32
    assert report["embedding"].startswith("the backbone of" if with_checkpoint else "timm/tf_efficientnet_lite0, ")
    for rule in ("nearest", "class_mean"):
        figures = report["rules"][rule]
        assert set(figures["top1"]) == {"identification", "modifier"}
        assert all(0.0 <= v <= 1.0 for v in figures["top1"]["identification"]["values"])
        assert len(figures["top1"]["modifier"]["values"]) == 2
        assert set(figures["identification_by_edition"]) <= {"Base", "Foil", "Negative"}
    assert "| class_mean |" in (tmp_path / "knn" / "knn.md").read_text()


def test_an_out_that_is_a_file_is_refused_in_one_line_before_any_work(tmp_path, caplog):
    (tmp_path / "report").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path / "report"), "dataset.labels_file=never/read.json"])
    assert exit_.value.code == 2 and (tmp_path / "report").read_text() == "not a folder"
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"--out={tmp_path / 'report'} is a file; give a folder for knn.md and knn.json"
    ]
