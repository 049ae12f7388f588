"""Near-duplicates: a re-capture of one screenshot (rescaled, recompressed) is one, another card is not; the
quality report's top-1 without them counts exactly the validation images that have none."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from balatro_train.demo_cards import card_sprite, catalogue, screenshot
from balatro_train.errors import UserError
from balatro_train.labels import Sample
from balatro_train.near_duplicates import has_near_duplicate, nearest_distances, perceptual_hashes
from balatro_train.quality import QualityReport, near_duplicate_figures


def write_shots(tmp_path) -> dict:
    """card A twice from one capture (the second rescaled and through JPEG), A from another capture, and card B."""
    a, b = (card_sprite(c, 0, named=False) for c in catalogue()[:2])
    first = screenshot(a, "Base", np.random.default_rng(1), "collection")
    buffer = io.BytesIO()
    first.resize((160, 220)).save(buffer, format="JPEG", quality=60)
    images = {
        "a_capture.png": first,
        "a_recapture.png": Image.open(buffer),
        "a_other.png": screenshot(a, "Holographic", np.random.default_rng(2), "collection").rotate(8),
        "b.png": screenshot(b, "Base", np.random.default_rng(3), "collection"),
    }
    for name, image in images.items():
        image.save(tmp_path / name)
    return {name: tmp_path / name for name in images}


def test_a_recapture_is_a_near_duplicate_and_another_card_is_not(tmp_path):
    paths = write_shots(tmp_path)
    hashes = perceptual_hashes(paths.values())
    distances = nearest_distances(
        [hashes[paths["a_recapture.png"]], hashes[paths["b.png"]]], [hashes[paths["a_capture.png"]]]
    )
    assert distances[0] <= 6 < distances[1]
    assert has_near_duplicate([paths["a_recapture.png"], paths["b.png"]], [paths["a_capture.png"]], hashes, 6) == [
        True,
        False,
    ]
    assert has_near_duplicate([paths["b.png"]], [], hashes, 64) == [False]  # nothing to be a copy of


def test_the_report_scores_only_the_images_without_a_near_duplicate(tmp_path):
    paths = write_shots(tmp_path)
    samples = {name: Sample(name, path, {}) for name, path in paths.items()}
    wrong = {"identification": {"true": "A", "pred": "B"}}  # only the near-copy is right: memory, not skill
    right = {"identification": {"true": "A", "pred": "A"}}
    predictions = {"a_recapture.png": right, "a_other.png": wrong, "b.png": wrong}
    figures = near_duplicate_figures(predictions, ["a_capture.png"], samples, 6, None)
    assert figures["share_with"] == pytest.approx(1 / 3) and figures["images_without"] == 2
    assert figures["top1_without"] == {"identification": 0.0}
    alone = near_duplicate_figures({"b.png": wrong}, ["a_capture.png"], samples, 64, None)  # everything is near
    assert alone["share_with"] == 1.0 and math.isnan(alone["top1_without"]["identification"])


@pytest.mark.parametrize("bits", [-1, 65, 2.5])
def test_an_impossible_distance_is_refused_before_the_sweep(bits):
    """The benchmark's callback is built when the sweep starts: the sweep then stops before any job."""
    with pytest.raises(UserError, match=f"near_duplicate_distance={bits} must be a number of bits from 0 to 64"):
        QualityReport(near_duplicate_distance=bits)
    assert QualityReport(near_duplicate_distance=0).near_duplicate_distance == 0
