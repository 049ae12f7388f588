"""`python -m balatro_train.bench`: it builds what the runner builds and reports what it measured.
No timing is asserted (speed figures belong in the README): only that each measure ran on the
configured settings, with the runner's own model, losses and loaders."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_overrides

from balatro_train.bench import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_bench_measures_the_configured_model_and_pipeline_and_writes_its_report(dataset, tmp_path, capsys):
    data, root = dataset
    out = tmp_path / "bench.json"
    report = main(["--steps", "2", "--out", str(out), *tiny_overrides(data, root), "trainer.ema_decay=0.9"])
    assert json.loads(out.read_text()) == report
    settings, rates = report["settings"], report["images_per_sec"]
    assert (settings["image_size"], settings["batch_size"], settings["precision"]) == (32, 8, "float32")
    assert settings["train_images"] > 0 and all(rate > 0 for rate in rates.values())
    assert report["ratios"]["runner_over_bare"] == pytest.approx(rates["runner"] / rates["bare_step"], rel=0.02)
    assert "runner / bare step" in capsys.readouterr().out
