"""benchmark=quality: the same recipe on several seeded splits, and the report at the sweep's root."""

from __future__ import annotations

import json
import statistics

import pytest
from conftest import run_cli, tiny_overrides

from balatro_train.quality import write_report


def test_the_quality_benchmark_reports_every_seed_and_their_mean(dataset, tmp_path):
    data, root = dataset
    run_cli(
        [
            "-m",
            "benchmark=quality",
            "seed=range(2)",
            *tiny_overrides(data, root),
            "trainer.epochs=1",
            "hydra.sweep.dir=outputs/quality",
        ],
        cwd=tmp_path,
    )
    sweep = tmp_path / "outputs" / "quality"
    report = json.loads((sweep / "quality.json").read_text())
    assert report["seeds"] == [0, 1] and report["wall_seconds"] > 0
    labels = json.loads(data["labels_file"].read_text())

    for job, seed_result in zip(("0", "1"), report["per_seed"], strict=True):
        predictions = json.loads((sweep / job / "val_predictions.json").read_text())
        split = json.loads((sweep / job / "split.json").read_text())
        assert list(predictions) == split["val"]  # the best epoch's answer for every validation image
        for task in ("identification", "modifier"):
            right = [p[task]["true"] == p[task]["pred"] for p in predictions.values()]
            assert seed_result["top1"][task] == pytest.approx(sum(right) / len(right))
            assert all(
                p[task]["true"] == labels[f]["name" if task == "identification" else "modifier"]
                for f, p in predictions.items()
            )
        # every card has 3 training originals here (4 originals, one validates): the 2-4 bucket
        assert set(seed_result["identification_by_training_count"]) == {"2-4"}
        assert set(seed_result["identification_by_edition"]) == {labels[f]["modifier"] for f in predictions}
        for edition, (recall, images) in seed_result["modifier_by_edition"].items():  # each edition's recall
            of_edition = [p["modifier"] for f, p in predictions.items() if labels[f]["modifier"] == edition]
            assert images == len(of_edition) and recall == pytest.approx(
                sum(p["pred"] == edition for p in of_edition) / len(of_edition)
            )
        assert sum(images for _, images in seed_result["modifier_by_edition"].values()) == len(predictions)

    top1 = report["tasks"]["identification"]["top1"]
    assert top1["values"] == [r["top1"]["identification"] for r in report["per_seed"]]
    assert top1["mean"] == pytest.approx(statistics.fmean(top1["values"]))
    assert top1["ci95"] >= 0 and "±" in (sweep / "quality.md").read_text()
    assert "## Modifier top-1 by edition" in (sweep / "quality.md").read_text()
    near = report["near_duplicates"]  # the figures themselves: tests/test_near_duplicates.py
    assert near["max_distance"] == 6 and set(near["top1_without"]) == {"identification", "modifier"}
    assert "near-duplicate among the training screenshots" in (sweep / "quality.md").read_text()
    assert write_report(sweep)["tasks"] == report["tasks"]  # by hand, from the folders alone
